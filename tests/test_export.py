"""Export: GGUF files that fourwalls and llama.cpp read back as the same model, HF folders transformers opens."""

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from fourwalls.cli import main
from fourwalls.errors import UnsupportedError, UsageError
from fourwalls.export import export_model
from fourwalls.formats import read_checkpoint
from fourwalls.formats.gguf import open_gguf, read_metadata
from fourwalls.formats.gguf_write import _permute, pre_tokenizer_name, write_gguf
from fourwalls.generate import SamplingParams, generate_tokens
from fourwalls.store import DEFAULT_MODEL, Store, build_model, bundled_gguf
from fourwalls.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, Tokenizer
from tests.conftest import tiny_model
from tests.test_parity_gguf import STRINGS
from tests.test_tokenizer import byte_tokenizer

PROMPT = "The library opens at nine in the morning, and"
TEXTS = [*STRINGS, "héllo wörld 🦊", "<|im_start|>user\nhi<|im_end|>"]
ENGLISH = (Path(__file__).parent / "fixtures" / "english.txt").read_text()


def _greedy(model, ids, n=16):
    return [t.id for t in generate_tokens(model, ids, SamplingParams(max_new_tokens=n, temperature=0))]


# --- tiny random models -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3", "tiny-qwen2"])
def test_gguf_round_trip_on_tiny_models(tmp_path, name):
    model, tok = tiny_model(name), byte_tokenizer()
    tokens = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        ref = model(tokens)
    for qtype, atol in (("f32", 1e-6), ("f16", 2e-2), ("q8_0", 5e-2)):
        path = tmp_path / f"{name}-{qtype}.gguf"
        write_gguf(path, model.config, model.state_dict(), tok, qtype)
        cfg, state, tok2 = read_checkpoint(path, model.config.name)
        assert cfg == model.config
        with torch.no_grad():
            torch.testing.assert_close(build_model(cfg, state)(tokens), ref, atol=atol, rtol=0)
        for s in TEXTS:
            assert tok2.encode(s) == tok.encode(s), s
            assert tok2.decode(tok.encode(s), skip_special_tokens=False) == s
        assert tok2.chat_template == tok.chat_template
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{name}-{q}.gguf" for q in ("f16", "f32", "q8_0"))


def test_gguf_layout_is_what_llama_cpp_expects(tmp_path):
    model, tok = tiny_model("tiny-llama3"), byte_tokenizer()
    write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok, "q8_0")
    reader = open_gguf(tmp_path / "m.gguf")
    meta = read_metadata(reader)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["rope_freqs.weight"] == types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert types["token_embd.weight"] == types["output.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert meta["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert meta["llama.rope.dimension_count"] == meta["llama.attention.key_length"] == 16
    assert "llama.rope.scaling.factor" not in meta  # it would make llama.cpp scale linearly on top of rope_freqs
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.merges"] == []  # llama.cpp refuses a gpt2 vocabulary without the key
    assert meta["tokenizer.ggml.tokens"][256:259] == ["<|im_start|>", "<|im_end|>", "[PAD258]"]
    assert meta["tokenizer.ggml.token_type"][255:259] == [1, 3, 3, 5]  # normal, control, control, unused
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"],
            meta["tokenizer.ggml.eot_token_id"]) == (1, 2, 3)
    assert meta["tokenizer.ggml.add_bos_token"] is False

    tied = tiny_model("tiny-llama")
    write_gguf(tmp_path / "tied.gguf", tied.config, tied.state_dict(), tok, "f16")
    types = {t.name: t.tensor_type.name for t in open_gguf(tmp_path / "tied.gguf").tensors}
    assert "output.weight" not in types and "rope_freqs.weight" not in types
    assert types["token_embd.weight"] == types["blk.0.attn_q.weight"] == "F16"
    assert types["blk.0.ffn_norm.weight"] == "F32"


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_q_k_rows_are_permuted_for_llama_only(tmp_path, name):
    model = tiny_model(name)
    write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), byte_tokenizer())
    stored = {t.name: np.array(t.data) for t in open_gguf(tmp_path / "m.gguf").tensors}
    cfg, layer = model.config, model.layers[0].self_attn
    for gname, w, heads in (("attn_q", layer.q_proj, cfg.n_heads), ("attn_k", layer.k_proj, cfg.n_kv_heads)):
        expected = _permute(w.weight.detach(), heads) if cfg.arch == "llama" else w.weight.detach()
        np.testing.assert_array_equal(stored[f"blk.0.{gname}.weight"], expected.numpy())
        if cfg.qkv_bias:
            np.testing.assert_array_equal(stored[f"blk.0.{gname}.bias"], w.bias.detach().numpy())


def _bpe(pre_tokenizer) -> Tokenizer:
    """A 450-token byte-level BPE trained on the English fixture, split first by ``pre_tokenizer``."""
    backend = HFTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=450, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    numbers = " ".join(str(i) for i in range(1900, 2100))  # digit merges: the four splittings then differ
    backend.train_from_iterator([ENGLISH, *STRINGS, numbers], trainer)
    backend.add_tokens(["<tool>"])  # an added, non-special token: USER_DEFINED in GGUF
    return Tokenizer(backend, None, None, "<|endoftext|>")


def _split(regex: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


PRE_TOKENIZERS = {
    "gpt-2": pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                       pre_tokenizers.ByteLevel(add_prefix_space=False)]),
    "llama-bpe": _split(_LLAMA3_SPLIT),
    "qwen2": _split(_QWEN2_SPLIT),
}


def test_pre_tokenizer_is_named_as_llama_cpp_knows_it_and_round_trips(tmp_path):
    model = tiny_model("tiny-llama")
    texts = [*TEXTS, ENGLISH, "<tool> called"]
    seen = set()
    for name, pre in PRE_TOKENIZERS.items():
        tok = _bpe(pre)
        assert pre_tokenizer_name(tok) == name
        write_gguf(tmp_path / f"{name}.gguf", model.config, model.state_dict(), tok)
        meta = read_metadata(open_gguf(tmp_path / f"{name}.gguf"))
        assert meta["tokenizer.ggml.pre"] == name
        assert meta["tokenizer.ggml.token_type"][tok.token_id("<tool>")] == gguf.TokenType.USER_DEFINED
        _, _, back = read_checkpoint(tmp_path / f"{name}.gguf")
        for s in texts:
            assert back.encode(s) == tok.encode(s), (name, s)
        assert back.extra_config["gguf_pre"] == name
        seen.add(tuple(tuple(tok.encode(s)) for s in texts))
    assert len(seen) == 4  # the four splittings tokenize differently: a wrong name would have shown

    tok = _bpe(PRE_TOKENIZERS["llama-bpe"])
    tok.extra_config["gguf_pre"] = "llama3"  # a name recorded from a GGUF file is kept when it still fits ...
    assert pre_tokenizer_name(tok) == "llama3"
    tok.extra_config["gguf_pre"] = "qwen2"  # ... and replaced when it does not
    assert pre_tokenizer_name(tok) == "llama-bpe"


def test_unsupported_input_is_refused_before_anything_is_written(tmp_path):
    model = tiny_model("tiny-llama")
    wordpiece = HFTokenizer(models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(UnsupportedError, match="byte-level BPE"):
        write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), Tokenizer(wordpiece))
    metaspace = _bpe(PRE_TOKENIZERS["gpt-2"])
    metaspace.backend.pre_tokenizer = pre_tokenizers.Metaspace()
    with pytest.raises(UnsupportedError, match="pre-tokenizer"):
        write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), metaspace)
    with pytest.raises(UsageError, match="unknown GGUF type 'q5_0'"):
        write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), byte_tokenizer(), "q5_0")
    small = model.config.replace(vocab_size=200)
    with pytest.raises(UnsupportedError, match="token id 257"):
        write_gguf(tmp_path / "m.gguf", small, model.state_dict(), byte_tokenizer())
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
    model = tiny_model("tiny-llama")
    target = tmp_path / "m.gguf"
    target.write_bytes(b"old")

    def disk_full(self, **_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        write_gguf(target, model.config, model.state_dict(), byte_tokenizer())
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and target.read_bytes() == b"old"


# --- the bundled model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(smol, session_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    for qtype in ("f32", "q8_0"):
        export_model(DEFAULT_MODEL, "gguf", out / f"smol-{qtype}.gguf", qtype, store=session_store)
    export_model(DEFAULT_MODEL, "hf", out / "smol-hf", store=session_store)
    return out


def test_bundled_model_exports_to_gguf_and_hf(smol, smol_float, exported):
    ids = smol.tokenizer.encode(PROMPT)
    cfg, state, tok = read_checkpoint(exported / "smol-f32.gguf")
    assert cfg == smol.config.replace(name=cfg.name)
    assert _greedy(build_model(cfg, state), ids) == _greedy(smol.model, ids)
    assert all(tok.encode(s) == smol.tokenizer.encode(s) for s in STRINGS)
    cfg8, state8, _ = read_checkpoint(exported / "smol-q8_0.gguf")
    assert (exported / "smol-q8_0.gguf").stat().st_size < 0.4 * (exported / "smol-f32.gguf").stat().st_size
    with torch.no_grad():
        a = build_model(cfg8, state8)(torch.tensor([ids]))[0, -1]
        b = smol.model(torch.tensor([ids]))[0, -1]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    hf = AutoModelForCausalLM.from_pretrained(exported / "smol-hf", dtype=torch.float32)
    with torch.no_grad():  # the HF folder holds the blocks dequantized: the float model's weights
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, smol_float.model(torch.tensor([ids])), atol=1e-4,
                                   rtol=1e-4)
    hf_tok = AutoTokenizer.from_pretrained(exported / "smol-hf")
    assert all(hf_tok(s)["input_ids"] == smol.tokenizer.encode(s) for s in STRINGS)


def test_bundled_gguf_export_keeps_the_original_vocabulary(exported):
    """The exported tokenizer metadata is what llama.cpp's own converter wrote into the bundled file."""
    original = read_metadata(open_gguf(bundled_gguf()))
    ours = read_metadata(open_gguf(exported / "smol-q8_0.gguf"))
    for key in ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "add_bos_token"):
        assert ours[f"tokenizer.ggml.{key}"] == original[f"tokenizer.ggml.{key}"], key
    assert ours["tokenizer.chat_template"] == original["tokenizer.chat_template"]
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "rope.freq_base", "rope.dimension_count", "vocab_size"):
        assert ours[f"llama.{key}"] == original[f"llama.{key}"], key


# --- llama.cpp (llama-cpp-python, an optional test dependency) --------------------------------


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed; `CMAKE_ARGS=-DGGML_NATIVE=OFF pip install llama-cpp-python` "
                    "builds it (about 15 minutes) to check exports against llama.cpp itself")
    return llama_cpp


def _llama_cpp_greedy(path: Path, ids: list[int], n: int = 16) -> tuple[object, list[int]]:
    llm = _llama_cpp().Llama(model_path=str(path), n_ctx=256, verbose=False, logits_all=False)
    out = []
    for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0):  # temp 0: llama.cpp's greedy sampler
        out.append(int(token))
        if len(out) == n:
            break
    return llm, out


def test_llama_cpp_runs_the_bundled_f32_export_like_fourwalls(smol, exported):
    _llama_cpp()
    ids = smol.tokenizer.encode(PROMPT)
    llm, theirs = _llama_cpp_greedy(exported / "smol-f32.gguf", ids)
    cfg, state, _ = read_checkpoint(exported / "smol-f32.gguf")
    assert theirs == _greedy(build_model(cfg, state), ids) == _greedy(smol.model, ids)
    for s in [*STRINGS, PROMPT]:
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == smol.tokenizer.encode(s), s


def test_llama_cpp_runs_the_bundled_q8_0_export_like_fourwalls(smol, exported):
    """Same weights, not the same arithmetic: llama.cpp also rounds each activation row to Q8_0 before a Q8_0
    matmul, which moves logits by up to about one (as much as fourwalls moves if it rounds them the same way).
    So the continuations agree token for token except where fourwalls' top two logits nearly tie; fourwalls'
    continuation is fed to both (teacher forcing), so one near-tie does not derail the steps after it."""
    llama_cpp = _llama_cpp()
    path = exported / "smol-q8_0.gguf"
    cfg, state, _ = read_checkpoint(path)  # fourwalls runs the same dequantized weights
    model = build_model(cfg, state)
    ids = smol.tokenizer.encode(PROMPT)
    ours = _greedy(model, ids)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, logits_all=True)
    llm.eval(ids + ours)
    theirs = llm.scores[len(ids) - 1:len(ids) + len(ours) - 1]
    with torch.no_grad():
        logits = model(torch.tensor([ids + ours]))[0, len(ids) - 1:-1].numpy()
    assert np.abs(theirs - logits).max() < 3.0  # a wrong tensor layout moves them by tens
    top2 = np.sort(logits, axis=-1)[:, -2:]
    for step, (token, row, (second, first)) in enumerate(zip(ours, theirs, top2)):
        assert int(row.argmax()) == token or first - second < 0.5, f"step {step}: margin {first - second:.3f}"
    assert sum(int(row.argmax()) == token for token, row in zip(ours, theirs)) >= 14


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-llama3", "tiny-qwen2"])
def test_llama_cpp_runs_a_tiny_export_like_fourwalls(tmp_path, name):
    _llama_cpp()
    model, tok = tiny_model(name), byte_tokenizer()
    write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), tok)
    ids = tok.encode("The library opens at nine")
    llm, theirs = _llama_cpp_greedy(tmp_path / "m.gguf", ids)
    assert theirs == _greedy(model, ids)
    assert llm.tokenize("héllo <|im_end|>".encode(), add_bos=False, special=True) == tok.encode("héllo <|im_end|>")


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_exports_a_stored_model(tmp_path, capsys):
    model = tiny_model("tiny-qwen2")
    Store().add("tiny", model.config, model.state_dict(), byte_tokenizer())
    out = tmp_path / "out" / "tiny.gguf"
    assert main(["export", "tiny", "--format", "gguf", "--out", str(out), "--dtype", "q8_0"]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert main(["export", "tiny", "--format", "gguf", "--out", str(out), "--force"]) == 0
    cfg, state, _ = read_checkpoint(out, "tiny")
    assert cfg == model.config.replace(name="tiny") and state["norm.weight"].equal(model.norm.weight)
    assert main(["export", "tiny", "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "home", "out"]  # no temp files left behind
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())  # an ordinary file, not mkstemp's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_hf_export_keeps_the_stored_dtype_and_gguf_export_takes_any(tmp_path):
    model = tiny_model("tiny-llama")
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    Store().add("tiny-bf16", model.config, state, byte_tokenizer())
    export_model("tiny-bf16", "hf", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    export_model("tiny-bf16", "gguf", tmp_path / "m.gguf")
    _, back, _ = read_checkpoint(tmp_path / "m.gguf")
    assert all(back[k].equal(state[k].float()) for k in back)


def test_bad_export_input(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["export", DEFAULT_MODEL, "--format", "gguf", "--out", str(out), "--dtype", "q3"]) == 2
    assert "unknown GGUF type" in capsys.readouterr().err and not out.exists()
    out.write_text("keep me")
    assert main(["export", DEFAULT_MODEL, "--format", "gguf", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["export", "nope", "--format", "hf", "--out", str(tmp_path / "h")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "h").exists()
    assert main(["export", DEFAULT_MODEL, "--format", "hf", "--out", str(tmp_path / "h"), "--dtype", "q8_0"]) == 2
    assert "--dtype applies to GGUF" in capsys.readouterr().err and not (tmp_path / "h").exists()
    assert main(["export", DEFAULT_MODEL, "--format", "gguf", "--out", str(tmp_path), "--force"]) == 2
    err = capsys.readouterr().err
    assert "is a folder" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.gguf"]
