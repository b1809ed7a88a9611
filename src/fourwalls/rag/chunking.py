"""Documents to chunks: spans of at most a token budget, whole sections packed under one heading and page, long
sections cut into overlapping windows at sentence or word boundaries."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import tokenizers

from fourwalls.errors import UsageError
from fourwalls.rag.loaders import Document, Section


@dataclass
class Chunk:
    """A span of Document.text to embed and cite: ``text == doc.text[start:end]``."""

    text: str
    start: int
    end: int
    heading: str | None
    page: int | None


def counting_tokenizer(tokenizer: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """``tokenizer`` if it neither truncates nor pads, else such a copy of it (the caller's stays as it is)."""
    if tokenizer.truncation or tokenizer.padding:
        tokenizer = tokenizers.Tokenizer.from_str(tokenizer.to_str())
        tokenizer.no_truncation()
        tokenizer.no_padding()
    return tokenizer


def chunk(doc: Document, tokenizer: tokenizers.Tokenizer, max_tokens: int = 192, overlap: int = 32) -> list[Chunk]:
    """Spans of at most ``max_tokens`` tokens: whole sections packed under one heading and page, long ones windowed.

    A section over the budget is cut into windows sharing ``overlap`` tokens (a few more or fewer, to open at a
    word), each ending after a sentence in its last fifth where there is one, else at a word boundary. Pass
    ``counting_tokenizer(t)``, made once, to spare a copy of a tokenizer that truncates or pads on every call.
    """
    if max_tokens <= 0 or not 0 <= overlap < max_tokens:
        raise UsageError(f"chunking needs max_tokens > 0 and 0 <= overlap < max_tokens, not {max_tokens} and {overlap}")
    tokenizer = counting_tokenizer(tokenizer)
    encodings = tokenizer.encode_batch([s.text for s in doc.sections], add_special_tokens=False)
    chunks: list[Chunk] = []
    group: list[Section] = []
    count = 0

    def emit(start: int, end: int, s: Section) -> None:
        chunks.append(Chunk(doc.text[start:end], start, end, s.heading, s.page))

    def flush() -> None:
        if group:
            emit(group[0].start, group[-1].start + len(group[-1].text), group[0])
            group.clear()

    for s, enc in zip(doc.sections, encodings):
        n = len(enc)
        if group and (count + n > max_tokens or (s.heading, s.page) != (group[0].heading, group[0].page)):
            flush()
        if n <= max_tokens:
            group.append(s)
            count = n if len(group) == 1 else count + n
            continue
        offsets = enc.offsets  # each read of an Encoding's attribute builds a new list
        for a, b in _windows(s.text, offsets, enc.word_ids, max_tokens, overlap):
            start, end = offsets[a][0] if a else 0, offsets[b - 1][1] if b < n else len(s.text)
            emit(s.start + start, s.start + end, s)
    flush()
    return chunks


def _windows(
    text: str, offsets: list[tuple[int, int]], words: list[int | None], size: int, overlap: int
) -> Iterator[tuple[int, int]]:
    """Token ranges [a, b) of at most ``size`` tokens covering a section, consecutive ones sharing ``overlap``.

    Windows open and close at word starts where they can: a window cut inside a word would re-tokenize into
    more tokens than it was counted as.
    """
    n, a, fifth = len(offsets), 0, max(1, size // 5)
    while True:
        b = min(a + size, n)
        if b < n:  # after a sentence end in the last fifth, else at the nearest word start
            cut = None
            for k in range(b, a + overlap, -1):
                if words[k] == words[k - 1]:
                    continue
                cut = cut or k
                if k < b - fifth:
                    break
                if text[offsets[k - 1][1] - 1] in ".?!" and offsets[k][0] > offsets[k - 1][1]:
                    cut = k
                    break
            b = cut or b
        yield a, b
        if b == n:
            return
        # The next window opens at a word start: a little before b - overlap, else after it (b at worst: no
        # overlap), else mid-word.
        back = range(b - overlap, max(a, b - overlap - fifth), -1)
        a = next((k for k in (*back, *range(b - overlap + 1, b + 1)) if words[k] != words[k - 1]), b - overlap)
