import pytest
import torch
from transformers import AutoModelForCausalLM

from fourwalls.cli import main
from fourwalls.export import export_model
from fourwalls.formats import read_checkpoint
from fourwalls.formats.gguf_write import write_gguf
from fourwalls.generate import SamplingParams, generate_tokens
from fourwalls.store import DEFAULT_MODEL, build_model
from tests.conftest import tiny_model
from tests.test_parity_gguf import STRINGS
from tests.test_tokenizer import byte_tokenizer

PROMPT = "The library opens at nine in the morning, and"


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
        assert tok2.encode("héllo wörld 🦊") == tok.encode("héllo wörld 🦊")
        assert tok2.chat_template == tok.chat_template


def _greedy(model, ids, n=16):
    return [t.id for t in generate_tokens(model, ids, SamplingParams(max_new_tokens=n, temperature=0))]


@pytest.fixture(scope="module")
def exported(smol, session_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    for qtype in ("f32", "q8_0"):
        export_model(DEFAULT_MODEL, "gguf", out / f"smol-{qtype}.gguf", qtype, store=session_store)
    export_model(DEFAULT_MODEL, "hf", out / "smol-hf", store=session_store)
    return out


def test_bundled_model_exports_to_gguf_and_hf(smol, exported):
    ids = smol.tokenizer.encode(PROMPT)
    cfg, state, tok = read_checkpoint(exported / "smol-f32.gguf")
    assert _greedy(build_model(cfg, state), ids) == _greedy(smol.model, ids)
    assert all(tok.encode(s) == smol.tokenizer.encode(s) for s in STRINGS)
    cfg8, state8, _ = read_checkpoint(exported / "smol-q8_0.gguf")
    assert (exported / "smol-q8_0.gguf").stat().st_size < 0.4 * (exported / "smol-f32.gguf").stat().st_size
    with torch.no_grad():
        a = build_model(cfg8, state8)(torch.tensor([ids]))[0, -1]
        b = smol.model(torch.tensor([ids]))[0, -1]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    hf = AutoModelForCausalLM.from_pretrained(exported / "smol-hf", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(hf(torch.tensor([ids])).logits, smol.model(torch.tensor([ids])), atol=1e-4,
                                   rtol=1e-4)


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_llama_cpp_loads_the_export_and_agrees(smol, exported, qtype):
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (optional test dependency)")
    path = exported / f"smol-{qtype}.gguf"
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False)
    ids = smol.tokenizer.encode(PROMPT)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=True) == ids
    cfg, state, _ = read_checkpoint(path)
    ours = _greedy(build_model(cfg, state), ids)
    llm.eval(ids)
    theirs = []
    for _ in range(16):
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        theirs.append(nxt)
        llm.eval([nxt])
    assert theirs == ours


def test_bad_export_input(tmp_path, capsys):
    out = tmp_path / "x.gguf"
    assert main(["export", DEFAULT_MODEL, "--format", "gguf", "--out", str(out), "--dtype", "q3"]) == 2
    assert "unknown GGUF type" in capsys.readouterr().err and not out.exists()
    out.write_text("keep me")
    assert main(["export", DEFAULT_MODEL, "--format", "gguf", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["export", "nope", "--format", "hf", "--out", str(tmp_path / "h")]) == 2
    assert "not found" in capsys.readouterr().err and not (tmp_path / "h").exists()
