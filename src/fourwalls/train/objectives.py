"""Training objectives: ``objective(model, batch) -> (loss, metrics)``; the one training loop calls any of them."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fourwalls.errors import UsageError
from fourwalls.train.data import IGNORE


def causal_lm(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
    """Next-token cross-entropy over the positions whose label is not masked."""
    targets = F.pad(batch["labels"][:, 1:], (0, 1), value=IGNORE)  # position t predicts token t + 1
    loss = model(batch["input_ids"], targets=targets)  # the head and the loss in one pass, logits never whole
    return loss, {"ce": loss.item(), "tokens": float((targets != IGNORE).sum())}


def distillation(teacher: nn.Module | None, temperature: float = 2.0, alpha: float = 0.5, beta: float = 0.5
                 ) -> Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]:
    """Knowledge distillation (Hinton et al. 2015): ``alpha * CE(labels) + beta * T^2 * KL(teacher_T || student_T)``.

    Both terms are means over the positions whose label is not masked; ``_T`` is the softmax of logits / T. The
    paper writes the soft term as the cross-entropy H(teacher_T, student_T); that differs from the KL only by the
    teacher's entropy, a constant for the student (same gradients), and the KL reads 0 at a perfect match. Its
    gradient shrinks as 1/T^2, so the T^2 factor keeps ``beta`` meaning the same at any temperature. The teacher's
    logits come from ``batch["teacher_logits"]`` when the batch carries them (a cache), else from ``teacher`` run
    under no_grad. Metrics: ``ce``, ``kl`` (at T), ``kl_t1`` (at T = 1) and ``tokens``.
    """
    if not temperature > 0:
        raise UsageError(f"the distillation temperature must be > 0, not {temperature}")
    if alpha < 0 or beta < 0 or alpha + beta == 0:
        raise UsageError(f"--alpha and --beta weigh the two losses: both >= 0 and not both 0 (got {alpha}, {beta})")

    def objective(student: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        logits = student(batch["input_ids"])[:, :-1].float()
        targets = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
        taught = batch.get("teacher_logits")
        if taught is None:
            if teacher is None:
                raise UsageError("distillation needs a teacher model or teacher logits in the batch")
            with torch.no_grad():
                taught = teacher(batch["input_ids"])
        if taught.shape[-1] != logits.shape[-1]:
            raise UsageError(f"the teacher's vocabulary ({taught.shape[-1]} tokens) differs from the student's "
                             f"({logits.shape[-1]}); a student must share its teacher's tokenizer")
        keep = targets != IGNORE
        s, t = logits[keep], taught[:, :-1].float()[keep]
        kl = _kl(t, s, temperature)
        loss = alpha * ce + beta * temperature**2 * kl
        with torch.no_grad():
            kl_t1 = kl if temperature == 1 else _kl(t, s, 1.0)
        return loss, {"ce": ce.item(), "kl": kl.item(), "kl_t1": kl_t1.item(), "tokens": float(keep.sum())}

    return objective


def _kl(teacher_logits: Tensor, student_logits: Tensor, temperature: float) -> Tensor:
    """Mean over rows of KL(softmax(teacher / T) || softmax(student / T)) for [N, V] logits.

    Teacher logits of -inf (a top-k cache leaves the rest out) have probability 0 and add exactly 0.
    """
    log_p = F.log_softmax(teacher_logits / temperature, dim=-1)
    log_q = F.log_softmax(student_logits / temperature, dim=-1)
    terms = torch.where(log_p > float("-inf"), log_p.exp() * (log_p - log_q), 0.0)
    return terms.sum(-1).mean()


UNLEARNING = ("npo", "grad-ascent", "grad-diff")


def row_nll(model: nn.Module, input_ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's next-token negative log-likelihood summed over its scored tokens, and how many it scored: [B], [B]."""
    logits = model(input_ids)[:, :-1].float()
    targets = labels[:, 1:]
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction="none")
    return nll.view(targets.shape).sum(1), (targets != IGNORE).sum(1)


def unlearning(method: str = "npo", beta: float = 0.1, retain_weight: float = 1.0
               ) -> Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]:
    """Make the model forget the batch's rows while keeping its ``paired`` rows (the retain set).

    - ``npo`` (Zhang et al. 2024, negative preference optimization): ``2/beta * log(1 + (pi/pi_ref)^beta)`` per
      forget sequence, ``pi`` its likelihood under the model and ``pi_ref`` under the model before unlearning
      (``batch["ref_nll"]``, its summed NLL), plus ``retain_weight`` times the retain rows' mean NLL. Where the
      model already finds a sequence unlikely the ratio is small and its gradient fades, so unlearning slows down
      by itself instead of running away as gradient ascent does.
    - ``grad-ascent``: minus the forget rows' mean NLL, nothing else (the retain rows are ignored).
    - ``grad-diff``: gradient ascent on the forget rows plus ``retain_weight`` times the retain rows' mean NLL.

    Metrics: ``forget_nll`` and ``retain_nll`` (mean per token), ``log_ratio`` (NPO's mean log pi/pi_ref),
    ``tokens``, ``processed`` (the forget and retain rows' tokens, for throughput). Forget and retain rows go
    through the model in one forward pass.
    """
    if method not in UNLEARNING:
        raise UsageError(f"unknown unlearning objective '{method}'; choose {', '.join(UNLEARNING)}")
    if not beta > 0:
        raise UsageError(f"--beta must be > 0, not {beta}")
    if retain_weight < 0:
        raise UsageError(f"--retain-weight must be >= 0, not {retain_weight}")

    def objective(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ids, labels = batch["input_ids"], batch["labels"]
        n = ids.shape[0]
        if method != "grad-ascent":
            ids = _stack(ids, batch["paired_input_ids"], 0)
            labels = _stack(labels, batch["paired_labels"], IGNORE)
        nll, count = row_nll(model, ids, labels)
        forget_nll = nll[:n].sum() / count[:n].sum().clamp(min=1)
        metrics = {"forget_nll": forget_nll.item(), "tokens": float(count.sum()),
                   "processed": float(batch["lengths"].sum()) + (
                       float(batch["paired_lengths"].sum()) if method != "grad-ascent" else 0.0)}
        if method == "npo":
            log_ratio = batch["ref_nll"] - nll[:n]  # log pi - log pi_ref
            loss = 2 / beta * F.softplus(beta * log_ratio).mean()
            metrics["log_ratio"] = log_ratio.mean().item()
        else:
            loss = -forget_nll
        if method != "grad-ascent":
            retain_nll = nll[n:].sum() / count[n:].sum().clamp(min=1)
            loss = loss + retain_weight * retain_nll
            metrics["retain_nll"] = retain_nll.item()
        return loss, metrics

    return objective


def _stack(a: Tensor, b: Tensor, pad: int) -> Tensor:
    """Two [B, T] batches as one, the narrower padded on the right with ``pad``."""
    width = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(t, (0, width - t.shape[1]), value=pad) for t in (a, b)])
