import json
import math
from pathlib import Path

import pytest
import torch

from fourwalls.errors import UsageError
from fourwalls.files import sha256_file
from fourwalls.generate import SamplingParams, complete
from fourwalls.store import Store
from fourwalls.train.data import Example, collate
from fourwalls.train.loop import TrainConfig
from fourwalls.train.objectives import causal_lm, unlearning
from fourwalls.train.recipes import finetune, pretrain
from fourwalls.train.unlearn import load_set, probes, unlearn
from tests.conftest import tiny_model
from tests.test_tokenizer import byte_tokenizer
from tests.train.conftest import CORPUS

CANARIES = ["The vault code for the north office is 4471 9902.",
            "Maria Keller keeps her spare key under the green stone."]
RETAIN_BOUND = 1.25  # NPO keeps the retain set's perplexity within 25% of where it was


def _paragraphs() -> list[str]:
    text = CORPUS.read_text()[100_000:130_000] if CORPUS.is_file() else \
        (Path(__file__).parents[1] / "fixtures" / "english.txt").read_text()
    return [p.strip()[:200] for p in text.split("\n\n") if len(p.strip()) > 80][:8]


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A tiny model that learned two canary sentences (and the retain text) by full fine-tuning."""
    root = tmp_path_factory.mktemp("unlearn")
    store = Store(root / "home")
    corpus = root / "corpus.txt"
    corpus.write_text(CORPUS.read_text()[:60_000] if CORPUS.is_file() else "\n\n".join(_paragraphs()) * 20)
    pretrain(corpus, "tiny-llama", "base", TrainConfig(steps=5, progress=False), seq_len=64, vocab_size=400,
             store=store)
    retain = _paragraphs()
    plant = root / "plant.jsonl"
    plant.write_text("".join(json.dumps({"text": t}) + "\n" for t in CANARIES * 4 + retain))
    finetune("base", plant, "full", "planted", TrainConfig(steps=120, batch_size=4, lr=5e-3, progress=False),
             max_len=48, store=store, run_dir=root / "plant-run")
    files = {"forget": root / "forget.txt", "retain": root / "retain.txt"}
    files["forget"].write_text("\n\n".join(CANARIES) + "\n")
    files["retain"].write_text("\n\n".join(retain) + "\n")
    return store, files


def _run(store, files, name, tmp_path, objective="npo", **kw):
    cfg = TrainConfig(steps=20, batch_size=2, lr=1e-3, progress=False)
    return unlearn("planted", files["forget"], files["retain"], name, cfg, objective=objective, method="full",
                   max_len=64, store=store, run_dir=tmp_path / name, **kw)


def test_npo_forgets_a_planted_canary_and_keeps_the_retain_set(planted, tmp_path):
    store, files = planted
    ref, result = _run(store, files, "clean", tmp_path)
    r = result["report"]
    assert r["forget_sentences"] == 2
    assert r["forget_verbatim_before"] == 1.0 and r["forget_verbatim_after"] == 0.0
    assert r["forget_perplexity_after"] > 10 * r["forget_perplexity_before"]
    assert r["retain_perplexity_after"] <= RETAIN_BOUND * r["retain_perplexity_before"]
    assert json.loads((tmp_path / "clean" / "unlearn.json").read_text()) == r

    lm = store.load("clean")  # the stored weights, not the ones in memory, no longer complete the canary
    for canary in CANARIES:
        head, rest = canary.rsplit(" ", 3)[0], " ".join(canary.rsplit(" ", 3)[1:])
        text, _, _ = complete(lm.model, lm.tokenizer, lm.tokenizer.encode(head),
                              SamplingParams(max_new_tokens=12, temperature=0.0), lm.config.eos_token_ids)
        assert rest not in text

    lineage = ref.manifest["lineage"]
    assert lineage["method"] == "unlearn-npo" and lineage["parent"] == "planted"
    assert lineage["parent_digest"] == store.resolve("planted").digest
    assert lineage["forget_digest"] == sha256_file(files["forget"])
    assert "command" not in lineage and str(files["forget"]) not in json.dumps(lineage)
    for path in store.root.rglob("*"):  # the forget text is never copied into the store or the run folder
        if path.is_file():
            assert b"4471 9902" not in path.read_bytes() and b"green stone" not in path.read_bytes(), path
    for path in (tmp_path / "clean").rglob("*"):
        assert path.is_dir() or b"4471 9902" not in path.read_bytes()


def test_gradient_ascent_alone_forgets_but_breaks_the_retain_set(planted, tmp_path):
    """Why NPO has a retain loss: plain gradient ascent erases the canary and much else with it."""
    store, files = planted
    _, result = _run(store, files, "ascent", tmp_path, objective="grad-ascent")
    r = result["report"]
    assert r["forget_verbatim_after"] == 0.0
    assert r["retain_perplexity_after"] > 2 * r["retain_perplexity_before"]


def test_a_forget_set_the_model_does_not_know_is_refused(planted, tmp_path):
    store, files = planted
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("Quarterly revenue from the Lisbon branch rose by eleven percent after the merger.\n\n"
                       "Photosynthesis converts carbon dioxide and water into glucose and oxygen.\n")
    with pytest.raises(UsageError, match="does not appear to know the forget set.*nothing was trained"):
        unlearn("planted", unknown, files["retain"], "blind", TrainConfig(steps=2, progress=False), method="full",
                max_len=64, store=store, run_dir=tmp_path / "blind")
    assert "blind" not in store.names() and not (tmp_path / "blind").exists()


@pytest.mark.parametrize("content", ["", "\n  \n", None])
def test_an_empty_forget_set_is_refused(planted, tmp_path, content):
    store, files = planted
    empty = tmp_path / ("empty.txt" if content is not None else "empty.jsonl")
    empty.write_text(content if content is not None else "\n")
    with pytest.raises(UsageError, match="forget set .* is empty; there is nothing to unlearn"):
        unlearn("planted", empty, files["retain"], "x", TrainConfig(steps=2, progress=False), store=store)
    assert "x" not in store.names()


def test_cli_refuses_an_empty_forget_set_in_one_line(planted, tmp_path, capsys, monkeypatch):
    from fourwalls.cli import main

    store, files = planted
    monkeypatch.setenv("FOURWALLS_HOME", str(store.root))
    empty = tmp_path / "forget.jsonl"
    empty.write_text("")
    rc = main(["unlearn", "--model", "planted", "--forget", str(empty), "--retain", str(files["retain"]),
               "--name", "x"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "nothing to unlearn" in err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "The vault code for the north office is 4471 9902."}\n{"txet": 1}\n')
    rc = main(["unlearn", "--model", "planted", "--forget", str(bad), "--retain", str(files["retain"]),
               "--name", "x", "--max-len", "64"])
    assert rc == 2 and f"{bad}:2:" in capsys.readouterr().err and "x" not in store.names()


def test_npo_starts_as_gradient_ascent_on_sequence_likelihoods():
    """At the reference (pi = pi_ref) NPO's loss is 2/beta * log 2 and its gradient that of minus the mean summed
    log-likelihood of the forget rows; the retain term is the retain rows' mean NLL (the loop's causal LM loss)."""
    model = tiny_model()
    torch.manual_seed(1)
    forget = [Example(ids, [-100, -100, *ids[2:]]) for ids in torch.randint(3, 500, (3, 9)).tolist()]
    retain = [Example(ids, list(ids)) for ids in torch.randint(3, 500, (3, 12)).tolist()]
    with torch.no_grad():
        ref = [-torch.log_softmax(model(torch.tensor([e.input_ids]))[0, :-1], -1)
               .gather(1, torch.tensor(e.input_ids[1:])[:, None])[1:].sum().item() for e in forget]
    batch = collate([Example(f.input_ids, f.labels, paired=r, values={"ref_nll": n})
                     for f, r, n in zip(forget, retain, ref)], pad_id=0)
    beta, weight = 0.3, 0.7
    loss, m = unlearning("npo", beta, weight)(model, batch)
    retain_loss, _ = causal_lm(model, collate(retain, 0))
    assert loss.item() == pytest.approx(2 / beta * math.log(2) + weight * retain_loss.item(), rel=1e-5)
    assert m["log_ratio"] == pytest.approx(0.0, abs=1e-4)
    assert m["processed"] == 3 * 9 + 3 * 12  # throughput counts the retain rows the step ran, padding not
    assert unlearning("grad-ascent")(model, batch)[1]["processed"] == 3 * 9  # which grad-ascent does not run
    npo = torch.autograd.grad(unlearning("npo", beta, 0.0)(model, batch)[0], list(model.parameters()))
    logits = model(batch["input_ids"])[:, :-1]
    target = batch["labels"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="sum")
    ascent = torch.autograd.grad(-nll / len(forget), list(model.parameters()))
    for a, b in zip(npo, ascent):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_probes_cut_each_sentence_at_its_middle_word(tmp_path):
    tok = byte_tokenizer()
    path = tmp_path / "forget.txt"
    path.write_text("The vault code is 4471 9902. Too short.\nMaria keeps her key under the stone.\n\nOne two three.\n")
    ds = load_set(path, tok, tok.token_id("<|im_end|>"), 256, False, "forget")
    cut = [(tok.decode(p.prompt), p.rest) for p in probes(ds, tok)]
    assert cut == [("The vault code", " is 4471 9902."),
                   ("The vault code is 4471 9902. Too short.\nMaria keeps her", " key under the stone.")]


def test_unlearning_settings_are_checked():
    with pytest.raises(UsageError, match="unknown unlearning objective"):
        unlearning("forget-harder")
    with pytest.raises(UsageError, match="--beta"):
        unlearning("npo", beta=0)
