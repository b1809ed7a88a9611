"""Fine-tuning speed and memory: fourwalls vs HF transformers + PEFT, LoRA / QLoRA / full, one JSON line.

The default model, the same 512-token sequences, batch 1, AdamW, LoRA r=8 alpha=16 on all seven projections.
Each configuration runs in its own process so that its peak RSS is its own; the peak is read twice: over the
whole process (load included) and over the training steps only (the kernel's high-water mark reset after load).
The configurations take turns for ``--rounds`` rounds, so that a slow minute of the machine does not land on one
of them only; each keeps its best speed and its highest peak.

    python benchmarks/finetune.py [--steps 3] [--rounds 2]
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import fourwalls  # noqa: F401
import torch
from rss import peak_rss_mb, reset_peak  # benchmarks/rss.py: run as a script, its folder is on the path

SEQ, R, ALPHA = 512, 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROOT = Path(__file__).resolve().parent.parent


def _batch(tokenizer) -> torch.Tensor:
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    text = corpus.read_text()[:30000] if corpus.is_file() else (ROOT / "tests/fixtures/english.txt").read_text() * 10
    return torch.tensor([tokenizer.encode(text)[:SEQ]])


def worker(impl: str, method: str, steps: int) -> dict:
    from fourwalls.store import DEFAULT_MODEL, Store

    store = Store()
    lm = store.load(DEFAULT_MODEL)
    ids = _batch(lm.tokenizer)
    whole_peak_before = peak_rss_mb()
    if impl == "fourwalls":
        from fourwalls.model.lora import LoRAConfig, attach_lora
        from fourwalls.model.native import keep_freed_memory
        from fourwalls.train.objectives import causal_lm

        keep_freed_memory()  # as fourwalls' training loop does

        model = lm.model
        if method == "qlora":
            from fourwalls.model.quant import quantize_nf4

            quantize_nf4(model)
        if method != "full":
            attach_lora(model, LoRAConfig(r=R, alpha=ALPHA, target_modules=TARGETS))
        batch = {"input_ids": ids, "labels": ids}

        def step_loss() -> torch.Tensor:
            return causal_lm(model, batch)[0]
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(store.root / "cache" / lm.digest, dtype=torch.float32)
        del lm
        if method != "full":
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(TARGETS),
                                                     lora_dropout=0.0, task_type="CAUSAL_LM"))

        def step_loss() -> torch.Tensor:
            return model(input_ids=ids, labels=ids).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    import gc

    gc.collect()
    reset_peak()
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t = time.perf_counter()
        step_loss().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    best = min(times[1:])
    return {"tokens_per_s": round(SEQ / best, 1), "train_peak_rss_mb": round(peak_rss_mb(), 1),
            "process_peak_rss_mb": round(max(peak_rss_mb(), whole_peak_before), 1),
            "trainable_params": sum(p.numel() for p in params)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--worker", nargs=2, metavar=("IMPL", "METHOD"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker, args.steps)))
        return
    out: dict = {"model": "smollm2-135m-instruct", "seq_len": SEQ, "batch": 1, "lora_r": R, "steps": args.steps,
                 "rounds": args.rounds}
    runs = [("fourwalls", m) for m in ("lora", "qlora", "full")]
    try:
        import peft  # noqa: F401
        import transformers  # noqa: F401

        runs += [("hf", "lora"), ("hf", "full")]  # bitsandbytes' 4-bit layers need a GPU: no HF QLoRA on CPU
    except ImportError:
        pass
    best: dict[str, dict] = {}
    for _ in range(args.rounds):
        for impl, method in runs:
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--worker", impl, method],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{impl} {method} failed:\n{proc.stderr[-2000:]}")
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            kept = best.setdefault(f"{impl}_{method}", result)
            for key, value in result.items():
                kept[key] = max(kept[key], value)  # the best speed, the highest peaks
    for name, result in best.items():
        out |= {f"{name}_{key}": value for key, value in result.items()}
    for m in ("lora", "full"):
        if f"hf_{m}_tokens_per_s" in out:
            ratio = out[f"fourwalls_{m}_tokens_per_s"] / out[f"hf_{m}_tokens_per_s"]
            out[f"{m}_tokens_per_s_ratio_vs_hf"] = round(ratio, 2)
    out["qlora_vs_lora_train_peak_rss"] = round(out["fourwalls_qlora_train_peak_rss_mb"]
                                                / out["fourwalls_lora_train_peak_rss_mb"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
