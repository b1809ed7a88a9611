"""LoRA as a drop-in substitution of Linear layers, saved and loaded as PEFT-format folders.

A LoRALinear keeps the frozen base layer and adds ``B(A(x)) * alpha / r`` with A Kaiming-initialised and B zero,
so an untrained adapter changes nothing. ``merge_lora`` folds the product back into plain Linear layers.
On disk an adapter is what HF PEFT writes for a ``*ForCausalLM``: ``adapter_config.json`` and
``adapter_model.safetensors`` with keys ``base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fourwalls.errors import FormatError, NotFoundError, UnsupportedError, UsageError
from fourwalls.model.ops import Linear, linear
from fourwalls.model.transformer import PROJECTIONS, block_linears

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model.model."  # PEFT's name for a *ForCausalLM's decoder ("model.") inside its wrapper

# PEFT options that change what an adapter computes; fourwalls refuses a file that turns any of them on.
_UNSUPPORTED = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "use_rslora": "rank-stabilised scaling (alpha / sqrt(r))",
    "fan_in_fan_out": "transposed (Conv1D-style) base weights",
    "rank_pattern": "per-layer ranks",
    "alpha_pattern": "per-layer alphas",
    "modules_to_save": "fully trained extra modules",
    "lora_bias": "trained LoRA bias terms",
    "layers_to_transform": "adapting only some layers",
    "layer_replication": "replicated layers",
    "exclude_modules": "excluded modules",
    "target_parameters": "LoRA on raw parameters",
    "trainable_token_indices": "trained token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA",
    "arrow_config": "Arrow routing among adapters",
    "use_bdlora": "block-diagonal LoRA",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
}
# Initialisations that only set A and B; the others (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA) also rewrite the base
# weights, and PEFT redoes that when it loads such an adapter, so it is wrong on the original base.
_PLAIN_INITS = (True, False, "gaussian", "eva", "orthogonal")


@dataclass
class LoRAConfig:
    """Rank, scale (``alpha / r``), dropout and target layer names of a LoRA adapter."""

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = PROJECTIONS

    def __post_init__(self) -> None:
        # A JSON round trip of asdict() gives a list; one bare name is one target, not its letters.
        names = self.target_modules
        self.target_modules = (names,) if isinstance(names, str) else tuple(names)
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UsageError(f"LoRA rank r must be an integer of at least 1, not {self.r!r}")
        if not 0 <= self.dropout < 1:
            raise UsageError(f"LoRA dropout must be in [0, 1), not {self.dropout!r}")
        if not self.target_modules:
            raise UsageError(f"LoRA needs at least one target module; choose from {', '.join(PROJECTIONS)}")
        unknown = [t for t in self.target_modules if t not in PROJECTIONS]
        if unknown:
            raise UsageError(f"unknown LoRA target module(s) {', '.join(map(repr, unknown))}; "
                             f"choose from {', '.join(PROJECTIONS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    """A frozen base layer plus a trainable low-rank update: ``base(x) + B(A(dropout(x))) * alpha / r``."""

    def __init__(self, base: nn.Module, cfg: LoRAConfig) -> None:
        super().__init__()
        self.base = base  # a Linear, or a quantized layer with in/out_features and dequantize() (QLoRA)
        device = next(iter([*base.parameters(), *base.buffers()])).device
        # fp32 adapter weights whatever the base's dtype (PEFT does the same): Adam's small steps survive.
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.enabled = True  # off: the base layer alone (see adapters_off)
        self.train(base.training)  # attached to a model in eval mode (serving), dropout must stay off

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        update = linear(linear(self.dropout(x.to(self.lora_A.weight.dtype)), self.lora_A.weight), self.lora_B.weight)
        return y + (update * self.scaling).to(y.dtype)

    def merged_weight(self) -> Tensor:
        """``base.weight + scaling * B @ A`` in the base's dtype (a quantized base is dequantized first)."""
        base = self.base.dequantize() if hasattr(self.base, "dequantize") else self.base.weight
        delta = self.scaling * (self.lora_B.weight @ self.lora_A.weight)
        return (base.float() + delta.to(base.device)).to(base.dtype)


def has_lora(model: nn.Module) -> bool:
    """Whether any layer of ``model`` is a LoRALinear."""
    return any(isinstance(m, LoRALinear) for m in model.modules())


def _check_no_lora(model: nn.Module) -> None:
    if has_lora(model):
        raise UsageError("this model already has LoRA layers; merge them first (merge_lora / `fourwalls merge`)")


@contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Inside, every LoRA layer of ``model`` computes its base layer alone: the model before its adapter, with no
    second copy of the weights (preference tuning's reference model)."""
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for layer in layers:
        layer.enabled = False
    try:
        yield
    finally:
        for layer in layers:
            layer.enabled = True


def attach_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the targeted layers in LoRALinear and freeze everything else; returns the layers wrapped."""
    _check_no_lora(model)
    for p in model.parameters():
        p.requires_grad_(False)
    targets = block_linears(model, nn.Module, cfg.target_modules)
    for _, parent, attr, layer in targets:
        setattr(parent, attr, LoRALinear(layer, cfg))
    return [name for name, *_ in targets]


def merge_lora(model: nn.Module) -> None:
    """Replace every LoRALinear by a plain Linear with the merged weight; the model trains as a whole again."""
    for _, parent, attr, layer in block_linears(model, LoRALinear):
        bias = None if layer.base.bias is None else layer.base.bias.detach().clone()
        setattr(parent, attr, Linear.holding(layer.merged_weight().detach().clone(), bias))
    for p in model.parameters():  # attach_lora froze them
        p.requires_grad_(True)


def lora_state_dict(model: nn.Module, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's names, read from ``state`` (the model's state dict) when given."""
    state = model.state_dict() if state is None else state
    out = {}
    for qual, module in model.named_modules():
        if isinstance(module, LoRALinear):
            for part in ("lora_A", "lora_B"):
                out[f"{_PREFIX}{qual}.{part}.weight"] = state[f"{qual}.{part}.weight"].detach().contiguous()
    return out


def save_adapter(folder: Path, model: nn.Module, cfg: LoRAConfig, base_model: str = "",
                 state: dict[str, Tensor] | None = None) -> None:
    """Write adapter_config.json + adapter_model.safetensors, the files HF PEFT reads; the weights are read from
    ``state`` when given (a sharded model's gathered state dict)."""
    weights = lora_state_dict(model, state)
    if not weights:
        raise UsageError("the model has no LoRA layers to save; attach_lora (or load_adapter) first")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_modules), "bias": "none",
              "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None}
    save_file({k: v.cpu() for k, v in weights.items()}, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def read_adapter_config(folder: Path) -> LoRAConfig:
    """Parse a PEFT adapter_config.json, refusing the options fourwalls does not implement."""
    if not folder.is_dir():
        raise NotFoundError(f"no such adapter folder: {folder}")
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise NotFoundError(f"{folder} is not a LoRA adapter folder (no {CONFIG_FILE})")
    try:
        c: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(c, dict):
        raise FormatError(f"{path} is not a JSON object")
    if c.get("peft_type", "LORA") != "LORA":
        raise UnsupportedError(f"{path}: adapter type {c.get('peft_type')} is not supported; fourwalls loads LoRA")
    for key, what in _UNSUPPORTED.items():
        if c.get(key):
            raise UnsupportedError(f"{path}: {key}={json.dumps(c[key])} ({what}) is not supported")
    init = c.get("init_lora_weights", True)
    if (init.lower() if isinstance(init, str) else init) not in _PLAIN_INITS:
        raise UnsupportedError(f"{path}: init_lora_weights={json.dumps(init)} changes the base weights or the layer "
                               "type; convert it to plain LoRA in PEFT (save_pretrained with "
                               "path_initial_model_for_weight_conversion)")
    if c.get("bias", "none") != "none":
        raise UnsupportedError(f"{path}: bias={c['bias']!r} (trained base biases) is not supported; use 'none'")
    targets = c.get("target_modules")
    if isinstance(targets, str):
        raise UnsupportedError(f"{path}: target_modules={targets!r} (a regex or 'all-linear') is not supported; "
                               "list the module names")
    try:
        return LoRAConfig(r=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                          target_modules=tuple(targets or ()))
    except KeyError as e:
        raise FormatError(f"{path} lacks the field {e}") from None
    except (TypeError, ValueError) as e:
        raise FormatError(f"{path} has an invalid r, lora_alpha or lora_dropout ({e})") from None
    except UsageError as e:
        raise UnsupportedError(f"{path}: {e}") from None


def read_adapter(folder: Path, model: nn.Module) -> tuple[LoRAConfig, dict[str, tuple[Tensor, Tensor]]]:
    """Read and check a PEFT-format adapter against ``model``: its config and ``{layer name: (A, B)}``."""
    cfg = read_adapter_config(folder)
    path = folder / WEIGHTS_FILE
    if not path.is_file():
        bin_hint = " (fourwalls loads no pickled adapter_model.bin)" if (folder / "adapter_model.bin").exists() else ""
        raise NotFoundError(f"{folder} has no {WEIGHTS_FILE}{bin_hint}")
    try:
        weights = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise FormatError(f"{path} is not a valid safetensors file ({e}); it may be truncated") from None
    # PEFT's in-memory names carry the adapter name ("lora_A.default.weight"); files written by older code may too.
    weights = {k.replace(".default.weight", ".weight"): v for k, v in weights.items()}
    expected = {}
    for qual, _, _, layer in block_linears(model, nn.Module, cfg.target_modules):
        expected[f"{_PREFIX}{qual}.lora_A.weight"] = (cfg.r, layer.in_features)
        expected[f"{_PREFIX}{qual}.lora_B.weight"] = (layer.out_features, cfg.r)
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or extra:
        raise FormatError(f"adapter in {folder} does not fit this model: missing {missing[:2]}, "
                          f"unexpected {extra[:2]}")
    for key, shape in expected.items():
        if tuple(weights[key].shape) != shape:
            raise FormatError(f"adapter tensor '{key}' has shape {tuple(weights[key].shape)}, this model and "
                              f"r={cfg.r} imply {shape}")
    layers = {}
    for key in expected:
        qual, part = key.removeprefix(_PREFIX).rsplit(".", 2)[:2]
        if part == "lora_A":
            layers[qual] = (weights[key], weights[f"{_PREFIX}{qual}.lora_B.weight"])
    return cfg, layers


def load_adapter(model: nn.Module, folder: Path) -> LoRAConfig:
    """Attach a PEFT-format adapter (saved by fourwalls or by HF PEFT) to ``model``; returns its config."""
    _check_no_lora(model)
    cfg, layers = read_adapter(folder, model)  # every name and shape checked first: a bad file changes nothing
    attach_lora(model, cfg)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for qual, (a, b) in layers.items():
            modules[qual].lora_A.weight.copy_(a)
            modules[qual].lora_B.weight.copy_(b)
    return cfg
