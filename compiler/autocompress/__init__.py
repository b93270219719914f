"""`onnxforge autocompress`: one budget in (latency, speedup, size or MACs), the best model
out, searched jointly over prune ratios, low-rank ranks, int8/fp32 and (on TVM) block
sparsity per layer on the measured latency of the backend (issue 17). See run.py for the
steps."""

from .budget import Budget
from .run import AutocompressResult, autocompress

__all__ = ["AutocompressResult", "Budget", "autocompress"]
