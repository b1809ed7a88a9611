"""The expert router (model "auto"): routing accuracy, answer loss under routing, and routing time, one JSON line.

Five task families whose data is generated here (arithmetic word problems, English -> pig latin, reversing the
words, a sentence as JSON, dates to ISO 8601), a few hundred examples each, split train / held out. One LoRA
adapter (r=8) per family is fine-tuned on the bundled SmolLM2-135M with `finetune`, which stores its routing
profile; the adapters are cached under ~/.cache/fourwalls/experts-bench, named by the digest of their data and
settings, so that a second run only evaluates. On the held-out prompts:

- ``top1_accuracy``: how often the router picks the family's own adapter (target >= 0.9);
- ``loss_*``: the token-mean cross-entropy of the held-out answers under the base model, the family's own
  adapter (the oracle), the routed adapter (top1) and the routed mix of two (top2); ``routed_vs_oracle`` is the
  ratio (target <= 1.02);
- ``base_fallback``: the share of general prompts (no family's) that the threshold leaves to the base model, and
  the score distribution the threshold was calibrated on (each family's lowest own score, the highest score of a
  general prompt);
- ``route_ms``: the median time of one routing (embedding + ranking) over the 5 experts and over a library of 20
  (the 5 plus 15 profiles of other subsets of the same data).

    python benchmarks/experts.py [--quick]
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import time
from pathlib import Path

import fourwalls  # noqa: F401
import torch

NAMES = ["Alice", "Bruno", "Chen", "Dara", "Emeka", "Fatima", "Goran", "Hana", "Ivan", "Julia", "Kofi", "Lena"]
CITIES = ["Paris", "Lagos", "Osaka", "Lima", "Oslo", "Cairo", "Quito", "Delhi", "Perth", "Riga"]
THINGS = ["apples", "books", "coins", "marbles", "stamps", "pencils", "shells", "cards"]
WORDS = ("the quick brown fox jumps over a lazy dog while green birds sing in tall trees near old stone walls "
         "every morning people walk their happy dogs along the quiet river bank").split()
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
GENERAL = ["Name a colour.", "Write a haiku about autumn.", "What is the capital of Italy?",
           "Give me a tip for sleeping better.", "Who wrote Romeo and Juliet?", "Describe a cat in one sentence.",
           "What should I cook for dinner tonight?", "Tell me a fun fact about space.",
           "How do I politely decline an invitation?", "Why is the sky blue?", "Suggest a name for a puppy.",
           "What is a good book for a long flight?", "Explain what a rainbow is.", "Say hello in French.",
           "What are the benefits of walking?", "Recommend a board game for four people.",
           "How can I learn to play the guitar?", "What is photosynthesis?", "Write a short thank-you note.",
           "What do bees make?"]


def _pig(word: str) -> str:
    for i, ch in enumerate(word):
        if ch in "aeiou":
            return word[i:] + word[:i] + ("way" if i == 0 else "ay")
    return word + "ay"


def arithmetic(r: random.Random) -> tuple[str, str]:
    a, b, who, what = r.randint(2, 60), r.randint(2, 40), r.choice(NAMES), r.choice(THINGS)
    if r.random() < 0.5:
        return f"{who} has {a} {what} and gets {b} more. How many {what} does {who} have now?", str(a + b)
    a += b
    return f"{who} had {a} {what} and gave away {b}. How many {what} are left?", str(a - b)


def pig_latin(r: random.Random) -> tuple[str, str]:
    words = r.sample(WORDS, r.randint(3, 6))
    return f"Translate into pig latin: {' '.join(words)}", " ".join(_pig(w) for w in words)


def reverse(r: random.Random) -> tuple[str, str]:
    words = r.sample(WORDS, r.randint(3, 7))
    return f"Reverse the order of these words: {' '.join(words)}", " ".join(reversed(words))


def to_json(r: random.Random) -> tuple[str, str]:
    name, city, age = r.choice(NAMES), r.choice(CITIES), r.randint(18, 90)
    return (f"Format as a JSON object with keys name, age and city: {name} is {age} years old and lives in {city}.",
            json.dumps({"name": name, "age": age, "city": city}))


def dates(r: random.Random) -> tuple[str, str]:
    y, m, d = r.randint(1950, 2030), r.randint(1, 12), r.randint(1, 28)
    shown = r.choice([f"{MONTHS[m - 1]} {d}, {y}", f"{d} {MONTHS[m - 1]} {y}", f"{d}/{m}/{y} (day/month/year)"])
    return f"Normalise this date to ISO 8601 (YYYY-MM-DD): {shown}", f"{y:04d}-{m:02d}-{d:02d}"


FAMILIES = {"arithmetic": arithmetic, "piglatin": pig_latin, "reverse": reverse, "json": to_json, "dates": dates}


def make_data(n_train: int, n_held: int, seed: int = 0) -> dict[str, tuple[list, list]]:
    out = {}
    for i, (family, make) in enumerate(FAMILIES.items()):
        r = random.Random(seed * 100 + i)
        seen, examples = set(), []
        while len(examples) < n_train + n_held:
            q, a = make(r)
            if q not in seen:
                seen.add(q)
                examples.append((q, a))
        out[family] = (examples[:n_train], examples[n_train:])
    return out


def chats(examples: list[tuple[str, str]]) -> str:
    return "".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
                   + "\n" for q, a in examples)


def train_adapters(store, data: dict, steps: int, work: Path) -> dict[str, str]:
    """One adapter per family, trained unless the store has it already (named by its data and settings)."""
    from fourwalls.model.lora import LoRAConfig
    from fourwalls.store import DEFAULT_MODEL
    from fourwalls.train.loop import TrainConfig
    from fourwalls.train.recipes import finetune

    names = {}
    work.mkdir(parents=True, exist_ok=True)
    for family, (train, _) in data.items():
        text = chats(train)
        key = hashlib.sha256(f"{text}{steps}".encode()).hexdigest()[:12]
        names[family] = name = f"{family}-{key}"
        if name in store.names():
            continue
        path = work / f"{family}.jsonl"
        path.write_text(text)
        t0 = time.perf_counter()
        finetune(DEFAULT_MODEL, path, "lora", name, TrainConfig(steps=steps, batch_size=8, lr=2e-3, progress=False),
                 LoRAConfig(r=8, alpha=16), max_len=96, val_fraction=0.05, store=store, run_dir=work / name,
                 description=f"{family} (benchmarks/experts.py)")
        print(f"trained {name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return names


def answer_loss(lm, adapters, held: list[tuple[str, str]], rows: list) -> tuple[float, int]:
    """Summed cross-entropy of the answers' tokens and their count, row i under ``rows[i]`` (AdapterSet.select)."""
    tok, pad = lm.tokenizer, lm.config.eos_token_ids[0]
    seqs, labels = [], []
    for q, a in held:
        prompt = tok.encode_chat([{"role": "user", "content": q}], add_generation_prompt=True)
        ids = tok.encode_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
        seqs.append(ids)
        labels.append([-100] * len(prompt) + ids[len(prompt):])
    width = max(map(len, seqs))
    x = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
    y = torch.tensor([lab[1:] + [-100] * (width - len(lab) + 1) for lab in labels])
    with torch.inference_mode(), adapters.select(rows):
        logits = lm.model(x).float()
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100,
                                           reduction="sum")
    return float(ce), int((y != -100).sum())


def median_ms(router, prompts: list[str]) -> float:
    for p in prompts[:5]:  # warm up
        router.route(p)
    times = []
    for p in prompts:
        t0 = time.perf_counter()
        router.route(p)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times) * 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a smoke test: few examples, a few steps")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--threshold", type=float, default=None, help="default: the server's default")
    args = ap.parse_args()
    from fourwalls.engine.multilora import AdapterSet
    from fourwalls.engine.router import Router
    from fourwalls.experts import DEFAULT_THRESHOLD, make_profile
    from fourwalls.rag.embed import embedder
    from fourwalls.store import DEFAULT_MODEL, Store

    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    n_train, n_held, steps = (24, 8, 2) if args.quick else (240, 40, args.steps)
    cache = Path("~/.cache/fourwalls/experts-bench").expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    store = Store(cache / "home")
    data = make_data(n_train, n_held)
    t0 = time.perf_counter()
    names = train_adapters(store, data, steps, cache / "work")
    train_s = time.perf_counter() - t0
    family_of = {n: f for f, n in names.items()}

    emb = embedder()
    profiles = {n: store.resolve(n).manifest["routing"] for n in names.values()}
    top1 = Router(profiles, emb, threshold)
    top2 = Router(profiles, emb, threshold, "top2")
    lm = store.load(DEFAULT_MODEL, quantized=False)  # the weights the adapters were trained on
    adapters = AdapterSet(lm.model)
    adapters.install([adapters.read(n, store.resolve(n).path) for n in names.values()])

    correct, total, lowest = 0, 0, {}
    sums = {"base": [0.0, 0], "oracle": [0.0, 0], "top1": [0.0, 0], "top2": [0.0, 0]}
    for family, (_, held) in data.items():
        routes1 = [top1.route(q) for q, _ in held]
        routes2 = [top2.route(q) for q, _ in held]
        correct += sum(r.adapter is not None and family_of[r.adapter] == family for r in routes1)
        total += len(held)
        lowest[family] = round(min(next(s.score for s in r.ranking if s.name == names[family]) for r in routes1), 3)
        for kind, rows in (("base", [None] * len(held)), ("oracle", [names[family]] * len(held)),
                           ("top1", [r.mix or None for r in routes1]), ("top2", [r.mix or None for r in routes2])):
            ce, n = answer_loss(lm, adapters, held, rows)
            sums[kind][0] += ce
            sums[kind][1] += n
    loss = {k: ce / n for k, (ce, n) in sums.items()}

    general = [top1.route(q) for q in GENERAL]
    prompts = [q for _, held in data.values() for q, _ in held]
    r = random.Random(1)
    more = {}
    for family, (train, _) in data.items():  # 3 more profiles per family, each of another half of its data
        for i in range(3):
            more[f"{family}-subset{i}"] = make_profile([q for q, _ in r.sample(train, len(train) // 2)], emb)
    big = Router({**profiles, **more}, emb, threshold)
    print(json.dumps({
        "benchmark": "experts", "model": DEFAULT_MODEL, "quick": args.quick, "families": list(FAMILIES),
        "train_examples": n_train, "held_out": n_held, "lora_rank": 8, "steps": steps,
        "train_seconds": round(train_s, 1), "threshold": threshold,
        "top1_accuracy": round(correct / total, 4),
        "loss_base": round(loss["base"], 4), "loss_oracle": round(loss["oracle"], 4),
        "loss_routed_top1": round(loss["top1"], 4), "loss_routed_top2": round(loss["top2"], 4),
        "routed_vs_oracle": round(loss["top1"] / loss["oracle"], 4),
        "routed_top2_vs_oracle": round(loss["top2"] / loss["oracle"], 4),
        "base_fallback": round(sum(not g.mix for g in general) / len(general), 4),
        "lowest_own_score": lowest, "highest_general_score": round(max(g.ranking[0].score for g in general), 3),
        "route_ms_5": median_ms(top1, prompts), "route_ms_20": median_ms(big, prompts),
        "torch_threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
