"""Knowledge distillation: a smaller student learns a stored teacher's output distribution.

Student construction and the recipe live here; the loss is ``train.objectives.distillation`` and the training is
the one loop. Teacher logits are computed on the fly, or once into a top-k cache on disk (safetensors) for reuse.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fourwalls.errors import FormatError, UsageError
from fourwalls.files import atomic_write
from fourwalls.model.config import ModelConfig, preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.store import ModelRef, Store
from fourwalls.train import data as D
from fourwalls.train.loop import TrainConfig, evaluate, rank, train
from fourwalls.train.objectives import causal_lm, distillation
from fourwalls.train.recipes import _command, _run_dir


def layer_plan(n_layers: int, k: int) -> list[int]:
    """The teacher layers a ``k``-layer student keeps: evenly spaced, always the first and the last (k >= 2).

    The first layer reads the copied embeddings and the last feeds the copied final norm and head, so keeping both
    leaves those weights next to the layers they were trained with. A one-layer student keeps the first.
    """
    if k < 1:
        raise UsageError(f"--student-layers must be at least 1, not {k}")
    if k >= n_layers:
        raise UsageError(f"a student of {k} layers is not smaller than its teacher ({n_layers} layers); "
                         f"choose --student-layers below {n_layers}")
    if k == 1:
        return [0]
    return [int(i * (n_layers - 1) / (k - 1) + 0.5) for i in range(k)]


def student_from_layers(teacher: Transformer, k: int) -> Transformer:
    """A copy of ``teacher`` keeping ``k`` of its layers (``layer_plan``) plus its embeddings, final norm and head."""
    keep = layer_plan(teacher.config.n_layers, k)
    state = teacher.state_dict()
    if any("lora_" in key for key in state):
        raise UsageError("the teacher carries a LoRA adapter; merge it first (`fourwalls merge`)")
    picked = {key: v for key, v in state.items() if not key.startswith("layers.")}
    for new, old in enumerate(keep):
        prefix = f"layers.{old}."
        picked.update({f"layers.{new}.{key[len(prefix):]}": v for key, v in state.items() if key.startswith(prefix)})
    student = Transformer(teacher.config.replace(n_layers=k))
    student.load_state_dict(picked)  # copies: the student shares no storage with its teacher
    return student.to(teacher.embed_tokens.weight.dtype)


def student_from_preset(preset_name: str, teacher_cfg: ModelConfig) -> Transformer:
    """A randomly initialised ``preset_name`` shape that speaks the teacher's vocabulary (seed torch first).

    A preset is only a shape: its vocabulary size and special-token ids are replaced by the teacher's, since the
    student is stored with, and must predict over, the teacher's tokenizer.
    """
    cfg = preset(preset_name).replace(vocab_size=teacher_cfg.vocab_size, bos_token_id=teacher_cfg.bos_token_id,
                                      eos_token_ids=teacher_cfg.eos_token_ids,
                                      context_length=teacher_cfg.context_length)
    if cfg.num_parameters >= teacher_cfg.num_parameters:
        raise UsageError(f"preset '{preset_name}' with the teacher's vocabulary has {cfg.num_parameters:,} "
                         f"parameters, not fewer than the teacher's {teacher_cfg.num_parameters:,}; pick a smaller one")
    student = Transformer(cfg)
    init_weights(student)
    return student


class TeacherCache:
    """The teacher's top-k logits for every example of a dataset, looked up by the example's tokens.

    Rows are matched by content with trailing padding stripped: the loop's batches carry no example index. Two
    examples equal up to trailing pad tokens share an entry (the longest), which is exact: in a causal model every
    position's logits depend only on the tokens before it. Logits outside the top k are -inf, so the soft loss
    compares the student with the teacher's distribution renormalised over its k likeliest tokens (exact when k is
    the vocabulary size).
    """

    def __init__(self, tensors: dict[str, Tensor], vocab_size: int, pad_id: int) -> None:
        self.tensors, self.vocab_size, self.pad_id = tensors, vocab_size, pad_id
        ids, offsets = tensors["input_ids"].tolist(), tensors["offsets"].tolist()
        self.index: dict[tuple[int, ...], tuple[int, int]] = {}
        for start, end in zip(offsets, offsets[1:]):
            key = _strip(ids[start:end], pad_id)
            if end - start > self.index.get(key, (0, 0))[1]:
                self.index[key] = (start, end - start)

    @classmethod
    def build(cls, teacher: Transformer, examples: list[D.Example], top_k: int, pad_id: int,
              batch_size: int = 8) -> TeacherCache:
        k = min(top_k, teacher.config.vocab_size)
        ids: list[int] = []
        offsets, values, indices = [0], [], []
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                chunk = examples[i : i + batch_size]
                top = teacher(D.collate(chunk, pad_id)["input_ids"]).float().topk(k, dim=-1)
                for row, e in enumerate(chunk):
                    n = len(e.input_ids)
                    values.append(top.values[row, :n])
                    indices.append(top.indices[row, :n].to(torch.int32))
                    ids.extend(e.input_ids)
                    offsets.append(offsets[-1] + n)
        tensors = {"input_ids": torch.tensor(ids, dtype=torch.int32), "offsets": torch.tensor(offsets),
                   "values": torch.cat(values).contiguous(), "indices": torch.cat(indices).contiguous()}
        return cls(tensors, teacher.config.vocab_size, pad_id)

    def save(self, path: Path, metadata: dict[str, str]) -> None:
        """Write atomically: a temporary file in the same folder, renamed into place."""
        from safetensors.torch import save_file

        meta = {**metadata, "vocab_size": str(self.vocab_size)}
        atomic_write(path, lambda tmp: save_file(self.tensors, str(tmp), metadata=meta))

    @classmethod
    def load(cls, path: Path, pad_id: int) -> TeacherCache:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                vocab_size = int((f.metadata() or {})["vocab_size"])
                tensors = {key: f.get_tensor(key) for key in ("input_ids", "offsets", "values", "indices")}
        except (SafetensorError, KeyError, ValueError, OSError) as e:
            raise FormatError(f"teacher-logit cache {path} is unreadable ({e}); delete it to rebuild") from None
        return cls(tensors, vocab_size, pad_id)

    def logits(self, input_ids: Tensor) -> Tensor:
        """[B, T, V] teacher logits for a padded batch of cached examples."""
        b, t = input_ids.shape
        out = torch.zeros(b, t, self.vocab_size)  # positions past an example are padding: their loss is masked
        for row in range(b):
            hit = self.index.get(_strip(input_ids[row].tolist(), self.pad_id))
            if hit is None:
                raise FormatError("a training example is missing from the teacher-logit cache; delete it to rebuild")
            start, n = hit[0], min(hit[1], t)
            block = torch.full((n, self.vocab_size), float("-inf"))
            rows = slice(start, start + n)
            block.scatter_(-1, self.tensors["indices"][rows].long(), self.tensors["values"][rows])
            out[row, :n] = block
        return out


def _strip(ids: list[int], pad_id: int) -> tuple[int, ...]:
    end = len(ids)
    while end and ids[end - 1] == pad_id:
        end -= 1
    return tuple(ids[:end])


def _load_data(path: Path, tok: Any, eos: int | None, seq_len: int) -> D.Dataset:
    """JSONL (as `finetune` reads it) by its suffix; anything else is plain text cut into ``seq_len`` blocks."""
    if path.suffix == ".jsonl":
        return D.load_jsonl(path, tok, eos, "auto", seq_len)
    return D.load_text_corpus(path, tok, seq_len)


def _held_out(student: nn.Module, ds: D.Dataset, objective: Any, batch_size: int, pad_id: int) -> dict[str, float]:
    """The student's cross-entropy on the data and KL to the teacher (at T = 1), per token, on held-out examples."""
    sums, tokens = {"ce": 0.0, "kl_t1": 0.0}, 0.0
    student.eval()
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            _, m = objective(student, D.collate(ds.examples[i : i + batch_size], pad_id))
            for key in sums:
                sums[key] += m[key] * m["tokens"]
            tokens += m["tokens"]
    return {"val_ce": round(sums["ce"] / max(tokens, 1.0), 6), "val_kl": round(sums["kl_t1"] / max(tokens, 1.0), 6)}


def distill(teacher_name: str, name: str, data: Path, cfg: TrainConfig, student_layers: int | None = None,
            student_preset: str | None = None, temperature: float = 2.0, alpha: float = 0.5, beta: float = 0.5,
            seq_len: int = 256, cache_teacher: bool | Path = False, cache_top_k: int = 64,
            val_fraction: float = 0.05, run_dir: Path | None = None, resume: bool = False,
            store: Store | None = None) -> tuple[ModelRef | None, dict[str, Any]]:
    """Distill a stored teacher into a smaller student (``student_layers`` or ``student_preset``); store it as ``name``.

    ``cache_teacher``: True caches the teacher's top-``cache_top_k`` logits under the store's cache/, a Path caches
    them in that folder; either way a later run on the same teacher and data reuses them, and the teacher is not
    kept in memory while the student trains.
    """
    if cfg.fsdp:
        raise UsageError("distillation runs data-parallel with the student replicated (DDP); drop --fsdp")
    store = store or Store()
    store.check_new_name(name)
    if (student_layers is None) == (student_preset is None):
        raise UsageError("give exactly one of --student-layers K and --student-preset P")
    distillation(None, temperature, alpha, beta)  # settings checked before anything is loaded
    cfg.validate()
    if cache_teacher is not False and cache_top_k < 1:
        raise UsageError(f"--cache-top-k must be at least 1, not {cache_top_k}")
    teacher_ref = store.resolve(teacher_name)
    if teacher_ref.kind == "adapter":
        raise UsageError(f"'{teacher_name}' is an adapter; merge it first (`fourwalls merge`) or distill its base")
    lm = store.load(teacher_name, quantized=False)  # a GGUF teacher in fp32, as training computes
    if lm.config.quantization and student_layers is not None:
        raise UsageError(f"'{teacher_name}' is quantized and its layers cannot be trained; take the student's layers "
                         "from its float parent (a quantized teacher works with --student-preset)")
    teacher, tok, teacher_cfg, teacher_digest = lm.model.eval(), lm.tokenizer, lm.config, lm.digest
    teacher.requires_grad_(False)
    del lm  # with a cache, nothing holds the teacher once the cache is built
    if seq_len > teacher_cfg.context_length:
        raise UsageError(f"--seq-len {seq_len} exceeds the teacher's context window ({teacher_cfg.context_length})")
    if cache_teacher is not False and teacher_digest == "unstored":
        raise UsageError("caching teacher logits needs a stored teacher (its digest names the cache); "
                         "`fourwalls models import` it first")
    torch.manual_seed(cfg.seed)  # a preset student's random init: the same seed gives the same run (and resume)
    if student_layers is not None:
        student = student_from_layers(teacher, student_layers)
        settings: dict[str, Any] = {"student_layers": student_layers,
                                    "kept_layers": layer_plan(teacher_cfg.n_layers, student_layers)}
    else:
        student = student_from_preset(str(student_preset), teacher_cfg)
        settings = {"student_preset": student_preset}
    settings.update(temperature=temperature, alpha=alpha, beta=beta, seq_len=seq_len)
    eos = (teacher_cfg.eos_token_ids or (None,))[0]
    pad = eos if eos is not None else 0
    ds = _load_data(data, tok, eos, seq_len)
    train_ds, val_ds = D.split(ds, val_fraction, cfg.seed)
    # The teacher's own cross-entropy on the held-out text, the mark the student's perplexity is read against.
    teacher_ce = evaluate(teacher, val_ds, causal_lm, cfg.batch_size, pad)

    cache = None
    if cache_teacher is not False:
        settings.update(cache_top_k=cache_top_k)
        folder = store.root / "cache" / "teacher-logits" if cache_teacher is True else Path(cache_teacher)
        key = json.dumps([teacher_digest, ds.digest, data.suffix == ".jsonl", seq_len, cache_top_k])
        path = folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"
        if path.is_file():
            cache = TeacherCache.load(path, pad)
        else:
            cache = TeacherCache.build(teacher, ds.examples, cache_top_k, pad)
            if rank() == 0:
                cache.save(path, {"teacher_digest": teacher_digest, "data_digest": ds.digest,
                                  "top_k": str(cache_top_k)})
        teacher = None  # training reads the cache: the teacher need not stay in memory
    objective = _with_cache(distillation(teacher, temperature, alpha, beta), cache)
    held_out = _with_cache(distillation(teacher, 1.0, 1.0, 1.0), cache)  # only its metrics are read
    identity = {"method": "distill", "teacher_digest": teacher_digest, **settings}
    result = train(student, train_ds, val_ds, cfg, _run_dir(store, name, run_dir), objective=objective,
                   resume=resume, identity=json.loads(json.dumps(identity)), pad_id=pad)
    if rank() != 0:  # only rank 0 writes to the store
        return None, result
    result.update(_held_out(student, val_ds, held_out, cfg.batch_size, pad))
    result.update(val_ppl=round(math.exp(min(result["val_ce"], 50)), 4), teacher_val_ce=round(teacher_ce, 6),
                  teacher_val_ppl=round(math.exp(min(teacher_ce, 50)), 4))
    lineage = {"method": "distill", "parent": teacher_ref.name, "parent_digest": teacher_digest, "settings": settings,
               "data": str(data), "data_digest": ds.digest, "data_stats": ds.stats, "hyperparameters": asdict(cfg),
               "val_loss": result.get("val_loss"), "val_ce": result["val_ce"], "val_kl": result["val_kl"],
               "val_ppl": result["val_ppl"], "teacher_val_ppl": result["teacher_val_ppl"], "command": _command()}
    return store.add(name, student.config.replace(name=name), student.state_dict(), tok, lineage=lineage), result


def _with_cache(objective: Any, cache: TeacherCache | None) -> Any:
    """``objective`` with each batch's teacher logits read from ``cache`` (unchanged without one)."""
    if cache is None:
        return objective

    def cached(student: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return objective(student, {**batch, "teacher_logits": cache.logits(batch["input_ids"])})

    return cached
