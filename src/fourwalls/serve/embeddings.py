"""``POST /v1/embeddings``: the OpenAI embeddings API, served by the embedder of the document collections."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import numpy as np
from fastapi import APIRouter

from fourwalls.errors import NotFoundError, UsageError
from fourwalls.serve.common import CurrentCaller, State
from fourwalls.serve.schemas import MAX_EMBED_INPUTS, EmbeddingRequest

router = APIRouter()


@router.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest, state: State, caller: CurrentCaller) -> Any:
    """OpenAI embeddings from the retrieval embedder: unit-length float32 vectors, as numbers or (base64) as
    little-endian float32 bytes."""
    embedder = await asyncio.to_thread(lambda: state.rag.embedder)
    if body.model != embedder.name:
        raise NotFoundError(f"model '{body.model}' does not exist; this server embeds with '{embedder.name}'",
                            param="model", code="model_not_found")
    caller.require_model(body.model)
    texts = [body.input] if isinstance(body.input, str) else list(body.input)
    if not texts or any(not t for t in texts):
        raise UsageError("input must be a non-empty string or a non-empty list of non-empty strings", param="input")
    if len(texts) > MAX_EMBED_INPUTS:
        raise UsageError(f"input takes at most {MAX_EMBED_INPUTS} texts (got {len(texts)})", param="input")
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise UsageError(f"{embedder.name} embeds in {embedder.dim} dimensions, not {body.dimensions}",
                         param="dimensions")

    def count() -> int:  # what the embedder reads, [CLS] and [SEP] included, after truncation
        return sum(min(embedder.count(t) + 2, embedder.max_tokens) for t in texts)

    tokens = await asyncio.to_thread(count)
    caller.admit(tokens)
    vectors: np.ndarray = await asyncio.to_thread(embedder.embed, texts)
    caller.spend(tokens)
    if body.encoding_format == "base64":
        values: list[str] | list[list[float]] = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vectors]
    else:
        values = [v.tolist() for v in vectors]
    return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": v}
                                       for i, v in enumerate(values)],
            "model": embedder.name, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
