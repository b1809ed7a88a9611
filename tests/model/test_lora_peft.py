import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from fourwalls.errors import UnsupportedError, UsageError
from fourwalls.formats.hf import write_hf
from fourwalls.model.lora import LoRAConfig, LoRALinear, attach_lora, load_adapter, merge_lora, save_adapter
from tests.conftest import tiny_model
from tests.test_tokenizer import byte_tokenizer

CFG = LoRAConfig(r=4, alpha=8, target_modules=("q_proj", "v_proj", "down_proj"))


def randomize_b(model):
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_B.weight, std=0.2)


def test_untrained_adapter_is_a_no_op_and_only_lora_trains():
    model, tokens = tiny_model(), torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        ref = model(tokens)
    names = attach_lora(model, CFG)
    assert len(names) == 2 * 3
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), ref)
    model(tokens).sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained and all(".lora_" in n for n in trained)
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".lora_" not in n)
    randomize_b(model)
    with torch.no_grad():
        assert not torch.allclose(model(tokens), ref)


def test_merge_equals_unmerged():
    model, tokens = tiny_model(), torch.randint(0, 512, (2, 12))
    attach_lora(model, CFG)
    randomize_b(model)
    with torch.no_grad():
        ref = model(tokens)
        merge_lora(model)
        torch.testing.assert_close(model(tokens), ref, atol=1e-5, rtol=1e-5)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_our_adapter_in_hf_peft_and_peft_adapter_in_fourwalls(tmp_path):
    base = tiny_model()
    write_hf(tmp_path / "base", base.config, base.state_dict(), byte_tokenizer())
    tokens = torch.randint(0, 512, (1, 16))

    ours = tiny_model()
    attach_lora(ours, CFG)
    randomize_b(ours)
    save_adapter(tmp_path / "ours", ours, CFG, "base")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "ours")
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), atol=1e-4, rtol=1e-4)

    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                LoraConfig(r=4, lora_alpha=8, target_modules=["k_proj", "up_proj"]))
    torch.manual_seed(2)
    for n, p in peft_model.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.2)
    peft_model.save_pretrained(tmp_path / "theirs")
    mine = tiny_model()
    cfg = load_adapter(mine, tmp_path / "theirs")
    assert cfg.target_modules == ("k_proj", "up_proj") or set(cfg.target_modules) == {"k_proj", "up_proj"}
    with torch.no_grad():
        torch.testing.assert_close(mine(tokens), peft_model(tokens).logits, atol=1e-4, rtol=1e-4)


def test_bad_lora_input(tmp_path):
    model = tiny_model()
    attach_lora(model, CFG)
    with pytest.raises(UsageError, match="already has LoRA"):
        attach_lora(model, CFG)
    with pytest.raises(UsageError, match="rank"):
        LoRAConfig(r=0)
    with pytest.raises(UsageError, match="unknown LoRA target"):
        LoRAConfig(target_modules=("attn",))
    save_adapter(tmp_path / "a", model, CFG)
    conf = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**conf, "use_dora": True}))
    with pytest.raises(UnsupportedError, match="use_dora"):
        load_adapter(tiny_model(), tmp_path / "a")
