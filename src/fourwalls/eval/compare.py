"""What `fourwalls compare` does: one table of what each model variant costs and gains, measured on the user's text.

Each model is measured in a fresh process, so its peak RSS is its own (the process's high-water mark while it loads
the model, prefills and decodes; perplexity is computed after that figure is taken). Decode speed is the best of
two runs. The first model is the
reference: perplexity and speeds of the others are also given relative to it.
"""

from __future__ import annotations

import json
import multiprocessing
import resource
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

from fourwalls.errors import UsageError
from fourwalls.files import atomic_write, read_text

COLUMNS = [  # key, heading, format
    ("name", "model", "{}"),
    ("size_mb", "size MB", "{:.1f}"),
    ("parameters_m", "params M", "{:.1f}"),
    ("dtype", "weights", "{}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("perplexity_delta", "ppl Δ", "{:+.2%}"),
    ("decode_perplexity_delta", "decoding ppl Δ", "{:+.2%}"),
    ("decode_tok_s", "decode tok/s", "{:.1f}"),
    ("decode_ratio", "decode ×", "{:.2f}"),
    ("prefill_tok_s", "prefill tok/s", "{:.0f}"),
    ("lineage", "made from", "{}"),
]


def _lineage(manifest: dict[str, Any]) -> str:
    lin = manifest.get("lineage") or {}
    method = lin.get("method")
    if not method:
        return "imported" if lin.get("imported_from") or manifest.get("source") else "-"
    settings = ", ".join(f"{k}={v}" for k, v in (lin.get("settings") or {}).items() if k != "method")
    parent = lin.get("parent") or lin.get("base") or lin.get("adapter") or "?"
    return f"{method} of {parent}" + (f" ({settings})" if settings else "")


def _peak_rss() -> int:
    """This process's peak resident set in bytes. Not getrusage's ru_maxrss: Linux carries that over from the
    parent through fork and exec, so a child would report its parent's peak if that was higher."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # other systems: the best there is


def measure(name: str, text: str, decode_tokens: int = 64, prefill_tokens: int = 256, context: int = 512,
            repeats: int = 2, decode_ppl_tokens: int = 256) -> dict[str, Any]:
    """Size, speed, peak RSS and perplexity of one model (call it in a process of its own for a fair RSS).

    Perplexity twice: over the whole text with prompt-sized forwards, and over its first ``decode_ppl_tokens``
    tokens one token at a time, as generation computes it (quantized decoding may differ from a prompt's)."""
    from fourwalls.eval.perplexity import decode_perplexity, perplexity
    from fourwalls.generate import SamplingParams, generate_tokens
    from fourwalls.store import Store, describe

    store = Store()
    ref = store.resolve(name)
    info = describe(ref)
    lm = store.load(name, dtype=None)  # as stored: a bf16 model runs in bf16
    ids = lm.tokenizer.encode(text)
    model = lm.model
    with torch.inference_mode():
        prompt = torch.tensor([(ids * (prefill_tokens // len(ids) + 1))[:prefill_tokens]])
        model(prompt[:, :16], last_only=True)  # warm-up: kernels packed, caches touched
        start = time.perf_counter()
        model(prompt, last_only=True)
        prefill = prompt.shape[1] / (time.perf_counter() - start)
    decode = 0.0
    params = SamplingParams(max_new_tokens=decode_tokens, temperature=0)
    for _ in range(repeats):  # the best of a few runs: a busy neighbour only ever slows one down
        stamps = [time.perf_counter() for _ in generate_tokens(model, ids[:16], params)]  # no EOS: all tokens
        decode = max(decode, (len(stamps) - 1) / (stamps[-1] - stamps[0]))  # the first token's time is the prompt's
    peak_rss = _peak_rss()
    ppl = perplexity(model, ids, context=min(context, lm.config.context_length), stride=min(256, context))
    decode_ppl = decode_perplexity(model, ids[:decode_ppl_tokens])
    return {
        "name": ref.name, "digest": ref.digest, "size_bytes": info["size_bytes"],
        "size_mb": info["size_bytes"] / 1e6, "parameters": info["parameters"],
        "parameters_m": info["parameters"] / 1e6, "dtype": info["dtype"], "peak_rss_bytes": peak_rss,
        "peak_rss_mb": peak_rss / 1e6, "perplexity": ppl.perplexity, "tokens_scored": ppl.tokens,
        "decode_perplexity": decode_ppl.perplexity, "decode_tokens_scored": decode_ppl.tokens,
        "decode_tok_s": decode, "prefill_tok_s": prefill, "lineage": _lineage(ref.manifest),
        "lineage_detail": ref.manifest.get("lineage", {}),
    }


def compare(names: list[str], text_file: Path, out: Path | None = None, decode_tokens: int = 64,
            progress: bool = True) -> list[dict[str, Any]]:
    """Measure each model in its own process; relate each to the first; write compare.{md,json,png} to ``out``."""
    from fourwalls.store import Store

    if not names:
        raise UsageError("name at least one model to compare")
    if decode_tokens < 2:
        raise UsageError("--decode-tokens must be at least 2")
    text = read_text(text_file, "text file")
    if len(text.split()) < 20:
        raise UsageError(f"{text_file} is too short to measure perplexity on; give at least a paragraph")
    store = Store()
    for name in names:
        store.resolve(name)  # an unknown name fails now, not after minutes of measuring the others
    rows = []
    spawn = multiprocessing.get_context("spawn")
    for i, name in enumerate(names):
        if progress:
            print(f"[{i + 1}/{len(names)}] measuring {name} ...", flush=True)
        with ProcessPoolExecutor(max_workers=1, mp_context=spawn) as pool:  # a fresh process: its own peak RSS
            rows.append(pool.submit(measure, name, text, decode_tokens).result())
    ref = rows[0]
    for row in rows:
        row["perplexity_delta"] = row["perplexity"] / ref["perplexity"] - 1
        row["decode_perplexity_delta"] = row["decode_perplexity"] / ref["decode_perplexity"] - 1
        row["decode_ratio"] = row["decode_tok_s"] / ref["decode_tok_s"]
        row["prefill_ratio"] = row["prefill_tok_s"] / ref["prefill_tok_s"]
        row["size_ratio"] = row["size_bytes"] / ref["size_bytes"]
    if out is not None:
        write_report(rows, out, text_file)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    """The comparison as a Markdown table (also readable as plain text)."""
    cells = [[fmt.format(r[key]) for key, _, fmt in COLUMNS] for r in rows]
    head = [h for _, h, _ in COLUMNS]
    widths = [max(len(x) for x in col) for col in zip(head, *cells)]
    line = lambda xs: "| " + " | ".join(x.ljust(w) for x, w in zip(xs, widths)) + " |"  # noqa: E731
    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def write_report(rows: list[dict[str, Any]], out: Path, text_file: Path) -> None:
    """compare.md, compare.json and compare.png (size against perplexity) in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    md = (f"# Model comparison\n\nMeasured on `{text_file}`; ratios and deltas against `{rows[0]['name']}`. "
          "Decode: greedy tokens per second after the first, one sequence. Peak RSS: the measuring process's "
          "high-water mark while loading, prefilling and decoding.\n\n" + table(rows) + "\n")
    atomic_write(out / "compare.md", lambda p: p.write_text(md))
    atomic_write(out / "compare.json", lambda p: p.write_text(json.dumps(rows, indent=2) + "\n"))
    atomic_write(out / "compare.png", lambda p: _plot(rows, p))


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.scatter([r["size_mb"] for r in rows], [r["perplexity"] for r in rows], s=40)
    for r in rows:
        ax.annotate(f"{r['name']}\n{r['decode_tok_s']:.0f} tok/s", (r["size_mb"], r["perplexity"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title("size against quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
