import math
from pathlib import Path

import pytest
import torch
from torch import nn

from fourwalls.cli import main
from fourwalls.compress.distill import TeacherCache, distill, layer_plan, student_from_layers, student_from_preset
from fourwalls.errors import UsageError
from fourwalls.model.config import preset
from fourwalls.model.transformer import Transformer, init_weights
from fourwalls.store import Store
from fourwalls.train.data import IGNORE, Example, collate, load_text_corpus, split
from fourwalls.train.loop import TrainConfig, evaluate, train
from fourwalls.train.objectives import causal_lm, distillation
from fourwalls.train.recipes import train_tokenizer
from tests.conftest import tiny_model

CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare.txt"
FAST = dict(batch_size=8, progress=False, seed=0)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices gain nothing from threads, and on a shared 2-core machine spinning OpenMP workers stall."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A store holding 'teacher': a 4-layer tiny model trained briefly on real text, so its predictions have shape."""
    root = tmp_path_factory.mktemp("distill")
    corpus = root / "corpus.txt"
    text = CORPUS.read_text()[:40_000] if CORPUS.is_file() else \
        (Path(__file__).parents[1] / "fixtures" / "english.txt").read_text() * 15
    corpus.write_text(text)
    tok = train_tokenizer(corpus, 400)
    eos = tok.token_id("<|endoftext|>")
    cfg = preset("tiny-llama").replace(name="teacher", n_layers=4, vocab_size=tok.vocab_size, bos_token_id=None,
                                       eos_token_ids=(eos,))
    torch.manual_seed(0)
    model = Transformer(cfg)
    init_weights(model)
    train(model, load_text_corpus(corpus, tok, 64), None, TrainConfig(steps=60, lr=3e-3, **FAST), root / "run",
          pad_id=eos)
    Store(root / "home").add("teacher", cfg, model.state_dict(), tok)
    return root


def held_out_kl(student, teacher, ds) -> float:
    """The student's KL to the teacher (T = 1) per token over held-out blocks."""
    _, m = distillation(teacher, 1.0, 0.0, 1.0)(student.eval(), collate(ds.examples, 0))
    return m["kl"]


def random_batch(vocab=512, rows=2, width=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, width), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE  # a masked prompt: neither term may look at it
    return {"input_ids": ids, "labels": labels}


# --- the objective ------------------------------------------------------------------------------------------------

def test_alpha_one_beta_zero_is_exactly_causal_lm():
    teacher, student, batch = tiny_model(seed=0), tiny_model(seed=1), random_batch()
    loss, m = distillation(teacher, 2.0, alpha=1.0, beta=0.0)(student, batch)
    plain, pm = causal_lm(student, batch)
    assert torch.allclose(loss, plain) and m["ce"] == pytest.approx(plain.item())
    assert m["tokens"] == pm["tokens"] == 2 * 11 and m["kl"] > 0


def test_soft_term_is_kl_scaled_by_temperature_squared():
    """Gradient of beta * T^2 * KL(p_t || p_s) w.r.t. the student's logits is T * (p_s - p_t) per kept position."""
    vocab, width = 7, 4
    g = torch.Generator().manual_seed(0)
    zt, zs = torch.randn(1, width, vocab, generator=g) * 3, torch.randn(1, width, vocab, generator=g) * 3

    class Fixed(nn.Module):
        def __init__(self, z):
            super().__init__()
            self.z = nn.Parameter(z.clone())

        def forward(self, ids):
            return self.z

    batch = {"input_ids": torch.zeros(1, width, dtype=torch.long), "labels": torch.zeros(1, width, dtype=torch.long)}
    n = width - 1  # the last position predicts nothing
    for t in (1.0, 2.0, 5.0):
        student = Fixed(zs)
        loss, m = distillation(Fixed(zt), t, alpha=0.0, beta=1.0)(student, batch)
        loss.backward()
        p_t, p_s = (zt[0, :n] / t).softmax(-1), (zs[0, :n] / t).softmax(-1)
        kl = (p_t * (p_t.log() - p_s.log())).sum(-1).mean()
        assert loss.item() == pytest.approx(t**2 * kl.item(), rel=1e-5) and m["kl"] == pytest.approx(kl.item())
        torch.testing.assert_close(student.z.grad[0, :n], t * (p_s - p_t) / n)
        assert student.z.grad[0, n].abs().max() == 0
    # Why T^2: at a high temperature the scaled gradient tends to (z_s - z_t, centred) / (V n), independent of T.
    d = zs[0, :n] - zt[0, :n]
    limit = (d - d.mean(-1, keepdim=True)) / (vocab * n)
    for t in (300.0, 600.0):
        student = Fixed(zs)
        distillation(Fixed(zt), t, alpha=0.0, beta=1.0)(student, batch)[0].backward()
        assert torch.linalg.norm(student.z.grad[0, :n] - limit) < 0.02 * torch.linalg.norm(limit)


def test_student_equal_to_teacher_has_zero_kl_and_cached_logits_match():
    teacher, batch = tiny_model(seed=0), random_batch()
    loss, m = distillation(teacher, 2.0, 0.5, 0.5)(teacher, batch)
    assert abs(m["kl"]) < 1e-6 and abs(m["kl_t1"]) < 1e-6 and loss.item() == pytest.approx(0.5 * m["ce"], abs=1e-5)
    student = tiny_model(seed=1)
    with torch.no_grad():
        cached = {**batch, "teacher_logits": teacher(batch["input_ids"])}
    assert torch.allclose(distillation(None, 2.0)(student, cached)[0], distillation(teacher, 2.0)(student, batch)[0])


def test_objective_refuses_bad_settings_and_a_different_vocabulary():
    with pytest.raises(UsageError, match="temperature"):
        distillation(None, temperature=0.0)
    with pytest.raises(UsageError, match="alpha"):
        distillation(None, alpha=-1.0)
    with pytest.raises(UsageError, match="alpha"):
        distillation(None, alpha=0.0, beta=0.0)
    teacher = tiny_model()
    torch.manual_seed(0)
    student = Transformer(preset("tiny-llama").replace(vocab_size=400))
    with pytest.raises(UsageError, match="vocabulary"):
        distillation(teacher)(student, random_batch(vocab=400))


# --- student construction -----------------------------------------------------------------------------------------

def test_layer_plan_is_evenly_spaced_and_keeps_first_and_last():
    assert layer_plan(4, 2) == [0, 3] and layer_plan(4, 3) == [0, 2, 3] and layer_plan(4, 1) == [0]
    assert layer_plan(12, 6) == [0, 2, 4, 7, 9, 11] and layer_plan(30, 15)[::14] == [0, 29]
    for k in (0, -1, 4, 5):
        with pytest.raises(UsageError):
            layer_plan(4, k)


def test_student_from_layers_copies_the_kept_layers_and_runs():
    torch.manual_seed(0)
    teacher = Transformer(preset("tiny-llama").replace(n_layers=4))
    init_weights(teacher)
    student = student_from_layers(teacher, 3)  # keeps teacher layers 0, 2, 3
    assert student.config.n_layers == 3 and len(student.layers) == 3
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 2, 3]):
        for key in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(s[f"layers.{new}.{key}"], t[f"layers.{old}.{key}"])
    assert not torch.equal(s["layers.1.self_attn.q_proj.weight"], t["layers.1.self_attn.q_proj.weight"])
    for key in ("embed_tokens.weight", "norm.weight", "lm_head.weight"):
        assert torch.equal(s[key], t[key])
    with torch.no_grad():  # a copy, not a view: training the student leaves the teacher alone
        student.layers[0].mlp.up_proj.weight.add_(1.0)
    assert not torch.equal(student.layers[0].mlp.up_proj.weight, teacher.layers[0].mlp.up_proj.weight)
    assert student(torch.tensor([[1, 2, 3]])).shape == (1, 3, 512)
    with pytest.raises(UsageError, match="not smaller"):
        student_from_layers(teacher, 4)


def test_student_from_preset_speaks_the_teachers_vocabulary():
    teacher_cfg = preset("tiny-8m").replace(vocab_size=1000, bos_token_id=None, eos_token_ids=(7,))
    student = student_from_preset("tiny-qwen2", teacher_cfg)
    assert student.config.vocab_size == 1000 and student.config.eos_token_ids == (7,)
    assert student.config.bos_token_id is None and student.config.arch == "qwen2"
    assert student(torch.tensor([[999, 3]])).shape == (1, 2, 1000)
    with pytest.raises(UsageError, match="not fewer"):
        student_from_preset("tiny-8m", preset("tiny-llama"))


# --- the teacher-logit cache --------------------------------------------------------------------------------------

def test_cache_serves_the_teachers_logits_for_padded_batches(tmp_path):
    teacher, pad = tiny_model(), 2
    examples = [Example(ids, ids) for ids in ([5, 6, 7, 8, 2], [5, 6, 9], [11, 12, 13, 14, 15, 16, 2, 2])]
    full = TeacherCache.build(teacher, examples, top_k=10_000, pad_id=pad, batch_size=2)  # k clamps to the vocab
    full.save(tmp_path / "c.safetensors", {"teacher_digest": "x"})
    loaded = TeacherCache.load(tmp_path / "c.safetensors", pad)
    batch = collate(examples[::-1], pad)  # another order and padding than when built
    with torch.no_grad():
        want = teacher(batch["input_ids"])
    got = loaded.logits(batch["input_ids"])
    for row, e in enumerate(examples[::-1]):
        torch.testing.assert_close(got[row, : len(e.input_ids)], want[row, : len(e.input_ids)], rtol=1e-4, atol=1e-4)
    top = TeacherCache.build(teacher, examples, top_k=8, pad_id=pad).logits(batch["input_ids"])
    assert (top[0, 0] > float("-inf")).sum() == 8
    _, m = distillation(None, 2.0)(tiny_model(seed=1), {**batch, "teacher_logits": top})
    assert m["kl"] > 0 and torch.isfinite(torch.tensor(m["kl"]))


# --- the recipe ---------------------------------------------------------------------------------------------------

def test_distill_lowers_kl_to_the_teacher_and_records_lineage(home):
    store = Store(home / "home")
    teacher = store.load("teacher")
    _, val = split(load_text_corpus(home / "corpus.txt", teacher.tokenizer, 64), 0.05, 0)  # distill's own split
    torch.manual_seed(0)
    before = held_out_kl(student_from_preset("tiny-llama", teacher.config), teacher.model, val)
    ref, result = distill("teacher", "student", home / "corpus.txt", TrainConfig(steps=30, lr=3e-3, **FAST),
                          student_preset="tiny-llama", seq_len=64, store=store, run_dir=home / "runs" / "student")
    student = store.load("student")
    after = held_out_kl(student.model, teacher.model, val)
    assert after < 0.5 * before, (before, after)
    assert result["val_kl"] == pytest.approx(after, rel=1e-3)
    assert student.config.n_layers == 2 and student.config.vocab_size == teacher.config.vocab_size
    lin = ref.manifest["lineage"]
    assert lin["method"] == "distill" and lin["parent"] == "teacher" and lin["parent_digest"] == teacher.digest
    assert lin["settings"] == {"student_preset": "tiny-llama", "temperature": 2.0, "alpha": 0.5, "beta": 0.5,
                               "seq_len": 64}
    assert lin["data_digest"].startswith("sha256-") and lin["hyperparameters"]["steps"] == 30
    assert lin["val_loss"] == result["val_loss"] and lin["val_kl"] == result["val_kl"]
    # The perplexities are the student's and the teacher's own on the held-out text, not exp of the mixed loss.
    pad = teacher.config.eos_token_ids[0]
    assert result["val_ppl"] == pytest.approx(math.exp(evaluate(student.model, val, causal_lm, 8, pad)), rel=1e-4)
    assert result["teacher_val_ppl"] == pytest.approx(math.exp(evaluate(teacher.model, val, causal_lm, 8, pad)),
                                                      rel=1e-4)
    assert result["teacher_val_ppl"] < result["val_ppl"] != pytest.approx(math.exp(result["val_loss"]), rel=0.05)
    assert lin["val_ppl"] == result["val_ppl"] and lin["teacher_val_ppl"] == result["teacher_val_ppl"]
    assert student.tokenizer.encode("To be, or not") == teacher.tokenizer.encode("To be, or not")


def test_cached_teacher_logits_train_like_the_live_teacher_and_are_reused(home, monkeypatch):
    store, cfg = Store(home / "home"), TrainConfig(steps=5, lr=2e-3, **FAST)
    kw = dict(student_preset="tiny-llama", seq_len=64, store=store)
    _, live = distill("teacher", "live", home / "corpus.txt", cfg, run_dir=home / "runs" / "live", **kw)
    _, cached = distill("teacher", "cached", home / "corpus.txt", cfg, cache_teacher=home / "cache",
                        cache_top_k=10_000, run_dir=home / "runs" / "cached", **kw)
    assert cached["val_loss"] == pytest.approx(live["val_loss"], rel=1e-4)
    assert len(list((home / "cache").glob("*.safetensors"))) == 1

    def no_teacher(*a, **k):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(TeacherCache, "build", no_teacher)
    _, again = distill("teacher", "cached2", home / "corpus.txt", cfg, cache_teacher=home / "cache",
                       cache_top_k=10_000, run_dir=home / "runs" / "cached2", **kw)
    assert again["val_loss"] == cached["val_loss"]


def test_resumed_distillation_is_bit_identical(home):
    store = Store(home / "home")
    cfg = lambda steps: TrainConfig(steps=steps, lr=2e-3, schedule="constant", save_every=3, **FAST)  # noqa: E731
    kw = dict(student_layers=2, seq_len=64, store=store)
    distill("teacher", "whole", home / "corpus.txt", cfg(6), run_dir=home / "runs" / "whole", **kw)
    distill("teacher", "half", home / "corpus.txt", cfg(3), run_dir=home / "runs" / "split", **kw)
    distill("teacher", "resumed", home / "corpus.txt", cfg(6), run_dir=home / "runs" / "split", resume=True, **kw)
    assert store.resolve("resumed").digest == store.resolve("whole").digest != store.resolve("half").digest
    assert store.resolve("resumed").manifest["lineage"]["settings"]["kept_layers"] == [0, 3]


@pytest.mark.parametrize("bad", [
    dict(student_layers=4), dict(student_layers=9), dict(student_layers=0), dict(student_layers=1, student_preset="x"),
    dict(), dict(student_preset="tiny-8m"), dict(student_layers=2, temperature=-1.0),
    dict(student_layers=2, alpha=0.0, beta=0.0), dict(student_layers=2, seq_len=4096),
    dict(student_layers=2, cache_teacher=True, cache_top_k=0),
])
def test_bad_settings_raise_and_store_nothing(home, bad):
    store = Store(home / "home")
    before = store.names()
    with pytest.raises(UsageError):
        distill("teacher", "nope", home / "corpus.txt", TrainConfig(steps=2, **FAST), store=store, **bad)
    assert store.names() == before and not (store.root / "runs" / "nope").exists()
    assert not (store.root / "cache" / "teacher-logits").exists()


def test_cli_distills_from_a_preset(home, monkeypatch, capsys):
    monkeypatch.setenv("FOURWALLS_HOME", str(home / "home"))
    rc = main(["distill", "--teacher", "teacher", "--student-preset", "tiny-llama", "--data",
               str(home / "corpus.txt"), "--name", "cli-student", "--seq-len", "64", "--steps", "2",
               "--batch-size", "4", "--temperature", "1.5", "--alpha", "0.2", "--beta", "0.8"])
    out = capsys.readouterr().out
    assert rc == 0 and "stored cli-student" in out and "KL" in out
    lin = Store(home / "home").resolve("cli-student").manifest["lineage"]
    assert f"held-out perplexity: student {lin['val_ppl']:.2f}, teacher {lin['teacher_val_ppl']:.2f} " in out
    assert "validation loss" not in out  # the mixed CE + KL loss is not shown as if it were a model's loss
    assert lin["settings"]["student_preset"] == "tiny-llama" and lin["settings"]["temperature"] == 1.5
    assert main(["distill", "--teacher", "teacher", "--student-layers", "4", "--data", str(home / "corpus.txt"),
                 "--name", "cli-bad"]) == 2


def test_distill_reads_jsonl_with_a_top_k_cache(home, tmp_path):
    """Variable-length examples, padded differently in each batch, still find their cached teacher logits."""
    lines = ["To be, or not to be, that is the question.", "All the world's a stage.", "Now is the winter.",
             "What light through yonder window breaks?", "Friends, Romans, countrymen, lend me your ears.",
             "A horse! a horse! my kingdom for a horse!", "The lady doth protest too much, methinks.",
             "If music be the food of love, play on.", "Once more unto the breach, dear friends.", "Et tu, Brute?"]
    data = tmp_path / "lines.jsonl"
    data.write_text("".join(f'{{"text": "{t}"}}\n' for t in lines))
    store = Store(home / "home")
    ref, result = distill("teacher", "from-jsonl", data, TrainConfig(steps=4, lr=2e-3, batch_size=3, progress=False),
                          student_layers=1, seq_len=64, cache_teacher=tmp_path / "cache", cache_top_k=16,
                          val_fraction=0.2, store=store, run_dir=tmp_path / "run")
    lin = ref.manifest["lineage"]
    assert lin["settings"]["cache_top_k"] == 16 and lin["data_stats"]["examples"] == 10
    assert result["val_kl"] > 0 and len(list((tmp_path / "cache").glob("*.safetensors"))) == 1
