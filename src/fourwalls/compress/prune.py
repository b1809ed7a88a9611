"""Pruning: zero the least important weights of the linear layers inside the decoder blocks.

Two scores, compared within each output row: ``magnitude`` (|W|) and ``wanda`` (|W| times the L2 norm of that
input feature over calibration text; Sun et al. 2023, "A Simple and Effective Pruning Approach for Large Language
Models"). Unstructured pruning zeroes the same number of weights in every row, so the sparsity is exact; an N:M
pattern keeps N of every M consecutive weights of a row (2:4 is what NVIDIA's sparse tensor cores run).

What it does not give here: the result is stored dense, in fp32. A zero takes as much room as the weight it
replaced and no CPU kernel used by fourwalls skips zeros, so the file is as large as the unpruned model in fp32 and
decoding is no faster. Pruning is a step towards a sparse-aware runtime or a smaller compressed file, not a
speed-up on this machine.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fourwalls.compress.calibrate import calibration_ids, calibration_lineage
from fourwalls.errors import UsageError
from fourwalls.model.transformer import Transformer, block_linears, rope_cos_sin, rope_inv_freq
from fourwalls.store import ModelRef, Store

METHODS = ("magnitude", "wanda")
CALIBRATION_SEQ_LEN = 256


def parse_pattern(pattern: str) -> tuple[int, int]:
    """'N:M' -> (N, M): N weights kept in every M consecutive input weights of a row."""
    keep_s, sep, group_s = pattern.partition(":")
    try:
        keep, group = int(keep_s), int(group_s)
    except ValueError:
        keep = group = 0
    if not sep or not 0 < keep < group:
        raise UsageError(f"bad pattern {pattern!r}: give N:M with 0 < N < M, e.g. 2:4 (2 of every 4 weights kept)")
    return keep, group


def target_sparsity(sparsity: float | None, pattern: str | None) -> float:
    """The fraction of weights to zero, checked against the pattern (which fixes it)."""
    if pattern is not None:
        keep, group = parse_pattern(pattern)
        implied = 1 - keep / group
        if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
            raise UsageError(f"pattern {pattern} keeps {keep} of every {group} weights, a sparsity of {implied:g}, "
                             f"not {sparsity:g}; leave --sparsity out or make it {implied:g}")
        return implied
    if sparsity is None:
        raise UsageError("give --sparsity (the fraction of weights to zero, e.g. 0.5) or --pattern N:M")
    if not 0 < sparsity < 1:  # NaN fails this too
        raise UsageError(f"sparsity must be between 0 and 1 (exclusive), not {sparsity:g}")
    return sparsity


def prune_mask(score: Tensor, sparsity: float, nm: tuple[int, int] | None = None) -> Tensor:
    """True where a weight goes: the lowest scores of each row, or of each group of M in a row for N:M."""
    rows, cols = score.shape
    if nm is None:
        group, drop = cols, round(sparsity * cols)
    else:
        group, drop = nm[1], nm[1] - nm[0]
    groups = score.reshape(rows, cols // group, group)
    # topk gives ``drop`` distinct positions even among equal scores, so exactly that many weights go per group.
    lowest = groups.topk(drop, dim=-1, largest=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True)
    return mask.reshape(rows, cols)


def _zero(layer: nn.Linear, score: Tensor, sparsity: float, nm: tuple[int, int] | None) -> None:
    layer.weight.masked_fill_(prune_mask(score, sparsity, nm), 0.0)


def _input_sq_norms(block: nn.Module, inputs: list[Tensor], cos: Tensor, sin: Tensor) -> dict[nn.Module, Tensor]:
    """Per input feature, the sum of squares over all calibration tokens, for each linear layer of ``block``."""
    sums: dict[nn.Module, Tensor] = {}

    def hook(layer: nn.Module, args: tuple[Tensor, ...], _: Tensor) -> None:
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        sums[layer] = sums.get(layer, 0) + x.pow(2).sum(0)

    handles = [m.register_forward_hook(hook) for m in block.modules() if isinstance(m, nn.Linear)]
    try:
        for x in inputs:
            block(x, cos, sin, None, None, True)
    finally:
        for h in handles:
            h.remove()
    return sums


def prune_model(model: Transformer, method: str, sparsity: float, nm: tuple[int, int] | None = None,
                calibration: Tensor | None = None, chunk: int = 4) -> None:
    """Prune ``model``'s decoder-block linear layers in place; ``wanda`` needs ``calibration`` token ids [n, T]."""
    layers = block_linears(model)  # embeddings, norms and lm_head are never pruned
    if nm is not None:
        for name, *_, layer in layers:
            if layer.in_features % nm[1]:
                raise UsageError(f"pattern {nm[0]}:{nm[1]} needs input widths divisible by {nm[1]}; "
                                 f"{name} has {layer.in_features}")
    with torch.no_grad():
        if method == "magnitude":
            for *_, layer in layers:
                _zero(layer, layer.weight.abs(), sparsity, nm)
            return
        if calibration is None:
            raise UsageError("wanda needs calibration text (--calibration FILE)")
        # Block by block, as in the Wanda paper's code: each block sees the activations of the blocks before it
        # as already pruned, so its scores describe the inputs it will get, not those of the dense model.
        # Sequences go through in chunks to bound the memory of attention and the MLP's hidden layer.
        xs = [model.embed_tokens(ids) for ids in calibration.split(chunk)]
        cos, sin = rope_cos_sin(rope_inv_freq(model.config), torch.arange(calibration.shape[1]), xs[0].dtype)
        for block in model.layers:
            sums = _input_sq_norms(block, xs, cos, sin)
            for layer in (m for m in block.modules() if isinstance(m, nn.Linear)):
                _zero(layer, layer.weight.abs() * sums[layer].sqrt().to(layer.weight.dtype), sparsity, nm)
            xs = [block(x, cos, sin, None, None, True) for x in xs]


def sparsity_stats(model: Transformer) -> dict[str, Any]:
    """Zeros over the pruned layers and over all parameters (tied embeddings counted once)."""
    pruned = [m.weight for *_, m in block_linears(model)]
    everything = list(model.parameters())  # parameters() yields a tied tensor once
    z_pruned, n_pruned = sum(int((w == 0).sum()) for w in pruned), sum(w.numel() for w in pruned)
    z_all, n_all = sum(int((p == 0).sum()) for p in everything), sum(p.numel() for p in everything)
    return {"layers": len(pruned), "zeros": z_pruned, "pruned_parameters": n_pruned, "parameters": n_all,
            "sparsity_pruned_layers": z_pruned / n_pruned, "sparsity_all": z_all / n_all}


def prune(model_name: str, method: str, sparsity: float | None, name: str, pattern: str | None = None,
          calibration: Path | None = None, samples: int = 32, store: Store | None = None,
          ) -> tuple[ModelRef, dict[str, Any]]:
    """Prune a stored model by ``method`` (magnitude or wanda) and store the result as ``name``, dense in fp32.

    sparsity: fraction of each row's weights to zero (rounded per row); implied by ``pattern`` ("N:M", N of every
    M consecutive weights kept) when that is given. calibration: a text file, needed by wanda; ``samples`` blocks
    of up to 256 tokens are read from it. The stored model is as large as its unpruned fp32 copy and decodes no
    faster on a CPU: nothing here uses sparse kernels.
    """
    if method not in METHODS:
        raise UsageError(f"unknown pruning method '{method}'; choose {' or '.join(METHODS)}")
    target = target_sparsity(sparsity, pattern)
    nm = parse_pattern(pattern) if pattern is not None else None
    if method == "wanda":
        if calibration is None:
            raise UsageError("wanda weighs each weight by its input's size on real text: give --calibration FILE "
                             "(a few KB of text like what the model will see)")
        if not Path(calibration).is_file():
            raise UsageError(f"no such calibration file: {calibration}")
        if samples < 1:
            raise UsageError(f"--samples must be at least 1, not {samples}")
    elif calibration is not None:
        raise UsageError("magnitude pruning reads no calibration text; leave --calibration out or use --method wanda")
    store = store or Store()
    store.check_new_name(name)
    ref = store.resolve(model_name)
    if ref.kind == "adapter":
        raise UsageError(f"'{model_name}' is an adapter; merge it into its base first (`fourwalls merge "
                         f"{model_name} --name NAME`) and prune the merged model")
    if "quantization" in ref.manifest or ref.manifest.get("lineage", {}).get("method") == "quantize":
        parent = ref.manifest.get("lineage", {}).get("parent") or "its full-precision parent"
        raise UsageError(f"'{model_name}' is quantized; prune {parent} instead (prune first, then quantize)")

    start = time.perf_counter()
    lm = store.load(model_name, dtype=torch.float32, quantized=False)
    ids = None
    if method == "wanda":
        seq_len = min(CALIBRATION_SEQ_LEN, lm.config.context_length)
        ids = calibration_ids(Path(calibration), lm.tokenizer, samples, seq_len)  # type: ignore[arg-type]
    prune_model(lm.model, method, target, nm, ids)
    stats = sparsity_stats(lm.model)

    from fourwalls.train.recipes import _command  # the train package is only needed for this

    lineage = {"method": "prune", "parent": ref.name, "parent_digest": ref.digest,
               "settings": {"method": method, "sparsity": target, "pattern": pattern,
                            "samples": None if ids is None else int(ids.shape[0]),
                            "seq_len": None if ids is None else int(ids.shape[1])},
               **calibration_lineage(calibration), "sparsity_achieved": stats["sparsity_pruned_layers"],
               "command": _command()}
    new = store.add(name, lm.config, lm.model.state_dict(), lm.tokenizer, lineage=lineage)
    size = sum(f.stat().st_size for f in new.path.iterdir() if f.is_file())
    report = {"name": new.name, "digest": new.digest, "method": method, "sparsity": target, "pattern": pattern,
              **stats, "calibration_tokens": 0 if ids is None else ids.numel(),
              "dense_storage": True, "size_bytes": size, "seconds": time.perf_counter() - start}
    return new, report
