"""Register-tiled multiply-accumulate: the micro-kernel behind conv2d, dense and matmul.

Pattern matched (``analyze_contraction``): a reduction block whose body is
``C[s...] = C[s...] + A[...] * B[...]`` (casts allowed) with

* an **N axis** ``n``: a spatial iter that indexes B and C but not A (the output channel
  of a conv, the column of a matmul). A grouped conv reads A at ``n // k``; that is
  allowed when the vector tile divides ``k``.
* an **M axis** ``m``: a spatial iter that indexes A and C but not B (output x of a conv,
  the row of a matmul); it becomes the unrolled register tile.

Schedule (``schedule_contraction``), the classic CPU GEMM/conv micro-kernel:

    parallel for (outer spatial tiles, fused):
        acc[mb, nb] = 0                                 # registers
        for r in reductions:                            # K, or (C_in, KH, KW)
            for mi in unroll(mb):
                acc[mi, :] += A[.., mi, r] * Bp[no, r, :]   # broadcast x vector FMA
        out[tile] = epilogue(acc)                       # bias/relu/clip/residual, fused

``B`` is packed to ``[N/nb, ..., nb]`` so the vector load is contiguous. When B is a
layout-free buffer (a weight constant, see Relax ``AttachAttrLayoutFreeBuffers``) the
packing is a ``meta_schedule.layout_rewrite_preproc`` block that
``SplitLayoutRewritePreproc`` + ``FoldConstant`` turn into a pre-packed constant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from tvm import ir, s_tir, tirx
from tvm.s_tir.schedule import LoopRV, SBlockRV

from .cpu_target import CpuInfo, cpu_info
from .rule_base import CpuRule, layout_free_params
from .sched_common import (
    MIN_PARALLEL_MACS,
    as_int,
    blocks_around,
    child_blocks,
    divisors,
    expr_vars,
    has_if_then_else,
    inline_prologue,
    is_reduction,
    is_spatial,
    iter_kinds,
    loop_extent,
    loops_bind_iters,
    schedule_spatial_block,
    spatial_and_reduction_iters,
    tile_epilogue,
    try_compute_inline,
    write_dtype_bits,
)

LAYOUT_REWRITE_ANN = "meta_schedule.layout_rewrite_preproc"
# Share of the vector registers given to accumulators; the rest holds the B vectors and
# the broadcast A values. 0.75 spilled (24 accumulators + 3 B registers on AVX-512).
ACCUMULATOR_SHARE = 0.625


@dataclass
class Contraction:
    """Roles of the iters and operands of a multiply-accumulate block."""

    block: SBlockRV
    a_buffer: object
    b_buffer: object
    a_read: int
    b_read: int
    n_iter: int
    n_dim_in_b: int
    n_divisor: int | None
    m_iter: int | None
    extents: list[int]
    kinds: str
    b_layout_free: bool
    spatial: list[int] = field(default_factory=list)
    reduction: list[int] = field(default_factory=list)
    # a second M axis (a conv's output y): rows of a two-dimensional register tile
    m2_iter: int | None = None

    @property
    def n_extent(self) -> int:
        return self.extents[self.n_iter]

    @property
    def m_extent(self) -> int:
        return 1 if self.m_iter is None else self.extents[self.m_iter]

    @property
    def m2_extent(self) -> int:
        return 1 if self.m2_iter is None else self.extents[self.m2_iter]


def _unwrap_load(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr if isinstance(expr, ir.expr.TensorLoad) else None


def _mac_operands(body):
    """(C store, A load, B load) of ``C = C + A * B``, or None."""
    if not isinstance(body, tirx.BufferStore):
        return None
    value = body.value
    if not isinstance(value, tirx.Add):
        return None
    acc, prod = value.a, value.b
    if _unwrap_load(acc) is None:
        acc, prod = prod, acc
    acc = _unwrap_load(acc)
    if acc is None or not acc.source.same_as(body.buffer):
        return None
    while isinstance(prod, tirx.Cast):
        prod = prod.value
    if not isinstance(prod, tirx.Mul):
        return None
    x, y = _unwrap_load(prod.a), _unwrap_load(prod.b)
    if x is None or y is None:
        return None
    return body, x, y


def _only_floordiv_uses(expr, var) -> int | None:
    """If every use of ``var`` in ``expr`` is ``var // k`` (constant k), return k; else None.

    Returns 0 when ``var`` does not occur at all.
    """
    found: list[int] = []

    def visit(e) -> bool:
        if isinstance(e, tirx.Var):
            return not e.same_as(var)
        if isinstance(e, tirx.FloorDiv) and isinstance(e.a, tirx.Var) and e.a.same_as(var):
            k = as_int(e.b)
            if k is None:
                return False
            found.append(k)
            return True
        if isinstance(e, tirx.Cast):
            return visit(e.value)
        if hasattr(e, "a") and hasattr(e, "b"):
            return visit(e.a) and visit(e.b)
        return True  # constants

    if not visit(expr):
        return None
    if not found:
        return 0
    if len(set(found)) != 1:
        return None
    return found[0]


def _read_index(block_stmt, buffer) -> int | None:
    for i, region in enumerate(block_stmt.reads):
        if region.source.same_as(buffer):
            return i
    return None


def _index_vars(indices) -> set:
    """The variables that a list of buffer indices uses."""
    return set().union(*(expr_vars(i) for i in indices))


def _stores_iters_in_order(store, ivars, spatial: list[int]) -> bool:
    """Whether each spatial iter indexes C exactly once, as the bare variable, in order."""
    return spatial == [
        next((j for j, v in enumerate(ivars) if idx.same_as(v)), -1) for idx in store.indices
    ]


def _group_size(a_indices, var) -> int | None:
    """k when A reads the N variable only as ``var // k`` (one k: a grouped conv), else
    None (``var`` must occur in ``a_indices``)."""
    uses = [_only_floordiv_uses(idx, var) for idx in a_indices]
    if any(u is None for u in uses):
        return None
    ks = {u for u in uses if u}
    if len(ks) != 1:
        return None
    return ks.pop()


@dataclass
class _NAxisChoice:
    """One reading of the block as ``C += A * B`` with N = iter ``n_iter``; ``score``
    ranks the readings (a packable B, no group, N a multiple of 4, a long N)."""

    score: tuple
    a: object  # the load of A
    b: object  # the load of B
    n_iter: int
    n_dim_in_b: int
    n_divisor: int | None
    m_iter: int | None
    m2_iter: int | None
    b_layout_free: bool


def _n_axis_choices(
    a, b, c_vars: set, ivars, extents: list[int], spatial: list[int], layout_free: list
) -> list[_NAxisChoice]:
    """Every spatial iter that can be the N axis with A = ``a`` and B = ``b``, the
    innermost output axis first, with the M axes that go with it."""
    a_vars = _index_vars(a.indices)
    b_vars = _index_vars(b.indices)
    b_free = any(b.source.same_as(p) for p in layout_free)
    choices = []
    for it in reversed(spatial):  # prefer the innermost output axis
        v = ivars[it]
        if v not in c_vars or v not in b_vars:
            continue
        dims = [d for d, idx in enumerate(b.indices) if idx.same_as(v)]
        if len(dims) != 1:
            continue
        divisor = None
        if v in a_vars:
            divisor = _group_size(a.indices, v)
            if divisor is None:
                continue
        # B must be packable (layout-free) or already contiguous along n
        if not b_free and dims[0] != len(b.indices) - 1:
            continue
        m_iters = [
            jt for jt in reversed(spatial)
            if jt != it and ivars[jt] in a_vars and ivars[jt] not in b_vars
            and extents[jt] > 1
        ]
        choices.append(_NAxisChoice(
            score=(b_free, divisor is None, extents[it] % 4 == 0, extents[it]),
            a=a, b=b, n_iter=it, n_dim_in_b=dims[0], n_divisor=divisor,
            m_iter=m_iters[0] if m_iters else None,
            m2_iter=m_iters[1] if len(m_iters) > 1 else None,
            b_layout_free=b_free,
        ))
    return choices


def analyze_contraction(
    sch: s_tir.Schedule, block: SBlockRV, layout_free: list
) -> Contraction | None:
    """Recognize a multiply-accumulate block and assign its N/M axes (None if no match)."""
    if not is_reduction(sch, block) or not loops_bind_iters(sch, block):
        return None
    stmt = sch.get(block)
    ops = _mac_operands(stmt.body)
    if ops is None:
        return None
    store, x, y = ops
    ivars = [iv.var for iv in stmt.iter_vars]
    extents = [as_int(iv.dom.extent) for iv in stmt.iter_vars]
    if any(e is None for e in extents):
        return None  # symbolic shapes: left to the fallback rule
    spatial, reduction = spatial_and_reduction_iters(sch, block)
    if not _stores_iters_in_order(store, ivars, spatial):
        return None
    c_vars = _index_vars(store.indices)
    choices = [
        choice
        for a, b in ((x, y), (y, x))
        if not a.source.same_as(b.source)
        for choice in _n_axis_choices(a, b, c_vars, ivars, extents, spatial, layout_free)
    ]
    if not choices:
        return None
    best = max(choices, key=lambda choice: choice.score)  # the first of equal scores
    a_read = _read_index(stmt, best.a.source)
    b_read = _read_index(stmt, best.b.source)
    if a_read is None or b_read is None:
        return None
    return Contraction(
        block=block, a_buffer=best.a.source, b_buffer=best.b.source, a_read=a_read,
        b_read=b_read, n_iter=best.n_iter, n_dim_in_b=best.n_dim_in_b,
        n_divisor=best.n_divisor, m_iter=best.m_iter, m2_iter=best.m2_iter, extents=extents,
        kinds=iter_kinds(sch, block), b_layout_free=best.b_layout_free, spatial=spatial,
        reduction=reduction,
    )


@dataclass(frozen=True)
class TileChoice:
    """Register tile: ``nb`` vector elements along N times ``mb`` rows along M (times
    ``yb`` rows along the second M axis, when there is one).

    ``n_padded`` is N rounded up to a multiple of ``nb`` (equal to N when ``nb`` divides
    it); the padded columns compute on zero weights and are never stored.
    """

    nb: int
    mb: int
    n_padded: int
    yb: int = 1  # rows of the second M axis in the tile (2-D tile: yb x mb x nb)
    # axis the epilogue stores along: "m" (contiguous output rows), "n" (the accumulator's
    # fast axis), "" = heuristic (m only for a power-of-two row tile of at least 4)
    store: str = ""

    @property
    def stores_along_m(self) -> bool:
        """Whether the epilogue stores along M: ``store`` when set, else the heuristic. The
        store side wants x innermost (contiguous rows), but only a power-of-two row tile
        of at least 4 makes a good vector; otherwise N (the accumulator's fast axis)."""
        if self.store:
            return self.store == "m"
        return self.mb >= 4 and self.mb & (self.mb - 1) == 0


def _row_tile(m_ext: int, max_mb: int) -> int:
    """Largest divisor of the M extent within the accumulator budget.

    A non-dividing tile would need a predicate inside the unrolled register tile, which
    measured 4x slower than a smaller dividing tile (3 x 32 for M = 111).
    """
    if m_ext <= 1:
        return 1
    fits = [d for d in divisors(m_ext) if d <= max_mb]
    return fits[-1] if fits else 1


def tile_options(
    info: Contraction, cpu: CpuInfo, dtype_bits: int = 32, can_pad: bool = True
) -> list[TileChoice]:
    """Every register tile worth trying, the heuristic choice first (empty: no vector tile).

    ``nb`` is a power of two (LLVM splits a ``<48 x float>`` into 128-bit pieces), up to
    two registers (four for a single row, GEMV), dividing N and the group size of a
    grouped conv. When only a narrow one divides N (N = 50, 1000, 10) N is padded to whole
    registers instead (only ``can_pad`` blocks: ``pad_einsum`` needs plain ``i, j, k``
    indices, which a conv's ``y * s + ry`` is not). ``mb`` divides M and fills the
    accumulator budget; the heuristic takes the (nb, mb) with the most independent
    accumulators. The other entries (smaller row tiles, other widths) are what a
    schedule-config search (``config_search``) times against it.
    """
    lanes = cpu.lanes(dtype_bits)
    n_ext = info.n_extent
    group = info.n_divisor
    m_ext = info.m_extent
    want_regs = 4 if m_ext == 1 else 2
    exact = 1
    while (
        exact * 2 <= want_regs * lanes
        and n_ext % (exact * 2) == 0
        and (group is None or group % (exact * 2) == 0)
    ):
        exact *= 2
    # (nb, padded N) candidates: exact power-of-two divisors, and padded whole registers
    options = []
    width = exact
    while width >= max(min(4, lanes), 1) and width >= min(exact, lanes):
        options.append((width, n_ext))
        width //= 2
    if exact < lanes and group is None and can_pad and n_ext >= max(lanes // 2, 4):

        def padded(w: int) -> int:
            return -(-n_ext // w) * w

        pads = [lanes * r for r in (1, 2, 4) if r <= want_regs]
        best = min(pads, key=lambda w: (round((padded(w) - n_ext) / padded(w), 3), -w))
        if exact < max(lanes // 2, 4) or (padded(best) - n_ext) / padded(best) <= 0.25:
            options = [(best, padded(best))] + ([(exact, n_ext)] if exact >= 4 else [])
    if not options:
        return []
    acc_budget = max(int(cpu.num_vector_regs * ACCUMULATOR_SHARE), 4)

    def score(nb: int, n_pad: int, mb: int):
        regs = -(-nb // lanes)
        accs = min(mb * regs, acc_budget)
        util = nb / (regs * lanes) * (n_ext / n_pad)
        return (min(accs, 8 if m_ext > 1 else want_regs), util >= 0.7, accs, util, nb)

    ranked = []
    for nb, n_pad in options:
        regs = -(-nb // lanes)
        best_mb = _row_tile(m_ext, max(acc_budget // regs, 1))
        ranked.append((score(nb, n_pad, best_mb), TileChoice(nb, best_mb, n_pad)))
    ranked.sort(key=lambda item: item[0], reverse=True)
    chosen = [tile for _, tile in ranked]
    # alternatives: dividing row tiles (times dividing rows of the second M axis) with at
    # least 4 accumulators within the register budget, the fullest first
    alternatives = []
    y_ext = info.m2_extent
    for nb, n_pad in options:
        regs = -(-nb // lanes)
        for mb in divisors(m_ext) if m_ext > 1 else [1]:
            for yb in divisors(y_ext) if y_ext > 1 else [1]:
                tile = TileChoice(nb, mb, n_pad, yb)
                accs = yb * mb * regs
                if accs <= acc_budget and (accs >= 4 or m_ext == 1) and tile not in chosen:
                    alternatives.append((-accs, yb, tile))
    alternatives.sort(key=lambda item: item[:2])
    # the heuristic tile storing along the other axis (rows of 2+ columns only)
    first = chosen[0]
    if first.mb >= 2:
        chosen.insert(1, TileChoice(first.nb, first.mb, first.n_padded, first.yb,
                                    "n" if first.stores_along_m else "m"))
    return chosen + [tile for _, _, tile in alternatives]


def tile_config(tile: TileChoice) -> dict:
    """The JSON form of a tile, as ``choose_tile(config=...)`` takes it back."""
    config = {"nb": tile.nb, "mb": tile.mb, "n_padded": tile.n_padded}
    if tile.yb > 1:
        config["yb"] = tile.yb
    if tile.store:
        config["store"] = tile.store
    return config


def choose_tile(
    info: Contraction, cpu: CpuInfo, dtype_bits: int = 32, can_pad: bool = True,
    config: dict | None = None,
) -> TileChoice | None:
    """The register tile: ``config`` (``{"nb", "mb", "n_padded"}``) when it is one of
    ``tile_options``, else the heuristic choice. None when N has no vector tile."""
    options = tile_options(info, cpu, dtype_bits, can_pad)
    if not options:
        return None
    if config:
        wanted = TileChoice(int(config.get("nb", 0)), int(config.get("mb", 0)),
                            int(config.get("n_padded", 0)), int(config.get("yb", 1)),
                            str(config.get("store", "")))
        if wanted in options:
            return wanted
    return options[0]


def _permute_n_last(ndim: int, n_dim: int):
    order = [d for d in range(ndim) if d != n_dim] + [n_dim]
    return lambda *idx: [idx[d] for d in order]


def _pack_b(sch: s_tir.Schedule, info: Contraction, nb: int, pad_block=None) -> None:
    """Repack the layout-free B to ``[.., n // nb, .., n % nb]`` via a preproc block.

    ``pad_block`` is the block ``pad_einsum`` made to zero-pad B; it becomes the packing
    block itself (a second copy would not be splittable by SplitLayoutRewritePreproc).
    """
    block = info.block
    ndim = len(sch.get(block).reads[info.b_read].region)
    d = info.n_dim_in_b
    if pad_block is None:
        pad_block = sch.cache_read(block, info.b_read, "global")
    sch.annotate(pad_block, LAYOUT_REWRITE_ANN, True)

    def index_map(*idx):
        return [idx[d] // nb] + [idx[i] for i in range(ndim) if i != d] + [idx[d] % nb]

    sch.transform_layout(
        block, ("read", info.b_read), tirx.IndexMap.from_func(index_map, ndim=ndim)
    )


def _loop_feeding_dim(sch: s_tir.Schedule, block, loops, dim: int):
    """The loop among ``loops`` whose variable drives write index ``dim`` of ``block``."""
    realize = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block)
    stmt = sch.get(block)
    target = expr_vars(stmt.writes[0].region[dim].min)
    ivars = [iv.var for iv in stmt.iter_vars]
    for lp in loops:
        lv = sch.get(lp).loop_var
        for var, value in zip(ivars, realize.iter_values):
            if var in target and lv in expr_vars(value):
                return lp
    return None


def _macs(info: Contraction) -> int:
    macs = 1
    for ext in info.extents:
        macs *= ext
    return macs


def runs_parallel(info: Contraction, cpu: CpuInfo) -> bool:
    """Whether the heuristic spreads the kernel over threads (enough work for the fork)."""
    return cpu.num_cores > 1 and _macs(info) >= MIN_PARALLEL_MACS


@dataclass
class _TileLoops:
    """The main block's loops once tiled (``_tile_loops``): the outer spatial tiles fused
    into one, the reductions, then the register tile (``yi`` x ``mi`` unrolled rows,
    ``ni`` the vector along N)."""

    reductions: list[LoopRV]
    yi: LoopRV | None
    mi: LoopRV | None
    ni: LoopRV
    fused: LoopRV | None = None

    @property
    def inner(self) -> list[LoopRV]:
        return [lp for lp in (self.yi, self.mi) if lp is not None] + [self.ni]


def _pad_n(sch: s_tir.Schedule, info: Contraction, tile: TileChoice):
    """Pad N to ``tile.n_padded`` (``pad_einsum``: zero weights in the padded columns).

    Returns the blocks before and after the main block as they are now, and the block
    that pads B (None if none); when B is layout-free that block is left out of the
    prologue: ``_pack_b`` turns it into the packing block."""
    main = info.block
    producers_before = {sch.get(b).name_hint for b in sch.get_producers(main)}
    pads = [1] * len(info.extents)
    pads[info.n_iter] = tile.nb
    sch.pad_einsum(main, pads)
    new_producers = [
        b for b in sch.get_producers(main) if sch.get(b).name_hint not in producers_before
    ]
    b_pad = None
    for b in new_producers:
        if sch.get(b).writes[0].source.same_as(sch.get(main).reads[info.b_read].source):
            b_pad = b
    prologue, epilogue = blocks_around(sch, main)
    if info.b_layout_free:
        prologue = [
            b for b in prologue if b_pad is None or not sch.get(b).same_as(sch.get(b_pad))
        ]
    return prologue, epilogue, b_pad


def _tile_loops(sch: s_tir.Schedule, info: Contraction, tile: TileChoice) -> _TileLoops:
    """Split N, M (and the second M axis) by the tile and order the loops: outer spatial
    tiles (fused), reductions, then mi (unrolled) x ni (vectorized)."""
    loops = sch.get_loops(info.block)
    no, ni = sch.split(loops[info.n_iter], [None, tile.nb])
    if info.m_iter is not None and tile.mb > 1:
        mo, mi = sch.split(loops[info.m_iter], [None, tile.mb])
    else:
        mo, mi = (loops[info.m_iter] if info.m_iter is not None else None), None
    yo, yi = None, None
    if info.m2_iter is not None and tile.yb > 1:
        yo, yi = sch.split(loops[info.m2_iter], [None, tile.yb])
    outer = [no]
    for it in info.spatial:
        if it == info.n_iter:
            continue
        if it == info.m_iter:
            outer.append(mo)
        elif it == info.m2_iter and yo is not None:
            outer.append(yo)
        else:
            outer.append(loops[it])
    outer = [lp for lp in outer if lp is not None]
    tiled = _TileLoops([loops[it] for it in info.reduction], yi, mi, ni)
    sch.reorder(*outer, *tiled.reductions, *tiled.inner)
    tiled.fused = sch.fuse(*outer) if len(outer) > 1 else outer[0]
    return tiled


def _accumulate_in_registers(
    sch: s_tir.Schedule, info: Contraction, epi, tiled: _TileLoops
) -> int:
    """Put the accumulator tile (and the epilogue) under the fused outer loop with N
    innermost, unroll the rows, vectorize N; returns N's dimension in the output."""
    main = info.block
    sch.reverse_compute_at(epi, tiled.fused)
    c_ndim = len(sch.get(main).writes[0].region)
    n_dim_c = info.spatial.index(info.n_iter)
    sch.transform_layout(
        main,
        ("write", 0),
        tirx.IndexMap.from_func(_permute_n_last(c_ndim, n_dim_c), ndim=c_ndim),
    )
    for lp in (tiled.yi, tiled.mi):
        if lp is not None:
            sch.unroll(lp)
    sch.vectorize(tiled.ni)
    init = sch.decompose_reduction(main, tiled.reductions[0])
    del init  # its loops are copies of (mi, ni): vectorized/unrolled already
    return n_dim_c


def _vectorize_epilogue(
    sch: s_tir.Schedule, info: Contraction, tile: TileChoice, cpu: CpuInfo, epi,
    tiled: _TileLoops, n_dim_c: int,
) -> None:
    """Vectorize the innermost loop of the epilogue over the tile, along M or along N
    (``TileChoice.stores_along_m``)."""
    epi_loops = sch.get_loops(epi)
    fused_depth = len(sch.get_loops(info.block)) - len(tiled.reductions) - len(tiled.inner)
    tile_loops = epi_loops[fused_depth:]
    if not tile.stores_along_m and len(tile_loops) >= 2:
        n_loop_e = _loop_feeding_dim(sch, epi, tile_loops, n_dim_c)
        if n_loop_e is not None and not n_loop_e.same_as(tile_loops[-1]):
            order = [lp for lp in tile_loops if not lp.same_as(n_loop_e)] + [n_loop_e]
            sch.reorder(*order)
            tile_loops = order
    if tile_loops:
        ext = loop_extent(sch, tile_loops[-1])
        if ext is not None and 2 <= ext <= 4 * cpu.lanes(write_dtype_bits(sch, epi)):
            sch.vectorize(tile_loops[-1])


def schedule_contraction(
    sch: s_tir.Schedule, info: Contraction, tile: TileChoice, cpu: CpuInfo,
    parallel: bool = True,
) -> None:
    """Apply the register-tiled micro-kernel to the whole function around ``info.block``
    (``parallel=False``: one thread even when the heuristic would use all)."""
    prologue, epilogue = blocks_around(sch, info.block)
    if not all(is_spatial(sch, b) for b in prologue + epilogue):
        raise ValueError("contraction: another reduction in the function")
    # 0. N not a multiple of the vector tile: pad the iteration space (zero weights)
    b_pad = None
    if tile.n_padded != info.n_extent:
        prologue, epilogue, b_pad = _pad_n(sch, info, tile)
    # 1. prologue: inline cheap producers (reshape, transpose), keep padding materialized
    kept_prologue = inline_prologue(sch, prologue)
    # 2. epilogue: one elementwise block fed by the accumulator tile (a consumer that is
    #    not pointwise, e.g. a Pad, runs after the kernel as a loop nest of its own)
    epi, epi_rest = tile_epilogue(sch, info.block, epilogue)
    # 3. pack B so that the N tile is contiguous
    if info.b_layout_free:
        _pack_b(sch, info, tile.nb, b_pad)
    # 4. tile; the outer tiles run in parallel when the kernel is worth the fork
    tiled = _tile_loops(sch, info, tile)
    if parallel and runs_parallel(info, cpu) and (loop_extent(sch, tiled.fused) or 0) > 1:
        sch.parallel(tiled.fused)
    # 5. accumulator tile lives under the parallel loop, N innermost
    n_dim_c = _accumulate_in_registers(sch, info, epi, tiled)
    # 6. epilogue over the tile: vectorize its innermost loop
    _vectorize_epilogue(sch, info, tile, cpu, epi, tiled, n_dim_c)
    # 7. padding / other producers and non-pointwise consumers: parallel, vectorized
    for b in kept_prologue + epi_rest:
        schedule_spatial_block(sch, b, cpu)


def has_window(sch: s_tir.Schedule, info: Contraction) -> bool:
    """True when A is read at ``spatial*stride + reduction`` (a sliding window: a conv)."""
    stmt = sch.get(info.block)
    ivars = [iv.var for iv in stmt.iter_vars]
    spatial = {ivars[i] for i in info.spatial}
    red = {ivars[i] for i in info.reduction}
    for region in stmt.reads[info.a_read].region:
        vs = expr_vars(region.min)
        if vs & spatial and vs & red:
            return True
    return False


def _inline_weight_transforms(sch: s_tir.Schedule, main) -> bool:
    """Inline the plain copies (no padding condition) that feed ``main``; True if any."""
    inlined = False
    for block in sch.get_producers(main):
        if is_spatial(sch, block) and not has_if_then_else(sch, block):
            inlined = try_compute_inline(sch, block) or inlined
    return inlined


class ContractionRule(CpuRule):
    """A rule around the micro-kernel: one multiply-accumulate block, with or without a
    sliding window (``sliding_window``), ``spatial_rank`` output axes (None: any), and N
    padded to whole registers when ``can_pad``. Knob: the register tile."""

    sliding_window = False
    spatial_rank: int | None = None
    can_pad = True

    def _analyze(self, sch: s_tir.Schedule, func: tirx.PrimFunc) -> Contraction | None:
        mains = [b for b in child_blocks(sch) if is_reduction(sch, b)]
        if len(mains) != 1:
            return None
        info = analyze_contraction(sch, mains[0], layout_free_params(func))
        if info is None and _inline_weight_transforms(sch, mains[0]):
            # e.g. conv_transpose: its flipped kernel is a copy of the weight; read
            # through the copy, B is the (packable) weight itself
            info = analyze_contraction(sch, mains[0], layout_free_params(func))
        if info is None or has_window(sch, info) != self.sliding_window:
            return None
        if self.spatial_rank is not None and len(info.spatial) != self.spatial_rank:
            return None
        return info

    def schedule(self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo) -> bool:
        return self.schedule_config(sch, func, cpu, None)

    def schedule_config(self, sch, func, cpu, config) -> bool:
        info = self._analyze(sch, func)
        if info is None:
            return False
        tile = choose_tile(info, cpu, can_pad=self.can_pad, config=config)
        if tile is None:
            return False
        serial = bool(config and config.get("serial"))
        schedule_contraction(sch, info, tile, cpu, parallel=not serial)
        return True

    def configs(self, func: tirx.PrimFunc, target) -> list[dict]:
        """Register tiles, the heuristic first; right after it the heuristic tile on one
        thread (``"serial"``) when the heuristic forks: for a small kernel the fork-join
        can cost more than the second core saves."""
        info = self._analyze(s_tir.Schedule(func), func)
        if info is None:
            return []
        cpu = cpu_info(target)
        configs = [tile_config(t) for t in tile_options(info, cpu, can_pad=self.can_pad)]
        if configs and runs_parallel(info, cpu):
            configs.insert(1, {**configs[0], "serial": True})
        return configs
