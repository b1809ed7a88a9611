"""fourwalls: a private, self-hosted LLM toolkit."""

__version__ = "0.1.0"
