"""Make smaller variants of a stored model: quantize, prune, distill. Each lands in the store with its lineage."""
