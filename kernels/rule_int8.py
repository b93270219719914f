"""Default schedules for int8 convolutions and matmuls with a dot-product instruction.

Pattern (what ``backends.tvm.qdq`` makes of a quantized layer, after LegalizeOps and
FuseOps): a reduction block ``acc[..] += int32(x_u8[..]) * int32(w_s8[..])`` writing an
int32 intermediate, then the fused epilogue (cast, scale, bias, activation, quantize,
residual add) writing the kernel's outputs.

- conv2d, NCHW / OIHW, one group, out channels a multiple of 16, in channels of 4: the
  padded input copy and the int32 accumulator are laid out NHWC inside the kernel (4
  consecutive input channels are one 32-bit broadcast, 16 output channels one vector),
  the weights are packed at compile time to ``[OC/16, KH, KW, IC/4, 16, 4]``.
- matmul with a constant ``[K, N]`` weight, N a multiple of 16, K of 4: weights packed
  to ``[N/16, K/4, 16, 4]``.

(16 is the VNNI lane count; with ARM ``sdot`` it is 4, see ``int8_intrin``.)

Both are tiled with a row of output pixels (or matrix rows) as independent
accumulators, the 16x4 dot product tensorized (``int8_intrin``: ``vpdpbusd`` on
AVX-512 VNNI; ``sdot`` 4x4 on AArch64 with dotprod), and the epilogue computed per
tile while the accumulators are in cache.
- depthwise conv2d in NHWC (``Int8DepthwiseRule``; a model is NHWC once
  ``backends.tvm.layout`` converted it): no dot product fits one product per channel and
  tap, so channels are int32 vectors (as many lanes as the dot instruction's
  accumulator), a row of output pixels the accumulators, weights packed ``[KH, KW, 1, C]``.

A function that does not fit (odd channel counts, groups, int8 activations, a target
without the instruction) is declined and the plain schedules handle it as widening
multiplies.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tvm import s_tir, tirx

from .cpu_target import CpuInfo
from .int8_intrin import DotIntrinsic, intrinsic_for
from .rule_base import LAYOUT_REWRITE_ANN, CpuRule, layout_free_params
from .sched_common import inline_epilogue_chain, reads_pointwise, vectorize_inner

logger = logging.getLogger(__name__)

ROW_TILES = (16, 8, 7, 6, 5, 4, 3, 2, 1)  # independent accumulators along the output row
MAX_ACCUMULATORS = 28  # of the 32 vector registers, leaving some for weights and inputs


def _int8_contraction(sch: s_tir.Schedule, data_dtype: str):
    """The int32 reduction block over ``data_dtype`` x s8-weight products, with its data
    and weight read indices, or None. The weight is the read of a layout-free (constant)
    parameter; the data the other 8-bit read."""
    func = sch.mod["main"]
    weights = layout_free_params(func)
    root = sch.get_sblock(func.body.block.name_hint)
    for block in sch.get_child_blocks(root):
        stmt = sch.get(block)
        if stmt.init is None or len(stmt.writes) != 1 or len(stmt.reads) < 2:
            continue
        if str(stmt.writes[0].source.dtype) != "int32":
            continue
        reads = [(i, r.source) for i, r in enumerate(stmt.reads)]
        weight = [i for i, b in reads if str(b.dtype) == "int8"
                  and any(b.same_as(w) for w in weights)]
        data = [i for i, b in reads if str(b.dtype) == data_dtype and i not in weight]
        if len(weight) == 1 and len(data) == 1:
            return block, data[0], weight[0]
    return None


def _var_indices(region) -> list | None:
    """The block vars a read indexes with, when every index is a plain var."""
    out = []
    for r in region:
        if not isinstance(r.min, tirx.Var):
            return None
        out.append(r.min)
    return out


def _is_intermediate(sch: s_tir.Schedule, buffer) -> bool:
    return not any(buffer.same_as(p) for p in sch.mod["main"].params)


def _row_tile(extent: int) -> int:
    return next(t for t in ROW_TILES if extent % t == 0)


@dataclass(frozen=True)
class _Tile:
    """One register tile: ``rows`` output pixels (matrix rows) x ``blocks`` vectors of
    output channels (columns) accumulate at once. More blocks load each broadcast input
    once for several weight vectors (fewer loads per dot product), at the cost of
    registers: rows x blocks accumulators must fit the 32 vector registers."""

    rows: int
    blocks: int = 1
    serial: bool = False

    @classmethod
    def of(cls, config: dict | None) -> _Tile | None:
        if not config or "rows" not in config:
            return None
        return cls(int(config["rows"]), int(config.get("blocks", 1)),
                   bool(config.get("serial")))

    def config(self) -> dict:
        out = {"rows": self.rows, "blocks": self.blocks}
        return {**out, "serial": True} if self.serial else out

    def fits(self, width: int, blocks: int) -> bool:
        return width % self.rows == 0 and blocks % self.blocks == 0


def _heuristic_tile(width: int, blocks: int) -> _Tile:
    """Two vectors of output channels when there are, else one; then the most rows that
    divide the output row and fit the registers. Two channel vectors measured faster
    than one on 14 of resnet18's 20 int8 conv kernels (1 thread, config search)."""
    two = 2 if blocks % 2 == 0 else 1
    rows = next(t for t in ROW_TILES if width % t == 0 and t * two <= MAX_ACCUMULATORS)
    return _Tile(rows, two)


def _pack_weight(sch, block, index: int, index_map) -> None:
    """Repack a layout-free weight through a preproc block (folded at compile time)."""
    pack = sch.cache_read(block, index, "global")
    sch.annotate(pack, LAYOUT_REWRITE_ANN, True)
    sch.transform_layout(block, ("read", index), index_map)


def _epilogue_at(sch: s_tir.Schedule, block, loop) -> None:
    """Inline the elementwise epilogue and compute what is left per tile at ``loop``.

    Only a block that reads the accumulator element for element (``reads_pointwise``)
    goes into the tile, in program order; the first that cannot (a Pad, a reshape) and
    everything after it stay loop nests of their own after the contraction, as in the
    float rules (a tile never leaves an element of such a consumer unwritten).
    """
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    children = sch.get_child_blocks(root)
    names = [sch.get(b).name_hint for b in children]
    rest = inline_epilogue_chain(sch, children[names.index(sch.get(block).name_hint) + 1:])
    for consumer in rest:
        reads_acc = any(r.source.same_as(sch.get(block).writes[0].source)
                        for r in sch.get(consumer).reads)
        if reads_acc and not reads_pointwise(sch, block, consumer):
            break
        try:
            sch.reverse_compute_at(consumer, loop)
        except Exception:  # noqa: BLE001 - stays a loop nest after the contraction
            logger.debug("int8 epilogue %s left outside the tile", sch.get(consumer).name_hint)
            break
        try:  # the output row of the tile (NCHW) or its columns (matmul)
            sch.vectorize(sch.get_loops(consumer)[-1])
        except Exception:  # noqa: BLE001 - a loop that cannot be vectorized stays scalar
            logger.debug("int8 epilogue %s not vectorized", sch.get(consumer).name_hint)


class Int8DotRule(CpuRule):
    """int8 conv2d / matmul -> packed weights + tensorized dot products."""

    name = "int8-dot"

    def is_target_available(self, target) -> bool:
        return intrinsic_for(target) is not None

    @staticmethod
    def _find(func, target):
        """(schedule, contraction block, data read, weight read, intrinsic), or None."""
        intrinsic = intrinsic_for(target)
        if intrinsic is None or not isinstance(func, tirx.PrimFunc):
            return None
        sch = s_tir.Schedule(func)
        found = _int8_contraction(sch, intrinsic.data_dtype)
        if found is None:
            return None
        return (sch, *found, intrinsic)

    def apply(self, func, target, tunable, config=None):
        found = self._find(func, target)
        if found is None:
            return None
        sch, block, data, weight, intrinsic = found
        if not _is_intermediate(sch, sch.get(block).writes[0].source):
            return None  # an int32 output: its layout is the caller's
        tile = _Tile.of(config)
        return sch if self._schedule(sch, block, data, weight, intrinsic, tile) else None

    def configs(self, func, target) -> list[dict]:
        """Tiles worth timing, the heuristic first: accumulator rows x blocks of output
        channels (columns), and the heuristic on one thread (fork-join can cost a small
        kernel more than the second core saves)."""
        shape = self._tile_shape(func, target)
        if shape is None:
            return []
        width, blocks = shape
        rows = [t for t in ROW_TILES if width % t == 0]
        options = [_heuristic_tile(width, blocks)]
        for b in (1, 2, 4):
            if blocks % b == 0:
                options += [_Tile(r, b) for r in rows if r * b <= MAX_ACCUMULATORS][:2]
        configs = [t.config() for t in dict.fromkeys(options)]
        return configs[:1] + [{**configs[0], "serial": True}] + configs[1:]

    def _tile_shape(self, func, target) -> tuple[int, int] | None:
        """(output row length, blocks of ``lanes`` output channels) of the contraction
        this rule schedules, or None."""
        found = self._find(func, target)
        if found is None:
            return None
        sch, block, data, weight, intrinsic = found
        stmt = sch.get(block)
        if _is_depthwise_nhwc(stmt, data, weight):
            return None
        out = [int(d) for d in stmt.writes[0].source.shape]
        w = [int(d) for d in stmt.reads[weight].source.shape]
        if len(w) == 4:
            layout = _conv_layout(stmt, weight)
            if layout is None:
                return None
            return out[3 if layout == "NCHW" else 2], w[0] // intrinsic.lanes
        return out[-2], w[1] // intrinsic.lanes

    def _schedule(self, sch, block, data: int, weight: int, intrinsic: DotIntrinsic,
                  tile: _Tile | None) -> bool:
        stmt = sch.get(block)
        if _is_depthwise_nhwc(stmt, data, weight):
            return False  # Int8DepthwiseRule
        if len(stmt.reads[weight].region) == 4:
            return _schedule_conv(sch, block, data, weight, intrinsic, tile)
        if len(stmt.reads[weight].region) == 2:
            return _schedule_matmul(sch, block, data, weight, intrinsic, tile)
        return False

    def schedule(self, sch, func, cpu: CpuInfo) -> bool:  # pragma: no cover - apply() used
        raise NotImplementedError


class Int8DepthwiseRule(Int8DotRule):
    """int8 depthwise conv in NHWC -> channels as int32 vectors (no dot product fits)."""

    name = "int8-depthwise"

    def configs(self, func, target) -> list[dict]:
        return []  # one setting (its row tile follows the output width)

    def _schedule(self, sch, block, data: int, weight: int, intrinsic: DotIntrinsic,
                  tile: _Tile | None) -> bool:
        if not _is_depthwise_nhwc(sch.get(block), data, weight):
            return False
        return _schedule_depthwise(sch, block, weight, intrinsic)


def _conv_layout(stmt, weight: int) -> str | None:
    """"NCHW" or "NHWC" for a one-group conv2d block over NCHW/OIHW or NHWC/OHWI, or None
    (groups > 1 index the weight differently)."""
    iters = [iv.var for iv in stmt.iter_vars]
    if len(iters) != 7:
        return None
    w_vars = _var_indices(stmt.reads[weight].region)
    if w_vars is None:
        return None
    for layout, expect in (
            ("NCHW", (iters[1], iters[4], iters[5], iters[6])),   # n f y x c ky kx: OIHW
            ("NHWC", (iters[3], iters[4], iters[5], iters[6]))):  # n y x f ky kx c: OHWI
        if all(v.same_as(u) for v, u in zip(w_vars, expect)):
            return layout
    return None


def _inline_prologue(sch, block) -> None:
    """Inline the elementwise blocks computed before the contraction that it does not
    read (a residual input's dequantize that FuseOps put in front) into their consumers
    in the epilogue."""
    root = sch.get_sblock(sch.mod["main"].body.block.name_hint)
    name = sch.get(block).name_hint
    for child in sch.get_child_blocks(root):
        if sch.get(child).name_hint == name:
            return
        written = sch.get(child).writes[0].source
        if any(r.source.same_as(written) for r in sch.get(block).reads):
            continue  # the input copy or a weight pack
        try:
            sch.compute_inline(child)
        except Exception:  # noqa: BLE001 - not inlinable: stays a loop nest of its own
            logger.debug("int8 prologue %s not inlined", sch.get(child).name_hint)


def _schedule_conv(sch, block, data: int, weight: int, intrinsic: DotIntrinsic,
                   tile: _Tile | None = None) -> bool:
    stmt = sch.get(block)
    layout = _conv_layout(stmt, weight)
    if layout is None:
        return False
    weight_shape = [int(d) for d in stmt.reads[weight].source.shape]
    out_channels = weight_shape[0]
    in_channels = weight_shape[1] if layout == "NCHW" else weight_shape[3]
    if out_channels % intrinsic.lanes or in_channels % intrinsic.reduce:
        return False
    out_w = int(stmt.writes[0].source.shape[3 if layout == "NCHW" else 2])
    lanes, red = intrinsic.lanes, intrinsic.reduce

    # layouts: input copy and accumulator NHWC, weights [OC/16, KH, KW, IC/4, 16, 4]
    producer = sch.get_producers(block)
    data_buffer = stmt.reads[data].source
    pad = [p for p in producer if sch.get(p).writes[0].source.same_as(data_buffer)]
    copy = pad[0] if pad else None
    if layout == "NCHW":
        # NCHW data: a transposing copy into NHWC, and the accumulator NHWC
        copy = copy or sch.cache_read(block, data, "global")
        sch.transform_layout(copy, ("write", 0), lambda a, b, h, w: (a, h, w, b))
        sch.transform_layout(block, ("write", 0), lambda a, b, h, w: (a, h, w, b))
        _pack_weight(sch, block, weight, lambda o, i, h, w: (
            o // lanes, h, w, i // red, o % lanes, i % red))
        ln, lf, ly, lx, lc, lky, lkx = sch.get_loops(block)
    else:
        _pack_weight(sch, block, weight, lambda o, h, w, i: (
            o // lanes, h, w, i // red, o % lanes, i % red))
        ln, ly, lx, lf, lky, lkx, lc = sch.get_loops(block)
    _inline_prologue(sch, block)

    if tile is None or not tile.fits(out_w, out_channels // lanes):
        tile = _heuristic_tile(out_w, out_channels // lanes)
    fo, fb, fi = sch.split(lf, [None, tile.blocks, lanes])
    co, ci = sch.split(lc, [None, red])
    xo, xi = sch.split(lx, [None, tile.rows])
    sch.reorder(ln, fo, ly, xo, lky, lkx, co, xi, fb, fi, ci)
    _tile(sch, block, sch.fuse(ln, fo, ly), xo, [xi, fb], lky, fi, intrinsic, tile.serial)
    if copy is not None:  # the input copy (padding, or NCHW -> NHWC)
        _parallel_copy(sch, copy, vectorize=layout == "NHWC")
    return True


def _parallel_copy(sch, copy, vectorize: bool) -> None:
    """The padded input copy: one parallel pass over its two outer loops; in NHWC the
    channels, innermost, as power-of-two vectors of 8 to 32 bytes (``vectorize_inner``
    with 16 byte lanes). A whole 96-byte channel vector under the padding's
    select came out of LLVM as one ``vpextrb``/``vpinsrb`` per byte (mobilenet_v2's
    56-pixel layers: that copy took 3/4 of the kernel's time)."""
    loops = sch.get_loops(copy)
    sch.parallel(sch.fuse(*loops[:2]))
    if vectorize and not vectorize_inner(sch, loops[-1], 16):
        logger.debug("int8 input copy not vectorized")  # an odd channel count: scalar copy


def _is_depthwise_nhwc(stmt, data: int, weight: int) -> bool:
    """A depthwise conv over NHWC data and a [C, KH, KW, 1] weight: block vars
    (n, y, x, c, ky, kx, r) with r of extent 1, the data read at channel c + r."""
    iters = stmt.iter_vars
    w_vars = _var_indices(stmt.reads[weight].region)
    if len(iters) != 7 or w_vars is None or int(iters[6].dom.extent) != 1:
        return False
    c, ky, kx, r = (iv.var for iv in (iters[3], iters[4], iters[5], iters[6]))
    if not all(v.same_as(u) for v, u in zip(w_vars, (c, ky, kx, r))):
        return False
    channel = stmt.reads[data].region[3].min
    return isinstance(channel, tirx.Add) and channel.a.same_as(c) and channel.b.same_as(r)


def _schedule_depthwise(sch, block, weight: int, intrinsic: DotIntrinsic) -> bool:
    """Depthwise int8 conv in NHWC: no dot product fits (one product per channel and
    tap), so channels are the vector (as many int32 lanes as the dot instruction's
    accumulator), a row of output pixels the independent accumulators, weights packed
    to [KH, KW, 1, C] so a tap's channels are one vector load."""
    stmt = sch.get(block)
    channels = int(stmt.writes[0].source.shape[3])
    lanes = intrinsic.lanes
    if channels % lanes:
        return False
    out_w = int(stmt.writes[0].source.shape[2])
    pad = [p for p in sch.get_producers(block) if not sch.get(p).annotations]
    _pack_weight(sch, block, weight, lambda c, h, w, r: (h, w, r, c))
    _inline_prologue(sch, block)
    ln, ly, lx, lf, lky, lkx, lr = sch.get_loops(block)
    fo, fi = sch.split(lf, [None, lanes])
    xo, xi = sch.split(lx, [None, _row_tile(out_w)])
    sch.reorder(ln, ly, fo, xo, lky, lkx, lr, xi, fi)
    outer = sch.fuse(ln, ly, fo)
    sch.parallel(outer)
    _epilogue_at(sch, block, xo)
    sch.unroll(xi)
    sch.vectorize(fi)
    init = sch.decompose_reduction(block, lky)
    sch.vectorize(sch.get_loops(init)[-1])
    for copy in pad:
        _parallel_copy(sch, copy, vectorize=True)
    return True


def _schedule_matmul(sch, block, data: int, weight: int, intrinsic: DotIntrinsic,
                     tile: _Tile | None = None) -> bool:
    stmt = sch.get(block)
    iters = [iv.var for iv in stmt.iter_vars]
    w_vars = _var_indices(stmt.reads[weight].region)
    a_vars = _var_indices(stmt.reads[data].region)
    if w_vars is None or a_vars is None or len(iters) < 3:
        return False
    j, k = iters[-2], iters[-1]  # (*batch, i, j, k)
    if not (w_vars[0].same_as(k) and w_vars[1].same_as(j) and a_vars[-1].same_as(k)):
        return False
    depth, columns = (int(d) for d in stmt.reads[weight].source.shape)
    lanes, red = intrinsic.lanes, intrinsic.reduce
    if columns % lanes or depth % red:
        return False
    rows = int(stmt.writes[0].source.shape[-2])
    _pack_weight(sch, block, weight, lambda kk, jj: (jj // lanes, kk // red, jj % lanes, kk % red))

    if tile is None or not tile.fits(rows, columns // lanes):
        tile = _heuristic_tile(rows, columns // lanes)
    *lb, li, lj, lk = sch.get_loops(block)
    jo, jb, ji = sch.split(lj, [None, tile.blocks, lanes])
    ko, ki = sch.split(lk, [None, red])
    io, ii = sch.split(li, [None, tile.rows])
    sch.reorder(*lb, io, jo, ko, ii, jb, ji, ki)
    outer = sch.fuse(*lb, io, jo)
    _tile(sch, block, outer, outer, [ii, jb], ko, ji, intrinsic, tile.serial)
    return True


def _tile(sch, block, outer, tile, accumulators, reduction, lanes, intrinsic: DotIntrinsic,
          serial: bool = False) -> None:
    """The common end of both schedules: parallel ``outer`` (unless ``serial``), the
    epilogue per ``tile``, the loops over the accumulators (rows, channel blocks)
    unrolled, their initialisation split off before ``reduction`` and vectorized, the
    dot product tensorized at ``lanes``."""
    if not serial:
        sch.parallel(outer)
    _epilogue_at(sch, block, tile)
    for loop in accumulators:
        sch.unroll(loop)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(lanes, intrinsic.name)
