"""Retrieval-augmented generation over HTTP: document collections, search, /v1/embeddings, and RAG chat.

Routes (JSON; errors are OpenAI error objects):

- ``GET /v1/collections``, ``POST /v1/collections`` ``{"name"}``, ``GET|DELETE /v1/collections/{name}``;
- ``POST /v1/collections/{name}/documents`` ``{"source", "text" | "content_base64", "title", "groups", "meta",
  "chunk_tokens", "overlap"}``: add or replace one document (identical content, groups and metadata: nothing is
  written and the status is ``unchanged``), ``DELETE /v1/collections/{name}/documents/{source}``;
- ``POST /v1/collections/{name}/search`` ``{"query", "top_k", "mode", "where"}``: ranked chunks with citations;
- ``POST /v1/embeddings``: the OpenAI embeddings API, served by the retrieval embedder;
- ``POST /v1/chat/completions`` with ``"rag": {"collection", "top_k", "mode", "where", "min_similarity"}``: the
  last user message is the question. The chunks retrieved for it replace the conversation's system message as
  numbered sources (earlier turns are kept), and the response carries a top-level ``citations`` list: ``{"index",
  "source", "title", "heading", "page", "span", "score", "similarity", "cited"}``, ``cited`` when an answer cites
  ``[index]``. When streaming, the citations come in the first chunk's top-level ``citations`` field, all with
  ``cited: false`` (the text is not known yet). Only relevant chunks become sources (``answer.relevant``: at
  least ``min_similarity`` similar to the question, or containing all of its words); when none is, no model
  runs: the answer is ``answer.NO_ANSWER``, with ``citations: []`` and zero usage.

Access: with API keys on, writes need an admin key, and every read (search, RAG chat, a collection's document
list and counts) sees only the documents of the key's groups plus those with no groups; the groups go into the
searches themselves, so the top k is cut after them (see ``auth``). Blocking work runs in worker threads; the
store is shared by them under ``RagService.lock``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response, StreamingResponse

from fourwalls.errors import ForbiddenError, FormatError, FourwallsError, NotFoundError, UsageError
from fourwalls.rag.answer import MIN_SIMILARITY, NO_ANSWER, Answer, cited, control_tokens, relevant
from fourwalls.rag.answer import messages as grounded_messages
from fourwalls.rag.ingest import Item, ingest
from fourwalls.rag.loaders import SUFFIXES, load, load_text
from fourwalls.rag.stores import indexed_text
from fourwalls.serve.auth import Key
from fourwalls.serve.openai import AuthKey, State, _sse
from fourwalls.serve.schemas import (
    MAX_EMBED_INPUTS,
    ChatCompletionRequest,
    CollectionCreate,
    DocumentUpload,
    EmbeddingRequest,
    RagOptions,
    SearchRequest,
)
from fourwalls.serve.state import RagService, ServerState

router = APIRouter()


def _error(cls: type[FourwallsError], message: str, param: str | None = None,
           code: str | None = None) -> FourwallsError:
    return cls(message, param=param, code=code)


def _admin(key: Key | None, what: str) -> None:
    if key is not None and not key.admin:
        raise ForbiddenError(f"{what} needs an admin API key")


def readable(key: Key | None) -> set[str] | None:
    """The document groups a request may read: None (all) without auth, else the key's scope."""
    return None if key is None else key.readable()


def _visible(doc: Any, groups: set[str] | None) -> bool:
    return groups is None or not doc.groups or bool(groups.intersection(doc.groups))


def _unix(stamp: str) -> int | str:
    try:
        return int(datetime.fromisoformat(stamp).timestamp())
    except (TypeError, ValueError):
        return stamp


def _collection(store: Any, name: str) -> Any:
    """The collection, or 404 as an OpenAI error."""
    try:
        return store.collection(name)
    except NotFoundError:
        raise _error(NotFoundError, f"collection '{name}' does not exist; GET /v1/collections lists them",
                     "collection", "collection_not_found") from None


def _collection_object(store: Any, c: Any, groups: set[str] | None, with_documents: bool = False) -> dict:
    out = {"id": c.name, "object": "collection", "embedder": c.embedder, "dim": c.dim, "documents": c.documents,
           "chunks": c.chunks, "created": _unix(c.created)}
    if groups is None and not with_documents:
        return out
    docs = [d for d in store.documents(c.name) if _visible(d, groups)]
    out["documents"], out["chunks"] = len(docs), sum(d.chunks for d in docs)  # what this key may read
    if with_documents:  # the documents themselves instead of their number
        out["documents"] = [{"source": d.source, "title": d.title, "groups": d.groups, "meta": d.meta,
                             "chunks": d.chunks, "digest": d.digest, "ingested": _unix(d.ingested)} for d in docs]
    return out


# --- collections ------------------------------------------------------------------------------------------


@router.get("/v1/collections")
async def list_collections(state: State, key: AuthKey) -> Any:
    """Every collection, with the number of documents and chunks the API key may read."""
    rag, groups = state.rag, readable(key)

    def work() -> list[dict]:
        store = rag.store
        return [_collection_object(store, c, groups) for c in store.collections()]

    return {"object": "list", "data": await asyncio.to_thread(work)}


@router.post("/v1/collections", status_code=201)
async def create_collection(body: CollectionCreate, state: State, key: AuthKey) -> Any:
    """Create an empty collection embedded with the server's embedder (admin)."""
    _admin(key, "creating a collection")
    rag = state.rag

    def work() -> dict:
        embedder, store = rag.embedder, rag.store
        try:
            with rag.writes:
                c = store.create_collection(body.name, embedder.name, embedder.dim)
        except UsageError as e:
            exists = "already exists" in str(e)
            raise _error(UsageError, str(e), "name", "collection_exists" if exists else "invalid_name") from None
        return _collection_object(store, c, None)

    return await asyncio.to_thread(work)


@router.get("/v1/collections/{name}")
async def get_collection(name: str, state: State, key: AuthKey) -> Any:
    """A collection with the list of its documents (``documents``: source, title, groups, meta, chunks, digest,
    ingested), only those the API key may read; ``chunks`` counts theirs."""
    rag, groups = state.rag, readable(key)

    def work() -> dict:
        store = rag.store
        return _collection_object(store, _collection(store, name), groups, with_documents=True)

    return await asyncio.to_thread(work)


@router.delete("/v1/collections/{name}")
async def delete_collection(name: str, state: State, key: AuthKey) -> Any:
    """Delete a collection with all of its documents (admin)."""
    _admin(key, "deleting a collection")
    rag = state.rag

    def work() -> None:
        with rag.writes:
            _collection(rag.store, name)
            rag.store.drop_collection(name)

    await asyncio.to_thread(work)
    return {"id": name, "object": "collection", "deleted": True}


# --- documents --------------------------------------------------------------------------------------------


def _load_file(source: str, data: bytes, title: str | None) -> Any:
    """Parse an upload with the loader of its source's suffix, from a private temporary file."""
    stem = f"upload-{uuid.uuid4().hex}"
    with tempfile.TemporaryDirectory(prefix="fourwalls-upload-") as tmp:
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
async def upload_document(name: str, body: DocumentUpload, state: State, key: AuthKey) -> Any:
    """Add or replace one document (admin): ``text`` is read as Markdown; ``content_base64`` is parsed by the
    source's suffix (.txt .md .markdown .html .htm .pdf .docx). Identical content, groups and metadata again:
    nothing is written (``status: unchanged``). A document that cannot be parsed: 400, the store unchanged."""
    _admin(key, "uploading documents")
    if (body.text is None) == (body.content_base64 is None):
        raise _error(UsageError, "send the document as either text or content_base64", "text")
    if "*" in body.groups:
        raise _error(UsageError, "'*' is not a group: a document with no groups is readable by every API key",
                     "groups")
    source, title = body.source, body.title
    if body.text is not None:
        data, text = body.text.encode(), body.text

        def read() -> Any:
            return load_text(source, text, title)
    else:
        suffix = Path(source).suffix.lower()
        if suffix not in SUFFIXES:
            raise _error(UsageError, f"cannot tell the file type of '{source}' from its suffix; supported: "
                         f"{', '.join(SUFFIXES)} (or send text)", "source")
        try:
            data = base64.b64decode(body.content_base64, validate=True)
        except (binascii.Error, ValueError):
            raise _error(UsageError, "content_base64 is not valid base64", "content_base64") from None
        if not data:
            raise _error(UsageError, "content_base64 is empty", "content_base64")

        def read() -> Any:
            return _load_file(source, data, title)

    item = Item(source, "sha256-" + hashlib.sha256(data).hexdigest(), read)
    rag = state.rag

    def work() -> dict:
        embedder, store = rag.embedder, rag.store
        with rag.writes:
            _collection(store, name)
            report = ingest(store, embedder, [item], name, groups=body.groups, meta=body.meta,
                            max_tokens=body.chunk_tokens, overlap=body.overlap, progress=False)
            if report.failed:
                raise _error(FormatError, report.failed[0][1], "content_base64" if body.text is None else "text",
                             "unreadable_document")
            doc = store.document(name, source)
        status = "added" if report.added else "replaced" if report.replaced else "unchanged"
        return {"object": "collection.document", "source": source, "status": status, "chunks": doc.chunks,
                "title": doc.title, "digest": doc.digest}

    return await asyncio.to_thread(work)


@router.delete("/v1/collections/{name}/documents/{source:path}")
async def delete_document(name: str, source: str, state: State, key: AuthKey) -> Any:
    """Remove one document and its chunks (admin)."""
    _admin(key, "deleting documents")
    rag = state.rag

    def work() -> bool:
        with rag.writes:
            _collection(rag.store, name)
            return rag.store.delete_document(name, source)

    if not await asyncio.to_thread(work):
        raise _error(NotFoundError, f"collection '{name}' has no document '{source}'", "source",
                     "document_not_found")
    return {"id": source, "object": "collection.document", "source": source, "deleted": True}


# --- search and embeddings --------------------------------------------------------------------------------


def _admit(state: ServerState, key: Key | None, tokens: int) -> None:
    if key is not None and state.keys is not None:
        state.keys.admit(key, tokens)


def _search(rag: RagService, name: str, query: str, k: int, mode: str, groups: set[str] | None,
            where: dict[str, str] | None) -> list:
    retriever = rag.retriever()
    _collection(retriever.store, name)
    return retriever.search(name, query, k, mode, groups, where)


@router.post("/v1/collections/{name}/search")
async def search(name: str, body: SearchRequest, state: State, key: AuthKey) -> Any:
    """The chunks best matching ``query`` among those the API key may read, best first, with their citations."""
    _admit(state, key, 0)
    hits = await asyncio.to_thread(_search, state.rag, name, body.query, body.top_k, body.mode, readable(key),
                                   body.where)
    return {"object": "list", "data": [h.citation() | {"text": h.text} for h in hits]}


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: State, key: AuthKey) -> Any:
    """OpenAI embeddings from the retrieval embedder: unit-length float32 vectors, as numbers or (base64) as
    little-endian float32 bytes."""
    embedder = await asyncio.to_thread(lambda: state.rag.embedder)
    if body.model != embedder.name:
        raise _error(NotFoundError, f"model '{body.model}' does not exist; this server embeds with "
                     f"'{embedder.name}'", "model", "model_not_found")
    if key is not None and not key.may_use(body.model):
        raise ForbiddenError(f"this API key may not use model '{body.model}'")
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or any(not t for t in texts):
        raise _error(UsageError, "input must be a non-empty string or a non-empty list of non-empty strings", "input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise _error(UsageError, f"input takes at most {MAX_EMBED_INPUTS} texts (got {len(texts)})", "input")
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise _error(UsageError, f"{embedder.name} embeds in {embedder.dim} dimensions, not {body.dimensions}",
                     "dimensions")

    def count() -> int:  # what the embedder reads, [CLS] and [SEP] included, after truncation
        return sum(min(embedder.count(t) + 2, embedder.max_tokens) for t in texts)

    tokens = await asyncio.to_thread(count)
    _admit(state, key, tokens)
    vectors: np.ndarray = await asyncio.to_thread(embedder.embed, texts)
    if key is not None and state.keys is not None:
        state.keys.spend(key, tokens)
    if body.encoding_format == "base64":
        values: list[Any] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        values = [v.tolist() for v in vectors]
    return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v}
                                       for i, v in enumerate(values)],
            "model": embedder.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


# --- RAG chat (called by /v1/chat/completions) ------------------------------------------------------------


async def ground(state: ServerState, key: Key | None, options: RagOptions,
                 messages: list[dict[str, str]]) -> tuple[list[dict[str, str]], list] | None:
    """The grounded conversation and the sources in it, or None when nothing readable is relevant enough."""
    if messages[-1]["role"] != "user":
        raise _error(UsageError, "with rag, the last message must be the user's question", "messages")
    question = messages[-1]["content"]
    if not question.strip():
        raise _error(UsageError, "with rag, the last user message (the question) must not be empty", "messages")
    history = [m for m in messages[:-1] if m["role"] != "system"]
    rag = state.rag

    def work() -> list:
        hits = _search(rag, options.collection, question, options.top_k, options.mode, readable(key), options.where)
        if options.mode == "bm25" and hits:  # BM25 finds no similarity to judge relevance by: measure it
            vectors = rag.embedder.embed([question] + [indexed_text(h.title, h.heading, h.text) for h in hits])
            for h, v in zip(hits, vectors[1:]):
                h.similarity = float(v @ vectors[0])
        return hits

    hits = relevant(await asyncio.to_thread(work), question,
                    MIN_SIMILARITY if options.min_similarity is None else options.min_similarity)
    if not hits:
        return None
    return grounded_messages(question, hits, control_tokens(state.lm.tokenizer), history), hits


def citations(hits: list, texts: list[str] | None) -> list[dict]:
    """Answer.citations() of the sources; ``cited`` when any of ``texts`` cites them (None: not known yet)."""
    numbers = sorted({i for t in texts or [] for i in cited(t, len(hits))})
    return Answer("", hits, numbers).citations()


def no_answer(body: ChatCompletionRequest, headers: dict[str, str]) -> Response:
    """The 'I don't know' completion, without running the model: nothing the key may read is relevant."""
    rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": rid, "created": created, "model": body.model}
    usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    if not body.stream:
        choices = [{"index": i, "message": {"role": "assistant", "content": NO_ANSWER}, "logprobs": None,
                    "finish_reason": "stop"} for i in range(body.n)]
        return JSONResponse({**head, "object": "chat.completion", "choices": choices, "usage": usage,
                             "citations": []}, headers=headers)

    async def events() -> Any:
        choices = [{"index": i, "delta": {"role": "assistant", "content": NO_ANSWER}, "logprobs": None,
                    "finish_reason": "stop"} for i in range(body.n)]
        yield _sse({**head, "object": "chat.completion.chunk", "choices": choices, "citations": []})
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
