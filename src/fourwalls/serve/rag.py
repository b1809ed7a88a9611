"""Document collections over HTTP: the collections, their documents, and search.

Routes (JSON; errors are OpenAI error objects):

- ``GET /v1/collections``, ``POST /v1/collections`` ``{"name"}``, ``GET|DELETE /v1/collections/{name}``;
- ``POST /v1/collections/{name}/documents`` ``{"source", "text" | "content_base64", "title", "groups", "meta",
  "chunk_tokens", "overlap", "regroup"}``: add or replace one document (identical content, groups and metadata:
  nothing is written and the status is ``unchanged``; other groups than the stored document's: 400 unless
  ``regroup``), ``DELETE /v1/collections/{name}/documents/{source}``;
- ``POST /v1/collections/{name}/search`` ``{"query", "top_k", "mode", "where"}``: ranked chunks with citations.

Chat completions answer from a collection with their ``rag`` field (see ``openai``); /v1/embeddings serves the
collections' embedder (see ``embeddings``).

Access: with API keys on, writes need an admin key, and every read (search, a collection's document list and
counts) sees only the documents of the caller's groups plus those with no groups; the groups go into the searches
themselves, so the top k is cut after them, and so do the term statistics of BM25 (see ``caller``). A collection in
which the caller may read no document is neither listed nor found (404). Searching runs the embedder: the key must
be allowed to use it, as for /v1/embeddings. Blocking work runs in worker threads; the store is
shared by them under ``RagService.lock``, and ``RagService.writes`` keeps whole writes from interleaving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import tempfile
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import APIRouter

from fourwalls.errors import FormatError, FourwallsError, NotFoundError, UsageError
from fourwalls.files import writing
from fourwalls.rag.ingest import Item, ingest, readers
from fourwalls.rag.loaders import SUFFIXES, Document, load, load_text
from fourwalls.rag.stores import Collection, DocumentStore
from fourwalls.serve.common import CurrentCaller, State
from fourwalls.serve.schemas import CollectionCreate, DocumentUpload, SearchRequest

router = APIRouter()


def _unix(stamp: str) -> int | str:
    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except (TypeError, ValueError):
        return stamp


def _collection_object(store: DocumentStore, c: Collection, groups: set[str] | None,
                       with_documents: bool = False) -> dict:
    out = {"id": c.name, "object": "collection", "embedder": c.embedder, "dim": c.dim, "documents": c.documents,
           "chunks": c.chunks, "created": _unix(c.created)}
    if groups is None and not with_documents:
        return out
    docs = [d for d in store.documents(c.name) if d.readable(groups)]
    out["documents"], out["chunks"] = len(docs), sum(d.chunks for d in docs)  # what this caller may read
    if with_documents:  # the documents themselves instead of their number
        out["documents"] = [{"source": d.source, "title": d.title, "groups": d.groups, "meta": d.meta,
                             "chunks": d.chunks, "digest": d.digest, "ingested": _unix(d.ingested)} for d in docs]
    return out


# --- collections ------------------------------------------------------------------------------------------


@router.get("/v1/collections")
async def list_collections(state: State, caller: CurrentCaller) -> Any:
    """The collections in which the API key may read a document, with the number of documents and chunks it may
    read."""
    rag, groups = state.rag, caller.groups

    def work() -> list[dict]:
        store = rag.store
        found = [_collection_object(store, c, groups) for c in store.collections()]
        return [c for c in found if groups is None or c["documents"]]

    return {"object": "list", "data": await asyncio.to_thread(work)}


@router.post("/v1/collections", status_code=201)
async def create_collection(body: CollectionCreate, state: State, caller: CurrentCaller) -> Any:
    """Create an empty collection embedded with the server's embedder (admin)."""
    caller.require_admin("creating a collection")
    rag = state.rag

    def work() -> dict:
        embedder, store = rag.embedder, rag.store
        try:
            with rag.writes:
                c = store.create_collection(body.name, embedder.name, embedder.dim)
        except UsageError as e:
            exists = "already exists" in str(e)
            raise UsageError(str(e), param="name", code="collection_exists" if exists else "invalid_name") from None
        return _collection_object(store, c, None)

    return await asyncio.to_thread(work)


@router.get("/v1/collections/{name}")
async def get_collection(name: str, state: State, caller: CurrentCaller) -> Any:
    """A collection with the list of its documents (``documents``: source, title, groups, meta, chunks, digest,
    ingested), only those the API key may read; ``chunks`` counts theirs."""
    rag, groups = state.rag, caller.groups

    def work() -> dict:
        return _collection_object(rag.store, rag.collection(name, groups), groups, with_documents=True)

    return await asyncio.to_thread(work)


@router.delete("/v1/collections/{name}")
async def delete_collection(name: str, state: State, caller: CurrentCaller) -> Any:
    """Delete a collection with all of its documents (admin)."""
    caller.require_admin("deleting a collection")
    rag = state.rag

    def work() -> None:
        with rag.writes:
            rag.collection(name)
            rag.store.drop_collection(name)

    await asyncio.to_thread(work)
    return {"id": name, "object": "collection", "deleted": True}


# --- documents --------------------------------------------------------------------------------------------


def _load_file(source: str, data: bytes, title: str | None) -> Document:
    """Parse an upload with the loader of its source's suffix, from a private temporary file."""
    stem = f"upload-{uuid.uuid4().hex}"
    with writing(Path(tempfile.gettempdir()), "the uploaded file", len(data)), \
            tempfile.TemporaryDirectory(prefix="fourwalls-upload-") as tmp:
        path = Path(tmp) / (stem + Path(source).suffix.lower())
        path.write_bytes(data)
        try:
            doc = load(path)
        except FourwallsError as e:  # say the source, not the temporary file
            raise FormatError(str(e).replace(str(path), source)) from None
        except Exception as e:  # a parser's own failure on a malformed file is still the file's problem
            raise FormatError(f"{source} cannot be read ({type(e).__name__}: {e})") from None
    doc.source = source
    if title is not None:
        doc.title = title
    elif doc.title == stem:  # the loader fell back on the file name
        doc.title = Path(source).stem or source
    return doc


@router.post("/v1/collections/{name}/documents")
async def upload_document(name: str, body: DocumentUpload, state: State, caller: CurrentCaller) -> Any:
    """Add or replace one document (admin): ``text`` is read as Markdown; ``content_base64`` is parsed by the
    source's suffix (.txt .md .markdown .html .htm .pdf .docx). Identical content, groups and metadata again:
    nothing is written (``status: unchanged``). A document that cannot be parsed: 400, the store unchanged."""
    caller.require_admin("uploading documents")
    if (body.text is None) == (body.content_base64 is None):
        raise UsageError("send the document as either text or content_base64", param="text")
    if "*" in body.groups:
        raise UsageError("'*' is not a group: a document with no groups is readable by every API key",
                         param="groups")
    source, title = body.source, body.title
    if body.text is not None:
        data, text = body.text.encode(), body.text

        def read() -> Document:
            return load_text(source, text, title)
    else:
        suffix = Path(source).suffix.lower()
        if suffix not in SUFFIXES:
            raise UsageError(f"cannot tell the file type of '{source}' from its suffix; supported: "
                             f"{', '.join(SUFFIXES)} (or send text)", param="source")
        try:
            data = base64.b64decode(body.content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise UsageError("content_base64 is not valid base64", param="content_base64") from None
        if not data:
            raise UsageError("content_base64 is empty", param="content_base64")

        def read() -> Document:
            return _load_file(source, data, title)

    item = Item(source, "sha256-" + hashlib.sha256(data).hexdigest(), read)
    rag = state.rag

    def work() -> dict:
        embedder, store = rag.embedder, rag.store
        with rag.writes:
            rag.collection(name)
            old = store.document(name, source)
            if old is not None and old.groups != sorted(set(body.groups)) and not body.regroup:
                raise UsageError(f"'{source}' may be read by {readers(old.groups)}; this upload is for "
                                 f"{readers(sorted(set(body.groups)))}: send \"regroup\": true to change who may "
                                 "read it", param="groups", code="groups_changed")
            report = ingest(store, embedder, [item], name, groups=body.groups, meta=body.meta, regroup=True,
                            max_tokens=body.chunk_tokens, overlap=body.overlap, progress=False)
            if report.failed:
                raise FormatError(report.failed[0][1], param="content_base64" if body.text is None else "text",
                                  code="unreadable_document")
            doc = store.document(name, source)
        status = "added" if report.added else "replaced" if report.replaced else "unchanged"
        out = {"object": "collection.document", "source": source, "status": status, "chunks": doc.chunks,
               "title": doc.title, "digest": doc.digest, "groups": doc.groups}
        if report.regrouped:
            out["previous_groups"] = report.regrouped[0][1]
        return out

    return await asyncio.to_thread(work)


@router.delete("/v1/collections/{name}/documents/{source:path}")
async def delete_document(name: str, source: str, state: State, caller: CurrentCaller) -> Any:
    """Remove one document and its chunks (admin)."""
    caller.require_admin("deleting documents")
    rag = state.rag

    def work() -> bool:
        with rag.writes:
            rag.collection(name)
            return rag.store.delete_document(name, source)

    if not await asyncio.to_thread(work):
        raise NotFoundError(f"collection '{name}' has no document '{source}'", param="source",
                            code="document_not_found")
    return {"id": source, "object": "collection.document", "source": source, "deleted": True}


# --- search -----------------------------------------------------------------------------------------------


@router.post("/v1/collections/{name}/search")
async def search(name: str, body: SearchRequest, state: State, caller: CurrentCaller) -> Any:
    """The chunks best matching ``query`` among those the API key may read, best first, with their citations."""
    caller.admit(0)
    rag, groups = state.rag, caller.groups

    def work() -> list[dict]:
        rag.collection(name, groups)
        hits = rag.retriever(caller).search(name, body.query, body.top_k, body.mode, groups, body.where)
        return [h.citation() | {"text": h.text} for h in hits]

    return {"object": "list", "data": await asyncio.to_thread(work)}
