import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from transformers import AutoModelForCausalLM

from fourwalls.errors import FormatError, NotFoundError, UnsupportedError, UsageError
from fourwalls.formats.hf import write_hf
from fourwalls.model.lora import (
    LoRAConfig,
    LoRALinear,
    adapters_off,
    attach_lora,
    load_adapter,
    lora_state_dict,
    merge_lora,
    save_adapter,
)
from fourwalls.model.ops import Linear
from tests.conftest import tiny_model
from tests.test_tokenizer import byte_tokenizer

CFG = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "k_proj", "o_proj", "up_proj", "down_proj"))


def tokens(batch: int = 2, length: int = 16) -> torch.Tensor:
    return torch.randint(0, 512, (batch, length), generator=torch.Generator().manual_seed(7))


def randomize_b(model: torch.nn.Module, seed: int = 1) -> None:
    """A trained-looking adapter: B is zero at initialisation, which would hide every bug."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)


def lora_model(name: str = "tiny-llama", cfg: LoRAConfig = CFG) -> torch.nn.Module:
    model = tiny_model(name)
    attach_lora(model, cfg)
    randomize_b(model)
    return model


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits if hasattr(out, "logits") else out


def test_untrained_adapter_changes_nothing_until_b_is_trained():
    model, x = tiny_model(), tokens()
    ref = logits(model, x)
    names = attach_lora(model, CFG)
    assert names[:3] == ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.o_proj"]
    assert len(names) == 2 * 5 and "layers.1.mlp.down_proj" in names
    assert isinstance(model.layers[0].self_attn.q_proj, LoRALinear)
    assert isinstance(model.layers[0].self_attn.v_proj, Linear)  # not targeted
    torch.testing.assert_close(logits(model, x), ref, atol=0, rtol=0)
    randomize_b(model)
    assert (logits(model, x) - ref).abs().max() > 1e-2


def test_adapters_off_is_the_base_model_inside_and_the_adapted_one_after():
    base = tiny_model()
    model = lora_model()
    x = tokens()
    with torch.no_grad():
        adapted, want = model(x), base(x)
        with adapters_off(model):
            off = model(x)
        assert torch.equal(off, want)
        assert not torch.allclose(adapted, want, atol=1e-3)
        assert torch.equal(model(x), adapted)
    with pytest.raises(RuntimeError), adapters_off(model):  # switched back on even when the body fails
        raise RuntimeError
    assert all(m.enabled for m in model.modules() if isinstance(m, LoRALinear))


def test_only_lora_parameters_require_and_receive_gradients():
    model = tiny_model()
    names = attach_lora(model, CFG)
    randomize_b(model)  # with B zero, A would get no gradient
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{q}.lora_{ab}.weight" for q in names for ab in "AB"}
    model(tokens()).logsumexp(-1).mean().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == trainable


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])  # qwen2: q/k/v carry biases
def test_merge_gives_the_same_logits_and_an_ordinary_model(name):
    model = lora_model(name, LoRAConfig(r=4, alpha=8))
    plain_keys = set(tiny_model(name).state_dict())
    x = tokens()
    ref = logits(model, x)
    merge_lora(model)
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert type(model.layers[1].mlp.down_proj) is Linear
    assert set(model.state_dict()) == plain_keys  # stores as a plain checkpoint
    with torch.inference_mode():  # the one-row decode fast path works on merged layers
        torch.testing.assert_close(model(x[:1, :1]), ref[:1, :1], atol=1e-5, rtol=1e-5)


def test_lora_on_an_nf4_base_merges_to_the_same_logits():
    from fourwalls.model.quant import quantize_nf4

    model, x = tiny_model(), tokens()
    quantize_nf4(model)
    attach_lora(model, CFG)
    randomize_b(model)
    ref = logits(model, x)
    merge_lora(model)
    torch.testing.assert_close(logits(model, x), ref, atol=1e-5, rtol=1e-5)


def test_saved_adapter_loads_into_a_fresh_base_with_identical_logits(tmp_path):
    model = lora_model()
    save_adapter(tmp_path, model, CFG, base_model="tiny-base")
    conf = json.loads((tmp_path / "adapter_config.json").read_text())
    assert conf["peft_type"] == "LORA" and conf["task_type"] == "CAUSAL_LM"
    assert (conf["r"], conf["lora_alpha"], conf["target_modules"]) == (4, 8, list(CFG.target_modules))
    assert conf["base_model_name_or_path"] == "tiny-base" and conf["use_dora"] is False
    fresh = tiny_model()
    assert load_adapter(fresh, tmp_path) == CFG
    x = tokens()
    assert torch.equal(logits(fresh, x), logits(model, x))
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".lora_" not in n)


def test_config_survives_asdict_and_json():
    cfg = LoRAConfig(r=16, alpha=32.0, dropout=0.05, target_modules=("q_proj", "v_proj"))
    assert LoRAConfig(**json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg


# --- parity with HF PEFT ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_base(tmp_path_factory):
    """The tiny base written as an HF folder: what both PEFT and fourwalls load."""
    folder = tmp_path_factory.mktemp("base")
    model = tiny_model()
    write_hf(folder, model.config, model.state_dict(), byte_tokenizer())
    return folder


def load_hf(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def test_our_names_and_shapes_are_peft_s(hf_base):
    peft_model = get_peft_model(load_hf(hf_base), LoraConfig(r=4, lora_alpha=8, target_modules=list(CFG.target_modules),
                                                             task_type="CAUSAL_LM"))
    theirs = {k: tuple(v.shape) for k, v in get_peft_model_state_dict(peft_model).items()}
    ours = {k: tuple(v.shape) for k, v in lora_state_dict(lora_model()).items()}
    assert ours == theirs
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in ours


def test_our_adapter_runs_in_hf_peft(hf_base, tmp_path):
    ours = lora_model()
    save_adapter(tmp_path, ours, CFG, base_model=str(hf_base))
    hf = PeftModel.from_pretrained(load_hf(hf_base), tmp_path).eval()
    x = tokens()
    torch.testing.assert_close(logits(hf, x), logits(ours, x), atol=1e-4, rtol=1e-4)


def test_peft_adapter_runs_in_fourwalls(hf_base, tmp_path):
    peft_cfg = LoraConfig(r=6, lora_alpha=24, lora_dropout=0.1, target_modules=["v_proj", "gate_proj", "o_proj"],
                          task_type="CAUSAL_LM")
    peft_model = get_peft_model(load_hf(hf_base), peft_cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    peft_model.save_pretrained(tmp_path)
    model = tiny_model()
    cfg = load_adapter(model, tmp_path)
    assert (cfg.r, cfg.alpha, cfg.dropout) == (6, 24.0, 0.1)
    assert set(cfg.target_modules) == {"v_proj", "gate_proj", "o_proj"}
    assert not any(m.training for m in model.modules())  # lora_dropout=0.1 stays off in an eval model
    x = tokens()
    torch.testing.assert_close(logits(model, x), logits(peft_model.eval(), x), atol=1e-4, rtol=1e-4)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_configs_and_double_attach():
    model = lora_model()
    with pytest.raises(UsageError, match="already has LoRA"):
        attach_lora(model, CFG)
    with pytest.raises(UsageError, match="rank r must be an integer of at least 1"):
        LoRAConfig(r=0)
    with pytest.raises(UsageError, match="unknown LoRA target module.*'attn'"):
        LoRAConfig(target_modules=("q_proj", "attn"))
    with pytest.raises(UsageError, match="at least one target"):
        LoRAConfig(target_modules=())
    with pytest.raises(UsageError, match="dropout"):
        LoRAConfig(dropout=1.0)


def saved(tmp_path, **config_changes):
    folder = tmp_path / "adapter"
    folder.mkdir()
    save_adapter(folder, lora_model(), CFG)
    conf = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**conf, **config_changes}))
    return folder


@pytest.mark.parametrize("change, error, message", [
    ({"use_dora": True}, UnsupportedError, "use_dora"),
    ({"bias": "all"}, UnsupportedError, "bias"),
    ({"fan_in_fan_out": True}, UnsupportedError, "fan_in_fan_out"),
    ({"use_rslora": True}, UnsupportedError, "use_rslora"),
    ({"rank_pattern": {"q_proj": 16}}, UnsupportedError, "rank_pattern"),
    ({"alpha_pattern": {"q_proj": 16}}, UnsupportedError, "alpha_pattern"),
    ({"target_modules": ["q_proj", "lm_head"]}, UnsupportedError, "lm_head"),
    ({"target_modules": "all-linear"}, UnsupportedError, "all-linear"),
    ({"peft_type": "IA3"}, UnsupportedError, "IA3"),
    ({"kasa_config": {"k": 1}}, UnsupportedError, "kasa_config"),
    ({"init_lora_weights": "pissa_niter_4"}, UnsupportedError, "init_lora_weights.*pissa"),
    ({"r": 8}, FormatError, r"shape \(4, 64\).*r=8"),  # config and tensors disagree
    ({"target_modules": ["q_proj"]}, FormatError, "unexpected"),
])
def test_adapter_files_fourwalls_cannot_honour_are_refused(tmp_path, change, error, message):
    folder = saved(tmp_path, **change)
    model = tiny_model()
    with pytest.raises(error, match=message):
        load_adapter(model, folder)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())  # refused before any change


def test_missing_and_damaged_adapter_folders(tmp_path):
    with pytest.raises(NotFoundError, match="no such adapter folder"):
        load_adapter(tiny_model(), tmp_path / "nowhere")
    folder = saved(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(FormatError, match="not a valid safetensors"):
        load_adapter(tiny_model(), folder)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(NotFoundError, match="adapter_model.safetensors"):
        load_adapter(tiny_model(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_adapter(tiny_model(), folder)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(NotFoundError, match="adapter_config.json"):
        load_adapter(tiny_model(), folder)
