"""The expert library and router: profiles stored by finetune/align, `fourwalls experts` and `fourwalls route`,
and what the router picks (on a tiny pretrained base; the profiles are real all-MiniLM-L6-v2 embeddings)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fourwalls.cli import main
from fourwalls.engine.router import Router
from fourwalls.errors import UsageError
from fourwalls.experts import DEFAULT_THRESHOLD, add_expert, make_profile, read_library, training_prompts
from fourwalls.rag.embed import embedder
from fourwalls.store import Store
from fourwalls.train.loop import TrainConfig
from fourwalls.train.recipes import align, finetune, pretrain

MATH = [f"{w} has {a} apples and buys {b} more. How many apples does {w} have?"
        for w, a, b in [("Ann", 3, 4), ("Bo", 12, 9), ("Cy", 7, 30), ("Di", 15, 2), ("Ed", 8, 8), ("Flo", 21, 5)]] + \
       ["What is 17 plus 26?", "Subtract 9 from 40.", "How much is 6 times 7?", "Add 120 and 45."]
PIG = [f"Translate into pig latin: {s}" for s in ["the quick brown fox", "good morning friend", "green birds sing",
                                                   "old stone walls", "happy dogs walk", "a lazy river"]] + \
      ["Pig latin for: hello world", "Say in pig latin: blue sky today"]


def chats(path, prompts, answer="ok"):
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": answer}]}) + "\n"
                            for p in prompts))
    return path


@pytest.fixture(scope="module")
def experts_home(tmp_path_factory):
    """A store with a tiny base and two LoRA adapters fine-tuned on arithmetic and pig-latin prompts."""
    tmp = tmp_path_factory.mktemp("experts")
    corpus = tmp / "corpus.txt"
    corpus.write_text(" ".join(MATH + PIG) * 30)
    store = Store(tmp / "home")
    cfg = TrainConfig(steps=2, batch_size=2, progress=False)
    pretrain(corpus, "tiny-llama", "tiny-base", cfg, seq_len=64, vocab_size=400, store=store)
    for name, prompts in (("math", MATH), ("pig", PIG)):
        finetune("tiny-base", chats(tmp / f"{name}.jsonl", prompts), "lora", name, cfg, max_len=64, store=store,
                 run_dir=tmp / name, description=f"{name} questions")
    pretrain(corpus, "tiny-llama", "other-base", cfg, seq_len=64, vocab_size=400, store=store)
    finetune("other-base", chats(tmp / "o.jsonl", MATH), "lora", "other-math", cfg, max_len=64, store=store,
             run_dir=tmp / "o")
    return store


@pytest.fixture
def home(experts_home, monkeypatch, tmp_path):
    """The module's store as $FOURWALLS_HOME, with an empty expert library."""
    monkeypatch.setenv("FOURWALLS_HOME", str(experts_home.root))
    for f in (experts_home.root / "experts").glob("*.json"):
        f.unlink()
    return experts_home


def test_finetune_stores_a_routing_profile_of_the_training_prompts(experts_home):
    routing = experts_home.resolve("math").manifest["routing"]
    assert routing["embedder"] == embedder().name and routing["dim"] == 384
    assert routing["prompts"] == len(MATH) and routing["description"] == "math questions"
    c = np.asarray(routing["centroids"])
    assert 1 <= len(c) <= 4 and np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-3)
    own = embedder().embed(MATH) @ c.T
    other = embedder().embed(PIG) @ c.T
    assert own.max(1).min() > other.max(1).max()  # every math prompt is nearer its centroids than any pig one


def test_align_stores_a_routing_profile_too(experts_home, tmp_path):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "chosen": "yes", "rejected": "no"}) + "\n" for p in PIG))
    ref, _ = align("tiny-base", data, "orpo", "pig-aligned", TrainConfig(steps=1, batch_size=2, progress=False),
                   max_len=64, store=experts_home, run_dir=tmp_path / "run")
    assert ref.manifest["routing"]["prompts"] == len(PIG)


def test_training_prompts_reads_every_data_shape(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("\n".join([
        json.dumps({"messages": [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                                 {"role": "user", "content": "last turn"}, {"role": "assistant", "content": "b"}]}),
        json.dumps({"instruction": "Sum these", "input": "1 2", "output": "3"}),
        json.dumps({"prompt": "a preference prompt", "chosen": "x", "rejected": "y"}),
        json.dumps({"text": "plain text"}), "not json"]))
    assert training_prompts(f) == ["last turn", "Sum these\n\n1 2", "a preference prompt", "plain text"]
    assert len(training_prompts(f, limit=2)) == 2
    f.write_text(json.dumps({"other": 1}))
    with pytest.raises(UsageError, match="no prompts"):
        training_prompts(f)


def test_the_router_ranks_only_what_the_caller_may_use_and_leaves_the_rest_to_the_base():
    e = embedder()
    router = Router({"math": make_profile(MATH, e), "pig": make_profile(PIG, e)}, e)
    route = router.route("What is 33 plus 19?")
    assert route.mix == {"math": 1.0} and route.adapter == "math" and route.label("base") == "math"
    assert [s.name for s in route.ranking] == ["math", "pig"] and route.ranking[0].score >= DEFAULT_THRESHOLD
    assert router.route("Pig latin for: sunny day").adapter == "pig"
    general = router.route("Write a haiku about autumn leaves.")
    assert general.mix == {} and general.label("base") == "base" and "below the threshold" in general.why()
    limited = router.route("What is 33 plus 19?", lambda name: name == "pig")
    assert "math" not in limited.mix and [s.name for s in limited.ranking] == ["pig"]
    assert limited.mix == {}  # pig does not fit an arithmetic question: the base answers

    mixed = Router({"math": make_profile(MATH, e), "math2": make_profile(MATH[::2], e)}, e, mode="top2")
    both = mixed.route("What is 33 plus 19?")
    assert set(both.mix) == {"math", "math2"} and abs(sum(both.mix.values()) - 1) < 1e-6
    assert list(both.mix.values())[0] >= list(both.mix.values())[1]  # the better scored weighs more
    assert both.adapter is None and both.label("b") == "+".join(both.mix)


def test_experts_cli_add_list_show_rm_and_route(home, capsys):
    assert main(["experts", "add", "math"]) == 0
    assert "added math to the experts of tiny-base" in capsys.readouterr().out
    assert main(["experts", "add", "pig", "--description", "pig latin"]) == 0
    capsys.readouterr()
    assert main(["experts", "list", "--base", "tiny-base"]) == 0
    out = capsys.readouterr().out
    assert "math questions" in out and "pig latin" in out
    assert main(["experts", "show", "pig", "--base", "tiny-base", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["description"] == "pig latin" and shown["digest"] == home.resolve("pig").digest
    assert main(["route", "How much is 8 times 9?", "--base", "tiny-base"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].startswith("math") and "<- 100%" in lines[1] and "of" in lines[1]
    assert "model 'auto' -> math" in lines[-1]
    assert main(["route", "Write a haiku about the sea.", "--base", "tiny-base", "--json"]) == 0
    routed = json.loads(capsys.readouterr().out)
    assert routed["model"] == "tiny-base" and routed["mix"] == {} and len(routed["ranking"]) == 2
    assert main(["experts", "rm", "math", "--base", "tiny-base"]) == 0
    capsys.readouterr()
    assert list(read_library(home.root, "tiny-base")["experts"]) == ["pig"]


@pytest.mark.parametrize("argv, message", [
    (["experts", "add", "nope"], "model 'nope' not found"),
    (["experts", "add", "tiny-base"], "is a model, not an adapter"),
    (["experts", "add", "other-math", "--base", "tiny-base"], "was trained on 'other-base', not 'tiny-base'"),
    (["experts", "rm", "math", "--base", "tiny-base"], "not in the expert library"),
    (["experts", "show", "math", "--base", "tiny-base"], "not in the expert library"),
    (["route", "hello", "--base", "tiny-base"], "has no experts"),
])
def test_bad_expert_commands_fail_in_one_line(home, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_adapter_without_a_profile_needs_its_data(home, capsys, tmp_path):
    ref = home.resolve("math")

    def write(folder):  # the same adapter in other bytes (the store keeps one folder per digest)
        config = json.loads((ref.path / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=3))
        (folder / "adapter_model.safetensors").write_bytes((ref.path / "adapter_model.safetensors").read_bytes())

    if "old-math" not in home.names():
        home.add_adapter("old-math", home.resolve("tiny-base"), write, ref.manifest["lineage"])  # no routing
    assert main(["experts", "add", "old-math"]) == 2
    assert "has no routing profile" in capsys.readouterr().err
    entry = add_expert(home, "old-math", data=chats(tmp_path / "m.jsonl", MATH[:5]))
    assert entry["profile"]["prompts"] == 5
