"""What a model is: one dataclass for the Llama family, and named presets as plain data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fourwalls.errors import NotFoundError, UnsupportedError


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling of RoPE (long-context extension)."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a Llama-family decoder. Field names follow the papers, not any one file format."""

    name: str = "custom"
    arch: str = "llama"  # "llama" (Llama, SmolLM, Mistral) or "qwen2" (QKV bias)
    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    head_dim: int = 0  # 0: dim // n_heads
    hidden_dim: int = 11008  # SwiGLU inner width
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    context_length: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    # Weight-only quantization of the stored weights (model/quant.py's QuantConfig as a dict), None for float.
    quantization: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.arch not in ("llama", "qwen2"):
            raise UnsupportedError(f"architecture '{self.arch}' is not supported; fourwalls runs llama and qwen2")

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def num_parameters(self) -> int:
        """Parameter count implied by the shape (tied embeddings counted once)."""
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        attn = self.dim * (q + 2 * kv) + q * self.dim + (q + 2 * kv if self.qkv_bias else 0)
        mlp = 3 * self.dim * self.hidden_dim
        per_layer = attn + mlp + 2 * self.dim
        head = 0 if self.tie_embeddings else self.vocab_size * self.dim
        return self.vocab_size * self.dim + self.n_layers * per_layer + self.dim + head

    # --- Hugging Face config.json ---------------------------------------------------------------

    @classmethod
    def from_hf(cls, hf: dict[str, Any], name: str = "custom") -> ModelConfig:
        model_type = hf.get("model_type", "llama")
        if model_type in ("llama", "mistral"):
            arch = "llama"
        elif model_type == "qwen2":
            arch = "qwen2"
        else:
            raise UnsupportedError(
                f"model_type '{model_type}' is not supported; fourwalls runs llama, mistral and qwen2 checkpoints"
            )
        scaling = None
        rs = hf.get("rope_scaling") or hf.get("rope_parameters")
        if rs and rs.get("rope_type", rs.get("type")) == "llama3":
            scaling = RopeScaling(
                factor=float(rs["factor"]),
                low_freq_factor=float(rs["low_freq_factor"]),
                high_freq_factor=float(rs["high_freq_factor"]),
                original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
            )
        elif rs and rs.get("rope_type", rs.get("type")) not in (None, "default"):
            raise UnsupportedError(f"rope scaling '{rs.get('rope_type', rs.get('type'))}' is not supported")
        quant = hf.get("quantization_config")
        if quant is not None and quant.get("quant_method") != "fourwalls":
            raise UnsupportedError(f"'{quant.get('quant_method')}' quantized checkpoints are not supported; import "
                                   "the float model and `fourwalls quantize` it")
        theta = hf.get("rope_theta") or (rs or {}).get("rope_theta") or 10000.0
        eos = hf.get("eos_token_id", 2)
        n_heads = hf["num_attention_heads"]
        return cls(
            name=name,
            arch=arch,
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
            hidden_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            rope_scaling=scaling,
            context_length=hf.get("max_position_embeddings", 4096),
            tie_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,)),
            quantization={k: v for k, v in quant.items() if k != "quant_method"} if quant else None,
        )

    def to_hf(self) -> dict[str, Any]:
        model_type = "qwen2" if self.arch == "qwen2" else "llama"
        hf: dict[str, Any] = {
            "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "intermediate_size": self.hidden_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.context_length,
            "tie_word_embeddings": self.tie_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_ids) if len(self.eos_token_ids) != 1 else self.eos_token_ids[0],
            "torch_dtype": "float32",
        }
        if model_type == "llama":
            hf["attention_bias"] = self.qkv_bias
            hf["mlp_bias"] = False
        if self.rope_scaling is not None:
            hf["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        if self.quantization is not None:
            hf["quantization_config"] = {"quant_method": "fourwalls", **self.quantization}
        return hf


def _preset(**kw: Any) -> ModelConfig:
    return ModelConfig(**kw)


_L3_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)

PRESETS: dict[str, ModelConfig] = {
    # Tiny random-weight configs for tests and for learning to pretrain on a laptop.
    "tiny-llama": _preset(name="tiny-llama", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                          hidden_dim=160, context_length=256, tie_embeddings=True, bos_token_id=1,
                          eos_token_ids=(2,)),
    "tiny-llama3": _preset(name="tiny-llama3", vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=1,
                           hidden_dim=128, rope_theta=500000.0, context_length=256,
                           rope_scaling=RopeScaling(factor=8.0, original_max_position_embeddings=64),
                           bos_token_id=1, eos_token_ids=(2, 3)),
    "tiny-qwen2": _preset(name="tiny-qwen2", arch="qwen2", vocab_size=512, dim=64, n_layers=2, n_heads=4,
                          n_kv_heads=2, hidden_dim=160, norm_eps=1e-6, rope_theta=1e6, context_length=256,
                          tie_embeddings=True, qkv_bias=True, bos_token_id=None, eos_token_ids=(2,)),
    "tiny-8m": _preset(name="tiny-8m", vocab_size=4096, dim=256, n_layers=6, n_heads=8, n_kv_heads=4,
                       hidden_dim=688, context_length=512, tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    # Real model families (shapes from their published config.json files).
    "smollm2-135m": _preset(name="smollm2-135m", vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3,
                            hidden_dim=1536, rope_theta=100000.0, context_length=8192, tie_embeddings=True,
                            bos_token_id=1, eos_token_ids=(2,)),
    "smollm2-360m": _preset(name="smollm2-360m", vocab_size=49152, dim=960, n_layers=32, n_heads=15, n_kv_heads=5,
                            hidden_dim=2560, rope_theta=100000.0, context_length=8192, tie_embeddings=True,
                            bos_token_id=1, eos_token_ids=(2,)),
    "smollm2-1.7b": _preset(name="smollm2-1.7b", vocab_size=49152, dim=2048, n_layers=24, n_heads=32,
                            n_kv_heads=32, hidden_dim=8192, rope_theta=130000.0, context_length=8192,
                            tie_embeddings=True, bos_token_id=1, eos_token_ids=(2,)),
    "llama-3.2-1b": _preset(name="llama-3.2-1b", vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                            head_dim=64, hidden_dim=8192, rope_theta=500000.0, rope_scaling=_L3_SCALING,
                            context_length=131072, tie_embeddings=True, bos_token_id=128000,
                            eos_token_ids=(128001, 128008, 128009)),
    "llama-3.2-3b": _preset(name="llama-3.2-3b", vocab_size=128256, dim=3072, n_layers=28, n_heads=24, n_kv_heads=8,
                            head_dim=128, hidden_dim=8192, rope_theta=500000.0, rope_scaling=_L3_SCALING,
                            context_length=131072, tie_embeddings=True, bos_token_id=128000,
                            eos_token_ids=(128001, 128008, 128009)),
    "llama-3-8b": _preset(name="llama-3-8b", vocab_size=128256, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                          hidden_dim=14336, rope_theta=500000.0, context_length=8192, bos_token_id=128000,
                          eos_token_ids=(128001,)),
    "qwen2.5-0.5b": _preset(name="qwen2.5-0.5b", arch="qwen2", vocab_size=151936, dim=896, n_layers=24, n_heads=14,
                            n_kv_heads=2, hidden_dim=4864, norm_eps=1e-6, rope_theta=1000000.0,
                            context_length=32768, tie_embeddings=True, qkv_bias=True, bos_token_id=None,
                            eos_token_ids=(151645, 151643)),
    "mistral-7b": _preset(name="mistral-7b", vocab_size=32768, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                          hidden_dim=14336, rope_theta=1000000.0, context_length=32768, bos_token_id=1,
                          eos_token_ids=(2,)),
}


def preset(name: str) -> ModelConfig:
    """Look up a named preset."""
    try:
        return PRESETS[name]
    except KeyError:
        raise NotFoundError(f"unknown preset '{name}'; presets: {', '.join(PRESETS)}") from None
