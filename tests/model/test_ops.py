"""The decoder's CPU machinery computes what plain PyTorch computes, forward and backward."""

import pytest
import torch
import torch.nn.functional as F

from fourwalls.model import ops
from fourwalls.model.ops import IGNORE_INDEX, Linear, linear_cross_entropy, linear_log_probs
from tests.conftest import tiny_model


def test_single_row_fast_path_equals_torch_linear():
    torch.manual_seed(0)
    layer = Linear(96, 40, bias=True)
    x = torch.randn(1, 1, 96)
    with torch.inference_mode():
        fast = layer(x)  # one row at inference: the OpenBLAS path
        ref = torch.nn.functional.linear(x, layer.weight, layer.bias)
    assert fast.shape == ref.shape == (1, 1, 40)
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    y = layer(x)  # with grad enabled: the ordinary path, differentiable
    y.sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("rows", [None, 5])  # one chunk, and several with a short last one
@pytest.mark.parametrize("train_weight", [False, True])
def test_linear_cross_entropy_equals_logits_then_cross_entropy(rows, train_weight):
    torch.manual_seed(0)
    h = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=train_weight)
    targets = torch.randint(0, 50, (23,))
    targets[[0, 7, 8]] = IGNORE_INDEX
    ref = F.cross_entropy(h @ weight.T, targets, ignore_index=IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, [h, weight] if train_weight else [h])
    loss = linear_cross_entropy(h, weight, targets, rows)
    grads = torch.autograd.grad(loss * 3, [h, weight] if train_weight else [h])  # backward scales by its input
    torch.testing.assert_close(loss, ref)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, 3 * r)
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(h, weight, targets, rows), ref)


@pytest.mark.parametrize("rows", [None, 5])
@pytest.mark.parametrize("train_weight", [False, True])
def test_linear_log_probs_equal_log_softmax_gathered(rows, train_weight):
    torch.manual_seed(0)
    h = torch.randn(23, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=train_weight)
    targets = torch.randint(0, 50, (23,))
    targets[[0, 7, 8]] = IGNORE_INDEX
    upstream = torch.randn(23)  # a vector result: each row's gradient is scaled by its own upstream gradient
    ref = F.log_softmax(h.double() @ weight.double().T, -1).gather(1, targets.clamp(min=0)[:, None]).squeeze(1)
    ref = ref * (targets != IGNORE_INDEX)
    ref_grads = torch.autograd.grad(ref, [h, weight] if train_weight else [h], upstream.double())
    out = linear_log_probs(h, weight, targets, rows)
    grads = torch.autograd.grad(out, [h, weight] if train_weight else [h], upstream)
    torch.testing.assert_close(out, ref.float())
    assert (out[[0, 7, 8]] == 0).all() and (out[1:7] < 0).all()
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r.float())
    with torch.no_grad():
        torch.testing.assert_close(linear_log_probs(h, weight, targets, rows), ref.float())


def test_models_log_probs_are_minus_its_per_token_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), IGNORE_INDEX)], 1)
    targets[0, :4] = IGNORE_INDEX
    with torch.no_grad():
        logps = model(ids, targets=targets, log_probs=True)
        mean_ce = model(ids, targets=targets)
    assert logps.shape == (2, 12) and (logps[0, :4] == 0).all() and (logps[:, -1] == 0).all()
    torch.testing.assert_close(-logps.sum() / (targets != IGNORE_INDEX).sum(), mean_ce)


needs_onednn = pytest.mark.skipif(ops._ONEDNN is None, reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("grads", ["input", "weight", "all"])
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
def test_onednn_linear_equals_f_linear_forward_and_backward(grads, shape, monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "_ONEDNN", lambda *a: calls.append(1) or torch.ops.mkldnn._linear_pointwise(*a))
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=grads != "weight")
    w = torch.randn(40, 24, requires_grad=grads != "input")
    b = torch.randn(40, requires_grad=grads == "all")
    wanted = [t for t in (x, w, b) if t.requires_grad]
    y = ops.linear(x, w, b)
    g = torch.randn(y.shape)
    ours = torch.autograd.grad(y, wanted, g)
    ref_y = F.linear(x.double(), w.double(), b.double())
    refs = torch.autograd.grad(ref_y, wanted, g.double())
    assert len(calls) >= 2  # forward and backward ran on oneDNN
    torch.testing.assert_close(y, ref_y.float(), atol=1e-5, rtol=1e-5)
    for a, r in zip(ours, refs, strict=True):
        torch.testing.assert_close(a, r.float(), atol=1e-4, rtol=1e-5)


@needs_onednn
@pytest.mark.parametrize("b,h,kv,t", [(1, 9, 3, 40), (2, 4, 2, 17), (2, 4, 4, 1)])
def test_training_attention_equals_sdpa(b, h, kv, t):
    torch.manual_seed(0)
    # laid out as the decoder makes them: [B, T, heads, D] viewed as [B, heads, T, D]
    q, k, v = (torch.randn(b, t, n, 16).transpose(1, 2).requires_grad_() for n in (h, kv, kv))
    y = ops.causal_attention(q, k, v)
    assert type(y.grad_fn).__name__ == "_CausalAttentionBackward"
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
    g = torch.randn(y.shape)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(torch.autograd.grad(y, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference keeps SDPA
        assert ops.causal_attention(q, k, v).grad_fn is None


@needs_onednn
def test_training_step_equals_the_torch_path(monkeypatch):
    """A whole loss and its gradients are the same on oneDNN's products as on torch's (FOURWALLS_ONEDNN=0)."""
    model = tiny_model("tiny-llama")
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))

    def loss_and_grads():
        model.zero_grad()
        model(tokens, targets=tokens.roll(-1, 1)).backward()
        return [p.grad.clone() for p in model.parameters()]

    ours = loss_and_grads()
    monkeypatch.setenv("FOURWALLS_ONEDNN", "0")
    for a, r in zip(ours, loss_and_grads(), strict=True):
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)
