"""Ingestion into a store: which items changed, load and chunk them, embed in batches across documents, and write
each document in one transaction."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from fourwalls.errors import FourwallsError, NotFoundError
from fourwalls.files import sha256_file
from fourwalls.rag.beir import read_corpus
from fourwalls.rag.chunking import chunk
from fourwalls.rag.embed import Embedder, check_embedder
from fourwalls.rag.loaders import SUFFIXES, Document, load, load_text
from fourwalls.rag.stores import ChunkRow, DocumentInfo, DocumentStore, indexed_text


@dataclass
class Item:
    """Something to ingest: its source key, a digest of its content, and how to load it."""

    source: str
    digest: str
    load: Callable[[], Document]


@dataclass
class Report:
    added: int = 0
    replaced: int = 0
    unchanged: int = 0
    removed: int = 0
    chunks: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    regrouped: list[tuple[str, list[str], list[str]]] = field(default_factory=list)  # (source, old, new groups)
    seconds: float = 0.0
    embed_seconds: float = 0.0

    def summary(self) -> str:
        rate = self.chunks / self.seconds if self.seconds else 0.0
        lines = [f"{self.added} added, {self.replaced} replaced, {self.unchanged} unchanged, {self.removed} removed, "
                 f"{len(self.failed)} failed; {self.chunks} chunks in {self.seconds:.1f} s ({rate:.1f} chunks/s, "
                 f"{self.embed_seconds:.1f} s embedding)"]
        for how, changes in (("widened", [c for c in self.regrouped if widens(c[1], c[2])]),
                             ("narrowed", [c for c in self.regrouped if not widens(c[1], c[2])])):
            if changes:
                listed = "; ".join(f"{source} ({readers(old)} → {readers(new)})" for source, old, new in changes)
                lines.append(f"{how} access of {len(changes)} document{'s' if len(changes) > 1 else ''}: {listed}")
        return "\n".join(lines)


def widens(old: list[str], new: list[str]) -> bool:
    """Whether readers gain access when a document's groups go from ``old`` to ``new`` (no groups: everyone)."""
    return bool(old) and (not new or not set(new) <= set(old))


def readers(groups: list[str]) -> str:
    """Who may read a document of these groups, in words."""
    return ", ".join(groups) or "everyone"


def file_items(paths: list[Path]) -> tuple[list[Item], list[tuple[str, str]]]:
    """Supported files under ``paths`` (folders walked, hidden entries skipped), and the paths refused outright."""
    items, refused = [], []
    for root in paths:
        if not root.exists():
            refused.append((str(root), f"no such file or folder: {root}"))
            continue
        found = [root] if root.is_file() else sorted(
            p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(root).parts))
        for p in found:
            source = str(p.resolve())
            try:
                items.append(Item(source, sha256_file(p), lambda p=p: load(p)))
            except OSError as e:
                refused.append((source, f"cannot read {p}: {e.strerror}"))
    return items, refused


def beir_items(path: Path) -> list[Item]:
    """The documents of a BEIR corpus (corpus.jsonl, or a folder holding one), keyed by their ``_id``."""
    corpus = path / "corpus.jsonl" if path.is_dir() else path
    return [Item(doc_id, "sha256-" + hashlib.sha256(f"{title}\0{text}".encode()).hexdigest(),
                 lambda i=doc_id, ti=title, te=text: load_text(i, te, title=ti or None))
            for doc_id, title, text in read_corpus(corpus)]


def ingest(store: DocumentStore, embedder: Embedder, items: list[Item], collection: str, *,
           groups: list[str] = (), meta: dict[str, str] | None = None, sync_roots: list[str] | None = None,
           regroup: bool = False, max_tokens: int = 192, overlap: int = 32, batch_chunks: int = 256,
           progress: bool = True) -> Report:
    """Bring ``collection`` up to date with ``items``: new and changed ones (re)written, unchanged ones skipped,
    and with ``sync_roots`` the documents under those roots that are no longer among the items removed.

    A failing item is recorded in the report and the rest go on; the store keeps its old version of it. A stored
    document is given other ``groups`` only with ``regroup`` (each change is listed in ``Report.regrouped``):
    without it, an item whose stored groups differ fails, so that ingesting a folder again for another group
    cannot silently change who may read what was ingested before."""
    groups, meta = sorted(set(groups)), dict(meta or {})
    try:
        check_embedder(store.collection(collection), embedder)
    except NotFoundError:
        store.create_collection(collection, embedder.name, embedder.dim)
    existing = {d.source: d for d in store.documents(collection)}
    report, pending, started = Report(), [], time.perf_counter()
    bar = tqdm(total=len(items), unit="doc", desc=f"ingest {collection}", disable=not progress)

    def flush() -> None:
        texts = [indexed_text(doc.title, c.heading, c.text) for _, doc, chunks in pending for c in chunks]
        t = time.perf_counter()
        vectors = embedder.embed(texts)
        report.embed_seconds += time.perf_counter() - t
        at = 0
        for item, doc, chunks in pending:
            info = DocumentInfo(item.source, item.digest, doc.title, groups, meta)
            store.put_document(collection, info, [ChunkRow(c.text, c.start, c.end, c.heading, c.page)
                                                  for c in chunks], vectors[at:at + len(chunks)])
            at += len(chunks)
            report.chunks += len(chunks)
            if item.source in existing:
                report.replaced += 1
                if existing[item.source].groups != groups:
                    report.regrouped.append((item.source, existing[item.source].groups, groups))
            else:
                report.added += 1
        bar.update(len(pending))
        bar.set_postfix_str(f"{report.chunks / (time.perf_counter() - started):.1f} chunks/s")
        pending.clear()

    for item in items:
        old = existing.get(item.source)
        if old and (old.digest, old.groups, old.meta) == (item.digest, groups, meta):
            report.unchanged += 1
            bar.update(1)
            continue
        if old and old.groups != groups and not regroup:
            report.failed.append((item.source, regroup_refusal(old.groups, groups)))
            bar.update(1)
            continue
        try:
            doc = item.load()
            chunks = chunk(doc, embedder.tokenizer, max_tokens, overlap)
        except FourwallsError as e:
            report.failed.append((item.source, str(e)))
            bar.update(1)
            continue
        pending.append((item, doc, chunks))
        if sum(len(c) for _, _, c in pending) >= batch_chunks:
            flush()
    if pending:
        flush()
    bar.close()
    if sync_roots is not None:
        seen = {item.source for item in items}
        for source in existing:
            if source not in seen and any(source == r or source.startswith(r.rstrip("/") + "/") for r in sync_roots):
                report.removed += store.delete_document(collection, source)
    report.seconds = time.perf_counter() - started
    return report


def regroup_refusal(old: list[str], new: list[str]) -> str:
    """Why a document keeps its groups: what ingesting it would change, and the flag that allows it."""
    return (f"it may be read by {readers(old)}; ingesting it for {readers(new)} would "
            f"{'widen' if widens(old, new) else 'change'} who may read it: pass --regroup to do so "
            "(the stored version is kept)")


def reembed(store: DocumentStore, embedder: Embedder, collection: str, progress: bool = True) -> int:
    """Embed every chunk of ``collection`` again with ``embedder`` and swap the vectors in, in one transaction."""
    hits = store.all_chunks(collection)
    texts = [indexed_text(h.title, h.heading, h.text) for h in hits]
    step = 256
    vectors = np.concatenate([embedder.embed(texts[i:i + step])
                              for i in tqdm(range(0, len(texts), step), unit="batch", disable=not progress)]
                             or [np.zeros((0, embedder.dim), np.float32)])
    store.replace_vectors(collection, embedder.name, embedder.dim, [h.id for h in hits], vectors)
    return len(hits)
