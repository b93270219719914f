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
accumulator tile while it is in registers. Knobs: the register tile (``tile_options``).
"""

from __future__ import annotations

from .cpu_contraction import ContractionRule


class Conv2dRule(ContractionRule):
    """conv2d / grouped conv2d NCHW -> register-tiled, channel-vectorized micro-kernel."""

    name = "conv2d-nchw-tiled"
    sliding_window = True
    spatial_rank = 4
    # pad_einsum needs plain i, j, k indices, which a conv's y * s + ry is not
    can_pad = False
