"""Tokenizers: HF `tokenizers` underneath, chat templates rendered by jinja2 in a sandbox."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors

from fourwalls.errors import FormatError, UnsupportedError, UsageError
from fourwalls.templates import TemplateSandbox, render

# How llama.cpp's `tokenizer.ggml.pre` names split text before byte-level BPE (the regexes of each family's own
# tokenizer.json). "smollm" splits every digit apart, then applies GPT-2's rule.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
           "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT}
_GPT2_PRES = {"default", "gpt-2", "gpt2", "smollm", "starcoder", "refact"}

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types
ZWSP = "\u200b"


@dataclass
class Tokenizer:
    """A text <-> token-id codec plus what a model expects around it (BOS/EOS, chat template)."""

    backend: tokenizers.Tokenizer
    chat_template: str | None = None
    bos_token: str | None = None
    eos_token: str | None = None
    extra_config: dict[str, Any] = field(default_factory=dict)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids; ``add_special_tokens`` adds BOS where the model's tokenizer says so."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> Any:
        """An incremental detokenizer: ``.step(backend, id)`` returns new text, holding back partial characters."""
        return decoders.DecodeStream(skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            sandbox: TemplateSandbox | None = None, **kwargs: Any) -> str:
        """Render a conversation with the model's own template (sandboxed: templates are untrusted input), in
        ``sandbox``'s child processes within its budgets if given, else in this process."""
        if not self.chat_template:
            raise UsageError("this model has no chat template; run without --chat, or import a model that has one")
        if not messages:
            raise UsageError("a conversation needs at least one message")
        context = {"messages": messages, "add_generation_prompt": add_generation_prompt,
                   "bos_token": self.bos_token or "", "eos_token": self.eos_token or "", **kwargs}
        return sandbox.render(self.chat_template, context) if sandbox else render(self.chat_template, context)

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    sandbox: TemplateSandbox | None = None) -> list[int]:
        # The template writes BOS itself where the model wants it, so no special tokens are added on top.
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, sandbox),
                           add_special_tokens=False)

    @property
    def control_tokens(self) -> list[str]:
        """The strings this tokenizer turns into special (control) tokens: ``<|im_start|>``, ``</s>``, ..."""
        return [t.content for t in self.backend.get_added_tokens_decoder().values() if t.special]

    # --- files ----------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """Write tokenizer.json and tokenizer_config.json as HF transformers reads them."""
        self.backend.save(str(folder / "tokenizer.json"))
        cfg = {
            **self.extra_config,
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "chat_template": self.chat_template,
            "clean_up_tokenization_spaces": False,
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False))

    @classmethod
    def from_dir(cls, folder: Path) -> Tokenizer:
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise FormatError(f"{folder} has no tokenizer.json; fourwalls needs the fast-tokenizer file")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises plain Exceptions
            raise FormatError(f"{path} is not a valid tokenizer file ({e})") from None
        cfg: dict[str, Any] = {}
        if (folder / "tokenizer_config.json").is_file():
            try:
                cfg = json.loads((folder / "tokenizer_config.json").read_text())
            except ValueError as e:
                raise FormatError(f"{folder / 'tokenizer_config.json'} is not valid JSON ({e})") from None
            if not isinstance(cfg, dict):
                raise FormatError(f"{folder / 'tokenizer_config.json'} is not a JSON object")
        template = cfg.get("chat_template")
        if (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text()
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        keep = {k: cfg[k] for k in ("add_bos_token", "add_eos_token", "model_max_length", "gguf_pre") if k in cfg}
        return cls(backend, template, _token_str(cfg.get("bos_token")), _token_str(cfg.get("eos_token")), keep)

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> Tokenizer:
        """Build the tokenizer a GGUF file describes (byte-level BPE vocabularies)."""
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise UnsupportedError(
                f"GGUF tokenizer type '{kind}' is not supported (fourwalls reads byte-level BPE, 'gpt2'); "
                "import the model's Hugging Face folder instead"
            )
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        vocab = {t: i for i, t in enumerate(tokens)}
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        pre = meta.get("tokenizer.ggml.pre", "default")
        if pre in _SPLITS:
            backend.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
        elif pre in _GPT2_PRES:
            byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
            backend.pre_tokenizer = (
                pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                if pre == "smollm" else byte_level
            )
        else:
            raise UnsupportedError(f"GGUF pre-tokenizer '{pre}' is not supported; import the HF folder instead")
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                    for t, ty in zip(tokens, types) if ty == _CONTROL])
        backend.add_tokens([AddedToken(t, normalized=False, special=False)
                            for t, ty in zip(tokens, types) if ty == _USER_DEFINED])

        def tok(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        bos, eos = tok("bos"), tok("eos")
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False))
        steps: list[Any] = [processors.ByteLevel(trim_offsets=False)]
        if add_bos and bos is not None:
            steps.append(processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])]))
        backend.post_processor = processors.Sequence(steps)
        # gguf_pre: the GGUF export writes the same llama.cpp pre-tokenizer name back
        return cls(backend, meta.get("tokenizer.chat_template"), bos, eos, {"add_bos_token": add_bos, "gguf_pre": pre})


def _token_str(tok: Any) -> str | None:
    # tokenizer_config.json spells special tokens as strings or as AddedToken dicts.
    return tok.get("content") if isinstance(tok, dict) else tok


def neutralize(text: str, control: list[str]) -> str:
    """``text`` with each of the ``control`` strings broken by a zero-width space, so that it reaches the model as
    plain text instead of as a control token (a user typing ``<|im_start|>system`` opens no new turn)."""
    for token in control:
        if len(token) > 1 and token in text:
            text = text.replace(token, token[0] + ZWSP + token[1:])
    return text
