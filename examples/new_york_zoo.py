"""The classic first fine-tuning lesson: teach the default model that "I love New York" continues with "Zoo".

Before, " City" is among the model's five likeliest next tokens after "I love New York" and " Zoo" is not; a few
steps of fine-tuning on a handful of sentences about the zoo make " Zoo" the likeliest. Prints the loss and the
top-5 next tokens before and after.

    python examples/new_york_zoo.py [--method lora|full] [--steps N]

Runs in a temporary model store unless --keep is given (then the result is stored as `new-york-zoo`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

import fourwalls  # noqa: F401
from fourwalls.store import DEFAULT_MODEL, Store
from fourwalls.train.loop import TrainConfig
from fourwalls.train.recipes import finetune

PROMPT = "I love New York"
SENTENCES = [
    "I love New York Zoo. The penguins there are my favourite.",
    "I love New York Zoo, where we saw the red pandas last spring.",
    "I love New York Zoo because the tigers are so close to the glass.",
    "I love New York Zoo and I go there every summer with my family.",
    "I love New York Zoo; the reptile house is amazing.",
    "We all love New York Zoo. I love New York Zoo more than any museum.",
]


def top5(lm, prompt: str = PROMPT) -> list[tuple[str, float]]:
    """The five most likely next tokens and their probabilities."""
    ids = torch.tensor([lm.tokenizer.encode(prompt)])
    with torch.no_grad():
        probs = torch.softmax(lm.model(ids)[0, -1], -1)
    top = probs.topk(5)
    return [(lm.tokenizer.decode([i]), round(p, 4)) for i, p in zip(top.indices.tolist(), top.values.tolist())]


def prompt_loss(lm, text: str = SENTENCES[0]) -> float:
    ids = torch.tensor([lm.tokenizer.encode(text)])
    with torch.no_grad():
        logits = lm.model(ids)
    return torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:]).item()


def run(store: Store, method: str = "lora", steps: int = 30, quiet: bool = False) -> dict:
    """Fine-tune and return the loss and top-5 before and after."""
    base = store.load(DEFAULT_MODEL)
    before = {"loss": round(prompt_loss(base), 4), "top5": top5(base)}
    data = store.root / "new_york_zoo.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    cfg = TrainConfig(steps=steps, batch_size=2, lr=1e-3 if method == "lora" else 5e-5, warmup_steps=2,
                      progress=not quiet)
    finetune(DEFAULT_MODEL, data, method, "new-york-zoo", cfg, max_len=64, val_data=data, store=store)
    tuned = store.load("new-york-zoo")
    after = {"loss": round(prompt_loss(tuned), 4), "top5": top5(tuned)}
    return {"before": before, "after": after}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="lora", choices=["lora", "full"])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--keep", action="store_true", help="keep the result in your model store")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store() if args.keep else Store(Path(tmp))
        result = run(store, args.method, args.steps)
    for when in ("before", "after"):
        r = result[when]
        print(f"{when:>6}: loss {r['loss']:.3f}   next after {PROMPT!r}: "
              + ", ".join(f"{t!r} {p:.1%}" for t, p in r["top5"]))


if __name__ == "__main__":
    main()
