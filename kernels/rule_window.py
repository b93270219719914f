"""Default schedule for sliding-window reductions: depthwise conv2d, max/avg pooling.

Pattern: one reduction block ``out[n, c, y, x] (+|max)= f(in[n, c', y*s + ry*d, x*s + rx*d],
...)`` whose innermost output axis x slides over the input (TOPI
``depthwise_conv2d_nchw`` / ``group_conv2d_nchw`` with one channel per group,
``pool_max``, ``pool_sum``), an optional padding block before it and an elementwise
epilogue after it (bias + relu6 of a depthwise conv, the division of an average pool).
Also the fallback for a regular conv whose channel count gives no vector tile.

Schedule: parallel over (batch, channel) planes; the padded plane is produced per
channel next to its use (it stays in cache); output rows are vectorized along x with
the window taps unrolled around a register accumulator; the epilogue is applied to the
accumulator before it is stored.
"""

from __future__ import annotations

import logging

from tvm import s_tir, tirx

from .cpu_target import CpuInfo, cpu_info
from .rule_base import CpuRule
from .sched_common import (
    MIN_PARALLEL_MACS,
    blocks_around,
    child_blocks,
    divisors,
    expr_vars,
    has_if_then_else,
    inline_prologue,
    is_reduction,
    is_spatial,
    loop_extent,
    loops_bind_iters,
    schedule_spatial_block,
    spatial_and_reduction_iters,
    tile_epilogue,
    vectorize_inner,
    write_dtype_bits,
)

logger = logging.getLogger(__name__)

MAX_UNROLLED_TAPS = 64


def _window_axes(sch: s_tir.Schedule, block) -> tuple[list[int], list[int]] | None:
    """(spatial iters, reduction iters) when some read slides x over a reduction axis."""
    spatial, reduction = spatial_and_reduction_iters(sch, block)
    if len(spatial) < 3 or not reduction:
        return None
    stmt = sch.get(block)
    ivars = [iv.var for iv in stmt.iter_vars]
    x = ivars[spatial[-1]]
    red = {ivars[i] for i in reduction}
    for region in stmt.reads:
        if region.source.same_as(stmt.writes[0].source):
            continue
        last = expr_vars(region.region[-1].min) if region.region else set()
        if x in last and last & red:
            return spatial, reduction
    return None


def _row_width(x_ext: int, lanes: int) -> int:
    """Output-row vector width: a power-of-two divisor, else the whole short row.

    Measured on mobilenet's depthwise layers (x = 112, 56, 28, 14, 7): a power-of-two
    divisor of at least 4 and the whole row (x <= 2 registers) are within 10 % of each
    other. A longer row takes its widest divisor between half a register and two
    registers (55 -> 11); failing that, one register with a predicated tail, which TVM
    executes as a scalar loop (x = 111).
    """
    pow2 = 1
    while pow2 * 2 <= 2 * lanes and x_ext % (pow2 * 2) == 0:
        pow2 *= 2
    if pow2 >= 4 or pow2 == x_ext:
        return pow2
    if x_ext <= 2 * lanes:
        return x_ext
    fits = [d for d in divisors(x_ext) if max(lanes // 2, 4) <= d <= 2 * lanes]
    return fits[-1] if fits else lanes


def _extent_product(sch: s_tir.Schedule, loops, unknown: int) -> int:
    """Product of the loops' extents, `unknown` standing for one that is not constant."""
    product = 1
    for lp in loops:
        product *= loop_extent(sch, lp) or unknown
    return product


def _width_options(x_ext: int, lanes: int) -> list[int]:
    """Row widths worth timing: the heuristic one first, then the other divisors of x
    between 4 and two registers, and the whole row when it fits in four registers."""
    options = [_row_width(x_ext, lanes)]
    others = [d for d in divisors(x_ext) if 4 <= d <= 2 * lanes]
    if x_ext <= 4 * lanes:
        others.append(x_ext)
    for width in sorted(set(others), reverse=True):
        if width not in options:
            options.append(width)
    return options


class WindowRule(CpuRule):
    """Depthwise conv / pooling -> (n, c)-parallel, x-vectorized, taps unrolled.

    Knobs: the output-row vector width (``{"width": w}``, see ``_width_options``), and
    ``"serial"`` (one thread) for a kernel the heuristic would fork."""

    name = "window-vectorized"

    @staticmethod
    def _main(sch: s_tir.Schedule):
        """(window block, spatial iters, reduction iters), or None."""
        mains = [b for b in child_blocks(sch) if is_reduction(sch, b)]
        if len(mains) != 1 or not loops_bind_iters(sch, mains[0]):
            return None
        axes = _window_axes(sch, mains[0])
        return None if axes is None else (mains[0], *axes)

    def configs(self, func: tirx.PrimFunc, target) -> list[dict]:
        sch = s_tir.Schedule(func)
        found = self._main(sch)
        if found is None:
            return []
        main, spatial, _ = found
        x_ext = loop_extent(sch, sch.get_loops(main)[spatial[-1]])
        if x_ext is None or x_ext < 2:
            return []
        cpu = cpu_info(target)
        lanes = cpu.lanes(write_dtype_bits(sch, main))
        configs = [{"width": w} for w in _width_options(x_ext, lanes)]
        work = _extent_product(sch, sch.get_loops(main), 1)
        if cpu.num_cores > 1 and work >= MIN_PARALLEL_MACS:  # as schedule_config forks
            configs.insert(1, {**configs[0], "serial": True})
        return configs

    def schedule(self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo) -> bool:
        return self.schedule_config(sch, func, cpu, None)

    def schedule_config(self, sch, func, cpu, config) -> bool:
        found = self._main(sch)
        if found is None:
            return False
        main, spatial, reduction = found
        prologue, epilogue = blocks_around(sch, main)
        if not all(is_spatial(sch, b) for b in prologue + epilogue):
            return False
        loops = sch.get_loops(main)
        x_ext = loop_extent(sch, loops[spatial[-1]])
        lanes = cpu.lanes(write_dtype_bits(sch, main))
        if x_ext is None or x_ext < 2:
            return False

        kept = inline_prologue(sch, prologue)
        try:
            epi, epi_rest = tile_epilogue(sch, main, epilogue)
        except ValueError:
            return False

        width = _row_width(x_ext, lanes)
        if config and int(config.get("width", 0)) in _width_options(x_ext, lanes):
            width = int(config["width"])
        xo, xi = sch.split(loops[spatial[-1]], [None, width])
        outer = [loops[i] for i in spatial[:-1]]
        reds = [loops[i] for i in reduction]
        sch.reorder(*outer, xo, *reds, xi)
        # parallel over planes (n, c); add rows when there are too few planes
        plane_loops = outer[:-1]
        n_planes = _extent_product(sch, plane_loops, 1)
        if n_planes >= 2 * cpu.num_cores or len(outer) < 2:
            par = sch.fuse(*plane_loops) if len(plane_loops) > 1 else plane_loops[0]
            per_plane = True
        else:
            par = sch.fuse(*outer)
            per_plane = False
        work = _extent_product(sch, sch.get_loops(main), 1)
        if cpu.num_cores > 1 and work >= MIN_PARALLEL_MACS and not (config or {}).get("serial"):
            sch.parallel(par)

        sch.reverse_compute_at(epi, xo)
        sch.vectorize(xi)
        if _extent_product(sch, reds, MAX_UNROLLED_TAPS) <= MAX_UNROLLED_TAPS:
            for lp in reds:
                sch.unroll(lp)
        sch.decompose_reduction(main, reds[0])
        epi_loops = sch.get_loops(epi)
        if epi_loops and (loop_extent(sch, epi_loops[-1]) or 0) >= 2:
            sch.vectorize(epi_loops[-1])

        for b in kept:
            if per_plane and self._produce_per_plane(sch, b, par, lanes):
                continue
            schedule_spatial_block(sch, b, cpu)
        for b in epi_rest:
            schedule_spatial_block(sch, b, cpu)
        return True

    @staticmethod
    def _produce_per_plane(sch: s_tir.Schedule, block, par, lanes: int) -> bool:
        """Compute the padded plane under the plane loop, fill + vectorized copy."""
        try:
            sch.compute_at(block, par, preserve_unit_loops=True)
        except Exception:  # noqa: BLE001 - keep it at the root instead
            return False
        targets = [block]
        if has_if_then_else(sch, block):
            try:
                fill = sch.decompose_padding(block, sch.get_loops(block)[1])
                targets.append(fill)
            except Exception:  # noqa: BLE001 - stays a scalar select
                return True
        for b in targets:
            try:
                vectorize_inner(sch, sch.get_loops(b)[-1], lanes)
            except Exception as err:  # noqa: BLE001 - stays scalar
                logger.debug("window: padded plane not vectorized: %s", err)
        return True
