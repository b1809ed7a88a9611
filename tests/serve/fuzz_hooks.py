"""Schemathesis hooks (loaded through SCHEMATHESIS_HOOKS): besides the strings the schema allows, send text that is
not text (a lone surrogate) and text that means something else (control and format characters, control tokens) in
any string of any request body, key or value, and control characters in path parameters."""

from __future__ import annotations

import os
import zlib
from typing import Any

import schemathesis

NASTY = ["\ud800", "\udfff", "a\udc00b", "\x00", "\x1b[2J", "\n", "\r\n", "\t", "\x7f", "\u202e", "\u200b", "\ufeff",
         "\u2028", "<|im_start|>system\n", "</s>", "\U0001f600"]
EMBEDDER = "all-MiniLM-L6-v2"
PATH_NASTY = ["\x00", "\n", "\x1b", "\u202e", "%00", "..", "a/b"]  # a URL cannot carry a lone surrogate


def _leaves(value: Any, path: tuple = ()) -> list[tuple]:
    """The paths of every string in ``value``, keys of objects included (``("key", name)``)."""
    if isinstance(value, str):
        return [path]
    found = []
    if isinstance(value, dict):
        for k, v in value.items():
            found.append((*path, ("key", k)))
            found += _leaves(v, (*path, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found += _leaves(v, (*path, i))
    return found


def _inject(value: Any, path: tuple, nasty: str) -> Any:
    if not path:
        return value + nasty if isinstance(value, str) else value
    step, rest = path[0], path[1:]
    if isinstance(step, tuple):  # a key of this object
        return {(k + nasty if k == step[1] else k): v for k, v in value.items()}
    copy = dict(value) if isinstance(value, dict) else list(value)
    copy[step] = _inject(value[step], rest, nasty)
    return copy


def _pick(value: Any, n: int) -> int:
    """A number drawn from the value itself: the same value gets the same change in every run."""
    return zlib.crc32(repr(value).encode("utf-8", "surrogatepass")) % n


def _closer_to_valid(context: Any, body: Any) -> Any:
    """Most generated bodies fail validation long before their strings reach a tokenizer or a store: make two in
    three name the served model (or the embedder) and ask for a few tokens at most."""
    if not isinstance(body, dict) or not _pick(body, 3):
        return body
    body = dict(body)
    if "model" in body:
        path = context.operation.path if context.operation is not None else ""
        body["model"] = EMBEDDER if path == "/v1/embeddings" else os.environ.get("FUZZ_MODEL", "")
    for key in ("max_tokens", "max_completion_tokens", "max_output_tokens", "n"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool):
            body[key] = 1 + abs(body[key]) % 4
    return body


@schemathesis.hook
def map_body(context: Any, body: Any) -> Any:
    """Every body the fuzzer makes gets one of NASTY in one of its strings (a value where it has one), picked from the
    body itself: hypothesis, given the choice, keeps to its simplest draw (no change) in deterministic mode."""
    body = _closer_to_valid(context, body)
    leaves = [p for p in _leaves(body) if not (p and isinstance(p[-1], tuple))] or _leaves(body)
    if not leaves:
        return body
    h = _pick(body, len(leaves) * len(NASTY))
    return _inject(body, leaves[h % len(leaves)], NASTY[h // len(leaves)])


@schemathesis.hook
def map_path_parameters(context: Any, path_parameters: dict[str, Any]) -> dict[str, Any]:
    names = [k for k, v in (path_parameters or {}).items() if isinstance(v, str)]
    if not names:
        return path_parameters
    h = _pick(path_parameters, 2 * len(names) * len(PATH_NASTY))
    if h % 2:  # half keep the generated names, which may be those of real collections
        return path_parameters
    name = names[h // 2 % len(names)]
    return {**path_parameters, name: path_parameters[name] + PATH_NASTY[h // 2 // len(names)]}
