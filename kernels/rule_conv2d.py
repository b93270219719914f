"""Default schedule for conv2d (NCHW, any stride/padding/dilation, grouped, 1x1).

Pattern: a multiply-accumulate block ``out[n, f, y, x] += pad[n, c, y*s + ry*d, x*s + rx*d]
* W[f, c, ry, rx]`` (TOPI ``conv2d_nchw`` / ``group_conv2d_nchw`` after LegalizeOps), with
an optional padding block before it and the fused elementwise epilogue after it (bias,
relu, clip, hardswish, residual add). Grouped convs read the input channel as
``f // (F/groups) * (C/groups) + c``; the vector tile then stays inside one group.
Depthwise convs (one input channel per output) have no N axis and fall through to the
window rule.

Schedule: the register-tiled micro-kernel of ``cpu_contraction`` with N = output
channels (vectorized, weights pre-packed to ``[F/nb, C, KH, KW, nb]``) and M = output x
(unrolled); the padded input is materialized once, in parallel; the epilogue runs on the
accumulator tile while it is in registers.
"""

from __future__ import annotations

from tvm import s_tir, tirx

from .cpu_contraction import analyze_contraction, choose_tile, schedule_contraction
from .cpu_target import CpuInfo
from .rule_base import CpuRule, layout_free_params
from .sched_common import child_blocks, expr_vars, is_reduction


def _has_window(sch: s_tir.Schedule, info) -> bool:
    """True when A is read at ``spatial*stride + reduction`` (a sliding window)."""
    stmt = sch.get(info.block)
    ivars = [iv.var for iv in stmt.iter_vars]
    spatial = {ivars[i] for i in info.spatial}
    red = {ivars[i] for i in info.reduction}
    for region in stmt.reads[info.a_read].region:
        vs = expr_vars(region.min)
        if vs & spatial and vs & red:
            return True
    return False


class Conv2dRule(CpuRule):
    """conv2d / grouped conv2d NCHW -> register-tiled, channel-vectorized micro-kernel."""

    name = "conv2d-nchw-tiled"

    def schedule(self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo) -> bool:
        mains = [b for b in child_blocks(sch) if is_reduction(sch, b)]
        if len(mains) != 1:
            return False
        info = analyze_contraction(sch, mains[0], layout_free_params(func))
        if info is None or len(info.spatial) != 4 or not _has_window(sch, info):
            return False
        tile = choose_tile(info, cpu, can_pad=False)
        if tile is None:
            return False
        schedule_contraction(sch, info, tile, cpu)
        return True
