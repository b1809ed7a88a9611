"""DPO speed and memory: fourwalls vs TRL's DPOTrainer (HF transformers + PEFT), LoRA, one JSON line.

The default model (TRL gets its HF export from the store's cache), the same preference pairs rendered with the same
chat template, batch 2 pairs, AdamW, LoRA r=8 alpha=16 on all seven projections, beta 0.1, and for both the
reference is the base with the adapter switched off, computed in each step. No gradient checkpointing on either
side (TRL turns it on by default, trading another forward pass for memory; fourwalls does not checkpoint). Tokens
are those of the chosen and the rejected sequences, padding excluded. Each side runs in its own process so that its
peak RSS is its own, read over the whole process and over the training steps only (the kernel's high-water mark
reset after loading); the two take turns for ``--rounds`` rounds, each keeping its best speed and its highest peak.

    python benchmarks/align.py [--steps 3] [--rounds 2]
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import fourwalls  # noqa: F401
import torch
from rss import peak_rss_mb, reset_peak  # benchmarks/rss.py: run as a script, its folder is on the path

BATCH, R, ALPHA, BETA = 2, 8, 16, 0.1
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROOT = Path(__file__).resolve().parent.parent


def pairs(n: int) -> list[tuple[str, str, str]]:
    """``n`` (prompt, chosen, rejected) of about 150, 120 and 120 tokens, cut from a real text."""
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    text = corpus.read_text()[:200_000] if corpus.is_file() else (ROOT / "tests/fixtures/english.txt").read_text() * 40
    out, at = [], 0
    for _ in range(n):
        prompt, chosen, rejected = text[at:at + 600], text[at + 600:at + 1080], text[at + 1080:at + 1560]
        out.append(("Continue this scene:\n" + prompt, chosen, rejected))
        at += 1560
    return out


def worker(impl: str, steps: int) -> dict:
    from fourwalls.store import DEFAULT_MODEL, Store

    store = Store()
    lm = store.load(DEFAULT_MODEL)
    rows = pairs(BATCH * (steps + 1))
    whole_peak_before = peak_rss_mb()
    if impl == "fourwalls":
        from fourwalls.model.lora import LoRAConfig, attach_lora
        from fourwalls.model.native import keep_freed_memory
        from fourwalls.train.data import collate, load_preferences
        from fourwalls.train.objectives import preference

        keep_freed_memory()  # as fourwalls' training loop does
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "pairs.jsonl"
            path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p}],
                                                "chosen": {"role": "assistant", "content": c},
                                                "rejected": {"role": "assistant", "content": r}}) + "\n"
                                    for p, c, r in rows))
            ds = load_preferences(path, lm.tokenizer, max_len=1024)
        model = lm.model
        attach_lora(model, LoRAConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
        objective = preference("dpo", BETA)
        eos = lm.config.eos_token_ids[0]
        batches = [collate(ds.examples[i:i + BATCH], eos) for i in range(0, len(ds), BATCH)]

        def step(i: int) -> float:
            loss, m = objective(model, batches[i])
            loss.backward()
            return m["processed"]  # both sequences run, padding excluded (tokens: the scored ones)
    else:
        from datasets import Dataset
        from peft import LoraConfig
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from trl import DPOConfig, DPOTrainer

        folder = store.root / "cache" / lm.digest
        del lm
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        data = Dataset.from_list([{"prompt": [{"role": "user", "content": p}],
                                   "chosen": [{"role": "assistant", "content": c}],
                                   "rejected": [{"role": "assistant", "content": r}]} for p, c, r in rows])
        out = tempfile.mkdtemp()
        args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, max_length=1024, beta=BETA,
                         learning_rate=1e-5, report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
                         dataloader_num_workers=0, seed=0, gradient_checkpointing=False)
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                             peft_config=LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                    lora_dropout=0.0, task_type="CAUSAL_LM"))
        model = trainer.model
        trainer.create_optimizer()
        trl_batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()]

        def step(i: int) -> float:
            trainer.compute_loss(model, trl_batches[i]).backward()
            return float(trl_batches[i]["attention_mask"].sum())
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    import gc

    gc.collect()
    reset_peak()
    speeds = []
    for i in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        tokens = step(i)
        opt.step()
        opt.zero_grad(set_to_none=True)
        speeds.append(tokens / (time.perf_counter() - t))
    return {"tokens_per_s": round(max(speeds[1:]), 1), "train_peak_rss_mb": round(peak_rss_mb(), 1),
            "process_peak_rss_mb": round(max(peak_rss_mb(), whole_peak_before), 1),
            "tokens_per_step": round(tokens, 1), "trainable_params": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", metavar="IMPL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    out: dict = {"model": "smollm2-135m-instruct", "objective": "dpo", "batch_pairs": BATCH, "lora_r": R,
                 "steps": args.steps, "rounds": args.rounds}
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for impl in ("fourwalls", "trl"):
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", impl],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{impl} failed:\n{proc.stderr[-3000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            kept = best.setdefault(impl, result)
            for key, value in result.items():
                kept[key] = max(kept[key], value)  # the best speed, the highest peaks
    for impl, result in best.items():
        out |= {f"{impl}_{key}": value for key, value in result.items()}
    out["dpo_tokens_per_s_ratio_vs_trl"] = round(out["fourwalls_tokens_per_s"] / out["trl_tokens_per_s"], 2)
    out["dpo_train_peak_rss_ratio_vs_trl"] = round(out["fourwalls_train_peak_rss_mb"] / out["trl_train_peak_rss_mb"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
