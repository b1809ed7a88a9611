"""Unlearning: remove what a stored model memorised (a leaked secret, a deleted customer) without retraining it.

The model trains on the one loop with ``objectives.unlearning`` (NPO by default) on pairs of a forget example and a
retain example. Before and after, it is measured on both sets: perplexity, and for each forget sentence whether
greedy decoding still completes it word for word from its first half. A forget set the model does not appear to
know is refused rather than trained on blindly. The forget text itself never reaches the store: the lineage names
its digest, the report holds numbers only, and checkpoints hold weights.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fourwalls.errors import UsageError
from fourwalls.files import atomic_write, read_text
from fourwalls.generate import SamplingParams, generate_tokens
from fourwalls.store import ModelRef, Store
from fourwalls.tokenizer import Tokenizer
from fourwalls.train import data as D
from fourwalls.train.loop import TrainConfig, evaluate, rank, train
from fourwalls.train.objectives import answer_logps, causal_lm, unlearning
from fourwalls.train.recipes import _run_dir, load_trainable, make_trainable, store_trained

MAX_PROBES = 256  # forget sentences checked for verbatim completion (the first ones)
MIN_WORDS = 4  # a shorter sentence has no meaningful first half


@dataclass
class Probe:
    """A forget sentence cut in two: the tokens up to the middle of it, and the words the model should not say."""

    prompt: list[int]
    rest: str


def check_not_empty(path: Path, what: str) -> None:
    if not read_text(path, f"{what} file").strip():
        raise UsageError(f"the {what} set {path} is empty; there is nothing to " +
                         ("unlearn" if what == "forget" else "keep: give text the model should still know"))


def load_set(path: Path, tok: Tokenizer, eos: int | None, max_len: int, skip_bad_lines: bool, what: str
             ) -> D.Dataset:
    """JSONL in any shape `finetune` reads (by suffix), else plain text with one example per paragraph."""
    check_not_empty(path, what)
    if path.suffix == ".jsonl":
        return D.load_jsonl(path, tok, eos, "auto", max_len, skip_bad_lines)
    return D.load_paragraphs(path, tok, eos, max_len)


def _spans(labels: list[int]) -> list[tuple[int, int]]:
    """The runs of scored positions: the whole text, or each assistant turn of a chat."""
    spans, start = [], None
    for i, label in enumerate([*labels, D.IGNORE]):
        if label != D.IGNORE and start is None:
            start = i
        elif label == D.IGNORE and start is not None:
            spans.append((start, i))
            start = None
    return spans


def _sentences(text: str) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for m in re.finditer(r"(?<=[.!?])\s+|\n+", text):
        bounds.append((start, m.start()))
        start = m.end()
    bounds.append((start, len(text)))
    return [(a, b) for a, b in bounds if len(text[a:b].split()) >= MIN_WORDS]


def probes(ds: D.Dataset, tok: Tokenizer, limit: int = MAX_PROBES) -> list[Probe]:
    """Each sentence of each scored span, cut at its middle word: the context before the span (a chat's prompt)
    plus the sentence's first half, and what follows."""
    out: list[Probe] = []
    for e in ds.examples:
        for start, end in _spans(e.labels):
            text = tok.decode(e.input_ids[start:end])
            for a, b in _sentences(text):
                words = list(re.finditer(r"\S+", text[a:b]))
                head = text[: a + words[len(words) // 2].start()].rstrip()
                prompt = e.input_ids[:start] + tok.encode(head, add_special_tokens=start == 0)
                out.append(Probe(prompt, text[len(head):b]))
                if len(out) == limit:
                    return out
    return out


def verbatim(model: nn.Module, tok: Tokenizer, eos_ids: tuple[int, ...], items: list[Probe]) -> float | None:
    """The share of probes whose greedy continuation starts with the rest of their sentence (None: no probes)."""
    if not items:
        return None
    hits = 0
    for p in items:
        want = " ".join(p.rest.split())
        budget = len(tok.encode(p.rest, add_special_tokens=False)) + 3
        ids = [t.id for t in generate_tokens(model, p.prompt, SamplingParams(budget, temperature=0.0), eos_ids)]
        hits += " ".join(tok.decode(ids).split()).startswith(want)
    return hits / len(items)


def measure(model: nn.Module, tok: Tokenizer, eos_ids: tuple[int, ...], forget: D.Dataset, retain: D.Dataset,
            items: list[Probe], batch_size: int, pad: int) -> dict[str, float | None]:
    """Perplexity on both sets (their scored tokens) and the forget sentences' verbatim share."""
    model.eval()
    ppl = {what: round(math.exp(min(evaluate(model, ds, causal_lm, batch_size, pad), 50)), 4)
           for what, ds in (("forget", forget), ("retain", retain))}
    share = verbatim(model, tok, eos_ids, items)
    return {"forget_perplexity": ppl["forget"], "retain_perplexity": ppl["retain"],
            "forget_verbatim": None if share is None else round(share, 4)}


def knows(before: dict[str, float | None]) -> bool:
    """Whether the model knows the forget set: it completes one of its sentences word for word, or finds it more
    likely than the text it should keep. Unlearning text the model never learned only damages it."""
    return bool(before["forget_verbatim"]) or before["forget_perplexity"] < before["retain_perplexity"]


def reference_nll(model: nn.Module, ds: D.Dataset, batch_size: int, pad: int) -> list[float]:
    """Each example's summed NLL under the model as it is (NPO's reference, computed once before training)."""
    model.eval()
    out: list[float] = []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            batch = D.collate(ds.examples[i : i + batch_size], pad)
            out.extend((-answer_logps(model, batch["input_ids"], batch["labels"])[0]).tolist())
    return out


def pairs(forget: D.Dataset, retain: D.Dataset, ref_nll: list[float]) -> D.Dataset:
    """Every forget example beside a retain example, cycling the shorter set, so an epoch reads both in full."""
    n = max(len(forget), len(retain))
    examples = []
    for i in range(n):
        f = forget.examples[i % len(forget)]
        examples.append(D.Example(f.input_ids, f.labels, paired=retain.examples[i % len(retain)],
                                  values={"ref_nll": ref_nll[i % len(forget)]}))
    digest = "sha256-" + hashlib.sha256(f"{forget.digest} {retain.digest}".encode()).hexdigest()
    return D.Dataset(examples, "unlearn", digest, {"pairs": n})


def unlearn(model_name: str, forget: Path, retain: Path, name: str, cfg: TrainConfig, objective: str = "npo",
            method: str = "lora", lora: Any = None, beta: float = 0.1, retain_weight: float = 1.0,
            max_len: int = 256, skip_bad_lines: bool = False, force: bool = False, run_dir: Path | None = None,
            resume: bool = False, store: Store | None = None) -> tuple[ModelRef | None, dict[str, Any]]:
    """Make a stored model forget ``forget`` while keeping ``retain``; store the result (adapter or model) as
    ``name`` and write ``unlearn.json`` (before/after perplexities and verbatim shares) in the run folder.

    ``force`` trains even when the model does not appear to know the forget set (``knows``).
    """
    loss = unlearning(objective, beta, retain_weight)  # settings checked before anything is loaded
    cfg.validate()
    store = store or Store()
    check_not_empty(forget, "forget")  # before the model loads: bad input fails fast
    check_not_empty(retain, "retain")
    base_ref, lm = load_trainable(store, model_name, name, method, max_len, "unlearn")
    tok, eos_ids = lm.tokenizer, tuple(lm.config.eos_token_ids or ())
    eos = eos_ids[0] if eos_ids else None
    pad = eos if eos is not None else 0
    forget_ds = load_set(forget, tok, eos, max_len, skip_bad_lines, "forget")
    retain_ds = load_set(retain, tok, eos, max_len, skip_bad_lines, "retain")
    items = probes(forget_ds, tok)
    before = measure(lm.model, tok, eos_ids, forget_ds, retain_ds, items, cfg.batch_size, pad)
    if not force and not knows(before):
        raise UsageError(f"the model does not appear to know the forget set: its perplexity there is "
                         f"{before['forget_perplexity']:.2f} against {before['retain_perplexity']:.2f} on the retain "
                         f"set, and it completes none of {len(items)} forget sentences word for word; nothing was "
                         "trained (--force unlearns anyway)")
    lora = make_trainable(lm.model, method, lora, cfg.seed)
    train_ds = pairs(forget_ds, retain_ds, reference_nll(lm.model, forget_ds, cfg.batch_size, pad))
    settings = {"objective": objective, "beta": beta, "retain_weight": retain_weight, "max_len": max_len}
    identity = {"method": method, "base_digest": lm.digest, **settings,
                **({"lora": asdict(lora)} if method != "full" else {})}
    run_dir = _run_dir(store, name, run_dir)
    result = train(lm.model, train_ds, None, cfg, run_dir, objective=loss, resume=resume,
                   identity=json.loads(json.dumps(identity)), pad_id=pad)
    after = measure(lm.model, tok, eos_ids, forget_ds, retain_ds, items, cfg.batch_size, pad)
    report = {"objective": objective, "method": method, "forget_sentences": len(items),
              "forget_examples": len(forget_ds), "retain_examples": len(retain_ds),
              **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}}
    result["report"] = report
    if rank() == 0:
        atomic_write(run_dir / "unlearn.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    # No file paths and no command line: a forget file's name can itself say what was to be forgotten.
    lineage = {"method": f"unlearn-{objective}", "training": method, "parent": base_ref.name,
               "parent_digest": lm.digest, "forget_digest": forget_ds.digest, "forget_stats": forget_ds.stats,
               "retain_digest": retain_ds.digest, "retain_stats": retain_ds.stats, "settings": settings,
               "hyperparameters": asdict(cfg), "report": report}
    return store_trained(store, name, method, base_ref, lm, lora, lineage), result
