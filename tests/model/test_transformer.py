import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from fourwalls.formats.hf import write_hf
from fourwalls.model import transformer as T
from fourwalls.model.config import PRESETS, ModelConfig
from fourwalls.model.transformer import IGNORE_INDEX, Transformer, linear_cross_entropy
from tests.conftest import tiny_model

TINY = ["tiny-llama", "tiny-llama3", "tiny-qwen2"]

# Parameter counts published for the real models (tied embeddings counted once).
KNOWN_PARAMS = {
    "smollm2-135m": 134_515_008,
    "smollm2-360m": 361_821_120,
    "llama-3.2-1b": 1_235_814_400,
    "llama-3-8b": 8_030_261_248,
    "qwen2.5-0.5b": 494_032_768,
    "mistral-7b": 7_248_023_552,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds(name):
    cfg = PRESETS[name]
    with torch.device("meta"):
        model = Transformer(cfg)
    n = sum(p.numel() for p in model.parameters())  # tied weights are one Parameter
    assert n == cfg.num_parameters
    if name in KNOWN_PARAMS:
        assert n == KNOWN_PARAMS[name]
    out = model(torch.zeros(1, 3, dtype=torch.long, device="meta"))
    assert out.shape == (1, 3, cfg.vocab_size)


@pytest.mark.parametrize("name", TINY)
def test_kv_cache_decoding_equals_full_forward(name):
    model = tiny_model(name)
    tokens = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(batch_size=2, max_len=32)
        parts = [model(tokens[:, :10], torch.arange(10), cache)]  # prefill from 0 (causal)
        parts.append(model(tokens[:, 10:16], torch.arange(10, 16), cache))  # a chunk at an offset (masked)
        for t in range(16, 24):  # one token at a time
            parts.append(model(tokens[:, t : t + 1], torch.tensor([t]), cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)


def test_last_only_matches_last_position():
    model = tiny_model()
    tokens = torch.randint(0, 512, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, last_only=True)[:, -1], model(tokens)[:, -1])


@pytest.mark.parametrize("name", TINY)
def test_matches_hf_transformers_on_random_weights(name, tmp_path):
    """Our decoder, saved in the native format, is the same function in HF transformers."""
    from tests.test_tokenizer import byte_tokenizer

    model = tiny_model(name)
    write_hf(tmp_path, model.config, model.state_dict(), byte_tokenizer())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = torch.randint(0, model.config.vocab_size, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=1e-4)


def test_config_round_trips_through_hf_json():
    for name in TINY + ["llama-3.2-1b", "qwen2.5-0.5b"]:
        cfg = PRESETS[name]
        assert ModelConfig.from_hf(cfg.to_hf(), name=cfg.name) == cfg


def test_single_row_fast_path_equals_torch_linear():
    from fourwalls.model.transformer import Linear

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


def test_forward_with_targets_is_the_loss_of_the_logits():
    torch.manual_seed(0)
    model = Transformer(PRESETS["tiny-llama"])
    tokens = torch.randint(0, model.config.vocab_size, (2, 12))
    targets = tokens.roll(-1, 1)
    targets[:, -1] = IGNORE_INDEX
    ref = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(model(tokens, targets=targets), ref)


needs_onednn = pytest.mark.skipif(T._ONEDNN is None, reason="this torch build has no oneDNN")


@needs_onednn
@pytest.mark.parametrize("grads", ["input", "weight", "all"])
@pytest.mark.parametrize("shape", [(7, 24), (2, 5, 24)])
def test_onednn_linear_equals_f_linear_forward_and_backward(grads, shape, monkeypatch):
    calls = []
    monkeypatch.setattr(T, "_ONEDNN", lambda *a: calls.append(1) or torch.ops.mkldnn._linear_pointwise(*a))
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=grads != "weight")
    w = torch.randn(40, 24, requires_grad=grads != "input")
    b = torch.randn(40, requires_grad=grads == "all")
    wanted = [t for t in (x, w, b) if t.requires_grad]
    y = T.linear(x, w, b)
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
    y = T.causal_attention(q, k, v)
    assert type(y.grad_fn).__name__ == "_CausalAttentionBackward"
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv != h)
    g = torch.randn(y.shape)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    for a, r in zip(torch.autograd.grad(y, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g), strict=True):
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # inference keeps SDPA
        assert T.causal_attention(q, k, v).grad_fn is None


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
