"""Catch-all default schedule for any PrimFunc the specific rules do not recognize.

Pattern: anything (scans, gathers with data-dependent indices, odd reductions, symbolic
shapes).

Schedule, best effort and block by block, never failing as a whole: spatial blocks get
parallel outer loops and a vectorized inner loop; blocks with reductions get their
leading spatial loops fused and parallel. A step the block does not allow is skipped.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx

from .cpu_target import CpuInfo
from .rule_base import CpuRule
from .sched_common import (
    MIN_PARALLEL_ELEMENTS,
    child_blocks,
    is_spatial,
    iter_kinds,
    loop_extent,
    schedule_spatial_block,
)

logger = logging.getLogger(__name__)


class FallbackRule(CpuRule):
    """Anything else -> parallel outer loops, vectorized inner loop where legal."""

    name = "fallback"

    def schedule(self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo) -> bool:
        for block in child_blocks(sch):
            try:
                if is_spatial(sch, block):
                    schedule_spatial_block(sch, block, cpu)
                else:
                    self._parallel_spatial_prefix(sch, block, cpu)
            except Exception as err:  # noqa: BLE001 - leave this block as it is
                logger.debug("fallback: block left unscheduled: %s", err)
        return True

    @staticmethod
    def _parallel_spatial_prefix(sch: s_tir.Schedule, block, cpu: CpuInfo) -> None:
        loops = sch.get_loops(block)
        kinds = iter_kinds(sch, block)
        lead = len(kinds) - len(kinds.lstrip("S"))
        if lead == 0 or len(loops) < lead or cpu.num_cores <= 1:
            return
        prefix = loops[:lead]
        work = 1
        for lp in loops:
            work *= loop_extent(sch, lp) or 1
        if work < MIN_PARALLEL_ELEMENTS:
            return
        fused = sch.fuse(*prefix) if len(prefix) > 1 else prefix[0]
        if (loop_extent(sch, fused) or 2) > 1:
            sch.parallel(fused)
