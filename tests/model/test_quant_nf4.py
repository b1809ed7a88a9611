import torch

from fourwalls.model.ops import linear
from fourwalls.model.quant import NF4_LEVELS, NF4Linear, quantize_nf4
from tests.conftest import tiny_model


def test_nf4_round_trip_error_is_within_half_a_level_step():
    torch.manual_seed(0)
    w = torch.randn(64, 128)
    layer = NF4Linear(w)
    deq = layer.dequantize()
    absmax = w.reshape(-1, 64).abs().amax(1, keepdim=True)
    max_gap = (NF4_LEVELS[1:] - NF4_LEVELS[:-1]).max() / 2
    assert ((deq - w).reshape(-1, 64).abs() <= absmax * max_gap + 1e-6).all()
    assert (deq - w).abs().mean() < 0.1 * w.abs().mean()
    assert layer.packed.numel() == w.numel() // 2  # two weights a byte


def test_nf4_layer_gradients_flow_to_the_input_only():
    torch.manual_seed(0)
    w = torch.randn(32, 64)
    layer = NF4Linear(w, bias=torch.randn(32))
    x = torch.randn(3, 64, requires_grad=True)
    layer(x).pow(2).sum().backward()
    ref_x = x.detach().clone().requires_grad_(True)
    linear(ref_x, layer.dequantize(), layer.bias).pow(2).sum().backward()  # the same product kernel, autograd's way
    torch.testing.assert_close(x.grad, ref_x.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_quantized_model_stays_close_and_is_smaller():
    model = tiny_model()
    tokens = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        ref = model(tokens)
        n = quantize_nf4(model)
        out = model(tokens)
    assert n == 2 * 7
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.98
