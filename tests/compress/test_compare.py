"""`fourwalls compare`: one table of size, memory, speed and perplexity per model, written as Markdown, JSON, PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fourwalls.cli import main
from fourwalls.compress.quantize import quantize
from fourwalls.errors import NotFoundError, UsageError
from fourwalls.eval.compare import compare
from fourwalls.store import Store
from tests.conftest import tiny_model
from tests.test_tokenizer import byte_tokenizer

TEXT = Path(__file__).parent.parent / "fixtures" / "english.txt"


@pytest.fixture
def variants():
    store = Store()
    model = tiny_model("tiny-qwen2")
    store.add("tiny", model.config, model.state_dict(), byte_tokenizer())
    quantize("tiny", "int8", "tiny-int8", progress=False)
    quantize("tiny", "int4", "tiny-int4", group_size=32, progress=False)
    return ["tiny", "tiny-int8", "tiny-int4"]


def test_compare_measures_each_model_and_relates_it_to_the_first(variants, tmp_path):
    rows = compare(variants, TEXT, tmp_path / "report", decode_tokens=8, progress=False)
    assert [r["name"] for r in rows] == variants
    ref, int8, int4 = rows
    assert ref["perplexity_delta"] == 0 and ref["decode_ratio"] == 1
    assert int4["size_bytes"] < int8["size_bytes"] < ref["size_bytes"] / 3  # int4 packs two weights a byte
    assert ref["parameters"] == int8["parameters"] == int4["parameters"]
    assert [r["dtype"] for r in rows] == ["float32", "int8", "int4"]
    for r in rows:
        assert r["perplexity"] > 1 and r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0
        assert r["peak_rss_bytes"] > 50e6  # a whole process with torch loaded, measured in that process
    assert int8["perplexity"] != ref["perplexity"]
    assert int8["lineage"] == "quantize of tiny (scheme=int8)"
    assert int4["lineage_detail"]["parent_digest"] == Store().resolve("tiny").digest
    report = tmp_path / "report"
    assert json.loads((report / "compare.json").read_text())[1]["name"] == "tiny-int8"
    md = (report / "compare.md").read_text()
    assert "| tiny-int4 " in md and "perplexity" in md
    assert (report / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_bad_input_before_measuring(variants, tmp_path, capsys):
    with pytest.raises(NotFoundError):
        compare(["tiny", "missing"], TEXT, tmp_path / "r", progress=False)
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(UsageError, match="too short"):
        compare(["tiny"], short, tmp_path / "r", progress=False)
    with pytest.raises(UsageError, match="no such text"):
        compare(["tiny"], tmp_path / "nope.txt", tmp_path / "r", progress=False)
    assert not (tmp_path / "r").exists()
    assert main(["compare", "tiny", "--text", str(short)]) == 2
    assert "too short" in capsys.readouterr().err
