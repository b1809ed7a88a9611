"""The fused decode step (one C call per token) computes what the PyTorch model computes."""

from __future__ import annotations

import copy
import ctypes

import pytest
import torch

from fourwalls.generate import SamplingParams, generate_tokens
from fourwalls.model.fused import _Cache, _Layer, _Lin, _Model, _Scratch, decoder
from fourwalls.model.native import abi, cpu_isas, native
from fourwalls.model.ops import Linear
from fourwalls.model.quant import (
    BlockEmbedding,
    BlockLinear,
    Int4Linear,
    Int8Linear,
    QuantConfig,
    dequantize_model,
    quantize_model,
    quantize_nf4,
    tie,
)
from fourwalls.model.transformer import block_linears
from tests.conftest import tiny_model
from tests.test_gguf_blocks import LAYOUTS, emulated, random_block_layer

pytestmark = pytest.mark.skipif(native() is None, reason="no AVX2 or no C compiler here: decoding runs in torch")


def test_the_structures_have_the_compiled_kernels_layout():
    """fused.py's ctypes structures against the library's own sizes and offsets (kernels.c's fw_abi): a field
    added, moved or resized on one side only would otherwise be read as garbage, not fail."""
    layout = abi()
    for struct in (_Lin, _Layer, _Model, _Scratch, _Cache):
        name = struct.__name__.removeprefix("_")
        assert ctypes.sizeof(struct) == layout[name], name
        ours = {f"{name}.{field}": getattr(struct, field).offset for field, _ in struct._fields_}
        assert ours == {key: value for key, value in layout.items() if key.startswith(f"{name}.")}


class Int8InputsInt4(torch.nn.Module):
    """An int4 layer computed as the fused step does, in plain torch: w = q * scale + (zero - 8 scale) per group
    times the input rounded to int8 in blocks of 32 (one scale each, absmax / 127), as llama.cpp multiplies Q4_1 by
    Q8_1: every part of the weight meets the same rounded input."""

    def __init__(self, layer: Int4Linear) -> None:
        super().__init__()
        self.layer = layer
        self.in_scale = layer.input_scale if layer.input_scale is not None else torch.ones(layer.in_features)
        self.weight = layer.dequantize() * self.in_scale  # the weights the rounded x / in_scale meets

    def forward(self, x):
        x = x / self.in_scale
        blocks = x.unflatten(-1, (-1, 32))
        d = blocks.abs().amax(-1, keepdim=True) / 127
        xq = (torch.round(blocks / d.clamp_min(1e-30)) * d).flatten(-2)
        return xq @ self.weight.T + (self.layer.bias if self.layer.bias is not None else 0)


def prefilled(model, rows: int, length: int):
    """A cache of ``rows`` sequences of ``length`` random tokens, filled by the model itself."""
    cache = model.new_cache(rows, 64)
    with torch.inference_mode():
        model(torch.randint(3, 512, (rows, length)), torch.arange(length), cache)
    return cache


def copy_cache(model, cache):
    new = model.new_cache(cache.k[0].shape[0], cache.max_len)
    for a, b in zip((*new.k, *new.v), (*cache.k, *cache.v)):
        a.copy_(b)
    return new


def step_both(model, reference, rows: int, isa: str | None = None):
    """One decode step of the fused ``model`` (kernels of ``isa``) and of the torch ``reference`` from the same
    cache: (ours, theirs, their logits, our logits)."""
    torch.manual_seed(rows)
    ours = prefilled(reference, rows, 11)
    theirs = copy_cache(model, ours)
    tokens, pos = torch.randint(3, 512, (rows, 1)), torch.tensor([11])
    with torch.inference_mode():
        expected = reference(tokens, pos, theirs)[:, -1]
        got = decoder(model, isa)(tokens, pos, ours)
    assert got.shape == expected.shape
    return ours, theirs, expected, got


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3", "tiny-qwen2"])
@pytest.mark.parametrize("scheme", [None, "int8"])
@pytest.mark.parametrize("rows", [1, 5, 32])
def test_the_fused_step_computes_the_models_logits_and_cache(isa, name, scheme, rows):
    """On every instruction set this CPU runs (the AVX2 build too, on an AVX-512 machine)."""
    model = tiny_model(name)
    reference = model
    if scheme:  # the fused step multiplies int8 weights by fp32 activations: the dequantized model's product
        quantize_model(model, QuantConfig(scheme))
        reference = copy.deepcopy(model)
        dequantize_model(reference)
    ours, theirs, expected, got = step_both(model, reference, rows, isa)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()
    for a, b in zip((*ours.k, *ours.v), (*theirs.k, *theirs.v)):
        assert a.dtype == torch.float16  # kv_dtype: an fp32 model's cache is fp16
        # the new keys and values went in, within one fp16 step (values a hair apart in fp32 may round apart)
        assert torch.allclose(a[:, :, :12].float(), b[:, :, :12].float(), rtol=1e-3, atol=1e-5)
        assert not a[:, :, 12:].any()  # and nothing past them


def int4_model(name: str, awq: bool, only: str | None = None):
    """A tiny model in int4 (groups of 32), with AWQ input scales or not; ``only``: that projection in int4, the
    others dequantized to float."""
    model = tiny_model(name)
    if awq:  # each layer divides its input by its own scales
        scales = {n: torch.rand(layer.in_features) + 0.5 for n, _, _, layer in block_linears(model)}
        quantize_model(model, QuantConfig("int4", group_size=32, input_scales=True), scales)
    else:
        quantize_model(model, QuantConfig("int4", group_size=32))
    for _, parent, attr, layer in block_linears(model, Int4Linear):
        if only is not None and attr != only:
            setattr(parent, attr, Linear.holding(layer.dequantize(), layer.bias))
    reference = copy.deepcopy(model)
    for _, parent, attr, layer in block_linears(reference, Int4Linear):
        setattr(parent, attr, Int8InputsInt4(layer))
    if isinstance(reference.lm_head, Int8Linear):  # the fused step's int8 head takes fp32 activations
        reference.lm_head = Linear.holding(reference.lm_head.dequantize(), requires_grad=False)
    return model, reference


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
@pytest.mark.parametrize("awq", [False, True])
@pytest.mark.parametrize("only", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
def test_int4_layers_in_the_fused_step_compute_the_int8_input_scheme(isa, name, awq, only):
    model, reference = int4_model(name, awq, only)
    _, _, expected, got = step_both(model, reference, 5, isa)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


class Emulated(torch.nn.Module):
    """A block layer computed in plain torch as the kernels compute it (tests/test_gguf_blocks.py's ``emulated``)."""

    def __init__(self, layer: BlockLinear) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return emulated(self.layer, x)


def block_model(name: str, spec: str, half: bool):
    """A tiny model whose every matrix, embedding table and (tied) head included, is a block layer of ``spec`` with
    random codes; and its reference, the same layers computed in torch."""
    model = tiny_model(name)
    for i, (_, parent, attr, layer) in enumerate(block_linears(model)):
        setattr(parent, attr, random_block_layer(spec, layer.in_features, layer.out_features, half, seed=i,
                                                 bias=layer.bias is not None))
    table = random_block_layer(spec, model.config.dim, model.config.vocab_size, half, seed=99, bias=False)
    table.__class__ = BlockEmbedding
    model.embed_tokens = table
    model.config = model.config.replace(tie_embeddings=True)
    tie(model)
    reference = copy.deepcopy(model)
    for _, parent, attr, layer in block_linears(reference, BlockLinear):
        setattr(parent, attr, Emulated(layer))
    reference.lm_head = Emulated(reference.lm_head)
    return model, reference


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize(("spec", "half"), LAYOUTS)
@pytest.mark.parametrize("rows", [1, 7])
def test_gguf_block_layers_in_the_fused_step(isa, spec, half, rows):
    """Every block layout as a whole model, its embedding table and tied head too: the fused step computes what the
    int8-input scheme computes in torch."""
    model, reference = block_model("tiny-qwen2", spec, half)  # qwen2: biases on q, k and v
    assert decoder(model, isa) is not None
    _, _, expected, got = step_both(model, reference, rows, isa)
    assert (got - expected).abs().max() < 1e-4 * expected.abs().max()


@pytest.mark.parametrize("rows", [1, 32])
def test_a_whole_int4_model_in_the_fused_step(rows):
    """With every layer in int4 an input a hair from a rounding boundary somewhere may round the other way in one
    path and not the other: close, not equal; and never dependent on the thread count."""
    model, reference = int4_model("tiny-llama3", awq=True)
    _, _, expected, got = step_both(model, reference, rows)
    assert (got - expected).abs().max() < 2e-2 * expected.abs().max()
    cache, tokens = prefilled(model, rows, 7), torch.randint(3, 512, (rows, 1))
    fused, n, outs = decoder(model), torch.get_num_threads(), []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.inference_mode():
                outs.append(fused(tokens, torch.tensor([7]), copy_cache(model, cache)))
    finally:
        torch.set_num_threads(n)
    assert torch.equal(*outs)


def test_greedy_generation_is_the_same_with_or_without_the_fused_step(monkeypatch):
    model = tiny_model("tiny-llama3")
    p = SamplingParams(max_new_tokens=40, temperature=0)
    fused = [t.id for t in generate_tokens(model, [5, 17, 300, 42], p)]
    monkeypatch.setattr("fourwalls.generate.decoder", lambda model: None)
    assert [t.id for t in generate_tokens(model, [5, 17, 300, 42], p)] == fused


def test_what_the_fused_step_does_not_take_runs_in_torch():
    model = tiny_model()
    fused = decoder(model)
    cache = model.new_cache(1, 16)
    with torch.inference_mode():
        assert fused(torch.tensor([[4, 5]]), torch.tensor([0, 1]), cache) is None  # a prompt, not a step
        rows = abi()["MAX_ROWS"] + 1
        assert fused(torch.tensor([[4]] * rows), torch.tensor([0]), model.new_cache(rows, 16)) is None
    assert fused(torch.tensor([[4]]), torch.tensor([0]), cache) is None  # gradients wanted: training
    int4 = tiny_model()
    quantize_model(int4, QuantConfig("int4", group_size=16))
    assert decoder(int4) is None  # groups narrower than the kernel's blocks of 32: torch's int4 kernel
    nf4 = tiny_model()
    quantize_nf4(nf4)
    assert decoder(nf4) is None  # a layer kind the kernels do not read
    assert decoder(tiny_model().to(torch.bfloat16)) is None


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize(("spec", "half"), LAYOUTS)
def test_a_rows_logits_do_not_depend_on_the_batch_it_is_decoded_in(isa, spec, half):
    """Each integer kernel sums a block's products exactly and adds the blocks in one order whatever the number of
    rows (one token alone takes a path of its own on AVX-512): a request's tokens are the same however many others
    share its decode steps."""
    model, _ = block_model("tiny-llama3", spec, half)
    rows = 19  # tiles of 8 rows, then 2, then 1 alone
    cache, tokens = prefilled(model, rows, 7), torch.randint(3, 512, (rows, 1))
    fused = decoder(model, isa)
    with torch.inference_mode():
        batch = fused(tokens, torch.tensor([7]), copy_cache(model, cache))
        for r in (0, 9, 18):
            alone = model.new_cache(1, cache.max_len)
            for a, b in zip((*alone.k, *alone.v), (*cache.k, *cache.v)):
                a.copy_(b[r:r + 1])
            assert torch.equal(fused(tokens[r:r + 1], torch.tensor([7]), alone)[0], batch[r])


@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize(("spec", "half"), LAYOUTS)
def test_a_prompt_filled_by_the_fused_step_is_the_prompt_decoded_token_by_token(isa, spec, half):
    """Decoder.fill takes up to MAX_ROWS consecutive positions of one sequence a call, every row's keys and values
    stored before any row attends: the cache it leaves, and the logits after it, are exactly those of decoding the
    prompt one token at a time, in whatever chunks the prompt comes."""
    model, _ = block_model("tiny-llama3", spec, half)
    fused = decoder(model, isa)
    prompt = torch.randint(3, 512, (75,), generator=torch.Generator().manual_seed(0)).tolist()

    def run(chunks):
        cache, pos = model.new_cache(1, 96), 0
        with torch.inference_mode():
            for n in chunks:
                if n == 1:
                    fused(torch.tensor([[prompt[pos]]]), torch.tensor([pos]), cache)
                else:
                    assert fused.fill(prompt[pos:pos + n], pos, cache)
                pos += n
            return cache, fused(torch.tensor([[7]]), torch.tensor([pos]), cache)

    cache, logits = run([1] * len(prompt))
    for chunks in ([75], [16, 40, 19], [3, 72]):
        filled, after = run(chunks)
        assert torch.equal(after, logits)
        for a, b in zip((*filled.k, *filled.v), (*cache.k, *cache.v)):
            assert torch.equal(a, b)
        assert filled.k[0][:, :, :76].any() and not filled.k[0][:, :, 76:].any()


def test_a_step_computes_the_logits_of_the_rows_asked_for_only():
    """A prompt's rows want no logits (or only the last's): the head runs on rows logits_from.. alone, and they are
    what the whole step gives them."""
    model, _ = block_model("tiny-llama3", "int4:32:offset", True)
    rows = 6
    cache, tokens = prefilled(model, rows, 7), torch.randint(3, 512, (rows, 1))
    fused = decoder(model)
    table, pos = torch.arange(rows, dtype=torch.int32)[:, None], torch.full((rows,), 7)
    with torch.inference_mode():
        every = fused(tokens, torch.tensor([7]), copy_cache(model, cache))
        last = fused._step(tokens[:, 0], pos, copy_cache(model, cache), table, 4, None)
    assert last.shape == (2, model.config.vocab_size)
    assert torch.equal(last, every[4:])
