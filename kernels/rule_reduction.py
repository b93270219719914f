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

``ChannelsLastReductionRule`` takes the other orientation: a reduction over outer axes
whose innermost axis is kept (a global average pool or ``mean`` over H, W of an NHWC
tensor). Reducing along the row would read memory with a stride of C per element; instead
the kept innermost axis is the vector and the reduction loops run outside it.
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


def _column_reduction(sch: s_tir.Schedule, blocks: list):
    """The one reduction block of ``blocks`` when it keeps its innermost axis: its write's
    last index is its last spatial var, which its read also indexes last, and no
    reduction var does. Else None."""
    reductions = [b for b in blocks if is_reduction(sch, b)]
    if len(reductions) != 1 or not all(is_spatial(sch, b) or b in reductions for b in blocks):
        return None
    block = reductions[0]
    stmt = sch.get(block)
    if len(stmt.reads) != 1 or not iter_kinds(sch, block).endswith("R"):
        return None
    spatial = [iv.var for iv in stmt.iter_vars if iv.iter_type == tirx.IterVar.DataPar]
    if not spatial:
        return None
    inner = spatial[-1]
    write_last = stmt.writes[0].region[-1].min
    read_last = stmt.reads[0].region[-1].min
    if not (isinstance(write_last, tirx.Var) and write_last.same_as(inner)
            and isinstance(read_last, tirx.Var) and read_last.same_as(inner)):
        return None
    return block


class ChannelsLastReductionRule(CpuRule):
    """mean / sum over outer axes keeping the innermost (NHWC global pooling) ->
    innermost axis vectorized, reduction loops outside it, epilogue vectorized."""

    name = "channels-last-reduction"

    def schedule(self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo) -> bool:
        blocks = child_blocks(sch)
        block = _column_reduction(sch, blocks)
        if block is None or not all(loops_bind_iters(sch, b) for b in blocks):
            return False
        kinds = iter_kinds(sch, block)
        loops = sch.get_loops(block)
        spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
        reduction = [lp for lp, k in zip(loops, kinds) if k == "R"]
        lanes = cpu.lanes(write_dtype_bits(sch, block))
        extent = loop_extent(sch, spatial[-1])
        if extent is None or extent % lanes:
            return False
        outer, vector = sch.split(spatial[-1], [None, lanes])
        sch.reorder(*spatial[:-1], outer, *reduction, vector)
        if cpu.num_cores > 1 and extent // lanes > 1:
            sch.parallel(sch.fuse(*spatial[:-1], outer) if len(spatial) > 1 else outer)
        sch.vectorize(vector)
        init = sch.decompose_reduction(block, reduction[0])
        sch.vectorize(sch.get_loops(init)[-1])
        for b in child_blocks(sch):
            if is_spatial(sch, b) and not sch.get(b).name_hint.endswith("_init"):
                b_loops = sch.get_loops(b)
                if b_loops:
                    vectorize_inner(sch, b_loops[-1], cpu.lanes(write_dtype_bits(sch, b)))
        return True
