"""LoRA as a drop-in substitution of Linear layers, saved and loaded as PEFT-format folders.

A LoRALinear keeps the frozen base layer and adds ``B(A(x)) * alpha / r`` with A Kaiming-initialised and B zero,
so an untrained adapter changes nothing. ``merge_lora`` folds the product back into plain Linear layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fourwalls.errors import FormatError, NotFoundError, UnsupportedError, UsageError
from fourwalls.model.transformer import Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_PREFIX = "base_model.model.model."  # what PEFT writes for a LlamaForCausalLM's decoder layers


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = TARGETS

    def __post_init__(self) -> None:
        self.target_modules = tuple(self.target_modules)
        if self.r < 1:
            raise UsageError(f"LoRA rank must be at least 1, not {self.r}")
        if not 0 <= self.dropout < 1:
            raise UsageError("LoRA dropout must be in [0, 1)")
        unknown = sorted(set(self.target_modules) - set(TARGETS))
        if unknown or not self.target_modules:
            raise UsageError(f"unknown LoRA target module(s) {unknown}; choose from {', '.join(TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, cfg: LoRAConfig) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, cfg.r, bias=False)
        self.lora_B = nn.Linear(cfg.r, base.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = cfg.scaling
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    def merged_weight(self) -> Tensor:
        base = self.base.dequantize() if hasattr(self.base, "dequantize") else self.base.weight
        return base + self.scaling * (self.lora_B.weight @ self.lora_A.weight)


def _targets(model: nn.Module, names: tuple[str, ...]) -> list[tuple[nn.Module, str, str]]:
    """(parent, attribute, qualified name) of every targeted layer inside ``model.layers``."""
    found = []
    for qual, module in model.layers.named_modules():
        for child_name, _child in module.named_children():
            if child_name in names:
                found.append((module, child_name, f"layers.{qual}.{child_name}"))
    return found


def attach_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Wrap the targeted layers in LoRALinear and freeze everything else; returns the layers wrapped."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UsageError("this model already has LoRA layers; merge them first")
    for p in model.parameters():
        p.requires_grad_(False)
    names = []
    for parent, attr, qual in _targets(model, cfg.target_modules):
        setattr(parent, attr, LoRALinear(getattr(parent, attr), cfg))
        names.append(qual)
    return names


def merge_lora(model: nn.Module) -> None:
    """Replace every LoRALinear by a plain Linear with the merged weight."""
    for module in list(model.modules()):
        for attr, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                bias = child.base.bias
                merged = Linear(child.base.in_features, child.base.out_features, bias=bias is not None,
                                device="meta")
                merged.weight = nn.Parameter(child.merged_weight().detach().clone())
                if bias is not None:
                    merged.bias = nn.Parameter(bias.detach().clone())
                setattr(module, attr, merged)


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapter's tensors under PEFT's names."""
    out = {}
    for qual, module in model.named_modules():
        if isinstance(module, LoRALinear):
            out[f"{_PREFIX}{qual}.lora_A.weight"] = module.lora_A.weight.detach().contiguous()
            out[f"{_PREFIX}{qual}.lora_B.weight"] = module.lora_B.weight.detach().contiguous()
    return out


def save_adapter(folder: Path, model: nn.Module, cfg: LoRAConfig, base_model: str = "") -> None:
    """Write adapter_config.json + adapter_model.safetensors, the files HF PEFT reads."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
              "lora_dropout": cfg.dropout, "target_modules": list(cfg.target_modules), "bias": "none",
              "base_model_name_or_path": base_model, "fan_in_fan_out": False, "inference_mode": True,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None}
    save_file(lora_state_dict(model), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def read_adapter_config(folder: Path) -> LoRAConfig:
    """Parse a PEFT adapter_config.json, refusing the options fourwalls does not implement."""
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise NotFoundError(f"{folder} is not a LoRA adapter folder (no adapter_config.json)")
    try:
        c: dict[str, Any] = json.loads(path.read_text())
    except ValueError as e:
        raise FormatError(f"{path} is not valid JSON ({e})") from None
    if c.get("peft_type", "LORA") != "LORA":
        raise UnsupportedError(f"adapter type {c.get('peft_type')} is not supported; fourwalls loads LoRA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("use_rslora", False)):
        if c.get(key, False) != ok:
            raise UnsupportedError(f"{path}: {key}={c.get(key)} is not supported")
    if c.get("bias", "none") != "none" or c.get("modules_to_save") or c.get("rank_pattern") or c.get("alpha_pattern"):
        raise UnsupportedError(f"{path}: bias terms, modules_to_save and per-layer ranks are not supported")
    targets = c.get("target_modules") or []
    if isinstance(targets, str):
        raise UnsupportedError(f"{path}: a regex target_modules is not supported; list the module names")
    try:
        return LoRAConfig(r=int(c["r"]), alpha=float(c["lora_alpha"]), dropout=float(c.get("lora_dropout", 0.0)),
                          target_modules=tuple(targets))
    except (KeyError, TypeError, ValueError) as e:
        raise FormatError(f"{path} lacks a valid {e}") from None
    except UsageError as e:
        raise UnsupportedError(f"{path}: {e}") from None


def load_adapter(model: nn.Module, folder: Path) -> LoRAConfig:
    """Attach a PEFT-format adapter (saved by fourwalls or by HF PEFT) to ``model``."""
    cfg = read_adapter_config(folder)
    try:
        weights = load_file(str(folder / "adapter_model.safetensors"))
    except FileNotFoundError:
        raise NotFoundError(f"{folder} has no adapter_model.safetensors") from None
    except (SafetensorError, OSError) as e:
        raise FormatError(f"{folder / 'adapter_model.safetensors'} is unreadable ({e})") from None
    attach_lora(model, cfg)
    expected = {k: v.shape for k, v in lora_state_dict(model).items()}
    # PEFT names the weights with or without the adapter name ("lora_A.default.weight" in memory, not on disk).
    weights = {k.replace(".default.weight", ".weight"): v for k, v in weights.items()}
    if set(weights) != set(expected):
        missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
        raise FormatError(f"adapter in {folder} does not fit this model: missing {missing[:2]}, unexpected {extra[:2]}")
    modules = dict(model.named_modules())
    with torch.no_grad():
        for key, tensor in weights.items():
            if tensor.shape != expected[key]:
                raise FormatError(f"adapter tensor {key} has shape {tuple(tensor.shape)}, expected "
                                  f"{tuple(expected[key])}")
            qual, part = key.removeprefix(_PREFIX).rsplit(".", 2)[:2]
            getattr(modules[qual], part).weight.copy_(tensor)
    return cfg
