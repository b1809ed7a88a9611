"""fourwalls: a private, self-hosted LLM toolkit."""

import os

# Idle OpenMP workers of torch spin briefly (libgomp's default is 300,000 rounds), then sleep: OpenBLAS's threads
# (batch-1 decoding where the fused step does not run, see model.ops.Linear) get the cores, and the
# back-to-back operator calls of a training step (some 10,000 of them) still find their workers awake. Sleeping at
# once (OMP_WAIT_POLICY=PASSIVE) cost a LoRA step at seq 512 a sixth of its speed (273 against 315 tok/s) and
# prompts a tenth. Takes effect only if fourwalls is imported before torch.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")

__version__ = "0.1.0"
