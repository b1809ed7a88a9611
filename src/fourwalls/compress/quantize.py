"""What `fourwalls quantize` does: a stored model to weight-only int8/int4 (or a bf16/fp16 cast), stored with lineage.

int4 can be calibrated on a text (activation-aware scaling, after AWQ, Lin et al. 2023): each layer's input
channels are scaled by ``mean|x|^a`` before its weights are quantized and its input divided by the same scales,
so the channels that carry large activations get finer steps. ``a`` is searched per layer on the calibration
activations to minimise the layer's output error; ``a = 0`` is plain quantization, so calibration never makes a
layer worse on its own calibration data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from fourwalls.compress.calibrate import calibration_ids, calibration_lineage
from fourwalls.errors import UsageError
from fourwalls.model.quant import QuantConfig, check_group_size, quantize_int4, quantize_model
from fourwalls.model.transformer import block_linears
from fourwalls.store import DTYPES, ModelRef, Store

CASTS = {"bf16": "bfloat16", "fp16": "float16"}
SCHEMES = ("int8", "int4", *CASTS)


def layer_inputs(model: nn.Module, ids: Tensor, rows: int = 256, progress: bool = False) -> dict[str, Tensor]:
    """Each decoder-block Linear's input over the calibration batches: an evenly spaced sample of ``rows`` rows."""
    seen: dict[str, list[Tensor]] = {}
    per_batch = max(1, rows // len(ids))

    def hook(name: str):
        def grab(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])
            step = max(1, x.shape[0] // per_batch)
            seen.setdefault(name, []).append(x[::step][:per_batch].float().clone())
        return grab

    handles = [child.register_forward_pre_hook(hook(name)) for name, *_, child in block_linears(model)]
    try:
        with torch.inference_mode():
            for row in tqdm(ids, desc="calibration", unit="sample", disable=not progress):
                model(row[None])
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v) for k, v in seen.items()}


def awq_scale(weight: Tensor, x: Tensor, group_size: int, grid: int = 11) -> tuple[Tensor, float]:
    """Per-input-channel scales minimising the int4 layer's output error on ``x``; also the alpha chosen."""
    w = weight.detach().float()
    reference = x @ w.T
    mean_abs = x.abs().mean(dim=0).clamp_min(1e-5)
    best: tuple[float, Tensor, float] | None = None
    for i in range(grid):
        alpha = i / (grid - 1)
        s = mean_abs.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred around 1, as AWQ does, so neither side over/underflows
        q, scale, zero = quantize_int4(w * s, group_size)
        groups = q.float().view(w.shape[0], -1, group_size)
        deq = ((groups - 8) * scale[..., None] + zero[..., None]).flatten(1) / s
        err = (x @ deq.T - reference).pow(2).mean().item()
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]


def quantize(model_name: str, scheme: str, name: str, group_size: int = 64, calibration: Path | None = None,
             samples: int = 16, seq_len: int = 256, progress: bool = True,
             store: Store | None = None) -> tuple[ModelRef, dict[str, Any]]:
    """Quantize (int8, int4) or cast (bf16, fp16) a stored model; store the result as ``name``."""
    from fourwalls.train.recipes import _command

    store = store or Store()
    if scheme not in SCHEMES:
        raise UsageError(f"unknown scheme '{scheme}'; choose {', '.join(SCHEMES)}")
    if calibration is not None and scheme != "int4":
        raise UsageError("--calibration applies to int4 only (int8 and casts need no calibration)")
    store.check_new_name(name)
    ref = store.resolve(model_name)
    if ref.kind == "adapter":
        raise UsageError(f"'{model_name}' is an adapter; merge it into its base first (`fourwalls merge`)")
    lineage = ref.manifest.get("lineage", {})
    if lineage.get("method") == "quantize":
        raise UsageError(f"'{model_name}' is already quantized ({lineage.get('settings', {}).get('scheme')}); "
                         f"quantize its parent '{lineage.get('parent')}' instead")
    lm = store.load(model_name, quantized=False)  # requantized from the float weights (a GGUF file's dequantized)
    if lm.config.quantization:
        raise UsageError(f"'{model_name}' is already quantized; quantize its float parent instead")
    settings: dict[str, Any] = {"scheme": scheme}
    report: dict[str, Any] = {}
    if scheme in CASTS:
        state = {k: v.to(DTYPES[CASTS[scheme]]) for k, v in lm.model.state_dict().items()}
        cfg = lm.config
    else:
        qcfg = QuantConfig(scheme, group_size, input_scales=calibration is not None)
        scales = None
        if scheme == "int4":
            settings["group_size"] = group_size
            check_group_size(lm.model, group_size)  # before the calibration pass, which takes a while
            if calibration is not None:
                ids = calibration_ids(calibration, lm.tokenizer, samples, seq_len)
                settings |= {"calibration_method": "awq", "samples": len(ids), "seq_len": ids.shape[1]}
                inputs = layer_inputs(lm.model, ids, progress=progress)
                scales, alphas = {}, []
                for layer, x in tqdm(inputs.items(), desc="awq", unit="layer", disable=not progress):
                    weight = lm.model.get_submodule(layer).weight
                    scales[layer], alpha = awq_scale(weight, x, group_size)
                    alphas.append(alpha)
                report["awq_mean_alpha"] = sum(alphas) / len(alphas)
        report["layers"] = quantize_model(lm.model, qcfg, scales)
        state, cfg = lm.model.state_dict(), lm.model.config
    lineage = {"method": "quantize", "parent": ref.name, "parent_digest": ref.digest, "settings": settings,
               **calibration_lineage(calibration), "command": _command()}
    out = store.add(name, cfg, state, lm.tokenizer, lineage=lineage, source=f"quantize {ref.name}")
    return out, report
