"""`fourwalls rag ...` (ingest, list, show, rm, search, ask, reembed, eval) and `fourwalls synth`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from fourwalls.errors import FormatError, UsageError
from fourwalls.eval.retrieval import DOCUMENT_ID  # stdlib only: the id's meaning for --help

# `rag ask` answers greedily, with a repeat penalty against the loops of small models; the other sampling defaults
# are those of `generate`.
ASK_SAMPLING = {"temperature": 0.0, "repeat_penalty": 1.1}


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    out = {}
    for v in values:
        key, sep, value = v.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE (got {v!r})")
        out[key] = value
    return out


def _store(args: argparse.Namespace) -> Any:
    from fourwalls.rag.stores import open_store

    return open_store(args.store)


def _embedder(args: argparse.Namespace) -> Any:
    from fourwalls.rag.embed import embedder

    return embedder(args.embedder, quantize=not args.float32)


def _groups(args: argparse.Namespace) -> set[str] | None:
    return set(args.group) if args.group else None


def cmd_ingest(args: argparse.Namespace) -> None:
    from fourwalls.rag.ingest import beir_items, file_items, ingest

    paths = [Path(p) for p in args.paths]
    if args.format == "beir":
        if len(paths) != 1:
            raise UsageError("--format beir takes one corpus.jsonl (or a folder holding it)")
        items, refused = beir_items(paths[0]), []
    else:
        items, refused = file_items(paths)
    store = _store(args)
    sync = [str(p.resolve()) for p in paths] if args.sync else None
    report = ingest(store, _embedder(args), items, args.collection, groups=args.group,
                    meta=_pairs(args.meta, "--meta"), sync_roots=sync, regroup=args.regroup,
                    max_tokens=args.chunk_tokens, overlap=args.overlap, progress=not args.quiet)
    failed = refused + report.failed
    for source, message in failed:
        print(f"fourwalls: skipped {source}: {message}", file=sys.stderr)
    report.failed = failed
    print(report.summary())
    if failed:
        raise FormatError(f"{len(failed)} of {len(items) + len(refused)} documents were not ingested (listed above)")


def cmd_list(args: argparse.Namespace) -> None:
    rows = _store(args).collections()
    if args.json:
        print(json.dumps([vars(c) for c in rows], indent=2))
        return
    print(f"{'COLLECTION':24} {'DOCUMENTS':>9} {'CHUNKS':>8}  EMBEDDER")
    for c in rows:
        print(f"{c.name:24} {c.documents:9} {c.chunks:8}  {c.embedder} ({c.dim}-d)")


def cmd_show(args: argparse.Namespace) -> None:
    store = _store(args)
    if args.source:
        source = _stored_source(store, args.collection, args.source)
        if source is None:
            raise UsageError(f"no document {args.source!r} in collection {args.collection!r}")
        doc = store.document(args.collection, source)
        chunks = [h.citation() | {"text": h.text} for h in store.chunks(args.collection, doc.source)]
        print(json.dumps(vars(doc) | {"chunk_list": chunks}, indent=2, ensure_ascii=False))
        return
    c = store.collection(args.collection)
    docs = store.documents(args.collection)
    if args.json:
        print(json.dumps(vars(c) | {"document_list": [vars(d) for d in docs]}, indent=2))
        return
    print(f"{c.name}: {c.documents} documents, {c.chunks} chunks, embedder {c.embedder} ({c.dim}-d), "
          f"created {c.created}")
    for d in docs:
        groups = ",".join(d.groups) or "(everyone)"
        print(f"  {d.source}  [{d.chunks} chunks, groups {groups}, {d.digest[:19]}]")


def cmd_rm(args: argparse.Namespace) -> None:
    store = _store(args)
    if args.all:
        if args.sources:
            raise UsageError("--all removes the whole collection; name no documents with it")
        store.drop_collection(args.collection)
        print(f"removed collection {args.collection}")
        return
    if not args.sources:
        raise UsageError("name the documents to remove, or --all to remove the collection")
    found = {s: _stored_source(store, args.collection, s) for s in args.sources}
    missing = [s for s, source in found.items() if source is None]
    if missing:  # checked first: a typo removes nothing
        raise UsageError(f"not in collection {args.collection!r}: {', '.join(missing)} (nothing was removed; "
                         f"`fourwalls rag show -c {args.collection}` lists its documents)")
    removed = sum(store.delete_document(args.collection, source) for source in set(found.values()))
    print(f"removed {removed} document{'s' if removed != 1 else ''} from {args.collection}")


def _stored_source(store: Any, collection: str, source: str) -> str | None:
    """The stored source that ``source`` names: itself, or the absolute path of a file a folder ingest stored."""
    for candidate in (source, str(Path(source).resolve())):
        if store.document(collection, candidate) is not None:
            return candidate
    return None


def _retriever(args: argparse.Namespace) -> Any:
    from fourwalls.rag.retrieve import Retriever

    return Retriever(_store(args), _embedder(args), args.bm25_weight, args.vector_weight)


def cmd_search(args: argparse.Namespace) -> None:
    hits = _retriever(args).search(args.collection, args.query, args.k, args.mode, _groups(args),
                                   _pairs(args.where, "--where"))
    if args.json:
        print(json.dumps([h.citation() | {"text": h.text} for h in hits], indent=2, ensure_ascii=False))
        return
    if not hits:
        print("no matching chunks")
    for i, h in enumerate(hits, 1):
        c = h.citation()
        where = h.source + (f" p.{h.page}" if h.page else "") + f" [{h.start}:{h.end}]"
        detail = ", ".join(f"{k} {v:.3f}" for k, v in (("bm25", h.bm25), ("similarity", h.similarity))
                           if v is not None)
        print(f"{i}. score {c['score']:.4f} ({detail})  {where}")
        print(f"   {h.location()}")
        text = " ".join(h.text.split())
        print(f"   {text[:300]}{'…' if len(text) > 300 else ''}")


def cmd_ask(args: argparse.Namespace, sampling: Callable[[argparse.Namespace], Any],
            load_model: Callable[[str], Any]) -> None:
    from fourwalls.rag.answer import MIN_SIMILARITY, ask

    params = sampling(args)
    params.validate()
    retriever = _retriever(args)
    retriever.store.collection(args.collection)  # a missing collection fails before the model loads
    answer = ask(load_model(args.model), retriever, args.collection, args.question, params, args.k, _groups(args),
                 _pairs(args.where, "--where"),
                 MIN_SIMILARITY if args.min_similarity is None else args.min_similarity)
    print(answer.text)
    if answer.sources:
        print("\nSources:")
    for c in answer.citations():
        mark = "*" if c["cited"] else " "
        page = f" p.{c['page']}" if c["page"] else ""
        print(f"{mark}[{c['index']}] {c['source']}{page} [{c['span'][0]}:{c['span'][1]}]  {c['title']}")


def cmd_reembed(args: argparse.Namespace) -> None:
    from fourwalls.rag.ingest import reembed

    n = reembed(_store(args), _embedder(args), args.collection, progress=not args.quiet)
    print(f"re-embedded {n} chunks of {args.collection}")


def cmd_eval(args: argparse.Namespace) -> None:
    from fourwalls.eval.retrieval import evaluate_retriever, match_qrels, plot_modes
    from fourwalls.rag.beir import read_qrels, read_queries

    queries, judged = read_queries(Path(args.queries)), read_qrels(Path(args.qrels))
    retriever = _retriever(args)
    qrels, unknown = match_qrels(judged, [d.source for d in retriever.store.documents(args.collection)])
    ids = {doc for docs in judged.values() for doc in docs}
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:3]) + (", ..." if len(unknown) > 3 else "")
        message = (f"{len(unknown)} of the {len(ids)} document ids in {args.qrels} name no document of collection "
                   f"{args.collection!r} ({shown}); an id is {DOCUMENT_ID}")
        if len(unknown) == len(ids):
            raise UsageError(message)
        print(f"fourwalls: warning: {message}; they count as not retrieved", file=sys.stderr)
    modes = args.mode.split(",")
    results = {m: evaluate_retriever(retriever, args.collection, queries, qrels, m, args.depth) for m in modes}
    print(json.dumps({"collection": args.collection, "queries": len(queries), "unknown_documents": len(unknown),
                      "results": results}))
    if args.plot:
        plot_modes(results, Path(args.plot))


def _caller_groups(args: argparse.Namespace) -> set[str] | None:
    """--group, narrowed to what the API key in $FOURWALLS_API_KEY may read when --api-keys names the key file."""
    groups = _groups(args)
    if not args.api_keys:
        return groups
    key = os.environ.get("FOURWALLS_API_KEY")
    if not key:
        raise UsageError("--api-keys needs the caller's key in $FOURWALLS_API_KEY")
    from fourwalls.serve.caller import KeyRing

    scope = KeyRing.load(Path(args.api_keys)).authenticate(f"Bearer {key}").groups
    return scope if groups is None else groups if scope is None else groups & scope


def cmd_synth(args: argparse.Namespace, load_model: Callable[[str], Any]) -> None:
    from fourwalls.rag.synth import load_seed_tasks, synthesize, usable_chunks

    groups = _caller_groups(args)
    seeds = load_seed_tasks(Path(args.seed_tasks)) if args.seed_tasks else None
    store = _store(args)
    usable_chunks(store, args.collection, groups, args.count, args.per_chunk)  # bad input fails before the model loads
    report = synthesize(load_model(args.model), store, args.collection, args.count, Path(args.out), groups, seeds,
                        args.per_chunk, args.max_tokens, args.seed, progress=not args.quiet)
    print(report.summary())


def _store_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=os.environ.get("FOURWALLS_RAG_STORE"),
                   help="postgresql://... or a SQLite file (default $FOURWALLS_RAG_STORE, else "
                        "$FOURWALLS_HOME/rag.db)")


def _embedder_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--embedder", help="a sentence-transformers BERT folder (default: the packaged "
                   "all-MiniLM-L6-v2)")
    p.add_argument("--float32", action="store_true", help="the embedder's linear layers in float32 instead of "
                   "int8: sentence-transformers' exact vectors, at half the speed (see README)")


def _retrieval_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--collection", "-c", required=True)
    p.add_argument("-k", type=int, default=5, help="chunks to return (default 5)")
    p.add_argument("--mode", default="hybrid", choices=["hybrid", "bm25", "vector"])
    p.add_argument("--group", action="append", default=[], help="search only what this group may read "
                   "(repeatable; default: everything)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only documents whose metadata has KEY=VALUE (repeatable)")
    p.add_argument("--bm25-weight", type=float, default=1.0, help="weight of BM25 in the fusion (default 1)")
    p.add_argument("--vector-weight", type=float, default=1.0, help="weight of vectors in the fusion (default 1)")
    _store_flags(p)
    _embedder_flags(p)


def register(sub: Any, parser_class: type, sampling_flags: Callable[..., None],
             sampling: Callable[[argparse.Namespace], Any], load_model: Callable[[str], Any],
             default_model: str) -> None:
    """Add `rag` and its subcommands to ``sub``; `rag ask` takes the main command's sampling flags, reads them with
    ``sampling`` and loads its model with ``load_model``."""
    rag = sub.add_parser("rag", help="retrieval-augmented generation over your documents")
    rsub = rag.add_subparsers(dest="rag_command", required=True, parser_class=parser_class)

    p = rsub.add_parser("ingest", help="add or update documents (.txt .md .html .pdf .docx) in a collection")
    p.add_argument("paths", nargs="+", help="files or folders (walked recursively)")
    p.add_argument("--collection", "-c", required=True, help="created on first use")
    p.add_argument("--group", action="append", default=[], help="only this group may read these documents "
                   "(repeatable; default: everyone)")
    p.add_argument("--regroup", action="store_true", help="give documents already stored with other groups "
                   "these --group(s) (without it they keep theirs and are reported; the summary lists each change)")
    p.add_argument("--meta", action="append", default=[], metavar="KEY=VALUE", help="metadata to filter on")
    p.add_argument("--sync", action="store_true", help="also remove documents under PATHS that no longer exist")
    p.add_argument("--format", default="files", choices=["files", "beir"], help="beir: a BEIR corpus.jsonl")
    p.add_argument("--chunk-tokens", type=int, default=192, help="largest chunk in tokens (default 192)")
    p.add_argument("--overlap", type=int, default=32, help="tokens shared by consecutive pieces of a long "
                   "paragraph (default 32)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _store_flags(p)
    _embedder_flags(p)
    p.set_defaults(func=cmd_ingest)

    p = rsub.add_parser("list", help="collections with their sizes and embedders")
    p.add_argument("--json", action="store_true")
    _store_flags(p)
    p.set_defaults(func=cmd_list)

    p = rsub.add_parser("show", help="a collection's documents, or one document's chunks")
    p.add_argument("--collection", "-c", required=True)
    p.add_argument("source", nargs="?", help="a document's source path")
    p.add_argument("--json", action="store_true")
    _store_flags(p)
    p.set_defaults(func=cmd_show)

    p = rsub.add_parser("rm", help="remove documents, or a whole collection with --all")
    p.add_argument("--collection", "-c", required=True)
    p.add_argument("sources", nargs="*", help="documents' source paths")
    p.add_argument("--all", action="store_true", help="remove the collection itself")
    _store_flags(p)
    p.set_defaults(func=cmd_rm)

    p = rsub.add_parser("search", help="ranked chunks for a query, with scores and sources")
    p.add_argument("query")
    _retrieval_flags(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = rsub.add_parser("ask", help="answer a question from a collection, citing the sources")
    p.add_argument("question")
    p.add_argument("--model", default=default_model, help=f"stored name or path (default {default_model})")
    p.add_argument("--min-similarity", type=float, default=None,
                   help="if no chunk is this similar to the question (cosine), the answer is 'I don't know' "
                   "(default 0.3)")
    _retrieval_flags(p)
    sampling_flags(p, **ASK_SAMPLING)
    p.set_defaults(func=partial(cmd_ask, sampling=sampling, load_model=load_model))

    p = sub.add_parser("synth", help="instruction data for finetune, written by a model from a collection's "
                       "documents (self-instruct)")
    p.add_argument("--collection", "-c", required=True)
    p.add_argument("--count", type=int, required=True, help="examples to write")
    p.add_argument("--out", required=True, help="JSONL file to write (finetune reads it as it is)")
    p.add_argument("--group", action="append", default=[], help="use only documents this group may read "
                   "(repeatable; default: every document)")
    p.add_argument("--api-keys", metavar="FILE", help="the server's API key file: use only documents the key in "
                   "$FOURWALLS_API_KEY may read")
    p.add_argument("--model", default=default_model, help=f"stored name or path (default {default_model})")
    p.add_argument("--seed-tasks", metavar="FILE", help="example instructions: JSONL with \"instruction\" or one "
                   "per line (default: a few built-in ones)")
    p.add_argument("--per-chunk", type=int, default=2, help="instructions tried per chunk at most (default 2)")
    p.add_argument("--max-tokens", type=int, default=160, help="longest answer in tokens (default 160)")
    p.add_argument("--seed", type=int, default=0, help="same seed, same data (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _store_flags(p)
    p.set_defaults(func=partial(cmd_synth, load_model=load_model))

    p = rsub.add_parser("reembed", help="re-embed a collection with another embedder")
    p.add_argument("--collection", "-c", required=True)
    p.add_argument("--quiet", action="store_true")
    _store_flags(p)
    _embedder_flags(p)
    p.set_defaults(func=cmd_reembed)

    p = rsub.add_parser("eval", help="nDCG@10, recall@k and MRR of retrieval on labelled queries (BEIR files)")
    p.add_argument("--collection", "-c", required=True)
    p.add_argument("--queries", required=True, help="BEIR queries.jsonl")
    p.add_argument("--qrels", required=True, help="BEIR qrels TSV (query-id, corpus-id, score); a corpus-id is "
                   f"{DOCUMENT_ID}")
    p.add_argument("--mode", default="hybrid,bm25,vector", help="comma-separated modes (default all three)")
    p.add_argument("--depth", type=int, default=100, help="chunks retrieved per query (default 100)")
    p.add_argument("--plot", metavar="PNG", help="also draw the modes' scores side by side")
    p.add_argument("--bm25-weight", type=float, default=1.0)
    p.add_argument("--vector-weight", type=float, default=1.0)
    _store_flags(p)
    _embedder_flags(p)
    p.set_defaults(func=cmd_eval)

