"""Training data: JSONL of plain text, Alpaca instructions or OpenAI chats, and plain-text corpora.

Every example becomes ``input_ids`` plus ``labels`` (the same ids, with -100 wherever no loss is taken: the prompt
and system/user turns of instruction and chat data). Order is a pure function of (seed, epoch), so a run resumed
from a checkpoint reads exactly the batches it would have read.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fourwalls.errors import FormatError, UsageError
from fourwalls.files import read_text, sha256_file
from fourwalls.model.ops import IGNORE_INDEX
from fourwalls.tokenizer import Tokenizer

IGNORE = IGNORE_INDEX  # a label that is not scored
SHAPES = ("text", "instruct", "chat")
_ROLES = {"system", "user", "assistant"}


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    paired: Example | None = None  # a second sequence trained beside this one (unlearning: a retain example)
    values: dict[str, float] = field(default_factory=dict)  # numbers an objective reads per example


@dataclass
class Dataset:
    examples: list[Example]
    shape: str
    digest: str  # sha256 of the source file(s): lineage and resume checks
    stats: dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def tokens(self) -> int:
        return sum(len(e.input_ids) for e in self.examples)


def detect_shape(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "messages" in obj:
        return "chat"
    if "instruction" in obj and "output" in obj:
        return "instruct"
    if "text" in obj:
        return "text"
    return None


def _check_record(obj: Any, shape: str) -> str | None:
    """What is wrong with one record of the given shape, or None."""
    if not isinstance(obj, dict):
        return "a line must be a JSON object"
    if shape == "text":
        return None if isinstance(obj.get("text"), str) and obj["text"] else "'text' must be a non-empty string"
    if shape == "instruct":
        for key in ("instruction", "output"):
            if not isinstance(obj.get(key), str) or not obj[key]:
                return f"'{key}' must be a non-empty string"
        if not isinstance(obj.get("input", ""), str):
            return "'input' must be a string"
        return None
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            return f"message {i} needs a role (system, user or assistant) and string content"
    if not any(m["role"] == "assistant" for m in msgs):
        return "the conversation has no assistant turn to learn from"
    return None


def _encode_text(tok: Tokenizer, text: str, eos_id: int | None) -> Example:
    ids = tok.encode(text) + ([eos_id] if eos_id is not None else [])
    return Example(ids, list(ids))


def _encode_chat(tok: Tokenizer, messages: list[dict[str, str]]) -> Example:
    """Render with the model's template; only the assistant turns' tokens carry loss."""
    ids = tok.encode_chat(messages, add_generation_prompt=False)
    labels = [IGNORE] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(tok.encode_chat(messages[:i], add_generation_prompt=True)) if i else 0
        end = len(tok.encode_chat(messages[: i + 1], add_generation_prompt=False))
        labels[start:end] = ids[start:end]
    return Example(ids, labels)


def _instruction_to_chat(obj: dict[str, str]) -> list[dict[str, str]]:
    prompt = obj["instruction"] + (f"\n\n{obj['input']}" if obj.get("input") else "")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": obj["output"]}]


def load_jsonl(path: Path, tok: Tokenizer, eos_id: int | None, shape: str = "auto", max_len: int = 1024,
               skip_bad_lines: bool = False) -> Dataset:
    """Read and tokenize a JSONL file; each bad line is an error naming file:line, or skipped and counted."""
    if shape not in ("auto", *SHAPES):
        raise UsageError(f"unknown data format '{shape}'; choose auto, {', '.join(SHAPES)}")
    lines = read_text(path, "data file").splitlines()
    examples, bad, truncated = [], 0, 0
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"invalid JSON ({e.msg})"
        else:
            if shape == "auto":
                shape = detect_shape(obj) or "auto"
            problem = "cannot tell the format: expected 'text', 'instruction'+'output' or 'messages'" \
                if shape == "auto" else _check_record(obj, shape)
        if problem:
            if not skip_bad_lines:
                raise FormatError(f"{path}:{n}: {problem} (use --skip-bad-lines to skip such lines)")
            bad += 1
            continue
        if shape == "text":
            ex = _encode_text(tok, obj["text"], eos_id)
        else:
            ex = _encode_chat(tok, obj["messages"] if shape == "chat" else _instruction_to_chat(obj))
        if len(ex.input_ids) > max_len:
            ex, truncated = Example(ex.input_ids[:max_len], ex.labels[:max_len]), truncated + 1
        if all(label == IGNORE for label in ex.labels[1:]):
            bad += 1  # nothing left to learn after truncation
            continue
        examples.append(ex)
    if not examples:
        raise UsageError(f"{path} holds no usable examples" + (f" ({bad} bad lines skipped)" if bad else ""))
    return Dataset(examples, shape, sha256_file(path),
                   {"examples": len(examples), "bad_lines": bad, "truncated": truncated})


def load_paragraphs(path: Path, tok: Tokenizer, eos_id: int | None, max_len: int = 1024) -> Dataset:
    """A plain-text file, one example per paragraph (blank-line separated), each truncated to ``max_len`` tokens."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", read_text(path, "data file")) if p.strip()]
    if not paragraphs:
        raise UsageError(f"{path} holds no text")
    examples = [_encode_text(tok, p, eos_id) for p in paragraphs]
    truncated = sum(len(e.input_ids) > max_len for e in examples)
    examples = [Example(e.input_ids[:max_len], e.labels[:max_len]) for e in examples]
    return Dataset(examples, "text", sha256_file(path), {"examples": len(examples), "truncated": truncated})


def load_text_corpus(path: Path, tok: Tokenizer, seq_len: int) -> Dataset:
    """A plain-text file cut into consecutive blocks of ``seq_len`` tokens (for pretraining)."""
    text = read_text(path, "data file")
    ids = tok.encode(text, add_special_tokens=False)
    blocks = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not blocks:
        raise UsageError(f"{path} has {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return Dataset([Example(b, list(b)) for b in blocks], "text", sha256_file(path), {"examples": len(blocks)})


def split(ds: Dataset, val_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """Hold out a seeded random fraction of the examples for validation."""
    if not 0 < val_fraction < 1:
        raise UsageError("--val-fraction must be between 0 and 1")
    order = list(range(len(ds)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(ds) * val_fraction))
    if n_val >= len(ds):
        raise UsageError(f"{len(ds)} examples are too few to hold out {val_fraction:.0%} for validation")
    pick = lambda idx: [ds.examples[i] for i in sorted(idx)]  # noqa: E731
    return (Dataset(pick(order[n_val:]), ds.shape, ds.digest, ds.stats),
            Dataset(pick(order[:n_val]), ds.shape, ds.digest, {}))


def pack(ds: Dataset, seq_len: int) -> Dataset:
    """Concatenate examples into full sequences of ``seq_len`` (no padding wasted; the tail is dropped)."""
    ids = [i for e in ds.examples for i in e.input_ids]
    labels = [x for e in ds.examples for x in e.labels]
    out = [Example(ids[i : i + seq_len], labels[i : i + seq_len]) for i in range(0, len(ids) - seq_len + 1, seq_len)]
    if not out:
        raise UsageError(f"the data has {len(ids)} tokens, fewer than one packed sequence of {seq_len}")
    return Dataset(out, ds.shape, ds.digest, {**ds.stats, "packed_sequences": len(out)})


def collate(examples: list[Example], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a batch; padded positions carry no loss. ``lengths``: each row's tokens before the padding."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
    batch = {"input_ids": ids, "labels": labels, "lengths": torch.tensor([len(e.input_ids) for e in examples])}
    if examples[0].paired is not None:
        batch.update({f"paired_{k}": v for k, v in collate([e.paired for e in examples], pad_id).items()})
    for key in examples[0].values:
        batch[key] = torch.tensor([e.values[key] for e in examples])
    return batch


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch: a seeded permutation, so a resumed run reads the same batches."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)] or [perm]


def batches(ds: Dataset, batch_size: int, seed: int, pad_id: int, start: int = 0) -> Iterator[dict[str, Tensor]]:
    """Endless batches (epoch after epoch), starting at global batch index ``start``."""
    per_epoch = max(1, len(ds) // batch_size)  # as many batches as batch_order makes
    index = start
    while True:
        epoch, pos = divmod(index, per_epoch)
        order = batch_order(len(ds), batch_size, seed, epoch)
        for b in order[pos:]:
            yield collate([ds.examples[i] for i in b], pad_id)
        index = (epoch + 1) * per_epoch
