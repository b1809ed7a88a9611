"""The `fourwalls` command: one thin subcommand per verb, each calling one library function."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fourwalls.errors import FourwallsError, UsageError
from fourwalls.files import megabytes

# llama.cpp's defaults: sampling that reads well without tuning. --temperature 0 is greedy. A command with other
# defaults (rag ask) passes them to _sampling_flags, whose help texts read them from here.
CLI_SAMPLING = {"max_tokens": 256, "temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                "repeat_penalty": 1.0}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _sampling_flags(p: argparse.ArgumentParser, **defaults: float) -> None:
    """The sampling flags, with CLI_SAMPLING's defaults unless ``defaults`` overrides some."""
    d = {**CLI_SAMPLING, **defaults}
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=d["max_tokens"],
                   help=f"most new tokens to generate (default {d['max_tokens']})")
    g.add_argument("--temperature", type=float, default=d["temperature"],
                   help=f"0 is greedy (default {d['temperature']})")
    g.add_argument("--top-k", type=int, default=d["top_k"], help=f"0 disables (default {d['top_k']})")
    g.add_argument("--top-p", type=float, default=d["top_p"], help=f"1 disables (default {d['top_p']})")
    g.add_argument("--min-p", type=float, default=d["min_p"], help=f"0 disables (default {d['min_p']})")
    g.add_argument("--repeat-penalty", type=float, default=d["repeat_penalty"],
                   help=f"1 disables (default {d['repeat_penalty']})")
    g.add_argument("--seed", type=int, help="same seed, same text (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")


def _params(args: argparse.Namespace) -> Any:
    from fourwalls.generate import SamplingParams

    return SamplingParams(max_new_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repeat_penalty,
                          seed=args.seed, stop=args.stop, logprobs=getattr(args, "logprobs", None))


def _load(name: str) -> Any:
    from fourwalls.store import Store

    return Store().load(name)


def cmd_generate(args: argparse.Namespace) -> None:
    from fourwalls.generate import stream

    if args.system is not None and not args.chat:
        raise UsageError("--system needs --chat")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    params = _params(args)
    params.validate()  # before the model loads: bad flags fail fast
    lm = _load(args.model)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        ids = lm.tokenizer.encode_chat(messages)
    else:
        ids = lm.tokenizer.encode(prompt)
    tokens = []
    for chunk in stream(lm.model, lm.tokenizer, ids, params, lm.config.eos_token_ids):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        tokens.extend(chunk.tokens)
    sys.stdout.write("\n")
    if params.logprobs is not None:
        for t in tokens:
            top = " ".join(f"{lm.tokenizer.decode([i], False)!r}:{lp:.3f}" for i, lp in (t.top or []))
            print(f"{lm.tokenizer.decode([t.id], False)!r}\t{t.logprob:.4f}\t{top}", file=sys.stderr)


def cmd_chat(args: argparse.Namespace) -> None:
    from fourwalls.generate import Session

    params = _params(args)
    params.validate()
    specs = _tool_specs(args)
    lm = _load(args.model)
    toolbox = _toolbox(lm, specs) if specs else None
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"fourwalls chat with {lm.name} — /reset clears the conversation, /exit or Ctrl-D quits")
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(system)
    session = Session(lm.model)
    lines = iter(sys.stdin.readline, "") if not interactive else None
    while True:
        try:
            line = input("> ") if interactive else next(lines)  # type: ignore[arg-type]
        except (EOFError, StopIteration):
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            messages = list(system)
            continue
        if not interactive:
            print(f"> {line}")
        turn = [*messages, {"role": "user", "content": line}]
        try:
            turn += _chat_turn(lm, turn, params, session, toolbox, args.max_tool_rounds, args.tool_choice)
        except FourwallsError as e:
            if not interactive:
                raise
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            print()
            continue
        print()
        messages = turn


def _tool_specs(args: argparse.Namespace) -> list[Any]:
    from fourwalls.tools import MAX_ROUNDS, parse_specs

    if not 1 <= args.max_tool_rounds <= MAX_ROUNDS:
        raise UsageError(f"--max-tool-rounds must be between 1 and {MAX_ROUNDS}")
    if args.tool_choice != "auto" and not args.tools:
        raise UsageError("--tool-choice needs --tools")
    return parse_specs(args.tools) if args.tools else []


def _toolbox(lm: Any, specs: list[Any]) -> Any:
    """The built-in tools, documents searching this machine's collections (every group: the user is local)."""
    from fourwalls.rag.embed import embedder
    from fourwalls.rag.retrieve import Retriever
    from fourwalls.rag.stores import open_store
    from fourwalls.tools import Toolbox

    def retriever() -> Retriever:
        store = open_store(os.environ.get("FOURWALLS_RAG_STORE"))
        for spec in specs:
            if spec.collection:
                store.collection(spec.collection)  # a missing collection fails now, not at the first search
        return Retriever(store, embedder())

    return Toolbox(specs, retriever, lm.tokenizer.control_tokens)


def _chat_turn(lm: Any, messages: list[dict[str, Any]], params: Any, session: Any, toolbox: Any,
               max_rounds: int, choice: str = "auto") -> list[dict[str, Any]]:
    """Answer the conversation, printing as it goes (each tool call shown with its result); returns the messages
    the turn adds."""
    from fourwalls.tools.loop import answer

    def show(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def ran(done: Any) -> None:
        for c, result in zip(done.calls, done.results):
            print(f"\n[{c.name}] {c.arguments} -> {result}")

    # one call per round: small models, free to go on, repeat their call until the token budget ends
    return answer(lm, messages, params, toolbox, max_rounds, choice, session, False, show, ran).messages


def cmd_perplexity(args: argparse.Namespace) -> None:
    from fourwalls.eval.perplexity import perplexity
    from fourwalls.files import read_text

    text = read_text(args.file)
    lm = _load(args.model)
    r = perplexity(lm.model, lm.tokenizer.encode(text), args.context, args.stride, progress=True)
    print(json.dumps({"model": lm.name, "digest": lm.digest, "file": args.file, "perplexity": round(r.perplexity, 4),
                      "nll": round(r.nll, 5), "tokens": r.tokens, "context": args.context, "stride": args.stride}))


def cmd_models_import(args: argparse.Namespace) -> None:
    from fourwalls.store import Store, describe

    ref = Store().import_model(Path(args.path), args.name, args.dtype)
    info = describe(ref)
    print(f"imported {ref.name} ({ref.digest}): {megabytes(info['size_bytes'])} of {info['dtype']} in {ref.path}")


def cmd_models_du(args: argparse.Namespace) -> None:
    from fourwalls.store import Store

    usage = Store().usage()
    if args.json:
        print(json.dumps({k: {"entries": n, "bytes": b, "path": str(p)} for k, (n, b, p) in usage.items()}, indent=2))
        return
    rows = [(kind, str(n), megabytes(b), str(p)) for kind, (n, b, p) in usage.items()]
    rows.append(("total", "", megabytes(sum(b for _, b, _ in usage.values())), ""))
    _table(("KIND", "ENTRIES", "SIZE", "WHERE"), rows, right=(1, 2))
    if usage["cache"][1]:
        print("the cache holds GGUF files in fourwalls' format and teacher logits, rebuilt when needed: "
              "`fourwalls models prune-cache` frees it")


def cmd_models_prune_cache(args: argparse.Namespace) -> None:
    from fourwalls.store import Store

    entries, freed = Store().prune_cache()
    print(f"freed {megabytes(freed)} ({entries} cache entries)")


def cmd_models_list(args: argparse.Namespace) -> None:
    from fourwalls.store import Store, describe

    rows = [describe(ref) for ref in Store().list()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    cells = [(r["name"] + (" (bundled)" if r["bundled"] else "") + (f" (on {r['base']})" if "base" in r else ""),
              r["digest"][:19], r["architecture"], f"{r['parameters'] / 1e6:.1f}M", r["dtype"],
              megabytes(r["size_bytes"])) for r in rows]
    _table(("NAME", "DIGEST", "ARCH", "PARAMS", "DTYPE", "SIZE"), cells, right=(3, 5))


def cmd_models_show(args: argparse.Namespace) -> None:
    from fourwalls.store import Store, describe

    info = describe(Store().resolve(args.name))
    if args.json:
        print(json.dumps(info, indent=2))
        return
    for key, value in info.items():
        if key == "lineage":
            print("lineage:" + ("" if value else " (none: an original model)"))
            for k, v in value.items():
                print(f"  {k}: {json.dumps(v) if not isinstance(v, str) else v}")
        else:
            print(f"{key}: {value}")


def cmd_models_rm(args: argparse.Namespace) -> None:
    from fourwalls.store import Store

    Store().remove(args.name)
    print(f"removed {args.name}")


def _key_file(args: argparse.Namespace) -> Path:
    from fourwalls.files import home

    return Path(args.file) if args.file else home() / "api-keys.json"


def cmd_keys_add(args: argparse.Namespace) -> None:
    from fourwalls.serve.caller import add_key

    path = _key_file(args)
    secret = add_key(path, args.name, admin=args.admin, models=args.models, groups=args.group or None,
                     rpm=args.rpm, tpm=args.tpm, profile=args.profile)
    print(f"added key '{args.name}' to {path}; its secret, shown only this once (the file keeps its sha256):",
          file=sys.stderr)
    print(secret)


def cmd_keys_list(args: argparse.Namespace) -> None:
    from fourwalls.serve.caller import read_keys

    path = _key_file(args)
    keys = read_keys(path) if path.exists() else []
    if args.json:
        print(json.dumps([{"name": k.name, "admin": k.admin, "models": k.models, "groups": k.groups, "rpm": k.rpm,
                           "tpm": k.tpm, "profile": k.profile} for k in keys], indent=2))
        return
    rows = [(k.name, "yes" if k.admin else "no", ",".join(k.models),
             "(all)" if k.groups is None and k.admin else ",".join(k.groups or []) or "(ungrouped only)",
             str(k.rpm or "-"), str(k.tpm or "-"), k.profile or "-") for k in keys]
    _table(("NAME", "ADMIN", "MODELS", "GROUPS", "RPM", "TPM", "PROFILE"), rows)
    if not keys:
        print(f"no keys in {path}: `fourwalls keys add NAME` makes one", file=sys.stderr)


def cmd_keys_rm(args: argparse.Namespace) -> None:
    from fourwalls.serve.caller import remove_key

    path = _key_file(args)
    remove_key(path, args.name)
    print(f"removed key '{args.name}' from {path}")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> None:
    """Columns as wide as their widest cell; ``right``: the columns aligned right (numbers)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        cells = [str(c).rjust(w) if i in right else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        print("  ".join(cells).rstrip())


def _train_flags(p: argparse.ArgumentParser, lr: float, steps: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--steps", type=int, default=steps, help=f"optimizer steps (default {steps})")
    g.add_argument("--batch-size", type=int, default=4, help="sequences per step, over all processes (default 4)")
    g.add_argument("--grad-accum", type=int, default=1, help="batches accumulated per step (default 1)")
    g.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--schedule", default="cosine", choices=["cosine", "linear", "constant"])
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "adafactor"])
    g.add_argument("--weight-decay", type=float, default=0.0)
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 disables (default 1)")
    g.add_argument("--eval-every", type=int, default=0, help="validate every N steps (default: at the end)")
    g.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (and always on SIGTERM)")
    g.add_argument("--keep", type=int, default=3, help="checkpoints to keep (default 3)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--bf16", action="store_true", help="bf16 autocast (fast only on CPUs with bf16 instructions)")
    g.add_argument("--fsdp", action="store_true",
                   help="under torchrun: shard parameters, gradients and optimizer state across the processes "
                        "(FSDP2) instead of replicating the model (DDP)")
    g.add_argument("--run-dir", type=Path,
                   help="checkpoints, metrics.jsonl, loss.png (default $FOURWALLS_HOME/runs/NAME)")
    g.add_argument("--resume", nargs="?", const="auto", choices=["auto"],
                   help="continue from the run folder's last checkpoint")


def _train_config(args: argparse.Namespace) -> Any:
    from fourwalls.train.loop import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       warmup_steps=args.warmup_steps, schedule=args.schedule, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, eval_every=args.eval_every,
                       save_every=args.save_every, keep=args.keep, seed=args.seed, bf16=args.bf16,
                       fsdp=args.fsdp)


def _report(ref: Any, result: dict[str, Any], run_dir: Path, validation: bool = True) -> None:
    if ref is None:  # a torchrun worker other than rank 0
        return
    speed = (f" at {result['tokens_per_s']:.0f} tokens/s ({result['trained_share']:.0%} trained on)"
             if "tokens_per_s" in result else "")
    val = ""
    if validation and "val_loss" in result:
        ppl = f" (ppl {result['val_ppl']:.2f})" if "val_ppl" in result else ""
        val = f", validation loss {result['val_loss']:.4f}{ppl}"
    print(f"stored {ref.name} ({ref.digest}) after {result['step']} steps{speed}{val}; curves in "
          f"{run_dir}/loss.png")


def cmd_pretrain(args: argparse.Namespace) -> None:
    from fourwalls.store import Store
    from fourwalls.train.recipes import pretrain

    cfg = _train_config(args)
    ref, result = pretrain(Path(args.data), args.preset, args.name, cfg, seq_len=args.seq_len,
                           vocab_size=args.vocab_size, val_fraction=args.val_fraction, run_dir=args.run_dir,
                           resume=bool(args.resume))
    _report(ref, result, args.run_dir or Store().root / "runs" / args.name)


def _lora_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA")
    g.add_argument("--lora-r", type=int, default=8)
    g.add_argument("--lora-alpha", type=float, default=16)
    g.add_argument("--lora-dropout", type=float, default=0.0)
    g.add_argument("--lora-targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")


def _lora(args: argparse.Namespace) -> Any:
    from fourwalls.model.lora import LoRAConfig

    return LoRAConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      target_modules=tuple(args.lora_targets.split(",")))


def cmd_finetune(args: argparse.Namespace) -> None:
    from fourwalls.store import Store
    from fourwalls.train.recipes import finetune

    cfg = _train_config(args)
    ref, result = finetune(args.model, Path(args.data), args.method, args.name, cfg, _lora(args), shape=args.format,
                           max_len=args.max_len, pack=args.pack, val_fraction=args.val_fraction,
                           val_data=Path(args.val_data) if args.val_data else None,
                           skip_bad_lines=args.skip_bad_lines, run_dir=args.run_dir, resume=bool(args.resume),
                           description=args.description)
    _report(ref, result, args.run_dir or Store().root / "runs" / args.name)


def cmd_align(args: argparse.Namespace) -> None:
    from fourwalls.store import Store
    from fourwalls.train.recipes import align

    ref, result = align(args.model, Path(args.data), args.objective, args.name, _train_config(args), args.method,
                        _lora(args), beta=args.beta, desirable_weight=args.desirable_weight,
                        undesirable_weight=args.undesirable_weight, shape=args.format, max_len=args.max_len,
                        val_fraction=args.val_fraction, val_data=Path(args.val_data) if args.val_data else None,
                        skip_bad_lines=args.skip_bad_lines, ref_cache=args.ref_cache, run_dir=args.run_dir,
                        resume=bool(args.resume), description=args.description)
    if ref is None:  # a torchrun worker other than rank 0
        return
    run_dir = args.run_dir or Store().root / "runs" / args.name
    held_out = ", ".join(f"{label} {result[key]:{form}}" for key, label, form in [
        ("val_reward_accuracy", "reward accuracy", ".2f"), ("val_reward_margin", "margin", ".3f"),
        ("val_loss", "loss", ".4f")] if key in result)  # KTO: no margin when the held-out answers share a label
    print(f"stored {ref.name} ({ref.digest}) after {result['step']} steps; held out: {held_out}; "
          f"curves in {run_dir}/loss.png")


def cmd_unlearn(args: argparse.Namespace) -> None:
    from fourwalls.store import Store
    from fourwalls.train.unlearn import unlearn

    run_dir = args.run_dir or Store().root / "runs" / args.name
    ref, result = unlearn(args.model, Path(args.forget), Path(args.retain), args.name, _train_config(args),
                          args.objective, args.method, _lora(args), beta=args.beta, retain_weight=args.retain_weight,
                          max_len=args.max_len, skip_bad_lines=args.skip_bad_lines, force=args.force,
                          run_dir=args.run_dir, resume=bool(args.resume))
    if ref is None:
        return
    r = result["report"]
    share = lambda key: "n/a" if r[key] is None else f"{r[key]:.0%}"  # noqa: E731
    print(f"forget set: perplexity {r['forget_perplexity_before']:.2f} -> {r['forget_perplexity_after']:.2f}, "
          f"completed verbatim {share('forget_verbatim_before')} -> {share('forget_verbatim_after')} of "
          f"{r['forget_sentences']} sentences")
    print(f"retain set: perplexity {r['retain_perplexity_before']:.2f} -> {r['retain_perplexity_after']:.2f}")
    print(f"stored {ref.name} ({ref.digest}) after {result['step']} steps; report in {run_dir}/unlearn.json")


def cmd_distill(args: argparse.Namespace) -> None:
    from fourwalls.compress.distill import distill
    from fourwalls.store import Store

    cfg = _train_config(args)
    ref, result = distill(args.teacher, args.name, Path(args.data), cfg, student_layers=args.student_layers,
                          student_preset=args.student_preset, temperature=args.temperature, alpha=args.alpha,
                          beta=args.beta, seq_len=args.seq_len, cache_teacher=args.cache_teacher,
                          cache_top_k=args.cache_top_k, val_fraction=args.val_fraction, run_dir=args.run_dir,
                          resume=bool(args.resume))
    _report(ref, result, args.run_dir or Store().root / "runs" / args.name, validation=False)
    if ref is not None:  # the training loss mixes cross-entropy and KL: its exp is no perplexity
        print(f"held-out perplexity: student {result['val_ppl']:.2f}, teacher {result['teacher_val_ppl']:.2f} "
              f"(cross-entropy {result['val_ce']:.4f} against {result['teacher_val_ce']:.4f} nats/token; KL to "
              f"the teacher {result['val_kl']:.4f})")


def cmd_merge(args: argparse.Namespace) -> None:
    from fourwalls.train.recipes import merge

    ref = merge(args.adapter, args.name)
    print(f"stored {ref.name} ({ref.digest})")


def cmd_export(args: argparse.Namespace) -> None:
    from fourwalls.export import export_model

    out = export_model(args.name, args.format, Path(args.out), args.dtype, args.force)
    print(f"wrote {out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    from fourwalls.compress.quantize import quantize

    ref, r = quantize(args.model, args.scheme, args.name, group_size=args.group_size,
                      calibration=Path(args.calibration) if args.calibration else None, samples=args.samples)
    size = sum(f.stat().st_size for f in ref.path.iterdir() if f.is_file())
    awq = f", AWQ mean alpha {r['awq_mean_alpha']:.2f}" if "awq_mean_alpha" in r else ""
    print(f"stored {ref.name} ({ref.digest}): {args.scheme}, {megabytes(size)} on disk{awq}; "
          f"`fourwalls compare {args.model} {ref.name} --text FILE` shows what it cost")


def cmd_compare(args: argparse.Namespace) -> None:
    from fourwalls.eval.compare import compare, table

    rows = compare(args.models, Path(args.text), Path(args.out), decode_tokens=args.decode_tokens)
    print(table(rows))
    print(f"wrote {args.out}/compare.md, compare.json and compare.png")


def cmd_prune(args: argparse.Namespace) -> None:
    from fourwalls.compress.prune import prune

    ref, r = prune(args.model, args.method, args.sparsity, args.name, pattern=args.pattern,
                   calibration=Path(args.calibration) if args.calibration else None, samples=args.samples)
    print(f"stored {ref.name} ({ref.digest}): {r['sparsity_pruned_layers']:.2%} of the weights of {r['layers']} "
          f"linear layers zeroed, {r['sparsity_all']:.2%} of all parameters")
    print(f"stored dense in fp32 ({megabytes(r['size_bytes'])}): as large as the unpruned model in fp32 and no "
          "faster to decode on this CPU (no sparse kernels)")


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from fourwalls.engine import EngineConfig
    from fourwalls.serve.server import ServeConfig, serve
    from fourwalls.tools import parse_specs

    adapters = {}
    for spec in args.adapter:
        name, sep, where = spec.partition("=")
        if not sep or not name or not where:
            raise UsageError(f"--adapter takes NAME=PATH (a PEFT folder or a stored adapter), not {spec!r}")
        adapters[name] = where
    checks = [(0 <= args.port <= 65535, "--port"), (args.max_batch >= 1, "--max-batch"),
              (args.max_model_len is None or args.max_model_len >= 16, "--max-model-len (at least 16)"),
              (args.max_queue >= 0, "--max-queue"), (args.prefill_chunk >= 1, "--prefill-chunk"),
              (args.prefill_workers >= 0, "--prefill-workers"),
              (args.drain_timeout >= 0, "--drain-timeout"), (args.request_timeout > 0, "--request-timeout"),
              (args.max_body_bytes >= 1024, "--max-body-bytes"),
              (args.kv_cache_tokens is None or args.kv_cache_tokens >= 16, "--kv-cache-tokens (at least 16)")]
    for ok, flag in checks:
        if not ok:
            raise UsageError(f"{flag} is out of range")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = EngineConfig(max_batch=args.max_batch, max_len=args.max_model_len or 4096, max_queue=args.max_queue,
                          kv_tokens=args.kv_cache_tokens, prefix_cache=not args.no_prefix_cache,
                          prefill_chunk=args.prefill_chunk, request_timeout=args.request_timeout,
                          prefill_workers=args.prefill_workers)
    tools = parse_specs(args.tools) if args.tools else []
    keys = _key_file(argparse.Namespace(file=args.api_keys))
    return serve(ServeConfig(args.model, args.host, args.port, adapters,
                             keys if args.api_keys or keys.is_file() else None, engine, args.drain_timeout,
                             args.max_body_bytes, args.log_requests, rag_store=args.rag_store, embedder=args.embedder,
                             tools=tools, route_threshold=args.route_threshold, route=args.route,
                             profiles=None if args.no_profiles else Path(args.profiles) if args.profiles else True,
                             default_profile=args.default_profile))


def _base(args: argparse.Namespace) -> str:
    from fourwalls.store import DEFAULT_MODEL

    return args.base or DEFAULT_MODEL


def cmd_experts_add(args: argparse.Namespace) -> None:
    from fourwalls.experts import add_expert
    from fourwalls.store import Store

    store = Store()
    entry = add_expert(store, args.adapter, args.base, Path(args.data) if args.data else None, args.description)
    base = store.resolve(args.adapter).manifest["base"]
    print(f"added {args.adapter} to the experts of {base} ({len(entry['profile']['centroids'])} centroids of "
          f"{entry['profile']['prompts']} prompts)")


def cmd_experts_list(args: argparse.Namespace) -> None:
    from fourwalls.experts import read_library
    from fourwalls.store import Store

    lib = read_library(Store().root, _base(args))
    if args.json:
        print(json.dumps(lib["experts"], indent=2))
        return
    rows = [(name, e["digest"][:19], str(len(e["profile"]["centroids"])), str(e["profile"]["prompts"]),
             e.get("description") or "") for name, e in lib["experts"].items()]
    if not rows:
        print(f"no experts for {lib['base']}: `fourwalls experts add ADAPTER` adds one")
        return
    _table(("EXPERT", "DIGEST", "CENTROIDS", "PROMPTS", "DESCRIPTION"), rows, right=(2, 3))


def cmd_experts_show(args: argparse.Namespace) -> None:
    from fourwalls.experts import expert
    from fourwalls.store import Store

    e = expert(Store(), args.adapter, _base(args))
    if args.json:
        print(json.dumps(e, indent=2))
        return
    p = e["profile"]
    print(f"expert: {args.adapter}\nbase: {_base(args)}\ndigest: {e['digest']}\n"
          f"description: {e.get('description') or ''}\nprofile: {len(p['centroids'])} centroids of {p['prompts']} "
          f"training prompts, embedded by {p['embedder']} ({p['dim']}-d)")


def cmd_experts_rm(args: argparse.Namespace) -> None:
    from fourwalls.experts import remove_expert
    from fourwalls.store import Store

    remove_expert(Store(), args.adapter, _base(args))
    print(f"removed {args.adapter} from the experts of {_base(args)}")


def cmd_route(args: argparse.Namespace) -> None:
    from fourwalls.engine.router import Router
    from fourwalls.experts import read_library
    from fourwalls.rag.embed import embedder
    from fourwalls.store import Store

    lib = read_library(Store().root, args.base)
    if not lib["experts"]:
        raise UsageError(f"'{args.base}' has no experts: `fourwalls experts add ADAPTER` adds one")
    router = Router({n: e["profile"] for n, e in lib["experts"].items()}, embedder(), args.threshold, args.route)
    route = router.route(args.prompt)
    if args.json:
        print(json.dumps({"model": route.label(args.base), "mix": route.mix, "threshold": args.threshold,
                          "ranking": [{"expert": s.name, "score": round(s.score, 4), "centroid": s.centroid}
                                      for s in route.ranking]}))
        return
    _table(("EXPERT", "SCORE", "NEAREST CENTROID", ""),
           [(s.name, f"{s.score:.3f}", f"{s.centroid + 1} of {len(lib['experts'][s.name]['profile']['centroids'])}",
             "<- " + f"{route.mix[s.name]:.0%}" if s.name in route.mix else "") for s in route.ranking], right=(1,))
    print(f"model 'auto' -> {route.label(args.base)}: {route.why()}")


def build_parser() -> argparse.ArgumentParser:
    from fourwalls.experts import DEFAULT_THRESHOLD
    from fourwalls.store import DEFAULT_MODEL

    parser = _Parser(prog="fourwalls", description="A private, self-hosted LLM toolkit. Nothing leaves this machine.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("generate", help="continue a prompt (streamed)")
    p.add_argument("prompt", help="the prompt text, or - to read it from stdin")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"stored name or path (default {DEFAULT_MODEL})")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("--logprobs", type=int, metavar="N", help="print each token's logprob and N alternatives")
    _sampling_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk to a model (reads one message per line from stdin when not a terminal)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"stored name or path (default {DEFAULT_MODEL})")
    p.add_argument("--system", help="system message")
    p.add_argument("--tools", metavar="LIST", help="built-in tools the model may call, run by fourwalls: "
                   "calculator, documents or documents:COLLECTION (comma-separated)")
    p.add_argument("--max-tool-rounds", type=int, default=4, help="most rounds of tool calls per answer "
                   "(default 4)")
    p.add_argument("--tool-choice", choices=["auto", "required"], default="auto", help="required: the answer "
                   "starts with a tool call (small models seldom call one unasked)")
    _sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("perplexity", help="perplexity of a model on a UTF-8 text file")
    p.add_argument("file")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"stored name or path (default {DEFAULT_MODEL})")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=256, help="tokens the window advances (default 256)")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("pretrain", help="train a tokenizer and a small model from scratch on a text file")
    p.add_argument("--data", required=True, help="a UTF-8 text file")
    p.add_argument("--preset", default="tiny-8m", help="model shape (default tiny-8m; see model/config.py)")
    p.add_argument("--name", required=True, help="store the result under this name")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size (default: the preset's)")
    p.add_argument("--val-fraction", type=float, default=0.05)
    _train_flags(p, lr=1e-3, steps=500)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("finetune", help="fine-tune a model (full or LoRA) on JSONL data")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"stored name or path (default {DEFAULT_MODEL})")
    p.add_argument("--data", required=True, help="JSONL: {text} | {instruction,input,output} | {messages}")
    p.add_argument("--format", default="auto", choices=["auto", "text", "instruct", "chat"])
    p.add_argument("--method", default="lora", choices=["full", "lora", "qlora"],
                   help="qlora: the frozen base in 4-bit NF4 (less memory), LoRA on top")
    p.add_argument("--name", required=True, help="store the result under this name")
    p.add_argument("--max-len", type=int, default=512, help="longest sequence; longer ones are truncated")
    p.add_argument("--pack", action="store_true", help="pack examples into full sequences")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share for validation")
    p.add_argument("--val-data", help="a separate JSONL validation file (instead of --val-fraction)")
    p.add_argument("--description", help="one line on what the adapter is for, shown by `fourwalls experts`")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines")
    _lora_flags(p)
    _train_flags(p, lr=2e-4, steps=100)
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("align", help="preference-tune a model (DPO, IPO, KTO, ORPO) on chosen/rejected answers")
    p.add_argument("--objective", required=True, choices=["dpo", "ipo", "kto", "orpo"],
                   help="dpo, ipo and orpo read pairs, kto labelled answers")
    p.add_argument("--data", required=True, help="JSONL: {prompt, chosen, rejected} (optional system) | {messages, "
                   "chosen: {...}, rejected: {...}} | for kto {prompt, completion, label: true|false}")
    p.add_argument("--format", default="auto", choices=["auto", "pairs", "kto"])
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"stored name or path (default {DEFAULT_MODEL})")
    p.add_argument("--method", default="lora", choices=["full", "lora", "qlora"],
                   help="qlora: the frozen base in 4-bit NF4 (less memory), LoRA on top")
    p.add_argument("--name", required=True, help="store the result under this name")
    p.add_argument("--beta", type=float, default=0.1,
                   help="DPO/KTO beta, IPO tau, ORPO lambda (default 0.1, as in the papers)")
    p.add_argument("--desirable-weight", type=float, default=1.0, help="KTO lambda_D (default 1)")
    p.add_argument("--undesirable-weight", type=float, default=1.0, help="KTO lambda_U (default 1)")
    p.add_argument("--ref-cache", nargs="?", const=True, default=False, type=Path, metavar="DIR",
                   help="with LoRA: compute the reference log-probabilities once and reuse them instead of a "
                   "reference pass each step (always so with --method full; default DIR: the store's cache)")
    p.add_argument("--max-len", type=int, default=512, help="longest prompt + answer; longer ones are truncated")
    p.add_argument("--val-fraction", type=float, default=0.1, help="held-out share for validation")
    p.add_argument("--val-data", help="a separate JSONL validation file (instead of --val-fraction)")
    p.add_argument("--description", help="one line on what the adapter is for, shown by `fourwalls experts`")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed lines")
    _lora_flags(p)
    _train_flags(p, lr=5e-5, steps=100)
    p.set_defaults(func=cmd_align)

    p = sub.add_parser("unlearn", help="make a model forget text it memorised, keeping what it should know")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"stored name or path (default {DEFAULT_MODEL})")
    p.add_argument("--forget", required=True, help="what to forget: text (one example per paragraph) or JSONL "
                   "as finetune reads it")
    p.add_argument("--retain", required=True, help="what to keep, in the same forms")
    p.add_argument("--objective", default="npo", choices=["npo", "grad-ascent", "grad-diff"],
                   help="npo: negative preference optimization plus the retain loss (default)")
    p.add_argument("--name", required=True, help="store the result under this name")
    p.add_argument("--method", default="lora", choices=["full", "lora", "qlora"])
    p.add_argument("--beta", type=float, default=0.1, help="NPO's inverse temperature (default 0.1)")
    p.add_argument("--retain-weight", type=float, default=1.0, help="weight of the retain loss (default 1)")
    p.add_argument("--max-len", type=int, default=256, help="longest example; longer ones are truncated")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count malformed JSONL lines")
    p.add_argument("--force", action="store_true", help="train even if the model does not seem to know the "
                   "forget set")
    _lora_flags(p)
    _train_flags(p, lr=1e-3, steps=30)
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("distill", help="train a smaller student to match a teacher model (knowledge distillation)")
    p.add_argument("--teacher", required=True, help="stored name or path of the teacher")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--student-layers", type=int, metavar="K",
                   help="keep K of the teacher's layers, evenly spaced with first and last (weights copied)")
    g.add_argument("--student-preset", metavar="P", help="a smaller preset, randomly initialised, teacher's vocab")
    p.add_argument("--data", required=True, help="a UTF-8 text file, or JSONL (*.jsonl) as finetune reads it")
    p.add_argument("--name", required=True, help="store the student under this name")
    p.add_argument("--temperature", type=float, default=2.0, help="softens both distributions (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the data's cross-entropy (default 0.5)")
    p.add_argument("--beta", type=float, default=0.5,
                   help="weight of the temperature²-scaled KL to the teacher (default 0.5)")
    p.add_argument("--seq-len", type=int, default=256, help="text block length / longest JSONL example")
    p.add_argument("--val-fraction", type=float, default=0.05)
    p.add_argument("--cache-teacher", nargs="?", const=True, default=False, type=Path, metavar="DIR",
                   help="compute the teacher's top-k logits once and reuse them (default DIR: the store's cache)")
    p.add_argument("--cache-top-k", type=int, default=64, help="logits kept per token in the cache (default 64)")
    _train_flags(p, lr=5e-4, steps=200)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("merge", help="fold a LoRA adapter into its base model")
    p.add_argument("adapter")
    p.add_argument("--name", required=True)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("export", help="write a model as GGUF (llama.cpp, Ollama) or an HF folder")
    p.add_argument("name", help="stored model or adapter (adapters are merged into their base)")
    p.add_argument("--format", required=True, choices=["gguf", "hf"])
    p.add_argument("--out", required=True, help="file (gguf) or folder (hf) to write")
    p.add_argument("--dtype", default="f32", help="GGUF weight type: f32, f16, q8_0, q4_0 or q4_1 (default f32)")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("quantize", help="weight-only int8/int4 quantization (or a bf16/fp16 cast) of a model")
    p.add_argument("model", help="stored name or path")
    p.add_argument("--scheme", required=True, choices=["int8", "int4", "bf16", "fp16"],
                   help="int8: per output channel; int4: per group of input weights")
    p.add_argument("--group-size", type=int, default=64, help="int4: weights sharing one scale; must divide the "
                   "layer widths (default 64)")
    p.add_argument("--calibration", metavar="FILE", help="int4: text to calibrate activation-aware scales on (AWQ)")
    p.add_argument("--samples", type=int, default=16, help="calibration blocks of 256 tokens (default 16)")
    p.add_argument("--name", required=True, help="store the result under this name")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("compare", help="size, memory, speed and perplexity of model variants, side by side")
    p.add_argument("models", nargs="+", help="stored names or paths; the first is the reference")
    p.add_argument("--text", required=True, help="UTF-8 text to measure perplexity on (your own data)")
    p.add_argument("--out", default="compare-report", help="folder for compare.md/.json/.png (default "
                   "./compare-report)")
    p.add_argument("--decode-tokens", type=int, default=64, help="greedy tokens timed per model (default 64)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("prune", help="zero a fraction of each linear layer's weights (magnitude or Wanda)")
    p.add_argument("model", help="stored name or path")
    p.add_argument("--method", required=True, choices=["magnitude", "wanda"],
                   help="magnitude: |W|; wanda: |W| times the input's norm on --calibration text")
    p.add_argument("--sparsity", type=float, help="fraction of each row's weights to zero, e.g. 0.5")
    p.add_argument("--pattern", metavar="N:M", help="keep N of every M consecutive weights, e.g. 2:4 (sparsity 0.5)")
    p.add_argument("--calibration", metavar="FILE", help="text file the wanda scores are measured on")
    p.add_argument("--samples", type=int, default=32, help="calibration blocks of 256 tokens (default 32)")
    p.add_argument("--name", required=True, help="store the result under this name")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("serve", help="serve a model behind an OpenAI-compatible API (127.0.0.1 unless --host)")
    p.add_argument("model", nargs="?", default=DEFAULT_MODEL, help=f"stored name or path (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="serve a LoRA adapter (PEFT folder or stored adapter) under NAME (repeatable)")
    p.add_argument("--api-keys", metavar="FILE", help="JSON file of sha256-hashed API keys with scopes and limits, "
                   "written by `fourwalls keys add` (default $FOURWALLS_HOME/api-keys.json if it exists, else no "
                   "keys: anyone who reaches the port may call)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-model-len", type=int, help="tokens per request, prompt + output (default: the "
                   "model's context, at most 4096)")
    p.add_argument("--kv-cache-tokens", type=int, help="the KV cache's size in tokens, shared by all requests in "
                   "blocks of 16 (default 16384, at least --max-model-len); memory is taken as it is used")
    p.add_argument("--no-prefix-cache", action="store_true", help="compute every prompt in full instead of "
                   "reusing the cached blocks of earlier requests' identical prefixes")
    p.add_argument("--max-queue", type=int, default=64, help="waiting requests before 503 (default 64)")
    p.add_argument("--prefill-chunk", type=int, default=256, help="prompt tokens fed per step (default 256)")
    p.add_argument("--prefill-workers", type=int, default=0, metavar="N", help="compute prompts in N processes, "
                   "each on a core of its own, while the server decodes on the others (default 0: prompts "
                   "and decoding share the cores, in chunks)")
    p.add_argument("--request-timeout", type=float, default=600, help="seconds per request (default 600)")
    p.add_argument("--drain-timeout", type=float, default=30, help="seconds SIGTERM waits for requests in "
                   "flight (default 30)")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20,
                   help="largest request body in bytes (default 1048576)")
    p.add_argument("--log-requests", action="store_true", help="log prompts and completions (off by default)")
    p.add_argument("--rag-store", metavar="URL", default=os.environ.get("FOURWALLS_RAG_STORE"),
                   help="document collections for /v1/collections and RAG chat: postgresql://... or a SQLite file "
                   "(default $FOURWALLS_RAG_STORE, else $FOURWALLS_HOME/rag.db)")
    p.add_argument("--embedder", metavar="FOLDER", help="a sentence-transformers BERT folder for /v1/embeddings "
                   "and retrieval (default: the packaged all-MiniLM-L6-v2)")
    p.add_argument("--tools", metavar="LIST", help="built-in tools offered on every chat, responses and messages "
                   "request: calculator, documents or documents:COLLECTION (comma-separated)")
    p.add_argument("--profiles", metavar="TOML", help="application profiles to add to (or change) the built-in "
                   "chat, rag, summarize and batch: [profiles.NAME] with priority, ttft_ms, itl_ms, max_tokens")
    p.add_argument("--default-profile", default="chat", metavar="NAME", help="the profile of requests that name "
                   "none and whose API key names none (default chat)")
    p.add_argument("--no-profiles", action="store_true", help="serve every request as an equal, in arrival order, "
                   "with no SLO (profiles named by requests are then ignored)")
    p.add_argument("--route", choices=["top1", "top2"], default="top1", help="model 'auto': run the best expert "
                   "of the library (`fourwalls experts`), or mix the two best per request (default top1)")
    p.add_argument("--route-threshold", type=float, default=DEFAULT_THRESHOLD, metavar="COSINE",
                   help=f"model 'auto': the base model answers when no expert scores this much (default "
                   f"{DEFAULT_THRESHOLD})")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("route", help="which expert model 'auto' would pick for a prompt, and why")
    p.add_argument("prompt", help="the last user turn of a conversation")
    p.add_argument("--base", default=DEFAULT_MODEL, help=f"whose expert library (default {DEFAULT_MODEL})")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"as serve --route-threshold (default {DEFAULT_THRESHOLD})")
    p.add_argument("--route", choices=["top1", "top2"], default="top1", help="as serve --route")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_route)

    experts = sub.add_parser("experts", help="the LoRA adapters model 'auto' routes over: add, list, show, rm")
    esub = experts.add_subparsers(dest="experts_command", required=True, parser_class=_Parser)
    base_help = "the base model whose library (default: the adapter's own base for add, else " + DEFAULT_MODEL + ")"
    p = esub.add_parser("add", help="put a stored adapter in its base model's library, with its routing profile")
    p.add_argument("adapter", help="a stored adapter's name")
    p.add_argument("--base", help=base_help)
    p.add_argument("--data", help="JSONL training data to profile the adapter from (needed for adapters stored "
                   "without a profile; replaces the stored one)")
    p.add_argument("--description", help="one line on what the expert is for")
    p.set_defaults(func=cmd_experts_add)
    p = esub.add_parser("list", help="the experts of a base model's library")
    p.add_argument("--base", help=base_help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_experts_list)
    p = esub.add_parser("show", help="one expert: its adapter, description and profile")
    p.add_argument("adapter")
    p.add_argument("--base", help=base_help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_experts_show)
    p = esub.add_parser("rm", help="take an expert out of the library (the adapter stays stored)")
    p.add_argument("adapter")
    p.add_argument("--base", help=base_help)
    p.set_defaults(func=cmd_experts_rm)

    keys = sub.add_parser("keys", help="API keys for `fourwalls serve`: add, list, rm (the file keeps only hashes)")
    ksub = keys.add_subparsers(dest="keys_command", required=True, parser_class=_Parser)
    file_help = "the key file (default $FOURWALLS_HOME/api-keys.json, which `fourwalls serve` reads when it exists)"
    p = ksub.add_parser("add", help="make a key: its secret is printed once, only its sha256 is stored")
    p.add_argument("name", help="who or what uses the key, e.g. support-bot")
    p.add_argument("--admin", action="store_true", help="may load adapters and write document collections")
    p.add_argument("--models", nargs="+", metavar="MODEL", help="models and adapters it may use (default: all)")
    p.add_argument("--group", action="append", default=[], help="document groups it may read (repeatable; "
                   "default: an admin reads all, another key only documents without groups)")
    p.add_argument("--rpm", type=int, help="requests per minute (default: no limit)")
    p.add_argument("--tpm", type=int, help="tokens per minute, prompt + completion (default: no limit)")
    p.add_argument("--profile", help="the application profile of its requests that name none (chat, rag, "
                   "summarize, batch, or one of serve --profiles; default: the server's --default-profile)")
    p.add_argument("--file", help=file_help)
    p.set_defaults(func=cmd_keys_add)
    p = ksub.add_parser("list", help="the keys of the key file (names, scopes and limits; never secrets)")
    p.add_argument("--file", help=file_help)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keys_list)
    p = ksub.add_parser("rm", help="remove a key")
    p.add_argument("name")
    p.add_argument("--file", help=file_help)
    p.set_defaults(func=cmd_keys_rm)

    from fourwalls.rag.cli import register

    register(sub, _Parser, _sampling_flags, _params, _load, DEFAULT_MODEL)

    models = sub.add_parser("models", help="the model store: import, list, show, rm, du, prune-cache")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    p = msub.add_parser("import", help="import a GGUF file or Hugging Face folder")
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype to store (auto: as the source, a GGUF file's quantized weights in their "
                        "blocks; a float dtype dequantizes them, for HF transformers)")
    p.set_defaults(func=cmd_models_import)
    p = msub.add_parser("list", help="list stored models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_list)
    p = msub.add_parser("du", help="disk use of the store by kind: models, adapters, cache, runs, documents")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_du)
    p = msub.add_parser("prune-cache", help="delete the cache (GGUF files in fourwalls' format, teacher logits), "
                        "which is rebuilt when needed")
    p.set_defaults(func=cmd_models_prune_cache)
    p = msub.add_parser("show", help="architecture, size, digest and lineage of a model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_show)
    p = msub.add_parser("rm", help="remove a stored model")
    p.add_argument("name")
    p.set_defaults(func=cmd_models_rm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:  # Ctrl-C while the parser imports torch is still an interrupt (130), not a traceback
        args = build_parser().parse_args(argv)
        status = args.func(args)  # most verbs return nothing: success
    except FourwallsError as e:
        print(f"fourwalls: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:
        from fourwalls.files import disk_full

        if not disk_full(e):
            raise
        where = f" writing {e.filename}" if getattr(e, "filename", None) else ""
        print(f"fourwalls: error: the disk is full{where}; free some space and try again", file=sys.stderr)
        return 2
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
