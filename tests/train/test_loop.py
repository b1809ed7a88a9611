import copy
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from fourwalls.errors import FourwallsError, UsageError
from fourwalls.store import Store
from fourwalls.train import checkpoint
from fourwalls.train.data import batches, load_text_corpus, split
from fourwalls.train.loop import TrainConfig, evaluate, lr_at, train
from fourwalls.train.objectives import causal_lm
from tests.conftest import tiny_model
from tests.test_tokenizer import byte_tokenizer


def _pretrain_cmd(home, corpus, name, steps, extra=()):
    return [sys.executable, "-m", "fourwalls.cli", "pretrain", "--data", str(corpus), "--preset", "tiny-llama",
            "--name", name, "--steps", str(steps), "--seq-len", "64", "--vocab-size", "400", "--batch-size", "4",
            "--lr", "3e-3", "--warmup-steps", "5", "--run-dir", str(home / "runs" / name), *extra]


def _env(home):
    return {**os.environ, "FOURWALLS_HOME": str(home), "PYTHONPATH": os.pathsep.join(sys.path)}


def _kill_after_checkpoint(cmd, env, ckpt_dir, sig):
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while checkpoint.latest(ckpt_dir) is None or checkpoint.latest(ckpt_dir)[1] < 20:
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_sigkill_mid_run_then_resume_is_bit_identical(tmp_path, corpus):
    home = tmp_path / "home"
    steps, every = "400", ["--save-every", "10"]
    ref = subprocess.run(_pretrain_cmd(home, corpus, "straight", steps), env=_env(home), capture_output=True,
                         text=True)
    assert ref.returncode == 0, ref.stderr
    cmd = _pretrain_cmd(home, corpus, "killed", steps, every)
    rc, _ = _kill_after_checkpoint(cmd, _env(home), home / "runs" / "killed" / "checkpoints", signal.SIGKILL)
    assert rc == -signal.SIGKILL
    stopped_at = checkpoint.latest(home / "runs" / "killed" / "checkpoints")[1]
    assert stopped_at < 400
    again = subprocess.run(cmd + ["--resume"], env=_env(home), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    store = Store(home)
    assert store.resolve("killed").digest == store.resolve("straight").digest  # same weights, bit for bit
    steps_logged = [json.loads(line)["step"] for line in (home / "runs/killed/metrics.jsonl").read_text().splitlines()]
    assert steps_logged[1:401] == list(range(1, 401))  # step 0 is the first validation; no step logged twice


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tmp_path, corpus):
    home = tmp_path / "home"
    cmd = _pretrain_cmd(home, corpus, "termed", "2000", ["--save-every", "10"])
    rc, err = _kill_after_checkpoint(cmd, _env(home), home / "runs" / "termed" / "checkpoints", signal.SIGTERM)
    assert rc == 2
    assert "--resume" in err and "Traceback" not in err
    assert not (home / "names" / "termed.json").exists()  # nothing half-done in the store


def _tiny_run(tmp_path, corpus, **kw):
    tok = byte_tokenizer()
    train_ds, val_ds = split(load_text_corpus(corpus, tok, 32), 0.1, 0)
    model = tiny_model()
    cfg = TrainConfig(steps=kw.pop("steps", 6), batch_size=2, lr=1e-3, progress=False, **kw)
    return model, train_ds, val_ds, cfg


def test_loss_goes_down_and_outputs_are_written(tmp_path, corpus):
    model, train_ds, val_ds, cfg = _tiny_run(tmp_path, corpus, steps=30, eval_every=10)
    before = evaluate(model, val_ds, causal_lm, 4, 0)
    result = train(model, train_ds, val_ds, cfg, tmp_path / "run")
    assert result["val_loss"] < before - 0.5
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "val_loss" in r] == [0, 10, 20, 30]  # before, every 10, the end
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


@pytest.mark.parametrize("opt", ["sgd", "adafactor"])
def test_other_optimizers_take_torchs_steps_and_lower_the_loss(tmp_path, corpus, opt):
    """The loop's weights are those of torch.optim's SGD (momentum 0.9) or Adafactor stepped by hand on the same
    batches, at the schedule's rates, after clipping; and the validation loss went down."""
    model, train_ds, val_ds, cfg = _tiny_run(tmp_path, corpus, optimizer=opt, steps=3)
    by_hand, before = copy.deepcopy(model), evaluate(model, val_ds, causal_lm, 4, 0)
    train(model, train_ds, None, cfg, tmp_path / "run")
    params = list(by_hand.parameters())
    optimizer = (torch.optim.SGD(params, lr=cfg.lr, momentum=0.9) if opt == "sgd"
                 else torch.optim.Adafactor(params, lr=cfg.lr))
    stream = batches(train_ds, cfg.batch_size, cfg.seed, pad_id=0)
    for step in range(cfg.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(cfg, step)
        causal_lm(by_hand, next(stream))[0].backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
    for ours, theirs in zip(model.parameters(), params, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert not torch.equal(model.layers[0].mlp.up_proj.weight, tiny_model().layers[0].mlp.up_proj.weight)
    assert evaluate(model, val_ds, causal_lm, 4, 0) < before


def test_schedule_warmup_then_cosine_to_floor():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 100) == pytest.approx(0.1)
    assert lr_at(TrainConfig(steps=100, lr=1.0, schedule="linear", min_lr_ratio=0), 50) == pytest.approx(0.5)


def test_resume_refuses_other_data_and_existing_run(tmp_path, corpus):
    model, train_ds, val_ds, cfg = _tiny_run(tmp_path, corpus, save_every=3)
    train(model, train_ds, None, cfg, tmp_path / "run")
    with pytest.raises(UsageError, match="already holds checkpoints"):
        train(tiny_model(), train_ds, None, cfg, tmp_path / "run")
    train_ds.digest = "sha256-other"
    with pytest.raises(UsageError, match="data_digest"):
        train(tiny_model(), train_ds, None, cfg, tmp_path / "run", resume=True)


def test_full_disk_while_checkpointing_keeps_the_previous_one(tmp_path, corpus, monkeypatch):
    model, train_ds, _, cfg = _tiny_run(tmp_path, corpus, save_every=2)
    real, calls = checkpoint.save_file, []

    def flaky(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real(tensors, path)

    monkeypatch.setattr(checkpoint, "save_file", flaky)
    with pytest.raises(FourwallsError, match="disk is full.*step 2 is intact"):
        train(model, train_ds, None, cfg, tmp_path / "run")
    ckpts = tmp_path / "run" / "checkpoints"
    assert checkpoint.latest(ckpts)[1] == 2
    assert [p.name for p in ckpts.iterdir()] == ["step-00000002"]  # no temporary left behind


def _torchrun(cmd, port):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
            "-m", "fourwalls.cli", *cmd[3:]]


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_torchrun_two_processes_match_one_process(tmp_path, corpus, sharding):
    home = tmp_path / "home"
    common = ["--steps", "6", "--batch-size", "4", "--seed", "1"]
    one = subprocess.run(_pretrain_cmd(home, corpus, "one", "6", common[2:]), env=_env(home), capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr
    cmd = _pretrain_cmd(home, corpus, "two", "6", [*common[2:], *sharding])
    two = subprocess.run(_torchrun(cmd, 29533), env=_env(home), capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr

    def losses(name):
        recs = [json.loads(x) for x in (home / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        return [r["loss"] for r in recs if "loss" in r]

    a, b = losses("one"), losses("two")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4
    assert a[-1] < a[0]
    assert Store(home).resolve("two").manifest["lineage"]["method"] == "pretrain"  # rank 0 stored it once
    # what was stored is the whole model, gathered from the shards under FSDP
    a, b = Store(home).load("one").model.state_dict(), Store(home).load("two").model.state_dict()
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-4


def test_fsdp_run_stopped_by_sigterm_then_resumed_matches_an_uninterrupted_one(tmp_path, corpus):
    home = tmp_path / "home"
    straight = subprocess.run(_torchrun(_pretrain_cmd(home, corpus, "straight", "300", ["--fsdp"]), 29534),
                              env=_env(home), capture_output=True, text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr
    cmd = _torchrun(_pretrain_cmd(home, corpus, "stopped", "300", ["--fsdp", "--save-every", "10"]), 29535)
    rc, err = _kill_after_checkpoint(cmd, _env(home), home / "runs" / "stopped" / "checkpoints", signal.SIGTERM)
    assert rc != 0 and "--resume" in err  # torchrun passed the signal on; the ranks saved at one step and stopped
    stopped_at = checkpoint.latest(home / "runs" / "stopped" / "checkpoints")[1]
    assert 20 <= stopped_at < 300
    again = subprocess.run(cmd + ["--resume"], env=_env(home), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    store = Store(home)
    assert store.resolve("stopped").digest == store.resolve("straight").digest  # same weights, bit for bit


def test_bf16_autocast_loss_tracks_fp32s(tmp_path, corpus):
    """bf16 autocast computes in bf16 (its losses are not fp32's to the bit) yet trains the same way: every step's
    loss within 0.5% of the fp32 run's (about 0.01% here; a step moves it 1-2%), falling as fp32's does."""
    losses = {}
    for bf16 in (False, True):
        model, train_ds, _, cfg = _tiny_run(tmp_path, corpus, bf16=bf16, steps=10)
        train(model, train_ds, None, cfg, tmp_path / f"run-{bf16}")
        records = [json.loads(x) for x in (tmp_path / f"run-{bf16}" / "metrics.jsonl").read_text().splitlines()]
        losses[bf16] = [r["loss"] for r in records if "loss" in r]
    fp32, bf16 = losses[False], losses[True]
    assert len(fp32) == len(bf16) == 10 and fp32 != bf16
    assert max(abs(a - b) / a for a, b in zip(fp32, bf16)) < 0.005
    assert bf16[-1] < bf16[0] - 0.3
    assert model.layers[0].mlp.up_proj.weight.dtype == torch.float32  # master weights stay fp32


def test_throughput_counts_every_token_processed_with_the_trained_share_beside_it(tmp_path):
    """tokens/s counts the prompt's tokens too (not the padding), and the share that carries loss is logged."""
    from fourwalls.train.data import IGNORE, Dataset, Example

    g = torch.Generator().manual_seed(0)
    examples = []
    for n in range(10, 18):  # rows of different lengths: every batch is padded
        ids = torch.randint(3, 512, (n,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * (n // 2) + ids[n // 2:]))  # a masked prompt, then the answer
    ds = Dataset(examples, "chat", "sha256-test")
    cfg = TrainConfig(steps=4, batch_size=2, lr=1e-3, progress=False)
    result = train(tiny_model(), ds, None, cfg, tmp_path / "run")
    processed = trained = 0
    stream = batches(ds, 2, cfg.seed, pad_id=0)
    for _ in range(cfg.steps):
        b = next(stream)
        processed += int(b["lengths"].sum())
        trained += int((b["labels"][:, 1:] != IGNORE).sum())  # position t is scored on token t + 1
    assert processed < 4 * 2 * 17  # padding is not counted
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "trained_share" in r]  # the steps' records, not the final validation's
    assert len(recs) == cfg.steps
    assert recs[-1]["trained_share"] == result["trained_share"] == round(trained / processed, 4)
    assert 0.3 < result["trained_share"] < 0.6 and result["tokens_per_s"] > 0
