"""`fourwalls align`: preference data, the reference model, runs that learn a preference, resume, bad input."""

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fourwalls.cli import main
from fourwalls.errors import FormatError, UsageError
from fourwalls.store import DEFAULT_MODEL, Store
from fourwalls.train import checkpoint
from fourwalls.train.data import IGNORE, Example, collate, load_preferences
from fourwalls.train.loop import TrainConfig
from fourwalls.train.objectives import with_paired
from fourwalls.train.recipes import align
from tests.test_tokenizer import byte_tokenizer
from tests.train.test_finetune import tiny_base  # noqa: F401  (a fixture)
from tests.train.test_loop import _env, _kill_after_checkpoint, _torchrun

ROOT = Path(__file__).resolve().parents[2]
TOPICS = ["the door", "the plants", "the key", "the cafe", "the printer", "the wifi", "the lamp", "the desk",
          "the window", "the kettle", "the garden", "the roof", "the car", "the bike", "the train", "the dog"]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def style_pairs(tmp_path: Path) -> Path:
    """A preference any prompt can show: answers that open with "Gladly:" over answers that open with "No." (the
    rest the same), so what is learnt on some prompts shows on held-out ones."""
    return write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Tell me about {t}.", "chosen": f"Gladly: {t} is fine.",
                                                    "rejected": f"No. {t} is fine."} for t in TOPICS])


def style_kto(tmp_path: Path) -> Path:
    rows = []
    for t in TOPICS:
        rows += [{"prompt": f"Tell me about {t}.", "completion": f"Gladly: {t} is fine.", "label": True},
                 {"prompt": f"Tell me about {t}.", "completion": f"No. {t} is fine.", "label": False}]
    return write_jsonl(tmp_path / "kto.jsonl", rows)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# --- data ---------------------------------------------------------------------------------------------------------


def answer_text(tok, ex) -> str:
    return tok.decode([i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE], False)


def test_pairs_flat_and_chat_forms_score_only_the_final_answer(tmp_path):
    tok = byte_tokenizer()
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"system": "Be brief.", "prompt": "Where is the key?", "chosen": "In the cabinet.", "rejected": "Lost."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Where is the key?"}],
         "chosen": {"role": "assistant", "content": "In the cabinet."}, "rejected": {"content": "Lost."}},
    ])
    ds = load_preferences(path, tok)
    assert ds.shape == "pairs" and ds.stats == {"examples": 2, "bad_lines": 0, "truncated": 0}
    flat, chat = ds.examples  # each the chosen answer, paired with the rejected one
    assert answer_text(tok, flat) == "In the cabinet.<|im_end|>\n"
    assert answer_text(tok, flat.paired) == answer_text(tok, chat.paired) == "Lost.<|im_end|>\n"
    assert answer_text(tok, chat) == "In the cabinet.<|im_end|>\n"  # the earlier "Hello!" carries no loss
    assert tok.decode(flat.input_ids, False).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert "Hello!" in tok.decode(chat.input_ids, False)
    ids, labels = with_paired(collate(ds.examples, 0))  # chosen then rejected: one batch, one forward
    assert ids.shape == labels.shape == (4, max(len(e.input_ids) for e in [*ds.examples, flat.paired, chat.paired]))
    assert answer_text(tok, Example(ids[3].tolist(), labels[3].tolist())) == "Lost.<|im_end|>\n"


def test_kto_records_pair_each_prompt_with_the_previous_answer_for_the_kl_term(tmp_path):
    tok = byte_tokenizer()
    rows = [{"prompt": f"Q{i}?", "completion": f"A{i}.", "label": i % 2 == 0} for i in range(3)]
    ds = load_preferences(write_jsonl(tmp_path / "k.jsonl", rows), tok)
    assert ds.shape == "kto" and ds.stats["desirable"] == 2
    assert [answer_text(tok, e) for e in ds.examples] == [f"A{i}.<|im_end|>\n" for i in range(3)]
    assert [answer_text(tok, e.paired) for e in ds.examples] == [f"A{i}.<|im_end|>\n" for i in (2, 0, 1)]
    assert "Q1?" in tok.decode(ds.examples[1].paired.input_ids, False)
    assert collate(ds.examples, 0)["desirable"].tolist() == [1.0, 0.0, 1.0]


BAD = [
    ('{"prompt": "Q", "chosen": "Same answer.", "rejected": " Same answer. "}', "the same answer"),
    ('{"prompt": "Q", "chosen": "A"}', "'rejected' must be"),
    ('{"prompt": "", "chosen": "A", "rejected": "B"}', "'prompt' must be a non-empty string"),
    ('{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}], "chosen": "B", '
     '"rejected": "C"}', "must end with the turn the answers reply to"),
    ('{"prompt": "Q", "chosen": {"role": "user", "content": "A"}, "rejected": "B"}', "assistant message"),
    ('{"prompt": "Q", "chosen": "A", "rejected": "B"', "invalid JSON"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_pair_lines_are_named_or_skipped_and_counted(tmp_path, line, message):
    tok = byte_tokenizer()
    good = '{"prompt": "Q", "chosen": "A", "rejected": "B"}'
    path = write_jsonl(tmp_path / "p.jsonl", [good, line, good])
    with pytest.raises(FormatError, match=rf"p\.jsonl:2: .*{message}.*--skip-bad-lines"):
        load_preferences(path, tok)
    assert load_preferences(path, tok, skip_bad_lines=True).stats == {"examples": 2, "bad_lines": 1, "truncated": 0}


def test_kto_label_must_be_a_boolean_and_truncation_is_counted(tmp_path):
    tok = byte_tokenizer()
    path = write_jsonl(tmp_path / "k.jsonl", [{"prompt": "Q", "completion": "A", "label": "yes"}])
    with pytest.raises(FormatError, match="k.jsonl:1: 'label' must be true"):
        load_preferences(path, tok)
    rows = [{"prompt": "Q", "chosen": "A", "rejected": "B"},
            {"prompt": "Q", "chosen": "x" * 40 + "A", "rejected": "x" * 40 + "B"},  # cut to two equal answers
            {"prompt": "Q" * 50, "chosen": "A", "rejected": "B"}]  # cut to no answer at all
    ds = load_preferences(write_jsonl(tmp_path / "long.jsonl", rows), tok, max_len=30)
    assert ds.stats == {"examples": 1, "bad_lines": 2, "truncated": 2}
    with pytest.raises(UsageError, match="no usable examples"):
        load_preferences(write_jsonl(tmp_path / "cut.jsonl", rows[1:]), tok, max_len=30)


# --- runs -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["dpo", "ipo", "kto", "orpo"])
def test_a_short_lora_run_raises_held_out_reward_accuracy_above_chance(tiny_base, tmp_path, objective):  # noqa: F811
    data = style_kto(tmp_path) if objective == "kto" else style_pairs(tmp_path)
    run = tmp_path / "run"
    cfg = TrainConfig(steps=30, batch_size=4, lr=3e-3, progress=False, eval_every=10)
    ref, result = align("tiny-base", data, objective, "aligned", cfg, val_fraction=0.25, max_len=64, store=tiny_base,
                        run_dir=run)
    recs = metrics(run)
    assert recs[0]["step"] == 0 and recs[0]["val_reward_accuracy"] <= 0.5  # where the run started
    assert result["val_reward_accuracy"] >= 0.75 and result["val_reward_margin"] > 0
    assert result["val_loss"] < recs[0]["val_loss"]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 30 and all("reward_accuracy" in r for r in steps)
    assert all(0 < r["trained_share"] < 1 for r in steps), [r["trained_share"] for r in steps]  # both answers count
    assert sum("reward_margin" in r for r in steps) >= 20  # a KTO batch with answers of one label has no margin
    assert ("kl" in steps[0]) == (objective != "orpo") and "val_ppl" not in result
    assert [r["step"] for r in recs if "val_reward_accuracy" in r] == [0, 10, 20, 30]
    assert (run / "loss.png").stat().st_size > 10_000
    lin = ref.manifest["lineage"]
    assert ref.kind == "adapter" and lin["objective"] == objective and lin["beta"] == 0.1
    assert lin["val_reward_accuracy"] == result["val_reward_accuracy"] and lin["data_digest"].startswith("sha256-")


def test_cached_reference_is_the_adapter_off_reference(tiny_base, tmp_path):  # noqa: F811
    data = style_pairs(tmp_path)
    cfg = TrainConfig(steps=6, batch_size=4, lr=3e-3, progress=False, eval_every=2)
    _, live = align("tiny-base", data, "dpo", "live", cfg, max_len=64, store=tiny_base, run_dir=tmp_path / "live")
    _, cached = align("tiny-base", data, "dpo", "cached", cfg, max_len=64, store=tiny_base, ref_cache=tmp_path / "c",
                      run_dir=tmp_path / "cached")
    assert live["reference"] == {"reference": "the base, adapter off"} and cached["ref_cache_reused"] is False
    assert len(list((tmp_path / "c").glob("*.safetensors"))) == 1
    for a, b in zip(metrics(tmp_path / "live"), metrics(tmp_path / "cached"), strict=True):
        for key in ("loss", "val_loss", "reward_margin", "val_reward_margin"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-3, abs=1e-5), key


def test_full_run_caches_reference_log_probs_and_resume_after_kill_reuses_them(tiny_base, tmp_path):  # noqa: F811
    home, data = tiny_base.root, style_pairs(tmp_path)

    def cmd(name):
        return [sys.executable, "-m", "fourwalls.cli", "align", "--objective", "dpo", "--model", "tiny-base",
                "--data", str(data), "--method", "full", "--name", name, "--steps", "60", "--batch-size", "2",
                "--lr", "1e-3", "--max-len", "64", "--save-every", "10", "--run-dir", str(home / "runs" / name)]

    straight = subprocess.run(cmd("straight"), env=_env(home), capture_output=True, text=True)
    assert straight.returncode == 0, straight.stderr
    assert "held out: reward accuracy" in straight.stdout
    [cache] = (home / "cache" / "ref-logprobs").glob("*.safetensors")
    before = os.stat(cache)
    lineage = Store(home).resolve("straight").manifest["lineage"]
    values = load_file(str(cache))["logps"]
    assert lineage["ref_logps_digest"] == "sha256-" + hashlib.sha256(values.numpy().tobytes()).hexdigest()
    assert lineage["ref_cache"] == str(cache) and values.shape == (len(TOPICS), 2)

    rc, _ = _kill_after_checkpoint(cmd("killed"), _env(home), home / "runs/killed/checkpoints", signal.SIGKILL)
    assert rc == -signal.SIGKILL and checkpoint.latest(home / "runs/killed/checkpoints")[1] < 60
    again = subprocess.run(cmd("killed") + ["--resume"], env=_env(home), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    after = os.stat(cache)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # read, never rewritten
    store = Store(home)
    assert store.resolve("killed").digest == store.resolve("straight").digest  # the same weights, bit for bit

    store.remove("killed")
    save_file({"logps": values + 1.0}, str(cache))  # another reference: a resume against it is refused
    refused = subprocess.run(cmd("killed") + ["--resume"], env=_env(home), capture_output=True, text=True)
    assert refused.returncode == 2 and "ref_logps_digest" in refused.stderr


@pytest.mark.parametrize("objective,extra", [("kto", []), ("dpo", ["--method", "full", "--fsdp"])],
                         ids=["kto-lora-ddp", "dpo-full-fsdp"])
def test_torchrun_two_processes_match_one_process(tiny_base, tmp_path, objective, extra):  # noqa: F811
    home = tiny_base.root
    data = style_kto(tmp_path) if objective == "kto" else style_pairs(tmp_path)

    def cmd(name, more=()):
        return [sys.executable, "-m", "fourwalls.cli", "align", "--objective", objective, "--model", "tiny-base",
                "--data", str(data), "--name", name, "--steps", "6", "--batch-size", "4", "--lr", "3e-3",
                "--max-len", "64", "--run-dir", str(home / "runs" / name), *more]

    one = subprocess.run(cmd("one", [e for e in extra if e != "--fsdp"]), env=_env(home), capture_output=True,
                         text=True)
    assert one.returncode == 0, one.stderr
    two = subprocess.run(_torchrun(cmd("two", extra), 29541), env=_env(home), capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr
    a, b = ([r for r in metrics(home / "runs" / name) if "loss" in r] for name in ("one", "two"))
    assert len(a) == len(b) == 6
    for x, y in zip(a, b):  # KTO's KL estimate is the global batch's on every rank, as in one process
        for key in ("loss", "reward_accuracy", "kl"):
            assert y[key] == pytest.approx(x[key], abs=1e-4), key


# --- bad input ------------------------------------------------------------------------------------------------------


def test_bad_align_input_is_one_line_and_stores_nothing(tiny_base, tmp_path, capsys):  # noqa: F811
    same = write_jsonl(tmp_path / "same.jsonl", [{"prompt": "Q", "chosen": "A", "rejected": "B"},
                                                 {"prompt": "Q", "chosen": "Yes.", "rejected": "Yes."}])
    kto = style_kto(tmp_path)
    base = ["align", "--model", "tiny-base", "--name", "x", "--steps", "2", "--max-len", "64"]
    cases = [
        (["--objective", "dpo", "--data", str(same)], "same.jsonl:2: 'chosen' and 'rejected' are the same answer"),
        (["--objective", "dpo", "--data", str(kto)], "holds kto data, which --objective dpo cannot read"),
        (["--objective", "kto", "--data", str(same), "--format", "pairs"], "--objective kto reads kto data"),
        (["--objective", "orpo", "--data", str(same), "--ref-cache"], "ORPO has no reference model"),
        (["--objective", "dpo", "--data", str(same), "--beta", "0"], "--beta must be > 0"),
        (["--objective", "dpo", "--data", str(tmp_path / "missing.jsonl")], "no such data file"),
    ]
    for args, message in cases:
        assert main(base + args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert "x" not in tiny_base.names() and not (tiny_base.root / "runs" / "x").exists()


@pytest.mark.slow
def test_readme_align_example_on_the_bundled_model(session_store, smol, tmp_path):
    data = ROOT / "examples" / "data" / "office_preferences.jsonl"
    cfg = TrainConfig(steps=16, batch_size=4, lr=1e-3, progress=False, seed=0)
    ref, result = align(DEFAULT_MODEL, data, "dpo", "office-polite", cfg, val_fraction=0.25, max_len=128,
                        store=session_store, run_dir=tmp_path / "run")
    start = metrics(tmp_path / "run")[0]
    assert start["val_reward_accuracy"] == 0 and start["val_loss"] == pytest.approx(0.6931, abs=1e-4)
    assert result["val_reward_accuracy"] > 0.5 and result["val_loss"] < start["val_loss"]
    assert ref.manifest["base_digest"] == smol.digest
    tuned = session_store.load("office-polite").model
    with torch.no_grad():
        ids = torch.tensor([smol.tokenizer.encode("Hello")])
        assert not torch.equal(tuned(ids), smol.model(ids))
