"""Size, quality and decode speed of the default model's compressed variants against fp32, one JSON line.

Variants of the bundled SmolLM2-135M-Instruct made with fourwalls' own commands in a throw-away store: fp32, bf16,
int8, int4 g32 and g64 (AWQ-calibrated on tests/fixtures/calibration.txt; g128 does not divide this model's width of
576 and is refused) and 50% Wanda-pruned. Each is measured by `fourwalls compare` in a process of its own (greedy
decode at batch 1, perplexity on the first 16k characters of tinyshakespeare, or on the test fixture where that is
absent). In the same run, where llama-cpp-python is installed: llama.cpp's decode speed on the fp32 model exported to
GGUF Q8_0 and Q4_0.

    python benchmarks/compress.py [--decode-tokens 128]

Run it on a quiet machine: a second busy process on 2 cores cuts these figures by up to 3x.
"""

# ruff: noqa: I001  (fourwalls must be imported before torch)
from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import fourwalls  # noqa: F401  (sets the OpenMP wait policy before torch loads)

ROOT = Path(__file__).resolve().parent.parent
CALIBRATION = ROOT / "tests/fixtures/calibration.txt"


def eval_text(folder: Path) -> Path:
    corpus = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    if not corpus.is_file():
        return ROOT / "tests/fixtures/english.txt"
    out = folder / "eval.txt"
    out.write_text(corpus.read_text()[:16000])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--decode-tokens", type=int, default=128)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fourwalls-bench-"))
    os.environ["FOURWALLS_HOME"] = str(work / "home")  # the variants go to a throw-away store

    from fourwalls.compress.prune import prune
    from fourwalls.compress.quantize import quantize
    from fourwalls.errors import UsageError
    from fourwalls.eval.compare import compare
    from fourwalls.export import export_model
    from fourwalls.store import DEFAULT_MODEL, Store

    base = DEFAULT_MODEL
    names = {"fp32": base}
    quantize(base, "bf16", "bf16", progress=False)
    names["bf16"] = "bf16"
    quantize(base, "int8", "int8", progress=False)
    names["int8"] = "int8"
    for g in (32, 64):
        quantize(base, "int4", f"int4-g{g}", group_size=g, calibration=CALIBRATION, progress=False)
        names[f"int4_g{g}"] = f"int4-g{g}"
    try:
        quantize(base, "int4", "int4-g128", group_size=128, progress=False)
    except UsageError as e:
        g128 = f"refused: {e}"
    prune(base, "wanda", 0.5, "wanda50", calibration=CALIBRATION)
    names["pruned_wanda_50"] = "wanda50"
    # fourwalls' reference is the fp32 model as stored (the bundled GGUF converted to fp32 safetensors).
    Store().import_model(Path(Store().resolve(base).path), "fp32", dtype="float32")
    names["fp32"] = "fp32"

    text = eval_text(work)
    rows = compare(list(names.values()), text, work / "report", decode_tokens=args.decode_tokens)
    by_name = {r["name"]: r for r in rows}
    result: dict = {"model": base, "text": str(text), "decode_tokens": args.decode_tokens, "int4_g128": g128}
    for key, name in names.items():
        r = by_name[name]
        result[key] = {"size_mb": round(r["size_mb"], 1), "perplexity": round(r["perplexity"], 3),
                       "perplexity_delta": round(r["perplexity_delta"], 4),
                       "decode_perplexity": round(r["decode_perplexity"], 3),
                       "decode_perplexity_delta": round(r["decode_perplexity_delta"], 4),
                       "decode_tok_s": round(r["decode_tok_s"], 2), "decode_ratio_vs_fp32": round(r["decode_ratio"], 2),
                       "prefill_tok_s": round(r["prefill_tok_s"], 1), "peak_rss_mb": round(r["peak_rss_mb"])}

    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        llama_cpp = None
    if llama_cpp is not None:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        import decode  # benchmarks/decode.py: the same llama.cpp timing

        from fourwalls.tokenizer import Tokenizer

        ids = Tokenizer.from_dir(Store().resolve("fp32").path).encode(text.read_text())[:128]
        decode.DECODE_TOKENS = args.decode_tokens
        for qtype in ("q8_0", "q4_0"):
            path = export_model("fp32", "gguf", work / f"{qtype}.gguf", qtype)
            _, seconds, threads = decode.bench_llamacpp(path, ids, [1, 2], 2)
            tok_s = args.decode_tokens / seconds
            result[f"llamacpp_{qtype}_decode_tok_s"] = round(tok_s, 2)
            result[f"llamacpp_{qtype}_threads"] = threads
        result["int8_vs_llamacpp_q8_0"] = round(result["int8"]["decode_tok_s"] / result["llamacpp_q8_0_decode_tok_s"],
                                                2)
        result["int4_g32_vs_llamacpp_q4_0"] = round(
            result["int4_g32"]["decode_tok_s"] / result["llamacpp_q4_0_decode_tok_s"], 2)
    result["report"] = str(work / "report")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
