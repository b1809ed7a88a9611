"""Training data: JSONL of plain text, Alpaca instructions or OpenAI chats, plain-text corpora, and preferences
(chosen/rejected pairs, KTO's labelled answers).

Every example becomes ``input_ids`` plus ``labels`` (the same ids, with -100 wherever no loss is taken: the prompt
and system/user turns of instruction and chat data); a preference example is two of those. Order is a pure function
of (seed, epoch), so a run resumed from a checkpoint reads exactly the batches it would have read.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
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
    # A second sequence trained beside this one: unlearning's retain example, a preference pair's rejected answer,
    # KTO's mismatched answer (whose log-ratio estimates the KL term).
    paired: Example | None = None
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
    problem = _check_messages(obj.get("messages"))
    if problem is None and not any(m["role"] == "assistant" for m in obj["messages"]):
        return "the conversation has no assistant turn to learn from"
    return problem


def _check_messages(msgs: Any) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return "'messages' must be a non-empty list"
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
            return f"message {i} needs a role (system, user or assistant) and string content"
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


def _read_jsonl(path: Path, shape: str, detect: Callable[[Any], str | None], check: Callable[[Any, str], str | None],
                expected: str, skip_bad_lines: bool) -> tuple[list[Any], str, int]:
    """The records of a JSONL file that ``check(record, shape)`` finds nothing wrong with, the shape (detected from
    the first record when "auto") and the number of bad lines; a bad line is an error naming file:line, or skipped
    and counted."""
    records, bad = [], 0
    for n, line in enumerate(read_text(path, "data file").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            problem = f"invalid JSON ({e.msg})"
        else:
            if shape == "auto":
                shape = detect(obj) or "auto"
            problem = f"cannot tell the format: expected {expected}" if shape == "auto" else check(obj, shape)
        if problem:
            if not skip_bad_lines:
                raise FormatError(f"{path}:{n}: {problem} (use --skip-bad-lines to skip such lines)")
            bad += 1
            continue
        records.append(obj)
    return records, shape, bad


def _truncate(ex: Example, max_len: int) -> tuple[Example | None, bool]:
    """``ex`` cut to ``max_len`` tokens, and whether it was cut; None when no scored token is left to learn from."""
    cut = len(ex.input_ids) > max_len
    if cut:
        ex = Example(ex.input_ids[:max_len], ex.labels[:max_len])
    return (None if all(label == IGNORE for label in ex.labels[1:]) else ex), cut


def load_jsonl(path: Path, tok: Tokenizer, eos_id: int | None, shape: str = "auto", max_len: int = 1024,
               skip_bad_lines: bool = False) -> Dataset:
    """Read and tokenize a JSONL file; each bad line is an error naming file:line, or skipped and counted."""
    if shape not in ("auto", *SHAPES):
        raise UsageError(f"unknown data format '{shape}'; choose auto, {', '.join(SHAPES)}")
    records, shape, bad = _read_jsonl(path, shape, detect_shape, _check_record,
                                      "'text', 'instruction'+'output' or 'messages'", skip_bad_lines)
    examples, truncated = [], 0
    for obj in records:
        if shape == "text":
            ex = _encode_text(tok, obj["text"], eos_id)
        else:
            ex = _encode_chat(tok, obj["messages"] if shape == "chat" else _instruction_to_chat(obj))
        kept, cut = _truncate(ex, max_len)
        truncated += cut
        if kept is None:
            bad += 1  # nothing left to learn after truncation
            continue
        examples.append(kept)
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


# --- preference data (`fourwalls align`) ----------------------------------------------------------------------------

PREFERENCE_SHAPES = ("pairs", "kto")
_PREFERENCE_EXPECTED = "'prompt' (or 'messages') with 'chosen'+'rejected', or with 'completion'+'label'"


def detect_preference_shape(obj: Any) -> str | None:
    if not isinstance(obj, dict):
        return None
    if "chosen" in obj or "rejected" in obj:
        return "pairs"
    if "completion" in obj or "label" in obj:
        return "kto"
    return None


def _prompt(obj: dict[str, Any]) -> list[dict[str, str]]:
    """The conversation the answers continue: ``messages``, or ``prompt`` as the user's turn after ``system``."""
    if "messages" in obj:
        return [{"role": m["role"], "content": m["content"]} for m in obj["messages"]]
    return ([{"role": "system", "content": obj["system"]}] if obj.get("system") else []) + [
        {"role": "user", "content": obj["prompt"]}]


def _answer(value: Any) -> str:
    """An answer's text: a string, or an assistant message {"role": "assistant", "content": ...}."""
    return value["content"] if isinstance(value, dict) else value


def _check_answer(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant" or not isinstance(value.get("content"), str):
            return f"'{key}' must be an assistant message with string content"
        value = value["content"]
    if not isinstance(value, str) or not value:
        return f"'{key}' must be a non-empty string (or an assistant message)"
    return None


def _check_preference(obj: Any, shape: str) -> str | None:
    """What is wrong with one preference record, or None."""
    if not isinstance(obj, dict):
        return "a line must be a JSON object"
    if "messages" in obj:
        problem = _check_messages(obj["messages"])
        if problem is None and obj["messages"][-1]["role"] == "assistant":
            problem = "'messages' must end with the turn the answers reply to, not with an assistant turn"
    elif not isinstance(obj.get("prompt"), str) or not obj["prompt"]:
        problem = "'prompt' must be a non-empty string (or give the conversation as 'messages')"
    elif not isinstance(obj.get("system", ""), str):
        problem = "'system' must be a string"
    else:
        problem = None
    keys = ("chosen", "rejected") if shape == "pairs" else ("completion",)
    problem = problem or next((p for k in keys if (p := _check_answer(obj, k))), None)
    if problem:
        return problem
    if shape == "kto":
        return None if isinstance(obj.get("label"), bool) else "'label' must be true (desirable) or false"
    if _answer(obj["chosen"]).strip() == _answer(obj["rejected"]).strip():
        return "'chosen' and 'rejected' are the same answer: there is nothing to prefer"
    return None


def _encode_answer(tok: Tokenizer, prompt: list[dict[str, str]], answer: str) -> Example:
    """``prompt`` then ``answer`` as the assistant's turn, rendered with the model's template; only the answer's
    tokens carry loss (not the prompt's, nor any earlier assistant turn in it)."""
    ids = tok.encode_chat([*prompt, {"role": "assistant", "content": answer}], add_generation_prompt=False)
    start = len(tok.encode_chat(prompt, add_generation_prompt=True))
    return Example(ids, [IGNORE] * start + ids[start:])


def load_preferences(path: Path, tok: Tokenizer, shape: str = "auto", max_len: int = 1024,
                     skip_bad_lines: bool = False) -> Dataset:
    """Read and tokenize preference JSONL: ``pairs`` ({prompt, chosen, rejected}, optional system, or the chat form
    {messages, chosen: {...}, rejected: {...}}) or ``kto`` ({prompt, completion, label}, same prompt forms).

    Each bad line (malformed, identical answers) is an error naming file:line, or skipped and counted; a pair or
    answer that truncation to ``max_len`` leaves with nothing to score, or with two equal answers, is counted too.
    Each example is the prompt with the chosen answer (KTO: with its answer, and ``values["desirable"]`` 1 or 0),
    ``paired`` with the prompt and the rejected answer (KTO: the mismatched answer, the previous record's, the last
    record's for the first, as TRL pairs them).
    """
    if shape not in ("auto", *PREFERENCE_SHAPES):
        raise UsageError(f"unknown preference format '{shape}'; choose auto, {', '.join(PREFERENCE_SHAPES)}")
    records, shape, bad = _read_jsonl(path, shape, detect_preference_shape, _check_preference, _PREFERENCE_EXPECTED,
                                      skip_bad_lines)
    truncated, examples = 0, []
    for i, obj in enumerate(records):
        prompt = _prompt(obj)
        if shape == "pairs":
            answers = [_answer(obj["chosen"]), _answer(obj["rejected"])]
        else:
            answers = [_answer(obj["completion"]), _answer(records[i - 1]["completion"])]
        cut = [_truncate(_encode_answer(tok, prompt, a), max_len) for a in answers]
        truncated += any(c for _, c in cut)
        first, second = (ex for ex, _ in cut)
        if first is None or second is None or (shape == "pairs" and first == second):
            bad += 1
            continue
        values = {} if shape == "pairs" else {"desirable": float(obj["label"])}
        examples.append(replace(first, paired=second, values=values))
    if not examples:
        raise UsageError(f"{path} holds no usable examples" + (f" ({bad} bad lines skipped)" if bad else ""))
    stats = {"examples": len(examples), "bad_lines": bad, "truncated": truncated}
    if shape == "kto":
        stats["desirable"] = int(sum(e.values["desirable"] for e in examples))
    return Dataset(examples, shape, sha256_file(path), stats)
