"""`fourwalls rag ...` end to end: the commands, their output, and bad input (exit 2, one line naming the cause)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fourwalls.cli import main
from tests.rag.docs import minimal_pdf

LABELLED = Path(__file__).parent.parent / "fixtures" / "rag"


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FOURWALLS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FOURWALLS_RAG_STORE", raising=False)
    return tmp_path / "home"


@pytest.fixture
def docs(tmp_path) -> Path:
    d = tmp_path / "docs"
    (d / "hr").mkdir(parents=True)
    (d / "hr" / "leave.md").write_text("# Leave\n\n## Parental\n\nParental leave is 16 weeks at full pay.\n")
    (d / "it.html").write_text("<html><head><title>IT</title><script>evil()</script></head><body><h1>Laptops</h1>"
                               "<p>Report a stolen laptop within one hour.</p></body></html>")
    (d / "policy.pdf").write_bytes(minimal_pdf([["Visitors sign in at reception."], ["Badges are returned daily."]]))
    return d


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_ingest_list_show_search_rm(home, docs, capsys):
    code, out, _ = run(capsys, "rag", "ingest", str(docs), "-c", "hb", "--group", "staff", "--quiet")
    assert code == 0 and out.startswith("3 added, 0 replaced, 0 unchanged")
    code, out, _ = run(capsys, "rag", "ingest", str(docs), "-c", "hb", "--group", "staff", "--quiet")
    assert "0 added, 0 replaced, 3 unchanged" in out
    code, out, _ = run(capsys, "rag", "list", "--json")
    [c] = json.loads(out)
    assert (c["name"], c["documents"], c["embedder"], c["dim"]) == ("hb", 3, "all-MiniLM-L6-v2", 384)

    code, out, _ = run(capsys, "rag", "search", "how long is parental leave", "-c", "hb", "-k", "2", "--json")
    hits = json.loads(out)
    assert hits[0]["source"].endswith("leave.md") and hits[0]["heading"] == "Leave > Parental"
    text = (docs / "hr" / "leave.md").read_text()
    assert "16 weeks" in hits[0]["text"] and hits[0]["span"][1] > hits[0]["span"][0]
    code, out, _ = run(capsys, "rag", "search", "badges", "-c", "hb", "--json", "--mode", "bm25")
    assert json.loads(out)[0]["page"] == 2
    code, out, _ = run(capsys, "rag", "search", "stolen laptop", "-c", "hb", "--group", "guests", "--json")
    assert json.loads(out) == []  # staff-only documents are invisible to other groups
    code, out, _ = run(capsys, "rag", "search", "stolen laptop", "-c", "hb")
    assert code == 0 and "1. score" in out and "it.html" in out and "evil" not in out

    code, out, _ = run(capsys, "rag", "show", "-c", "hb", str(docs / "hr" / "leave.md"))
    shown = json.loads(out)
    assert shown["chunk_list"][0]["text"] in text
    code, out, _ = run(capsys, "rag", "rm", "-c", "hb", str(docs / "it.html"))
    assert code == 0 and "removed 1" in out
    code, out, _ = run(capsys, "rag", "show", "-c", "hb", "--json")
    assert len(json.loads(out)["document_list"]) == 2
    code, out, _ = run(capsys, "rag", "rm", "-c", "hb", "--all")
    assert code == 0 and run(capsys, "rag", "list", "--json")[1].strip() == "[]"


def test_beir_ingest_and_eval(home, tmp_path, capsys):
    code, out, _ = run(capsys, "rag", "ingest", "--format", "beir", str(LABELLED), "-c", "nw", "--quiet")
    assert code == 0 and out.startswith("59 added")
    plot = tmp_path / "eval.png"
    code, out, _ = run(capsys, "rag", "eval", "-c", "nw", "--queries", str(LABELLED / "queries.jsonl"),
                       "--qrels", str(LABELLED / "qrels.tsv"), "--plot", str(plot))
    r = json.loads(out)["results"]
    assert set(r) == {"hybrid", "bm25", "vector"}
    assert all(0 < m["ndcg@10"] <= 1 and m["queries"] == 32 for m in r.values())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_input(home, docs, tmp_path, capsys):
    (docs / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    code, out, err = run(capsys, "rag", "ingest", str(docs), str(tmp_path / "missing"), "-c", "hb", "--quiet")
    assert code == 2 and out.startswith("3 added")  # the good files went in
    assert "broken.pdf" in err and "missing" in err and "Traceback" not in err
    for argv, message in [
        (["rag", "search", "x", "-c", "nope"], "no collection named 'nope'"),
        (["rag", "search", "?!", "-c", "hb"], "no terms"),
        (["rag", "ingest", str(docs), "-c", "bad name!"], "invalid collection name"),
        (["rag", "search", "x", "-c", "hb", "--where", "novalue"], "KEY=VALUE"),
        (["rag", "rm", "-c", "hb"], "--all"),
        (["rag", "ask", "why?", "-c", "hb", "--top-p", "2"], "top_p must be in (0, 1]"),  # before the model loads
        (["rag", "ask", "why?", "-c", "nope", "--model", "no-such-model"], "no collection named 'nope'"),
        (["rag", "list", "--store", "postgresql://fw@127.0.0.1:1/x?connect_timeout=2"], "cannot reach PostgreSQL"),
    ]:
        code, _, err = run(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


@pytest.mark.slow
def test_ask_loads_the_model_and_lists_the_sources(home, docs, capsys):
    from fourwalls.rag.answer import NO_ANSWER

    run(capsys, "rag", "ingest", str(docs), "-c", "hb", "--quiet")
    code, out, err = run(capsys, "rag", "ask", "How many weeks of parental leave do employees get?", "-c", "hb",
                         "-k", "1", "--max-tokens", "8")
    answer, _, sources = out.partition("\nSources:\n")
    assert code == 0 and answer.strip() and answer.strip() != NO_ANSWER, (out, err)
    [source] = sources.splitlines()  # -k 1: the one chunk the answer was grounded on, numbered 1
    assert source[1:].startswith("[1] ") and source.endswith("leave.md [0:39]  Leave"), source
    code, out, _ = run(capsys, "rag", "ask", "What is the capital of Peru?", "-c", "hb", "--max-tokens", "8")
    assert code == 0 and out.strip() == NO_ANSWER  # nothing similar enough: nothing generated, no sources


HANDBOOK = Path(__file__).parents[2] / "examples" / "handbook"


def test_the_tours_handbook_is_the_labelled_corpus():
    """examples/handbook, which the README ingests, holds the labelled set's pages, one Markdown file each."""
    corpus = [json.loads(line) for line in (LABELLED / "corpus.jsonl").read_text().splitlines()]
    assert sorted(p.name for p in HANDBOOK.iterdir()) == sorted(f"{d['_id']}.md" for d in corpus)
    for d in corpus:
        assert (HANDBOOK / f"{d['_id']}.md").read_text() == f"# {d['title']}\n\n{d['text']}\n"


def test_eval_matches_qrels_ids_to_file_names_and_warns_of_unknown_ones(home, tmp_path, capsys):
    code, _, _ = run(capsys, "rag", "ingest", str(HANDBOOK), "-c", "hb", "--quiet")
    assert code == 0
    args = ["rag", "eval", "-c", "hb", "--queries", str(LABELLED / "queries.jsonl"), "--mode", "bm25"]
    code, out, err = run(capsys, *args, "--qrels", str(LABELLED / "qrels.tsv"))  # ids are file names' stems
    result = json.loads(out)
    assert code == 0 and err == "" and result["unknown_documents"] == 0
    assert result["results"]["bm25"]["ndcg@10"] > 0.7
    qrels = (LABELLED / "qrels.tsv").read_text().splitlines()
    partial = tmp_path / "partial.tsv"
    partial.write_text("\n".join([qrels[0], *(line.replace("\tprod-", "\tnope-") for line in qrels[1:])]) + "\n")
    unknown = len({line.split("\t")[1] for line in qrels[1:] if line.split("\t")[1].startswith("prod-")})
    code, out, err = run(capsys, *args, "--qrels", str(partial))
    assert code == 0 and json.loads(out)["unknown_documents"] == unknown
    assert err.startswith(f"fourwalls: warning: {unknown} of the ") and "an id is a document's source" in err
    nothing = tmp_path / "nothing.tsv"
    nothing.write_text("query-id\tcorpus-id\tscore\nq01\tmissing-page\t1\n")
    code, out, err = run(capsys, *args, "--qrels", str(nothing))
    assert code == 2 and out == "" and "1 of the 1 document ids" in err and len(err.splitlines()) == 1


def test_rm_of_a_missing_document_removes_nothing_and_says_so_once(home, docs, capsys):
    run(capsys, "rag", "ingest", str(docs), "-c", "hb", "--quiet")
    code, out, err = run(capsys, "rag", "rm", "-c", "hb", str(docs / "it.html"), "nope.md")
    assert code == 2 and out == "" and len(err.splitlines()) == 1
    assert "not in collection 'hb': nope.md (nothing was removed" in err
    code, out, _ = run(capsys, "rag", "rm", "-c", "hb", str(docs / "it.html"))
    assert code == 0 and out == "removed 1 document from hb\n"


def test_reingesting_for_another_group_needs_regroup_and_names_the_document(home, docs, capsys):
    leave = str((docs / "hr" / "leave.md").resolve())
    assert run(capsys, "rag", "ingest", str(docs / "hr"), "-c", "hb", "--group", "managers", "--quiet")[0] == 0
    code, out, err = run(capsys, "rag", "ingest", str(docs), "-c", "hb", "--group", "staff", "--quiet")
    assert code == 2 and out.startswith("2 added, 0 replaced, 0 unchanged")
    assert f"fourwalls: skipped {leave}: it may be read by managers; ingesting it for staff would widen" in err
    code, out, _ = run(capsys, "rag", "ingest", str(docs), "-c", "hb", "--group", "staff", "--regroup", "--quiet")
    assert code == 0 and out.splitlines()[1] == f"widened access of 1 document: {leave} (managers → staff)"


def test_ingest_onto_a_full_disk_is_one_line_and_keeps_the_store_whole(docs, capsys, small_disk, monkeypatch):
    home = small_disk(1024)  # the store's schema fits, a document's vectors do not (sqlite-vec allocates 1.5 MB)
    monkeypatch.setenv("FOURWALLS_HOME", str(home))
    monkeypatch.delenv("FOURWALLS_RAG_STORE", raising=False)
    code, out, err = run(capsys, "rag", "ingest", str(docs / "hr"), "-c", "hb", "--quiet")
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "disk is full" in err and "rag.db" in err
    small_disk.grow(home, 64 * 1024)
    code, out, err = run(capsys, "rag", "ingest", str(docs / "hr"), "-c", "hb", "--quiet")
    assert code == 0 and out.startswith("1 added, 0 replaced"), out + err
    code, out, _ = run(capsys, "rag", "search", "parental leave", "-c", "hb", "--json")
    assert "16 weeks" in json.loads(out)[0]["text"]
