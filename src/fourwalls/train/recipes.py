"""What `fourwalls pretrain`, `finetune`, `align` and `merge` do: build model and data, run the loop, store the
result."""

from __future__ import annotations

import hashlib
import json
import logging
import shlex
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from torch import nn

from fourwalls.errors import FormatError, FourwallsError, UsageError
from fourwalls.files import atomic_write
from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.store import LoadedModel, ModelRef, Store
from fourwalls.tokenizer import Tokenizer
from fourwalls.train import data as D
from fourwalls.train.checkpoint import full_state_dict
from fourwalls.train.loop import TrainConfig, rank, train
from fourwalls.train.objectives import PREFERENCE_OBJECTIVES, preference, reference_logps

log = logging.getLogger("fourwalls.train")

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


def load_trainable(store: Store, model_name: str, name: str, method: str, max_len: int, verb: str = "fine-tune"
                   ) -> tuple[ModelRef, LoadedModel]:
    """A stored float model to train by ``method`` into the new name ``name`` on sequences up to ``max_len``
    tokens (an adapter or a model quantized for deployment is refused; the method and name are checked first)."""
    if method not in METHODS:
        raise UsageError(f"unknown method '{method}'; choose {', '.join(METHODS)}")
    store.check_new_name(name)
    base_ref = store.resolve(model_name)
    if base_ref.kind == "adapter":
        raise UsageError(f"'{model_name}' is an adapter; merge it first (`fourwalls merge`) or {verb} its base")
    lm = store.load(model_name, quantized=False)  # a GGUF file's blocks dequantized: weights to train
    if lm.config.quantization:
        raise UsageError(f"'{model_name}' is quantized for deployment; {verb} its float parent "
                         f"'{base_ref.manifest.get('lineage', {}).get('parent')}' (or use --method qlora on it)")
    if max_len > lm.config.context_length:
        raise UsageError(f"--max-len {max_len} exceeds the model's context window ({lm.config.context_length})")
    return base_ref, lm


def make_trainable(model: nn.Module, method: str, lora: Any, seed: int) -> Any:
    """``full`` trains every weight; ``lora`` attaches an adapter (``lora``'s settings, else the defaults; its random
    A matrices seeded by ``seed``); ``qlora`` first holds the base in 4-bit NF4. Returns the LoRA settings."""
    from fourwalls.model.lora import LoRAConfig, attach_lora

    lora = lora or LoRAConfig()
    if method == "qlora":
        from fourwalls.model.quant import quantize_nf4

        quantize_nf4(model)
    if method != "full":
        torch.manual_seed(seed)  # LoRA's A matrices are random: the same seed gives the same run
        attach_lora(model, lora)
    return lora


def store_trained(store: Store, name: str, method: str, base_ref: ModelRef, lm: LoadedModel, lora: Any,
                  lineage: dict[str, Any], data: Path | None = None, description: str | None = None
                  ) -> ModelRef | None:
    """Store a trained ``lm.model``: the adapter alone (on ``base_ref``, with a routing profile of the prompts of
    ``data``: experts.py) or the whole model; None off rank 0."""
    from fourwalls.model.lora import save_adapter

    state = full_state_dict(lm.model)  # every rank: gathering a sharded model's weights is a collective
    if rank() != 0:  # only rank 0 writes to the store
        return None
    if method == "full":
        return store.add(name, lm.config, state, lm.tokenizer, lineage=lineage)
    lineage["lora"] = asdict(lora)
    routing = _profile(data, description) if data is not None else None
    return store.add_adapter(name, base_ref, lambda d: save_adapter(d, lm.model, lora, base_ref.name, state), lineage,
                             routing)


def _profile(data: Path, description: str | None) -> dict[str, Any] | None:
    """The routing profile of an adapter trained on ``data``; None (with a warning) without the embedder: the
    adapter is still served by name, and `fourwalls experts add --data` can profile it later."""
    from fourwalls.experts import make_profile, training_prompts
    from fourwalls.rag.embed import embedder

    try:
        return make_profile(training_prompts(data), embedder(), description)
    except FourwallsError as e:
        log.warning("the adapter is stored without a routing profile: %s", e)
        return None


def finetune(model_name: str, data: Path, method: str, name: str, cfg: TrainConfig, lora: Any = None,
             shape: str = "auto", max_len: int = 512, pack: bool = False, val_fraction: float = 0.1,
             val_data: Path | None = None, skip_bad_lines: bool = False, run_dir: Path | None = None,
             resume: bool = False, store: Store | None = None, description: str | None = None
             ) -> tuple[ModelRef | None, dict[str, Any]]:
    """Fine-tune a stored model (full or LoRA) on JSONL data; store the new model or adapter as ``name`` (an
    adapter with a routing profile of the data's prompts and ``description``, for `fourwalls experts`)."""
    store = store or Store()
    base_ref, lm = load_trainable(store, model_name, name, method, max_len)
    tok, eos = lm.tokenizer, (lm.config.eos_token_ids or (None,))[0]
    ds = D.load_jsonl(data, tok, eos, shape, max_len, skip_bad_lines)
    if val_data is not None:
        train_ds, val_ds = ds, D.load_jsonl(val_data, tok, eos, ds.shape, max_len, skip_bad_lines)
    else:
        train_ds, val_ds = D.split(ds, val_fraction, cfg.seed)
    if pack:
        train_ds = D.pack(train_ds, max_len)
    lora = make_trainable(lm.model, method, lora, cfg.seed)
    identity = {"method": method, "base_digest": lm.digest, "max_len": max_len, "pack": pack,
                **({"lora": asdict(lora)} if method != "full" else {})}
    run_dir = _run_dir(store, name, run_dir)
    pad = eos if eos is not None else 0
    result = train(lm.model, train_ds, val_ds, cfg, run_dir, resume=resume,
                   identity=json.loads(json.dumps(identity)), pad_id=pad)
    lineage = {"method": method, "base": base_ref.name, "base_digest": lm.digest, "data": str(data),
               "data_digest": ds.digest, "data_stats": ds.stats, "hyperparameters": asdict(cfg),
               "val_loss": result.get("val_loss"), "command": _command()}
    return store_trained(store, name, method, base_ref, lm, lora, lineage, data, description), result


def merge(adapter: str, name: str, store: Store | None = None) -> ModelRef:
    """Fold a stored adapter into its base: a new full model in the store."""
    from fourwalls.model.lora import merge_lora

    store = store or Store()
    ref = store.resolve(adapter)
    if ref.kind != "adapter":
        raise UsageError(f"'{adapter}' is not an adapter; `fourwalls models list` shows which are")
    store.check_new_name(name)
    lm = store.load(adapter, quantized=False)  # the merged model is a float one
    merge_lora(lm.model)
    lineage = {"method": "merge", "adapter": adapter, "adapter_digest": ref.digest, "base": ref.manifest["base"],
               "base_digest": ref.manifest["base_digest"], "command": _command()}
    return store.add(name, lm.config, lm.model.state_dict(), lm.tokenizer, lineage=lineage)


# --- preference tuning: `fourwalls align` ---------------------------------------------------------------------------


def align(model_name: str, data: Path, objective: str, name: str, cfg: TrainConfig, method: str = "lora",
          lora: Any = None, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
          shape: str = "auto", max_len: int = 512, val_fraction: float = 0.1, val_data: Path | None = None,
          skip_bad_lines: bool = False, ref_cache: bool | Path = False, run_dir: Path | None = None,
          resume: bool = False, store: Store | None = None, description: str | None = None
          ) -> tuple[ModelRef | None, dict[str, Any]]:
    """Preference-tune a stored model with DPO, IPO, KTO or ORPO (``objective``) on JSONL pairs or labelled
    answers; store the new model or adapter as ``name``.

    The reference is the starting model, at no second copy in memory: with LoRA, the model with its adapter
    switched off, in each step; with ``full`` training (or ``ref_cache`` with LoRA) its answer log-probabilities,
    computed once before training and cached as safetensors under the store's cache/ (``ref_cache`` True) or in the
    folder ``ref_cache`` names, reused by later runs on the same model and data and by ``resume``. ORPO has none.
    """
    objective_fn = preference(objective, beta, desirable_weight, undesirable_weight)  # settings checked first
    cfg.validate()
    wanted = PREFERENCE_OBJECTIVES[objective]
    if shape not in ("auto", wanted):
        raise UsageError(f"--objective {objective} reads {wanted} data, not {shape}")
    if objective == "orpo" and ref_cache is not False:
        raise UsageError("ORPO has no reference model, so nothing to cache; drop --ref-cache")
    store = store or Store()
    base_ref, lm = load_trainable(store, model_name, name, method, max_len, "align")
    ds = D.load_preferences(data, lm.tokenizer, shape, max_len, skip_bad_lines)
    if ds.shape != wanted:
        hint = "--objective kto" if ds.shape == "kto" else "--objective dpo, ipo or orpo"
        raise UsageError(f"{data} holds {ds.shape} data, which --objective {objective} cannot read; use {hint}")
    val_ds = D.load_preferences(val_data, lm.tokenizer, ds.shape, max_len, skip_bad_lines) if val_data else None
    lora = make_trainable(lm.model, method, lora, cfg.seed)  # before the reference: qlora's is the NF4 base
    eos = (lm.config.eos_token_ids or (None,))[0]
    pad = eos if eos is not None else 0
    settings: dict[str, Any] = {"objective": objective, "beta": beta, "max_len": max_len}
    if objective == "kto":
        settings.update(desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    reference: dict[str, Any] = {"reference": "none (ORPO)" if objective == "orpo" else "the base, adapter off"}
    reused = None
    if objective != "orpo" and (method == "full" or ref_cache is not False):
        folder = Path(ref_cache) if isinstance(ref_cache, str | Path) else store.root / "cache" / "ref-logprobs"
        key = [lm.digest, method == "qlora", ds.shape, max_len]
        ds, reference, reused = _with_reference(lm.model, ds, folder, key, pad, cfg.batch_size)
        if val_ds is not None:
            val_ds, val_reference, _ = _with_reference(lm.model, val_ds, folder, key, pad, cfg.batch_size)
            reference.update({f"val_{k}": v for k, v in val_reference.items() if k != "reference"})
    train_ds, val_ds = (ds, val_ds) if val_ds is not None else D.split(ds, val_fraction, cfg.seed)
    identity = {"method": method, "base_digest": lm.digest, **settings,
                **{k: v for k, v in reference.items() if k.endswith("digest")},
                **({"lora": asdict(lora)} if method != "full" else {})}
    result = train(lm.model, train_ds, val_ds, cfg, _run_dir(store, name, run_dir), objective=objective_fn,
                   resume=resume, identity=json.loads(json.dumps(identity)), pad_id=pad)
    result.update(reference=reference, ref_cache_reused=reused)
    lineage = {"method": method, **settings, "base": base_ref.name, "base_digest": lm.digest, "data": str(data),
               "data_digest": ds.digest, "data_stats": ds.stats, **reference, "hyperparameters": asdict(cfg),
               **{k: v for k, v in result.items() if k.startswith("val_")}, "command": _command()}
    return store_trained(store, name, method, base_ref, lm, lora, lineage, data, description), result


def _with_reference(model: torch.nn.Module, ds: D.Dataset, folder: Path, key: list[Any], pad_id: int,
                    batch_size: int) -> tuple[D.Dataset, dict[str, Any], bool]:
    """``ds`` with the reference's answer log-probabilities on every example: read from the cache file for this
    model, data and settings, or computed with ``model`` now and written there (atomically) for the next run.
    Also returns where they are and their digest (for the lineage), and whether the file was reused."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import save_file

    digest = hashlib.sha256(json.dumps([*key, ds.digest]).encode()).hexdigest()
    path = folder / f"{digest[:32]}.safetensors"
    reused = path.is_file()
    if reused:
        try:
            with safe_open(str(path), framework="pt") as f:
                values = f.get_tensor("logps")
        except (SafetensorError, OSError, ValueError) as e:
            raise FormatError(f"reference cache {path} is unreadable ({e}); delete it to rebuild") from None
        if tuple(values.shape) != (len(ds), 2):
            raise FormatError(f"reference cache {path} holds {tuple(values.shape)} log-probabilities for "
                              f"{len(ds)} examples; delete it to rebuild")
    else:
        values = reference_logps(model, ds, pad_id, batch_size)
        if rank() == 0:
            meta = {"base_digest": str(key[0]), "data_digest": ds.digest, "shape": ds.shape}
            atomic_write(path, lambda tmp: save_file({"logps": values.contiguous()}, str(tmp), metadata=meta))
    examples = [replace(e, values={**e.values, "ref_logp": a, "paired_ref_logp": b})
                for e, (a, b) in zip(ds.examples, values.tolist())]
    info = {"reference": "the base's log-probabilities, cached", "ref_cache": str(path),
            "ref_logps_digest": "sha256-" + hashlib.sha256(values.numpy().tobytes()).hexdigest()}
    return replace(ds, examples=examples), info, reused
