"""Default schedule for dense / matmul / batch_matmul (and 1x1 convs written as matmul).

Pattern: a multiply-accumulate block ``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]`` with
no sliding window (TOPI ``matmul`` / ``dense`` / ``batch_matmul`` after LegalizeOps,
with broadcasting batch dims), followed by the fused elementwise epilogue (bias add,
activation, residual add). B is either a weight constant (packed ahead of time to
``[N/nb, K, nb]``) or an activation that is already contiguous along j (attention's
``Q @ K^T`` after its transpose kernel, ``P @ V``).

Schedule: the register-tiled micro-kernel of ``cpu_contraction`` with N = j
(vectorized) and M = i (unrolled); batch-1 dense (GEMV) gets a wider N tile so that
several independent FMA chains hide the FMA latency. Knobs: the register tile.
"""

from __future__ import annotations

from .cpu_contraction import ContractionRule


class MatmulRule(ContractionRule):
    """dense / matmul / batch_matmul -> register-tiled, column-vectorized micro-kernel."""

    name = "matmul-tiled"
    sliding_window = False
    spatial_rank = None
    can_pad = True
