"""CPU autograd machinery the decoder calls: fp32 matrix products on oneDNN (forward and backward), the Linear
layer with decoding's few-row path, training's attention, and the cross-entropy of the head without its logits.

Each piece computes what its plain PyTorch form computes (``F.linear``, ``F.scaled_dot_product_attention``,
``F.cross_entropy``), faster on the CPUs fourwalls runs on; the measurements are with each.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fourwalls.model.native import NativeLinear

# oneDNN's fp32 matrix product (it ships inside torch's CPU wheels): torch sends fp32 products to MKL, which on
# the AMD CPUs measured here ran at 130-200 GFLOP/s on 2 cores against oneDNN's 420-480 (AVX-512), in the
# forward and both backward products alike. The op is inductor's, so it is looked up, not assumed.
_ONEDNN = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None) \
    if torch.backends.mkldnn.is_available() else None


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        weight = weight.contiguous()  # a weight with gaps between its rows took oneDNN's reference path: 500x slower
    return _ONEDNN(x, weight, bias, "none", [], "")


def _on_onednn(*tensors: Tensor) -> bool:
    return (_ONEDNN is not None and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)
            and not torch.is_autocast_enabled("cpu") and os.environ.get("FOURWALLS_ONEDNN") != "0")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear`` with fp32 CPU products, forward and backward, on oneDNN's kernels where torch has them."""
    if not _on_onednn(x, weight):
        return F.linear(x, weight, bias)
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                         or (bias is not None and bias.requires_grad))):
        return _onednn(x, weight, bias)
    return _OneDNNLinear.apply(x, weight, bias)


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x if weight.requires_grad else None, weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _onednn(grad, weight.t())
        g = grad.reshape(-1, grad.shape[-1])
        if ctx.needs_input_grad[1]:
            dw = _onednn(g.t(), x.reshape(-1, x.shape[-1]).t())
        if ctx.needs_input_grad[2]:
            db = g.sum(0)
        return dx, dw, db


class Linear(nn.Linear):
    """nn.Linear with a fast path for the few rows of inference decoding (one token for each of up to ``FAST_ROWS``
    rows), for where fourwalls' fused decode step (model/fused.py) does not run: no C compiler, or layers it does not
    take.

    Decoding reads every weight once per step, so its speed is the matrix product's memory bandwidth. Torch's CPU
    wheels multiply through MKL, whose sgemv reached about half of OpenBLAS's bandwidth on the AMD CPUs measured
    here (and its small-M sgemm was slower too: 16 rows took 156 ms per step against OpenBLAS's 126); NumPy ships
    OpenBLAS and a NumPy view of the weight costs nothing. Training, prompts and other dtypes take the ordinary
    path. Run torch single-threaded meanwhile (see ``decode_threads``): torch's idle OpenMP workers spin and
    starve OpenBLAS's threads.
    """

    FAST_ROWS = 32  # a decode batch, as the C kernels' MAX_ROWS; its own number: it serves where they cannot

    @classmethod
    def holding(cls, weight: Tensor, bias: Tensor | None = None, requires_grad: bool = True) -> Linear:
        """A layer whose parameters are these tensors (not copied; nothing initialised)."""
        layer = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
        layer.weight = nn.Parameter(weight, requires_grad=requires_grad)
        if bias is not None:
            layer.bias = nn.Parameter(bias, requires_grad=requires_grad)
        return layer

    def forward(self, x: Tensor) -> Tensor:
        if (x.dim() == 3 and x.shape[0] * x.shape[1] <= self.FAST_ROWS and x.dtype == torch.float32
                and x.device.type == "cpu" and self.weight.dtype == torch.float32 and not torch.is_grad_enabled()):
            rows = x.reshape(-1, x.shape[-1]).numpy()
            y = torch.from_numpy(rows @ self.weight.detach().numpy().T).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return linear(x, self.weight, self.bias)

    def as_native(self) -> NativeLinear:
        return NativeLinear("LIN_F32", self.weight, self.out_features, self.in_features, bias=self.bias)


@contextmanager
def decode_threads(model: nn.Module) -> Iterator[None]:
    """Torch single-threaded while decoding when the matrix products run on OpenBLAS's own threads (``Linear``).

    A quantized model's layers run torch's own kernels, which want torch's threads: it keeps them.
    """
    if not any(type(m) is Linear for m in model.modules()):
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention of ``q`` [B, H, T, D] over ``k``, ``v`` [B, KV, T, D] (KV divides H), as in training."""
    if (_on_onednn(q, k, v) and q.shape[2] <= 2048 and torch.is_grad_enabled()
            and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _CausalAttention.apply(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])


QUERY_GROUP = 16  # the engine's default KV block size: its prompt chunks and prefix-cache hits start on multiples of it


def prompt_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Attention of a prompt chunk's queries ``q`` [B, H, T, D] at positions S-T..S-1 over a cache's keys and values
    [B, KV, S, D], in groups of 16 positions (aligned to multiples of 16), each over the keys up to its last query.

    One query's result then depends on its group alone, never on where its chunk began: the same prompt computes
    the same keys and values whether it was fed whole, in chunks, or after a prefix-cache hit (a chunk starting at
    any block boundary), while one product over the whole chunk takes another kernel path for each chunk length."""
    t, s = q.shape[2], k.shape[2]
    start, gqa = s - t, k.shape[1] != q.shape[1]
    out = []
    a = start
    while a < s:
        b = min((a // QUERY_GROUP + 1) * QUERY_GROUP, s)
        mask = torch.arange(b, device=q.device)[None, :] <= torch.arange(a, b, device=q.device)[:, None]
        out.append(F.scaled_dot_product_attention(q[:, :, a - start:b - start], k[:, :, :b], v[:, :, :b],
                                                  attn_mask=mask, enable_gqa=gqa))
        a = b
    return torch.cat(out, dim=2)


def _future_mask(t: int) -> Tensor:
    """[T, T]: 0 where a query may attend, -inf on the keys after it."""
    return torch.full((t, t), float("-inf")).triu_(1)


def _attention_probs(q: Tensor, k: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T + mask) for the query rows of one KV head's group [G * T, D] (already scaled)."""
    s = _onednn(q, k)
    s.view(-1, *mask.shape).add_(mask)
    return torch.softmax(s, -1)


class _CausalAttention(torch.autograd.Function):
    """Training's attention as plain matrix products on oneDNN: torch's fp32 flash attention multiplies through MKL,
    and forward and backward took 15 ms a layer at T = 512 against 11 ms here (SmolLM2's 9 query heads on 3 KV heads).

    The query heads sharing a KV head are one matrix, so each (row, KV head) is two products forward and four
    backward. The probabilities are computed again in backward rather than kept (T x T a head), so memory stays
    what it is without them; all positions are scored and the future masked, up to T = 2048 (SDPA beyond).
    """

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        b, h, t, d = q.shape
        kv = k.shape[1]
        k, v = k.contiguous(), v.contiguous()
        qs = (q * d**-0.5).reshape(b, kv, h // kv * t, d)
        mask = _future_mask(t)
        out = torch.empty_like(qs)
        for i in range(b):
            for j in range(kv):
                out[i, j] = _onednn(_attention_probs(qs[i, j], k[i, j], mask), v[i, j].t())
        ctx.save_for_backward(qs, k, v, out)
        return out.view(b, h, t, d)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        qs, k, v, out = ctx.saved_tensors
        b, kv, gt, d = qs.shape
        t = k.shape[2]
        mask = _future_mask(t)
        g = grad.contiguous().reshape(qs.shape)
        rows = (g * out).sum(-1, keepdim=True)  # sum_j P_ij dP_ij, softmax's backward term
        dq, dk, dv = torch.empty_like(qs), torch.empty_like(k), torch.empty_like(v)
        for i in range(b):
            for j in range(kv):
                p = _attention_probs(qs[i, j], k[i, j], mask)
                # dV = P^T dO and dK = dS^T Q as the transposes of dO^T P and Q^T dS: oneDNN copies a transposed
                # input, and these inputs are the small [D, G * T] ones rather than the [G * T, T] ones
                dv[i, j] = _onednn(g[i, j].t(), p.t()).t()
                ds = _onednn(g[i, j], v[i, j]).sub_(rows[i, j]).mul_(p)
                dk[i, j] = _onednn(qs[i, j].t(), ds.t()).t()
                dq[i, j] = _onednn(ds, k[i, j].t())
        return (dq * d**-0.5).view(b, gt // t * kv, t, d), dk, dv


IGNORE_INDEX = -100  # a target that is not scored (prompt tokens, padding), as in PyTorch and HF


def linear_cross_entropy(h: Tensor, weight: Tensor, targets: Tensor, rows: int | None = None) -> Tensor:
    """Mean cross-entropy of ``h @ weight.T`` [N, V] against ``targets`` [N], without keeping the logits.

    The logits of a training batch are its largest tensor (512 tokens x 49,152 words is 100 MB in fp32, and
    log-softmax and its gradient make three); here they exist one chunk of rows at a time, and the gradients
    for ``h`` and ``weight`` are made in the same pass (the loss is a scalar: backward only scales them).
    ``rows`` per chunk defaults to 128 MB of fp32 logits.
    """
    rows = rows or max(16, 2**25 // weight.shape[0])
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _LinearCrossEntropy.forward(None, h, weight, targets, rows)
    return _LinearCrossEntropy.apply(h, weight, targets, rows)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, rows: int) -> Tensor:  # type: ignore[override]
        keep = targets != IGNORE_INDEX
        count = keep.sum().clamp(min=1)
        safe = targets.clamp(min=0)[:, None]
        want_h = ctx is not None and h.requires_grad
        want_w = ctx is not None and weight.requires_grad
        dh = torch.empty_like(h) if want_h else None
        dw = torch.zeros_like(weight) if want_w else None
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for i in range(0, h.shape[0], rows):
            hc, kc = h[i:i + rows], keep[i:i + rows]
            logits = linear(hc, weight).float()
            lse = torch.logsumexp(logits, -1)
            loss += ((lse - logits.gather(1, safe[i:i + rows]).squeeze(1)) * kc).sum()
            if want_h or want_w:  # d loss / d logits = (softmax - one_hot) / count on kept rows
                g = _minus_grad_logits(logits, lse, safe[i:i + rows], kc).div_(count).to(h.dtype)
                if want_h:
                    dh[i:i + rows] = linear(g, weight.t())
                if want_w:
                    dw += linear(g.t(), hc.t())
        if ctx is not None:
            ctx.save_for_backward(dh, dw)
        return loss / count

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        dh, dw = ctx.saved_tensors
        return dh * grad if dh is not None else None, dw * grad if dw is not None else None, None, None


def linear_log_probs(h: Tensor, weight: Tensor, targets: Tensor, rows: int | None = None) -> Tensor:
    """``log_softmax(h @ weight.T)`` at ``targets`` [N] (0 where the target is ``IGNORE_INDEX``), without keeping
    the logits.

    What preference objectives score: an answer's log-probability is the sum of its tokens'. The result is a vector,
    so unlike the mean cross-entropy its backward cannot be done in forward: forward keeps each row's gradient for a
    unit upstream gradient instead, ``weight.T @ (onehot - softmax)`` [N, D] (as large as ``h``), and backward
    scales it. A trained ``weight`` (full fine-tuning) needs the probabilities again: backward recomputes them one
    chunk at a time from the saved log-normalisers.
    """
    rows = rows or max(16, 2**25 // weight.shape[0])
    if not (torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)):
        return _LinearLogProbs.forward(None, h, weight, targets, rows)
    return _LinearLogProbs.apply(h, weight, targets, rows)


def _minus_grad_logits(logits: Tensor, lse: Tensor, safe: Tensor, keep: Tensor) -> Tensor:
    """``softmax - onehot`` on kept rows, 0 on the others: minus the gradient of the target's log-probability with
    respect to the logits (computed in place in ``logits``)."""
    g = logits.sub_(lse[:, None]).exp_()
    g.scatter_add_(1, safe, -keep[:, None].float())
    return g.mul_(keep[:, None])


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: Tensor, weight: Tensor, targets: Tensor, rows: int) -> Tensor:  # type: ignore[override]
        keep = targets != IGNORE_INDEX
        safe = targets.clamp(min=0)[:, None]
        want_h = ctx is not None and h.requires_grad
        out = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        lses = torch.empty_like(out)
        unit_dh = torch.empty_like(h) if want_h else None  # d out_i / d h_i
        for i in range(0, h.shape[0], rows):
            hc, kc = h[i:i + rows], keep[i:i + rows]
            logits = linear(hc, weight).float()
            lse = torch.logsumexp(logits, -1)
            out[i:i + rows] = (logits.gather(1, safe[i:i + rows]).squeeze(1) - lse) * kc
            lses[i:i + rows] = lse
            if want_h:
                unit_dh[i:i + rows] = -linear(_minus_grad_logits(logits, lse, safe[i:i + rows], kc).to(h.dtype),
                                              weight.t())
        if ctx is not None:
            ctx.rows = rows
            ctx.save_for_backward(unit_dh, h if weight.requires_grad else None, weight, targets, lses)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        unit_dh, h, weight, targets, lses = ctx.saved_tensors
        dh = unit_dh * grad[:, None].to(unit_dh.dtype) if unit_dh is not None else None
        dw = None
        if h is not None:
            keep, safe, rows = targets != IGNORE_INDEX, targets.clamp(min=0)[:, None], ctx.rows
            dw = torch.zeros_like(weight)
            for i in range(0, h.shape[0], rows):
                hc = h[i:i + rows]
                g = _minus_grad_logits(linear(hc, weight).float(), lses[i:i + rows], safe[i:i + rows],
                                       keep[i:i + rows])
                dw -= linear(g.mul_(grad[i:i + rows, None]).to(h.dtype).t(), hc.t())
        return dh, dw, None, None
