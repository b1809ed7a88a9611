"""fourwalls: a private, self-hosted LLM toolkit."""

import os

# Idle OpenMP workers of torch sleep instead of spinning, so that OpenBLAS's threads (batch-1 decoding, see
# model.transformer.Linear) get the cores. Takes effect only if fourwalls is imported before torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
