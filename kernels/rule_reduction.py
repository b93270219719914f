"""Default schedule for row reductions: softmax, layer/RMS norm, mean/sum/max reductions,
global average pooling.

Pattern: every block is spatial or a reduction, and all blocks share their leading
spatial axes (the "rows": batch, heads, tokens, channels); the reductions run over
trailing axes. Examples: ``T_softmax_maxelem -> exp -> expsum -> norm``,
``x_sum -> x_mean -> x_var_sum -> T_layer_norm``, ``rxplaceholder_red -> T_divide``.

Schedule: rows parallel (fused), every block computed at the row loop so the row stays
in cache between passes, the innermost loop of each elementwise stage vectorized;
reductions stay sequential along the row (their order matches the reference, and the
rows give the parallelism).
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .cpu_target import CpuInfo
from .rule_base import CpuRule
from .sched_common import (
    MIN_PARALLEL_ELEMENTS,
    child_blocks,
    is_reduction,
    is_spatial,
    iter_kinds,
    loop_extent,
    loops_bind_iters,
    vectorize_inner,
    write_dtype_bits,
)


def _leading_spatial(sch: s_tir.Schedule, block) -> list[int]:
    kinds = iter_kinds(sch, block)
    lead = len(kinds) - len(kinds.lstrip("S"))
    loops = sch.get_loops(block)
    return [loop_extent(sch, lp) for lp in loops[:lead]]


class RowReductionRule(CpuRule):
    """softmax / layernorm / reductions -> rows parallel, stages fused per row."""

    name = "row-reduction"

    def schedule(self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo) -> bool:
        blocks = child_blocks(sch)
        if not any(is_reduction(sch, b) for b in blocks):
            return False
        if not all(is_spatial(sch, b) or is_reduction(sch, b) for b in blocks):
            return False
        if not all(loops_bind_iters(sch, b) for b in blocks):
            return False
        last = blocks[-1]
        if not is_spatial(sch, last):
            # a bare reduction: give it an elementwise consumer to carry the rows
            last = sch.cache_write(last, 0, "global")
            blocks = child_blocks(sch)
        leads = [_leading_spatial(sch, b) for b in blocks]
        k = min(len(lead) for lead in leads)
        while k > 0 and any(lead[:k] != leads[-1][:k] for lead in leads):
            k -= 1
        if k == 0 or any(e is None for e in leads[-1][:k]):
            return False
        rows = 1
        for e in leads[-1][:k]:
            rows *= e
        per_row = 1  # elements the widest stage touches per row
        for b in blocks:
            inner = 1
            for lp in sch.get_loops(b)[k:]:
                inner *= loop_extent(sch, lp) or 1
            per_row = max(per_row, inner)
        row_loops = sch.get_loops(last)[:k]
        row = sch.fuse(*row_loops) if k > 1 else row_loops[0]
        if cpu.num_cores > 1 and rows > 1 and rows * per_row >= MIN_PARALLEL_ELEMENTS:
            sch.parallel(row)
        for b in reversed(blocks[:-1]):
            sch.compute_at(b, row, preserve_unit_loops=True)
        for b in child_blocks_under(sch, row):
            if is_spatial(sch, b):
                loops = sch.get_loops(b)
                if len(loops) > 1:
                    vectorize_inner(sch, loops[-1], cpu.lanes(write_dtype_bits(sch, b)))
        return True


def child_blocks_under(sch: s_tir.Schedule, loop) -> list:
    """Blocks directly or indirectly under ``loop``."""
    return list(sch.get_child_blocks(loop))
