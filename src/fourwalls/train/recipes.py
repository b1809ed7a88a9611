"""What `fourwalls pretrain`, `finetune` and `merge` do: build model and data, run the loop, store the result."""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from torch import nn

from fourwalls.errors import UsageError
from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.store import LoadedModel, ModelRef, Store
from fourwalls.tokenizer import Tokenizer
from fourwalls.train import data as D
from fourwalls.train.checkpoint import full_state_dict
from fourwalls.train.loop import TrainConfig, rank, train

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _command() -> str:
    return shlex.join(["fourwalls", *sys.argv[1:]]) if sys.argv and sys.argv[0].endswith("fourwalls") else ""


def _run_dir(store: Store, name: str, run_dir: Path | None) -> Path:
    return run_dir or store.root / "runs" / name


def train_tokenizer(corpus: Path, vocab_size: int) -> Tokenizer:
    """A byte-level BPE tokenizer trained on one text file (GPT-2's pre-tokenization, ChatML specials)."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with corpus.open(encoding="utf-8") as f:
        backend.train_from_iterator(f, trainer)
    return Tokenizer(backend, CHATML, None, "<|endoftext|>")


def pretrain(data: Path, preset_name: str, name: str, cfg: TrainConfig, seq_len: int = 256,
             vocab_size: int | None = None, val_fraction: float = 0.05, run_dir: Path | None = None,
             resume: bool = False, store: Store | None = None) -> tuple[ModelRef | None, dict[str, Any]]:
    """Train a tokenizer and a model from scratch on a text file; store it as ``name``."""
    store = store or Store()
    store.check_new_name(name)
    base = preset(preset_name)
    run_dir = _run_dir(store, name, run_dir)
    if not data.is_file():
        raise UsageError(f"no such data file: {data}")
    tok_file = run_dir / "tokenizer.json"
    if resume and tok_file.is_file():  # the tokenizer is part of the run: a resumed run reuses it
        tok = Tokenizer.from_dir(run_dir)
    else:
        tok = train_tokenizer(data, vocab_size or base.vocab_size)  # deterministic: every rank trains the same
        if rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            tok.save(run_dir)
    eos = tok.token_id("<|endoftext|>")
    mcfg = base.replace(name=name, vocab_size=tok.vocab_size, context_length=max(seq_len, base.context_length),
                        bos_token_id=None, eos_token_ids=(eos,))
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg)
    init_weights(model)
    train_ds, val_ds = D.split(D.load_text_corpus(data, tok, seq_len), val_fraction, cfg.seed)
    identity = {"method": "pretrain", "preset": preset_name, "seq_len": seq_len}
    result = train(model, train_ds, val_ds, cfg, run_dir, resume=resume, identity=identity, pad_id=eos)
    state = full_state_dict(model)  # every rank: gathering a sharded model's weights is a collective
    if rank() != 0:  # only rank 0 writes to the store
        return None, result
    lineage = {"method": "pretrain", "preset": preset_name, "data": str(data), "data_digest": train_ds.digest,
               "seq_len": seq_len, "hyperparameters": asdict(cfg), "val_loss": result.get("val_loss"),
               "command": _command()}
    return store.add(name, mcfg, state, tok, lineage=lineage), result


METHODS = ("full", "lora", "qlora")


def load_trainable(store: Store, model_name: str, verb: str = "fine-tune") -> tuple[ModelRef, LoadedModel]:
    """A stored float model to train on (an adapter or a model quantized for deployment is refused)."""
    base_ref = store.resolve(model_name)
    if base_ref.kind == "adapter":
        raise UsageError(f"'{model_name}' is an adapter; merge it first (`fourwalls merge`) or {verb} its base")
    lm = store.load(model_name)
    if lm.config.quantization:
        raise UsageError(f"'{model_name}' is quantized for deployment; {verb} its float parent "
                         f"'{base_ref.manifest.get('lineage', {}).get('parent')}' (or use --method qlora on it)")
    return base_ref, lm


def make_trainable(model: nn.Module, method: str, lora: Any, seed: int) -> None:
    """``full`` trains every weight; ``lora`` attaches an adapter; ``qlora`` first holds the base in 4-bit NF4."""
    from fourwalls.model.lora import attach_lora

    if method == "qlora":
        from fourwalls.model.quant import quantize_nf4

        quantize_nf4(model)
    if method != "full":
        torch.manual_seed(seed)  # LoRA's A matrices are random: the same seed gives the same run
        attach_lora(model, lora)


def store_trained(store: Store, name: str, method: str, base_ref: ModelRef, lm: LoadedModel, lora: Any,
                  lineage: dict[str, Any]) -> ModelRef | None:
    """Store a trained ``lm.model``: the adapter alone (on ``base_ref``) or the whole model; None off rank 0."""
    from fourwalls.model.lora import save_adapter

    state = full_state_dict(lm.model)  # every rank: gathering a sharded model's weights is a collective
    if rank() != 0:  # only rank 0 writes to the store
        return None
    if method == "full":
        return store.add(name, lm.config, state, lm.tokenizer, lineage=lineage)
    lineage["lora"] = asdict(lora)
    return store.add_adapter(name, base_ref, lambda d: save_adapter(d, lm.model, lora, base_ref.name, state), lineage)


def finetune(model_name: str, data: Path, method: str, name: str, cfg: TrainConfig, lora: Any = None,
             shape: str = "auto", max_len: int = 512, pack: bool = False, val_fraction: float = 0.1,
             val_data: Path | None = None, skip_bad_lines: bool = False, run_dir: Path | None = None,
             resume: bool = False, store: Store | None = None) -> tuple[ModelRef | None, dict[str, Any]]:
    """Fine-tune a stored model (full or LoRA) on JSONL data; store the new model or adapter as ``name``."""
    from fourwalls.model.lora import LoRAConfig

    if method not in METHODS:
        raise UsageError(f"unknown method '{method}'; choose full, lora or qlora")
    store = store or Store()
    store.check_new_name(name)
    base_ref, lm = load_trainable(store, model_name)
    if max_len > lm.config.context_length:
        raise UsageError(f"--max-len {max_len} exceeds the model's context window ({lm.config.context_length})")
    tok, eos = lm.tokenizer, (lm.config.eos_token_ids or (None,))[0]
    ds = D.load_jsonl(data, tok, eos, shape, max_len, skip_bad_lines)
    if val_data is not None:
        train_ds, val_ds = ds, D.load_jsonl(val_data, tok, eos, ds.shape, max_len, skip_bad_lines)
    else:
        train_ds, val_ds = D.split(ds, val_fraction, cfg.seed)
    if pack:
        train_ds = D.pack(train_ds, max_len)
    lora = lora or LoRAConfig()
    make_trainable(lm.model, method, lora, cfg.seed)
    identity = {"method": method, "base_digest": lm.digest, "max_len": max_len, "pack": pack,
                **({"lora": asdict(lora)} if method != "full" else {})}
    run_dir = _run_dir(store, name, run_dir)
    pad = eos if eos is not None else 0
    result = train(lm.model, train_ds, val_ds, cfg, run_dir, resume=resume,
                   identity=json.loads(json.dumps(identity)), pad_id=pad)
    lineage = {"method": method, "base": base_ref.name, "base_digest": lm.digest, "data": str(data),
               "data_digest": ds.digest, "data_stats": ds.stats, "hyperparameters": asdict(cfg),
               "val_loss": result.get("val_loss"), "command": _command()}
    return store_trained(store, name, method, base_ref, lm, lora, lineage), result


def merge(adapter: str, name: str, store: Store | None = None) -> ModelRef:
    """Fold a stored adapter into its base: a new full model in the store."""
    from fourwalls.model.lora import merge_lora

    store = store or Store()
    ref = store.resolve(adapter)
    if ref.kind != "adapter":
        raise UsageError(f"'{adapter}' is not an adapter; `fourwalls models list` shows which are")
    store.check_new_name(name)
    lm = store.load(adapter)
    merge_lora(lm.model)
    lineage = {"method": "merge", "adapter": adapter, "adapter_digest": ref.digest, "base": ref.manifest["base"],
               "base_digest": ref.manifest["base_digest"], "command": _command()}
    return store.add(name, lm.config, lm.model.state_dict(), lm.tokenizer, lineage=lineage)
