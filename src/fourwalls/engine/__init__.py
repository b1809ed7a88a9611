"""The serving engine: continuous batching over a KV-cache pool, with many LoRA adapters in one batch."""

from fourwalls.engine.engine import Engine, EngineConfig, Request

__all__ = ["Engine", "EngineConfig", "Request"]
