"""The one training loop. Pretraining, fine-tuning, preference tuning, distillation and unlearning differ only in
data and objective.

Under ``torchrun --nproc-per-node N`` the same loop runs data-parallel (gloo on CPU, NCCL on GPU): every rank takes
its share of each global batch and only rank 0 writes checkpoints, metrics and plots. The model is replicated (DDP),
or with ``fsdp`` sharded (FSDP2: each rank holds 1/N of the parameters, gradients and optimizer state, and gathers
a block's weights only while it computes), for models whose training state does not fit one process.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from fourwalls.errors import FourwallsError, UsageError
from fourwalls.model.native import keep_freed_memory
from fourwalls.train import checkpoint
from fourwalls.train.data import Dataset, batches, collate
from fourwalls.train.objectives import Objective, causal_lm

_COUNTS = ("tokens", "examples", "processed")  # what an objective's metrics count, not measure: not logged as curves


class TrainingInterrupted(FourwallsError):
    """SIGTERM/SIGINT: the loop saved a checkpoint at a step boundary and stopped."""


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps
    batch_size: int = 4  # global: split across ranks under torchrun
    grad_accum: int = 1
    lr: float = 2e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    schedule: str = "cosine"  # cosine | linear | constant
    optimizer: str = "adamw"  # adamw | sgd | adafactor
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0  # 0 disables clipping
    eval_every: int = 0  # 0: only at the end
    save_every: int = 0  # 0: only on a signal and at the end
    keep: int = 3
    seed: int = 0
    bf16: bool = False  # bf16 autocast (helps only where the CPU has bf16 instructions)
    fsdp: bool = False  # under torchrun: shard the model with FSDP2 instead of replicating it with DDP
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [
            (self.steps >= 1, "--steps must be at least 1"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch size and gradient accumulation must be >= 1"),
            (self.lr > 0, "--lr must be > 0"),
            (self.schedule in ("cosine", "linear", "constant"), "--schedule must be cosine, linear or constant"),
            (self.optimizer in ("adamw", "sgd", "adafactor"), "--optimizer must be adamw, sgd or adafactor"),
            (0 <= self.warmup_steps < self.steps, "--warmup-steps must be below --steps"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup, then cosine or linear decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    shape = 0.5 * (1 + math.cos(math.pi * progress)) if cfg.schedule == "cosine" else 1 - progress
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * shape)


def make_optimizer(cfg: TrainConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adafactor":  # factored second moments: memory-light for big matrices
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def evaluate(model: nn.Module, ds: Dataset, objective: Objective, batch_size: int, pad_id: int) -> float:
    """Mean loss over a whole dataset, weighted by the tokens (or examples) each batch's loss is a mean over."""
    return evaluate_metrics(model, ds, objective, batch_size, pad_id)["loss"]


def evaluate_metrics(model: nn.Module, ds: Dataset, objective: Objective, batch_size: int,
                     pad_id: int) -> dict[str, float]:
    """Mean loss and the objective's other metrics over a whole dataset, each batch weighted by what its loss is a
    mean over (``examples`` where the objective counts them, else ``tokens``); a metric a batch could not measure
    (NaN) is left out of that metric's mean. The counts (``tokens``, ``examples``) come back as totals."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            loss, m = objective(model, collate(ds.examples[i : i + batch_size], pad_id))
            w = m.get("examples", m["tokens"])
            for key, value in {"loss": loss.item(), **m}.items():
                if key in _COUNTS:
                    sums[key], weights[key] = sums.get(key, 0.0) + value, 1.0
                elif math.isfinite(value):
                    sums[key] = sums.get(key, 0.0) + value * w
                    weights[key] = weights.get(key, 0.0) + w
    return {key: sums[key] / max(weights[key], 1.0) for key in sums}


def rank() -> int:
    """This process's rank under torchrun (0 when alone); only rank 0 writes files."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        atexit.register(_leave_process_group)
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def _leave_process_group() -> None:
    """Destroy the process group we made while the interpreter is still whole: a rank that exits with it open can
    abort in its teardown (gloo's worker threads; "terminate called without an active exception", SIGABRT). The
    ranks meet first, so none closes its connections while another still tears its group down."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def train(model: nn.Module, train_ds: Dataset, val_ds: Dataset | None, cfg: TrainConfig, run_dir: Path,
          objective: Objective = causal_lm, resume: bool = False, identity: dict[str, Any] | None = None,
          pad_id: int = 0) -> dict[str, Any]:
    """Train ``model`` in place; checkpoints, metrics.jsonl and loss.png go to ``run_dir``. Returns final metrics."""
    cfg.validate()
    keep_freed_memory()
    rank, world = _dist()
    if cfg.batch_size % world:
        raise UsageError(f"the batch size ({cfg.batch_size}) must be divisible by the number of processes ({world})")
    identity = {**(identity or {}), "data_digest": train_ds.digest}
    ckpt_dir = run_dir / "checkpoints"
    sharded = cfg.fsdp and world > 1
    if sharded:  # before the optimizer: the shards replace the parameters
        _shard(model)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise UsageError("the model has no trainable parameters")
    optimizer = make_optimizer(cfg, params)
    step, start_time = 0, time.time()
    torch.manual_seed(cfg.seed)
    if resume:
        found = checkpoint.latest(ckpt_dir)
        if found is None:
            raise UsageError(f"nothing to resume: {ckpt_dir} holds no checkpoint")
        state = checkpoint.load(found[0], model, optimizer, identity)
        step = state["step"]
    elif checkpoint.latest(ckpt_dir) is not None:
        raise UsageError(f"{run_dir} already holds checkpoints; pass --resume to continue, or pick a new run folder")
    ddp = nn.parallel.DistributedDataParallel(model) if world > 1 and not sharded else model
    metrics_path = run_dir / "metrics.jsonl"
    records = _load_metrics(metrics_path, step) if resume and rank == 0 else []
    if not resume and val_ds is not None and (rank == 0 or sharded):  # where the curve starts: the untrained model
        start = _validation(model, val_ds, objective, cfg, pad_id)  # a sharded model computes on every rank
        if rank == 0:
            metrics_path.unlink(missing_ok=True)
            _append_metric(metrics_path, {"step": 0, **start})
    stop = {"signal": None}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    stream = batches(train_ds, cfg.batch_size, cfg.seed, pad_id, start=step * cfg.grad_accum)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    bar = tqdm(total=cfg.steps, initial=step, desc="train", unit="step", disable=not cfg.progress or rank != 0)
    # Throughput counts every token the model processed (prompts included, padding not); the share of them that
    # carries loss (an assistant's turns, say) is reported beside it.
    processed_seen, trained_seen, tick = 0.0, 0.0, time.perf_counter()
    model.train()
    try:
        while step < cfg.steps:
            lr = lr_at(cfg, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_sum, tokens, processed, measured = 0.0, 0.0, 0.0, []
            for _ in range(cfg.grad_accum):
                batch = {k: v[rank::world] for k, v in next(stream).items()}
                with autocast:
                    loss, m = objective(ddp, batch)
                (loss / cfg.grad_accum).backward()
                loss_sum += loss.item() / cfg.grad_accum
                tokens += m["tokens"]
                measured.append({k: v for k, v in m.items() if k not in _COUNTS})
                processed += m.get("processed", _processed(batch))
            if world > 1:  # the loss of the whole global batch, not this rank's share; a signal on any rank stops all
                t = torch.tensor([loss_sum, 1.0 if stop["signal"] else 0.0])
                dist.all_reduce(t)
                loss_sum = t[0].item() / world
                if t[1] > 0 and not stop["signal"]:
                    stop["signal"] = signal.SIGTERM
            step_metrics = _mean_metrics(measured, world)
            grad_norm = _full(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm or float("inf"))).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            processed_seen += processed * world
            trained_seen += tokens * world
            elapsed = time.perf_counter() - tick
            rec = {"step": step, "loss": round(loss_sum, 6), "lr": lr, "grad_norm": round(grad_norm, 4),
                   "tokens_per_s": round(processed_seen / elapsed, 1),
                   "trained_share": round(trained_seen / max(processed_seen, 1.0), 4), **step_metrics}
            if cfg.eval_every and step % cfg.eval_every == 0 and val_ds is not None and step < cfg.steps:
                rec.update(_validation(model, val_ds, objective, cfg, pad_id))
            records.append(rec)
            bar.set_postfix_str(f"loss={loss_sum:.4f}, {rec['tokens_per_s']:.0f} tok/s "
                                f"({rec['trained_share']:.0%} trained on)")
            bar.update(1)
            if rank == 0:
                _append_metric(metrics_path, rec)
            at_save = cfg.save_every and step % cfg.save_every == 0
            if at_save or stop["signal"]:
                weights, optimizer_state = checkpoint.gather(model, optimizer)  # a collective when sharded
                if rank == 0:
                    checkpoint.save(ckpt_dir, step, weights, optimizer_state,
                                    {"identity": identity, "config": asdict(cfg)}, cfg.keep)
            if stop["signal"]:
                raise TrainingInterrupted(f"stopped by signal {stop['signal']} at step {step}; a checkpoint was "
                                          f"saved in {ckpt_dir}: run the same command with --resume to continue")
    finally:
        bar.close()
        for s, handler in old.items():
            signal.signal(s, handler)
    model.eval()
    final = {"step": step, "train_loss": records[-1]["loss"] if records else None,
             "seconds": round(time.time() - start_time, 1)}
    if records:
        final.update(tokens_per_s=records[-1]["tokens_per_s"], trained_share=records[-1]["trained_share"])
    if val_ds is not None:
        final.update(_validation(model, val_ds, objective, cfg, pad_id))
    if rank == 0:
        _append_metric(metrics_path, {"step": step, **{k: v for k, v in final.items() if k.startswith("val")}})
        plot_losses(metrics_path, run_dir / "loss.png")
    return final


def _shard(model: nn.Module) -> None:
    """FSDP2 over the decoder blocks, then the rest (embeddings, norm, head) as one more unit."""
    from torch.distributed.fsdp import fully_shard

    for block in getattr(model, "layers", []):
        fully_shard(block)
    fully_shard(model)


def _full(t: Tensor) -> Tensor:
    """A DTensor (a sharded model's gradient norm, say) as a whole tensor; any other tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _processed(batch: dict[str, Tensor]) -> float:
    """The tokens a batch ran through the model: its rows and their paired rows (a preference pair's rejected
    answer, KTO's mismatched one), for tokens/s; an objective that runs only some of them reports ``processed``."""
    return float(batch["lengths"].sum()) + float(batch["paired_lengths"].sum() if "paired_lengths" in batch else 0)


def _mean_metrics(measured: list[dict[str, float]], world: int) -> dict[str, float]:
    """A step's metrics: each one's mean over its micro-batches and ranks, leaving out those that could not measure
    it (NaN: a KTO share with no desirable answer, say); rounded for metrics.jsonl, and absent where none could."""
    if not measured[0]:
        return {}
    keys = list(measured[0])
    t = torch.tensor([[m[k], 1.0] if math.isfinite(m[k]) else [0.0, 0.0] for m in measured for k in keys],
                     dtype=torch.float64).view(len(measured), len(keys), 2).sum(0)
    if world > 1:
        dist.all_reduce(t)
    return {k: round(total / n, 6) for k, (total, n) in zip(keys, t.tolist()) if n}


def _validation(model: nn.Module, ds: Dataset, objective: Objective, cfg: TrainConfig, pad_id: int) -> dict:
    """``val_loss``, the objective's metrics as ``val_<name>``, and ``val_ppl`` where the objective reports the
    data's cross-entropy (``ce``): the exp of a mixed loss (distillation's CE + KL, a preference loss) is no
    perplexity."""
    was_training = model.training
    model.eval()
    metrics = evaluate_metrics(model, ds, objective, cfg.batch_size, pad_id)
    model.train(was_training)
    out = {f"val_{key}": round(value, 6) for key, value in metrics.items() if key not in _COUNTS}
    if "ce" in metrics:
        out["val_ppl"] = round(math.exp(min(metrics["ce"], 50)), 4)
    return out


def _load_metrics(path: Path, up_to_step: int) -> list[dict[str, Any]]:
    """Metrics of a resumed run: drop what the interrupted run logged after its last checkpoint."""
    if not path.is_file():
        return []
    kept = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:  # a line torn by the kill
            continue
        if rec["step"] <= up_to_step:
            kept.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in kept))
    return kept


def _append_metric(path: Path, rec: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(rec) + "\n")


def plot_losses(metrics: Path, out: Path) -> None:
    """Training and validation loss against step, as a PNG; beside it a panel for each metric the objective logs
    (DPO's rewards, accuracy and KL estimate, say), its training curve and its validation points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in metrics.read_text().splitlines()]
    names = ["loss", *dict.fromkeys(k for r in recs for k in r if k not in _LOGGED and not k.startswith("val_"))]
    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 if cols == 1 else 4.5 * cols, 4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        train = [(r["step"], r[name]) for r in recs if name in r]
        val = [(r["step"], r[f"val_{name}"]) for r in recs if f"val_{name}" in r]
        if train:
            ax.plot(*zip(*train), label=f"train {name}", linewidth=1)
        if val:
            ax.plot(*zip(*val), "o-", label=f"validation {name}")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)" if name == "loss" and cols == 1 else name)
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


_LOGGED = ("step", "loss", "lr", "grad_norm", "tokens_per_s")  # the loop's own fields of a metrics.jsonl record
