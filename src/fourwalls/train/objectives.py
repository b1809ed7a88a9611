"""Training objectives: ``objective(model, batch) -> (loss, metrics)``; the one training loop calls any of them.

``metrics`` holds ``tokens`` (the tokens the loss scores), ``processed`` where the batch ran more than its rows'
tokens (padding excluded; the loop's tokens/s counts it, else the rows' lengths), ``examples`` where the loss is a
mean over examples rather than tokens (validation weighs batches by it), and whatever else the objective measures:
the loop logs it per step and on validation, and plots it beside the loss. Every call returns the same keys (NaN
where a batch cannot measure one), since under torchrun the ranks average them together.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from fourwalls.errors import UsageError
from fourwalls.model.lora import adapters_off, has_lora
from fourwalls.train.data import IGNORE, Dataset, collate

Objective = Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, dict[str, float]]]


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


# --- preference tuning (`fourwalls align`) --------------------------------------------------------------------------
# The losses are functions of answer log-probabilities (sums over each answer's tokens), written as the papers write
# them and checked against TRL's trainers on the same log-probabilities.

PREFERENCE_OBJECTIVES = {"dpo": "pairs", "ipo": "pairs", "orpo": "pairs", "kto": "kto"}  # the data each one reads


def dpo_losses(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, beta: float) -> Tensor:
    """DPO (Rafailov et al. 2023, eq. 7) per pair: ``-log sigmoid(beta * (chosen log-ratio - rejected log-ratio))``,
    a log-ratio being the policy's answer log-probability minus the reference's."""
    return -F.logsigmoid(beta * ((chosen - ref_chosen) - (rejected - ref_rejected)))


def ipo_losses(chosen: Tensor, rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, n_chosen: Tensor,
               n_rejected: Tensor, beta: float) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17) per pair: ``(h - 1 / (2 * beta))^2``, beta being the paper's tau and ``h`` the
    difference of the log-ratios, each averaged over its answer's ``n`` tokens (as TRL does, with the authors'
    agreement: a sum would make the squared loss grow with the answers' length)."""
    h = (chosen - ref_chosen) / n_chosen.clamp(min=1) - (rejected - ref_rejected) / n_rejected.clamp(min=1)
    return (h - 1 / (2 * beta)) ** 2


def kto_losses(logratio: Tensor, desirable: Tensor, kl: Tensor, beta: float, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0) -> Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7) per example: ``lambda_D * (1 - sigmoid(beta * (r - z)))`` for a desirable
    answer, ``lambda_U * (1 - sigmoid(beta * (z - r)))`` for an undesirable one; ``r`` is its log-ratio and ``z``
    the KL reference point (a detached, non-negative estimate)."""
    return torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (logratio - kl))),
                       undesirable_weight * (1 - torch.sigmoid(beta * (kl - logratio))))


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for x <= 0, accurate on both sides of -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds_ratio(chosen_mean: Tensor, rejected_mean: Tensor) -> Tensor:
    """ORPO (Hong et al. 2024, eqs. 4 and 7) per pair: ``log sigmoid(log odds(chosen) - log odds(rejected))``, with
    ``odds(y) = P(y) / (1 - P(y))`` and ``log P(y)`` the answer's mean log-probability per token."""
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    return F.logsigmoid(log_odds)


def answer_logps(model: nn.Module, ids: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Each row's log-probability of its labelled tokens (an answer; for unlearning, the text) summed [B], and how
    many there are [B]; the head runs on those positions only, a chunk at a time: the logits are never whole."""
    targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE)  # position t predicts token t + 1
    return model(ids, targets=targets, log_probs=True).sum(1), (targets != IGNORE).sum(1)


def with_paired(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The batch's rows, then their paired rows, as one batch of 2B ids and labels: one forward for both."""
    return (_stack(batch["input_ids"], batch["paired_input_ids"], 0),
            _stack(batch["labels"], batch["paired_labels"], IGNORE))


def _tokens(labels: Tensor) -> float:
    """Tokens run for these rows, padding excluded: every sequence ends with its answer."""
    positions = torch.arange(1, labels.shape[1] + 1, device=labels.device)
    return float(((labels != IGNORE) * positions).amax(1).sum())


def reference_logps(model: nn.Module, ds: Dataset, pad_id: int, batch_size: int = 8) -> Tensor:
    """The answer log-probabilities [N, 2] of every example of a preference dataset under ``model`` (chosen and
    rejected, or KTO's answer and mismatched answer): computed once before training, they are the reference for a
    run that changes the model itself."""
    out = []
    with torch.no_grad():
        for i in range(0, len(ds), batch_size):
            logps, _ = answer_logps(model, *with_paired(collate(ds.examples[i : i + batch_size], pad_id)))
            out.append(logps.view(2, -1).t())
    return torch.cat(out)


def _reference(model: nn.Module, batch: dict[str, Tensor], ids: Tensor, labels: Tensor) -> Tensor:
    """The reference's log-probabilities of the 2B sequences: from the batch when precomputed (``ref_logp`` and
    ``paired_ref_logp``), else from this model with its LoRA adapters switched off (in the same step, no gradient)."""
    if "ref_logp" in batch:
        return torch.cat([batch["ref_logp"], batch["paired_ref_logp"]])
    if not has_lora(model):
        raise UsageError("training without LoRA needs the reference log-probabilities computed before training "
                         "(fourwalls align does this: the cache of --ref-cache)")
    inner = getattr(model, "module", model)  # under DDP: no gradient, so no need of the wrapper's bookkeeping
    with torch.no_grad(), adapters_off(inner):
        return answer_logps(inner, ids, labels)[0]


def _rewards(chosen: Tensor, rejected: Tensor) -> dict[str, float]:
    return {"reward_accuracy": (chosen > rejected).float().mean().item(), "reward_chosen": chosen.mean().item(),
            "reward_rejected": rejected.mean().item(), "reward_margin": (chosen - rejected).mean().item()}


def preference(kind: str, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0
               ) -> Objective:
    """The objective of `fourwalls align`: ``dpo``, ``ipo`` or ``orpo`` over batches of pairs, ``kto`` over labelled
    answers. ``beta`` is DPO's and KTO's beta, IPO's tau and ORPO's lambda (0.1: the papers' and TRL's default).

    Rewards are ``beta`` times the log-ratio to the reference (ORPO, which has no reference: times the mean token
    log-probability, as TRL logs them). Metrics: ``reward_accuracy`` (the share of pairs whose chosen answer out-
    rewards the rejected one; for KTO, of answers whose reward has their label's sign), ``reward_chosen``,
    ``reward_rejected``, ``reward_margin``, ``kl`` (the policy's mean log-ratio to the reference over the batch's
    answers; for KTO its reference point, from the mismatched answers) and for ORPO ``nll`` and ``log_odds_ratio``.
    """
    if kind not in PREFERENCE_OBJECTIVES:
        raise UsageError(f"unknown objective '{kind}'; choose {', '.join(PREFERENCE_OBJECTIVES)}")
    if not beta > 0:
        raise UsageError(f"--beta must be > 0, not {beta}")
    if desirable_weight < 0 or undesirable_weight < 0 or desirable_weight + undesirable_weight == 0:
        raise UsageError("--desirable-weight and --undesirable-weight must be >= 0 and not both 0")

    def paired(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ids, labels = with_paired(batch)
        b = ids.shape[0] // 2
        logps, counts = answer_logps(model, ids, labels)
        metrics = {"examples": float(b), "tokens": float(counts.sum()), "processed": _tokens(labels)}
        if kind == "orpo":
            mean = logps / counts.clamp(min=1)
            ratio = orpo_log_odds_ratio(mean[:b], mean[b:])
            nll = -logps[:b].sum() / counts[:b].sum().clamp(min=1)
            rewards = beta * mean.detach()
            metrics.update(_rewards(rewards[:b], rewards[b:]), nll=nll.item(), log_odds_ratio=ratio.mean().item())
            return nll - beta * ratio.mean(), metrics
        ref = _reference(model, batch, ids, labels)
        if kind == "dpo":
            losses = dpo_losses(logps[:b], logps[b:], ref[:b], ref[b:], beta)
        else:
            losses = ipo_losses(logps[:b], logps[b:], ref[:b], ref[b:], counts[:b], counts[b:], beta)
        logratio = (logps - ref).detach()
        metrics.update(_rewards(beta * logratio[:b], beta * logratio[b:]), kl=logratio.mean().item())
        return losses.mean(), metrics

    def kto(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        ids, labels = with_paired(batch)  # each answer, then the mismatched answers
        b = ids.shape[0] // 2
        ref = _reference(model, batch, ids, labels)
        logps, counts = answer_logps(model, ids[:b], labels[:b])
        training = torch.is_grad_enabled()  # validation: each rank that runs it sees the whole set
        with torch.no_grad():  # the reference point: no gradient flows through it
            inner = getattr(model, "module", model)
            kl = (answer_logps(inner, ids[b:], labels[b:])[0] - ref[b:]).mean()
            if dist.is_initialized() and training:  # the global batch's estimate, as TRL's
                dist.all_reduce(kl)
                kl /= dist.get_world_size()
            kl = kl.clamp(min=0)
        desirable = batch["desirable"].bool()
        loss = kto_losses(logps - ref[:b], desirable, kl, beta, desirable_weight, undesirable_weight).mean()
        rewards = beta * (logps - ref[:b]).detach()
        chosen, rejected = rewards[desirable], rewards[~desirable]
        nan = float("nan")
        metrics = {"examples": float(b), "tokens": float(counts.sum()), "processed": _tokens(labels),
                   "reward_accuracy": ((rewards > 0) & desirable | (rewards < 0) & ~desirable).float().mean().item(),
                   "reward_chosen": chosen.mean().item() if len(chosen) else nan,
                   "reward_rejected": rejected.mean().item() if len(rejected) else nan,
                   "reward_margin": (chosen.mean() - rejected.mean()).item() if len(chosen) and len(rejected) else nan,
                   "kl": kl.item()}
        return loss, metrics

    return kto if kind == "kto" else paired


UNLEARNING = ("npo", "grad-ascent", "grad-diff")


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
    through the model in one forward pass, the head run on the scored positions only (``answer_logps``).
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
        logps, count = answer_logps(model, ids, labels)
        nll = -logps  # each row's summed NLL
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
