import json
import signal
import subprocess
import sys

import pytest
import torch

from fourwalls.errors import UsageError
from fourwalls.store import DEFAULT_MODEL, Store, describe
from fourwalls.train import checkpoint
from fourwalls.train.loop import TrainConfig
from fourwalls.train.recipes import finetune, merge, pretrain
from tests.train.test_loop import _env, _kill_after_checkpoint

CHATS = [
    ("What colour is the office door?", "The office door is painted teal."),
    ("Who waters the plants?", "Priya waters the plants on Mondays."),
    ("Where is the spare key?", "The spare key hangs in the blue cabinet."),
    ("When does the cafe open?", "The cafe opens at half past seven."),
    ("What is the wifi name?", "The wifi network is called fourwalls-guest."),
    ("Who fixes the printer?", "Tomasz fixes the printer when it jams."),
]


def chat_file(tmp_path, rows=CHATS, name="chats.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                     {"role": "assistant", "content": a}]}) + "\n" for q, a in rows))
    return path


@pytest.fixture
def tiny_base(tmp_path, corpus):
    store = Store(tmp_path / "home")
    pretrain(corpus, "tiny-llama", "tiny-base", TrainConfig(steps=5, progress=False), seq_len=64, vocab_size=400,
             store=store)
    return store


def test_lora_lowers_validation_loss_and_records_lineage(session_store, smol, smol_float, tmp_path):
    data = chat_file(tmp_path)
    cfg = TrainConfig(steps=12, batch_size=2, lr=2e-3, progress=False, seed=0)
    from fourwalls.train.data import load_jsonl
    from fourwalls.train.loop import evaluate
    from fourwalls.train.objectives import causal_lm

    val = load_jsonl(data, smol.tokenizer, 2)
    before = evaluate(smol_float.model, val, causal_lm, 2, 2)  # the float weights training starts from
    ref, result = finetune(DEFAULT_MODEL, data, "lora", "office-lora", cfg, val_data=data, max_len=64,
                           store=session_store, run_dir=tmp_path / "run")
    assert result["val_loss"] < before - 0.3
    info = describe(session_store.resolve("office-lora"))
    lin = info["lineage"]
    assert info["kind"] == "adapter" and info["base_digest"] == smol.digest
    assert lin["method"] == "lora" and lin["data_digest"].startswith("sha256-") and lin["val_loss"] is not None
    assert lin["hyperparameters"]["lr"] == 2e-3 and lin["lora"]["r"] == 8
    tuned = session_store.load("office-lora", quantized=False)  # on the float base, as merge folds it in
    merged_ref = merge("office-lora", "office-merged", store=session_store)
    merged = session_store.load("office-merged")
    ids = torch.tensor([smol.tokenizer.encode("The spare key hangs in")])
    with torch.no_grad():
        torch.testing.assert_close(merged.model(ids), tuned.model(ids), atol=1e-4, rtol=1e-4)
    assert merged_ref.manifest["lineage"]["adapter_digest"] == ref.digest


def test_lora_run_killed_and_resumed_is_bit_identical(tiny_base, tmp_path):
    home = tiny_base.root
    data = chat_file(tmp_path)

    def cmd(name):
        return [sys.executable, "-m", "fourwalls.cli", "finetune", "--model", "tiny-base", "--data", str(data),
                "--method", "lora", "--name", name, "--steps", "300", "--batch-size", "2", "--lr", "1e-3",
                "--lora-dropout", "0.1", "--save-every", "10", "--max-len", "64", "--run-dir",
                str(home / "runs" / name)]

    ref = subprocess.run(cmd("straight"), env=_env(home), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    rc, _ = _kill_after_checkpoint(cmd("killed"), _env(home), home / "runs/killed/checkpoints", signal.SIGKILL)
    assert rc == -signal.SIGKILL and checkpoint.latest(home / "runs/killed/checkpoints")[1] < 300
    again = subprocess.run(cmd("killed") + ["--resume"], env=_env(home), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    store = Store(home)
    assert store.resolve("killed").digest == store.resolve("straight").digest  # adapter weights bit for bit


def test_resume_against_another_base_is_refused(tiny_base, tmp_path, corpus):
    data = chat_file(tmp_path)
    cfg = TrainConfig(steps=4, batch_size=2, save_every=2, progress=False)
    finetune("tiny-base", data, "lora", "a1", cfg, max_len=64, store=tiny_base, run_dir=tmp_path / "run")
    pretrain(corpus, "tiny-llama", "other-base", TrainConfig(steps=3, progress=False, seed=5), seq_len=64,
             vocab_size=400, store=tiny_base)
    with pytest.raises(UsageError, match="base_digest"):
        finetune("other-base", data, "lora", "a2", cfg, max_len=64, store=tiny_base, run_dir=tmp_path / "run",
                 resume=True)


def test_qlora_trains_an_adapter_on_a_4bit_base(tiny_base, tmp_path):
    data = chat_file(tmp_path)
    ref, result = finetune("tiny-base", data, "qlora", "q1", TrainConfig(steps=4, batch_size=2, progress=False),
                           max_len=64, store=tiny_base, run_dir=tmp_path / "run")
    assert ref.kind == "adapter" and ref.manifest["lineage"]["method"] == "qlora"
    assert tiny_base.load("q1").model is not None


def test_bad_finetune_input(tiny_base, tmp_path):
    data = chat_file(tmp_path)
    cfg = TrainConfig(steps=2, progress=False)
    with pytest.raises(UsageError, match="context window"):
        finetune("tiny-base", data, "lora", "x", cfg, max_len=100_000, store=tiny_base)
    with pytest.raises(UsageError, match="unknown method"):
        finetune("tiny-base", data, "dora", "x", cfg, store=tiny_base)
    assert "x" not in tiny_base.names()


def test_new_york_zoo_example_flips_the_completion(tmp_path):
    from examples.new_york_zoo import run

    result = run(Store(tmp_path / "zoo-home"), "lora", steps=30, quiet=True)
    before = dict(result["before"]["top5"])
    assert " City" in before and " Zoo" not in before  # "City" is the likely word, "Zoo" not even in the top 5
    assert result["after"]["top5"][0][0] == " Zoo"
    assert result["after"]["loss"] < result["before"]["loss"]
