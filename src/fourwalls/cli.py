"""The `fourwalls` command: one thin subcommand per verb, each calling one library function."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from fourwalls.errors import FourwallsError, UsageError

# llama.cpp's defaults: sampling that reads well without tuning. --temperature 0 is greedy.
CLI_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repetition_penalty": 1.0}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, not usage + message
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most new tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=CLI_SAMPLING["temperature"],
                   help="0 is greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=CLI_SAMPLING["top_k"], help="0 disables (default 40)")
    g.add_argument("--top-p", type=float, default=CLI_SAMPLING["top_p"], help="1 disables (default 0.95)")
    g.add_argument("--min-p", type=float, default=CLI_SAMPLING["min_p"], help="0 disables (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="1 disables (default 1.0)")
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
    from fourwalls.generate import Session, stream

    params = _params(args)
    params.validate()
    lm = _load(args.model)
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
        messages.append({"role": "user", "content": line})
        reply = []
        try:
            ids = lm.tokenizer.encode_chat(messages)
            for chunk in stream(lm.model, lm.tokenizer, ids, params, lm.config.eos_token_ids, session):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                reply.append(chunk.text)
        except FourwallsError as e:
            if not interactive:
                raise
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:  # stop this answer, keep the conversation
            pass
        print()
        messages.append({"role": "assistant", "content": "".join(reply)})


def cmd_perplexity(args: argparse.Namespace) -> None:
    from fourwalls.eval.perplexity import perplexity

    text = _read_text(Path(args.file))
    lm = _load(args.model)
    r = perplexity(lm.model, lm.tokenizer.encode(text), args.context, args.stride, progress=True)
    print(json.dumps({"model": lm.name, "digest": lm.digest, "file": args.file, "perplexity": round(r.perplexity, 4),
                      "nll": round(r.nll, 5), "tokens": r.tokens, "context": args.context, "stride": args.stride}))


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"no such file: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not UTF-8 text") from None
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


def cmd_models_import(args: argparse.Namespace) -> None:
    from fourwalls.store import Store

    ref = Store().import_model(Path(args.path), args.name, args.dtype)
    print(f"imported {ref.name} ({ref.digest})")


def cmd_models_list(args: argparse.Namespace) -> None:
    from fourwalls.store import Store, describe

    rows = [describe(ref) for ref in Store().list()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{'NAME':32} {'DIGEST':19} {'ARCH':6} {'PARAMS':>8} {'DTYPE':24} {'SIZE':>9}")
    for r in rows:
        name = r["name"] + (" (bundled)" if r["bundled"] else "")
        print(f"{name:32} {r['digest'][:19]:19} {r['architecture']:6} {r['parameters'] / 1e6:7.1f}M "
              f"{r['dtype']:24} {r['size_bytes'] / 2**20:7.1f}MB")


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


def build_parser() -> argparse.ArgumentParser:
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
    _sampling_flags(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("perplexity", help="perplexity of a model on a UTF-8 text file")
    p.add_argument("file")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"stored name or path (default {DEFAULT_MODEL})")
    p.add_argument("--context", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--stride", type=int, default=256, help="tokens the window advances (default 256)")
    p.set_defaults(func=cmd_perplexity)

    models = sub.add_parser("models", help="the model store: import, list, show, rm")
    msub = models.add_subparsers(dest="models_command", required=True, parser_class=_Parser)
    p = msub.add_parser("import", help="import a GGUF file or Hugging Face folder")
    p.add_argument("path")
    p.add_argument("--name", required=True)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weight dtype to store (auto: as the source, GGUF dequantized to float32)")
    p.set_defaults(func=cmd_models_import)
    p = msub.add_parser("list", help="list stored models")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_list)
    p = msub.add_parser("show", help="architecture, size, digest and lineage of a model")
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_models_show)
    p = msub.add_parser("rm", help="remove a stored model")
    p.add_argument("name")
    p.set_defaults(func=cmd_models_rm)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except FourwallsError as e:
        print(f"fourwalls: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
