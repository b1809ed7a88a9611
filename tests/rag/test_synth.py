"""`fourwalls synth`: group scoping, capacity, filters, and a short run on the bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fourwalls.cli import main
from fourwalls.errors import ForbiddenError, NotFoundError, UsageError
from fourwalls.rag.embed import embedder
from fourwalls.rag.ingest import beir_items, ingest
from fourwalls.rag.stores.sqlite import SqliteStore
from fourwalls.rag.synth import (
    MIN_GROUNDING,
    clean_answer,
    clean_instruction,
    grounding,
    load_seed_tasks,
    readable_chunks,
    synthesize,
    usable_chunks,
)
from fourwalls.train.data import load_jsonl

CORPUS = Path(__file__).parent.parent / "fixtures" / "rag" / "corpus.jsonl"


@pytest.fixture(scope="module")
def emb():
    return embedder()


def _fill(store, emb, everyone: bool = True) -> dict[str, list[str]]:
    """Six documents readable by group eng, six by hr, three by everyone; returns the sources of each."""
    items = beir_items(CORPUS)
    split = {"eng": items[:6], "hr": items[6:12], "": items[12:15] if everyone else []}
    for group, batch in split.items():
        if batch:
            ingest(store, emb, batch, "hb", groups=[group] if group else [], progress=False)
    return {g: [i.source for i in batch] for g, batch in split.items()}


def test_a_group_reads_its_own_and_ungrouped_documents_only(store, emb):
    sources = _fill(store, emb)
    eng = {h.source for h in readable_chunks(store, "hb", {"eng"})}
    assert eng == set(sources["eng"] + sources[""])
    assert {h.source for h in readable_chunks(store, "hb", set())} == set(sources[""])
    assert {h.source for h in readable_chunks(store, "hb", None)} == {s for v in sources.values() for s in v}
    with pytest.raises(NotFoundError):
        readable_chunks(store, "nope", None)


def test_a_collection_the_caller_may_not_read_is_refused(store, emb):
    ingest(store, emb, beir_items(CORPUS)[:3], "secret", groups=["hr"], progress=False)
    with pytest.raises(ForbiddenError, match="may read no document of collection 'secret'"):
        readable_chunks(store, "secret", {"eng"})


def test_count_beyond_what_the_collection_supports_is_one_line(tmp_path, emb, capsys, monkeypatch):
    db = tmp_path / "rag.db"
    store = SqliteStore(db)
    _fill(store, emb)
    n = len(usable_chunks(store, "hb", {"eng"}, 1, 1))
    assert 0 < n <= 9
    with pytest.raises(UsageError, match=f"supports at most {2 * n} examples"):
        usable_chunks(store, "hb", {"eng"}, 2 * n + 1, 2)
    out = tmp_path / "out.jsonl"
    rc = main(["synth", "-c", "hb", "--count", "1000", "--out", str(out), "--group", "eng", "--store", str(db),
               "--model", "no-such-model"])  # refused before any model is loaded
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "supports at most" in err and not out.exists()
    rc = main(["synth", "-c", "hb", "--count", "1", "--out", str(out), "--store", str(db), "--api-keys",
               str(tmp_path / "keys.json")])
    assert rc == 2 and "FOURWALLS_API_KEY" in capsys.readouterr().err


def test_filters():
    assert clean_instruction("1. Question: What pressure does the NW-220 need?\nIt needs 4 to 6 bar.") == \
        "What pressure does the NW-220 need?"
    assert clean_instruction("Sure! Here is one:\n\n\"Explain how to vent the air line.\"") == \
        "Explain how to vent the air line."
    assert clean_instruction("What does the passage say about grippers?") is None  # leans on the source
    assert clean_instruction("The NW-240 is an electric gripper.") is None  # no question, no instruction
    assert clean_answer("It needs 4 to 6 bar of clean air [1].", "stop") == "It needs 4 to 6 bar of clean air."
    assert clean_answer("It needs 4 to 6 bar of", "length") is None  # cut off
    assert clean_answer("I don't know: the sources do not say.", "stop") is None
    source = "The NW-220 needs clean, dry air at 4 to 6 bar. Closing time is 0.12 s."
    assert grounding("It needs clean dry air at 4 to 6 bar.", source) == 1.0
    assert grounding("Grippers are made of titanium and sold in Peru.", source) < MIN_GROUNDING


def test_seed_tasks(tmp_path):
    jsonl = tmp_path / "seeds.jsonl"
    jsonl.write_text('{"instruction": "Who signs off holidays?"}\n{"instruction": "List the fire exits."}\n')
    assert load_seed_tasks(jsonl) == ["Who signs off holidays?", "List the fire exits."]
    text = tmp_path / "seeds.txt"
    text.write_text("Who signs off holidays?\n\n")
    assert load_seed_tasks(text) == ["Who signs off holidays?"]
    jsonl.write_text('{"task": "x"}\n')
    with pytest.raises(UsageError, match="seeds.jsonl:1"):
        load_seed_tasks(jsonl)


@pytest.mark.slow
def test_synth_on_the_bundled_model_cites_only_readable_sources(smol, tmp_path, emb):
    store = SqliteStore(tmp_path / "rag.db")
    sources = _fill(store, emb, everyone=False)  # the README's run: it kept one pair of two asked for
    out = tmp_path / "synth.jsonl"
    report = synthesize(smol, store, "hb", 2, out, groups={"eng"}, progress=False)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert 1 <= report.kept == len(rows) <= 2
    assert report.attempts == report.kept + sum(report.dropped.values())
    for row in rows:
        src = row["source"]
        assert src["collection"] == "hb" and src["document"] in sources["eng"] + sources[""]
        chunk = next(h for h in store.chunks("hb", src["document"]) if [h.start, h.end] == src["span"])
        answer = row["messages"][1]["content"]
        assert grounding(answer, chunk.text) >= MIN_GROUNDING
        assert row["model_digest"] == smol.digest
    ds = load_jsonl(out, smol.tokenizer, 2)  # finetune reads it as it is
    assert ds.shape == "chat" and len(ds) == len(rows)
