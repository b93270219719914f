"""Default schedule for dense / matmul / batch_matmul (and 1x1 convs written as matmul).

Pattern: a multiply-accumulate block ``C[b.., i, j] += A[b.., i, k] * B[b.., k, j]`` with
no sliding window (TOPI ``matmul`` / ``dense`` / ``batch_matmul`` after LegalizeOps,
with broadcasting batch dims), followed by the fused elementwise epilogue (bias add,
activation, residual add). B is either a weight constant (packed ahead of time to
``[N/nb, K, nb]``) or an activation that is already contiguous along j (attention's
``Q @ K^T`` after its transpose kernel, ``P @ V``).

Schedule: the register-tiled micro-kernel of ``cpu_contraction`` with N = j
(vectorized) and M = i (unrolled); batch-1 dense (GEMV) gets a wider N tile so that
several independent FMA chains hide the FMA latency.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .cpu_contraction import analyze_contraction, choose_tile, schedule_contraction
from .cpu_target import CpuInfo
from .rule_base import CpuRule, layout_free_params
from .rule_conv2d import _has_window
from .sched_common import child_blocks, is_reduction


class MatmulRule(CpuRule):
    """dense / matmul / batch_matmul -> register-tiled, column-vectorized micro-kernel."""

    name = "matmul-tiled"

    def schedule(self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo) -> bool:
        mains = [b for b in child_blocks(sch) if is_reduction(sch, b)]
        if len(mains) != 1:
            return False
        info = analyze_contraction(sch, mains[0], layout_free_params(func))
        if info is None or _has_window(sch, info):
            return False
        tile = choose_tile(info, cpu)
        if tile is None:
            return False
        schedule_contraction(sch, info, tile, cpu)
        return True
