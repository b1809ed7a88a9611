"""GGUF weights run as the file holds them: repacked into the kernels' block layouts without changing a weight,
multiplied as llama.cpp multiplies them (int8 inputs), stored and exported in blocks."""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from fourwalls.export import export_model
from fourwalls.formats import read_checkpoint
from fourwalls.formats.gguf import _unpermute
from fourwalls.model.native import abi, cpu_isas, native
from fourwalls.model.quant import BlockEmbedding, BlockLinear
from fourwalls.model.transformer import block_linears
from fourwalls.store import DEFAULT_MODEL, Store, build_model, bundled_gguf
from tests.gguf_fixture import _TOKENS, llama_writer

Q = gguf.GGMLQuantizationType
EXACT = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Where each type keeps its fp16 scales (d, dmin): byte offsets in its block.
_HALVES = {Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q8_0: (0,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
           Q.Q5_0: (0,), Q.Q5_1: (0, 2)}
DIM, FFN, HEADS, KV_HEADS, VOCAB = 256, 512, 4, 2, len(_TOKENS)


def random_blocks(qtype: Q, rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Random bytes in qtype's blocks, every code pattern possible, its fp16 scales finite and of a plausible size."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows * cols // block, size), dtype=np.uint8)
    for at in _HALVES[qtype]:
        raw[:, at:at + 2] = (rng.uniform(0.001, 0.05, len(raw)) * rng.choice([-1, 1], len(raw))).astype(
            np.float16)[:, None].view(np.uint8)
    return raw.reshape(rows, -1)


def write_gguf_model(path: Path, qtype: Q, embed: Q | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF, 256 wide, its seven matrices (and the embedding table, with ``embed``) in qtype's
    blocks filled at random; returns those raw tensors by GGUF name."""
    rng = np.random.default_rng(seed)
    w = llama_writer(path, "blocks-test", dim=DIM, layers=1, ffn=FFN, heads=HEADS, kv_heads=KV_HEADS)
    kv = KV_HEADS * DIM // HEADS
    shapes = {"attn_q": (DIM, DIM), "attn_k": (kv, DIM), "attn_v": (kv, DIM), "attn_output": (DIM, DIM),
              "ffn_gate": (FFN, DIM), "ffn_up": (FFN, DIM), "ffn_down": (DIM, FFN)}
    raws = {}
    table = "token_embd.weight"
    if embed is None:
        w.add_tensor(table, rng.standard_normal((VOCAB, DIM)).astype(np.float32))
    else:
        raws[table] = random_blocks(embed, VOCAB, DIM, rng)
        w.add_tensor(table, raws[table], raw_shape=raws[table].shape, raw_dtype=embed)
    for name in ("attn_norm", "ffn_norm"):
        w.add_tensor(f"blk.0.{name}.weight", rng.uniform(0.5, 1.5, DIM).astype(np.float32))
    for name, (rows, cols) in shapes.items():
        raws[f"blk.0.{name}.weight"] = random_blocks(qtype, rows, cols, rng)
        raw = raws[f"blk.0.{name}.weight"]
        w.add_tensor(f"blk.0.{name}.weight", raw, raw_shape=raw.shape, raw_dtype=qtype)
    w.add_tensor("output_norm.weight", np.ones(DIM, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return raws


_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


def gguf_reference(raw: np.ndarray, qtype: Q, name: str) -> torch.Tensor:
    """The weights as the gguf package dequantizes them, in fourwalls' row order."""
    w = torch.from_numpy(gguf.quants.dequantize(raw, qtype))
    if name in ("attn_q", "attn_k"):
        w = _unpermute(w, HEADS if name == "attn_q" else KV_HEADS)
    return w


@pytest.mark.parametrize("qtype", EXACT, ids=lambda q: q.name)
def test_quantized_weights_are_kept_exactly_as_gguf_dequantizes_them(tmp_path, qtype):
    raws = write_gguf_model(tmp_path / "m.gguf", qtype, embed=qtype)
    cfg, state, _ = read_checkpoint(tmp_path / "m.gguf")
    model = build_model(cfg, state)
    assert cfg.quantization["gguf_types"] == {qtype.name: 8} and "requantized" not in cfg.quantization
    for gname, module in _NAMES.items():
        layer = model.get_submodule(f"layers.0.{module}")
        assert isinstance(layer, BlockLinear) and layer.bits == (4 if qtype in (Q.Q4_0, Q.Q4_1, Q.Q4_K) else 8)
        expected = gguf_reference(raws[f"blk.0.{gname}.weight"], qtype, gname)
        assert torch.equal(layer.dequantize(), expected), gname  # bit for bit
    assert isinstance(model.embed_tokens, BlockEmbedding)
    table = torch.from_numpy(gguf.quants.dequantize(raws["token_embd.weight"], qtype))
    assert torch.equal(model.embed_tokens(torch.arange(VOCAB)), table)
    assert torch.equal(model.lm_head.dequantize(), table)  # the tied head reads the same blocks
    # The file's own fp16 scales stay fp16 (no longer to read than the file); products of two scales stay fp32.
    half = qtype in (Q.Q4_0, Q.Q4_1, Q.Q8_0)
    assert model.layers[0].mlp.up_proj.scales.dtype == (torch.float16 if half else torch.float32)


def test_types_without_an_exact_layout_go_to_int8_with_the_loss_stated(tmp_path, caplog):
    raws = write_gguf_model(tmp_path / "m.gguf", Q.Q5_0)
    with caplog.at_level(logging.WARNING):
        cfg, state, _ = read_checkpoint(tmp_path / "m.gguf")
    assert "7 Q5_0 tensors" in caplog.text and "requantized to int8 in blocks of 32" in caplog.text
    assert "Q5_0" in cfg.quantization["requantized"]
    layer = build_model(cfg, state).layers[0].mlp.down_proj
    assert layer.spec == "int8:32"
    expected = gguf_reference(raws["blk.0.ffn_down.weight"], Q.Q5_0, "ffn_down")
    assert not torch.equal(layer.dequantize(), expected)
    assert (layer.dequantize() - expected).norm() / expected.norm() < 0.01  # 5 bits into 8: a small loss
    ref = Store(tmp_path / "home").import_model(tmp_path / "m.gguf", "q5")
    assert "Q5_0" in ref.manifest["requantized"]  # and the stored model says so


def emulated(layer: BlockLinear, x: torch.Tensor) -> torch.Tensor:
    """The product as llama.cpp computes it, in plain torch: the weights (codes times scales, plus offsets) times x
    rounded to int8 per block of 32 (absmax / 127)."""
    blocks = x.unflatten(-1, (-1, 32))
    d = blocks.abs().amax(-1, keepdim=True) / 127
    xq = (torch.round(blocks * torch.where(d > 0, 1 / d, 0)) * d).flatten(-2)
    y = xq @ layer.dequantize().T
    return y if layer.bias is None else y + layer.bias


def random_block_layer(spec: str, in_features: int, out_features: int, half: bool, seed: int = 0,
                       bias: bool = True) -> BlockLinear:
    """A block layer of ``spec`` with random codes, scales (fp16 with ``half``) and offsets."""
    g = torch.Generator().manual_seed(seed)
    layer = BlockLinear.from_spec(spec, in_features, out_features, bias=bias)
    low, high = (0, 256) if layer.bits == 4 else (-128, 128)
    layer.weight = torch.randint(low, high, layer.weight.shape, generator=g, dtype=torch.int32).to(layer.weight.dtype)
    layer.scales = torch.rand(layer.scales.shape, generator=g) * 0.02 + 0.001
    if layer.offsets is not None:
        layer.offsets = torch.randn(layer.offsets.shape, generator=g) * 0.05
    if half:
        layer.scales = layer.scales.half()
        layer.offsets = None if layer.offsets is None else layer.offsets.half()
    if bias:
        layer.bias = torch.randn(out_features, generator=g)
    return layer


LAYOUTS = [("int4:32:offset", False), ("int4:32:offset", True), ("int8:32", True), ("int8:32:offset", False),
           ("int8:16", False), ("int8:16:offset", True)]


@pytest.mark.skipif(native() is None, reason="no AVX2 or no C compiler here: the layers multiply in torch")
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize(("spec", "half"), LAYOUTS)
@pytest.mark.parametrize("rows", [1, 3, 5, 37, 200])
def test_block_layers_multiply_as_llama_cpp_does_on_every_instruction_set(monkeypatch, isa, spec, half, rows):
    """Every layout (int4 and int8 codes, groups of 32 and 16, offsets or none, fp32 or fp16 scales) against the
    int8-input scheme in torch, for a decode step's few rows and a prompt's many; widths of an odd number of
    blocks (160) take the kernels' last-block paths."""
    monkeypatch.setenv("FOURWALLS_ISA", isa)
    assert abi()["ISA_AVX512"] == (isa == "avx512")
    torch.manual_seed(rows)
    for width in (160, 576):
        layer = random_block_layer(spec, width, 96, half)
        x = torch.randn(rows, width)
        x[:, :3] *= 30  # outlier channels, as real activations have
        with torch.inference_mode():
            y, expected = layer(x), emulated(layer, x)
        assert (y - expected).abs().max() < 1e-5 * expected.abs().max()


@pytest.mark.skipif(native() is None, reason="no AVX2 or no C compiler here: the layers multiply in torch")
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize(("spec", "half"), LAYOUTS)
def test_a_rows_output_does_not_depend_on_how_many_rows_are_multiplied_with_it(monkeypatch, isa, spec, half):
    """71 rows take every AVX-512 path (64 with each block unpacked once, then 7 in a tile of 8 registers), one row
    alone its own: each row's result is the same bit for bit, so a prompt's keys and values do not depend on how it
    was chunked (the prefix cache relies on it)."""
    monkeypatch.setenv("FOURWALLS_ISA", isa)
    torch.manual_seed(3)
    layer = random_block_layer(spec, 576, 96, half)
    x = torch.randn(71, 576)
    with torch.inference_mode():
        whole = layer(x)
        assert torch.equal(torch.cat([layer(x[:5]), layer(x[5:66]), layer(x[66:])]), whole)
        for r in (0, 63, 64, 70):
            assert torch.equal(layer(x[r:r + 1]), whole[r:r + 1])


@pytest.mark.skipif(native() is None, reason="no AVX2 or no C compiler here: the layers multiply in torch")
@pytest.mark.parametrize("isa", cpu_isas())
@pytest.mark.parametrize("half", [False, True])
def test_q4_0s_offsets_are_made_from_its_scales_with_the_same_result(monkeypatch, isa, half):
    """GGUF's Q4_0 stores no offsets: its blocks' offsets are -8 scales, which the AVX-512 kernels make instead of
    reading a second array. The product is bit for bit the one that reads them, and llama.cpp's."""
    from fourwalls.model.fused import LinearProduct

    monkeypatch.setenv("FOURWALLS_ISA", isa)
    torch.manual_seed(5)
    layer = random_block_layer("int4:32:offset", 576, 96, half)
    assert not layer.as_native().zero_m8  # offsets of their own
    layer.offsets = layer.scales * -8
    lin = layer.as_native()
    assert lin.zero_m8
    x = torch.randn(37, 576)
    with torch.inference_mode():
        made = [LinearProduct(lin, isa)(x[:n]) for n in (1, 3, 37)]
        lin.zero_m8 = False
        read = [LinearProduct(lin, isa)(x[:n]) for n in (1, 3, 37)]
        expected = emulated(layer, x)
    assert all(torch.equal(a, b) for a, b in zip(made, read))
    assert (made[2] - expected).abs().max() < 1e-5 * expected.abs().max()
    layer.offsets[0, 0] += 1  # changed in place: the kernels must read them again
    assert not layer.as_native().zero_m8


def test_forced_instruction_sets(monkeypatch):
    monkeypatch.setenv("FOURWALLS_ISA", "none")
    assert native() is None
    layer = random_block_layer("int4:32:offset", 64, 8, half=True)
    x = torch.randn(2, 64)
    with torch.inference_mode():  # no kernels: the same product in torch, the input rounded as the kernels round it
        y = layer(x)
    assert (y - emulated(layer, x)).abs().max() < 1e-5 * y.abs().max()
    assert not torch.allclose(y, x @ layer.dequantize().T + layer.bias, rtol=0, atol=1e-5)
    for isa in cpu_isas():
        monkeypatch.setenv("FOURWALLS_ISA", isa)
        assert abi()["ISA_AVX512"] == (isa == "avx512")


@pytest.mark.slow
def test_the_default_model_runs_its_gguf_blocks_with_no_fp32_copy(smol, session_store):
    model = smol.model
    assert smol.config.quantization["gguf_types"] == {"Q4_1": 210, "Q8_0": 1}
    layers = [layer for *_, layer in block_linears(model, torch.nn.Module)]
    assert len(layers) == 210 and all(isinstance(layer, BlockLinear) and layer.bits == 4 for layer in layers)
    assert isinstance(model.embed_tokens, BlockEmbedding) and model.lm_head.weight is model.embed_tokens.weight
    tensors = {t.data_ptr(): t for t in model.state_dict().values()}  # the tied head's once
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert weight_bytes < 1.05 * bundled_gguf().stat().st_size  # the blocks, as large as the file
    cache = session_store.root / "cache"
    assert not (cache / smol.digest).exists()  # no fp32 folder
    repacked = cache / f"gguf-{smol.digest}"  # but the repacked form, as large as the file
    assert sum(f.stat().st_size for f in repacked.iterdir()) < 1.2 * bundled_gguf().stat().st_size
    trainable = session_store.load(DEFAULT_MODEL, quantized=False).model  # float weights to train: the same values
    assert type(trainable.layers[0].mlp.up_proj).__name__ == "Linear"
    assert torch.equal(trainable.layers[0].mlp.up_proj.weight, model.layers[0].mlp.up_proj.dequantize())


@pytest.mark.slow
def test_import_stores_the_blocks_and_export_gives_back_the_files_bytes(smol, session_store, tmp_path):
    ref = session_store.import_model(bundled_gguf(), "smol-blocks")
    assert ref.manifest["dtype"] == "gguf" and ref.manifest["gguf_types"] == {"Q4_1": 210, "Q8_0": 1}
    assert sum(f.stat().st_size for f in ref.path.iterdir()) < 1.2 * bundled_gguf().stat().st_size  # not fp32
    out = export_model("smol-blocks", "gguf", tmp_path / "back.gguf", dtype="q4_1", store=session_store)
    original = {t.name: t for t in gguf.GGUFReader(bundled_gguf()).tensors}
    for t in gguf.GGUFReader(out).tensors:
        assert t.tensor_type == original[t.name].tensor_type, t.name
        assert np.array_equal(t.data, original[t.name].data), t.name  # every byte of every block
