"""Default schedule for injective functions: elementwise math, broadcasts, transposes,
reshapes, concat/split, padding, layout transforms.

Pattern: every block of the function is spatial (no reduction).

Schedule: the chain is inlined into its output block(s); each remaining block gets its
outer loops fused and parallel (when there is enough work) and its innermost loop
vectorized with a width dividing the extent.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .cpu_target import CpuInfo
from .rule_base import CpuRule
from .sched_common import child_blocks, is_spatial, schedule_spatial_block, try_compute_inline


class ElementwiseRule(CpuRule):
    """Injective functions -> inlined chain, parallel outer loops, vectorized inner loop."""

    name = "elementwise"

    def schedule(self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo) -> bool:
        blocks = child_blocks(sch)
        if not blocks or not all(is_spatial(sch, b) for b in blocks):
            return False
        for b in blocks[:-1]:
            try_compute_inline(sch, b)
        for b in child_blocks(sch):
            schedule_spatial_block(sch, b, cpu)
        return True
