"""Small TensorIR schedule helpers shared by the CPU rules.

Nothing here decides a strategy: these functions answer questions about blocks and
loops (is it spatial, what does it read, how long is this loop) and perform the few
mechanical steps every rule repeats (inline the elementwise chain, vectorize the
innermost loop with a width that divides it, parallelize a loop prefix).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import tvm
from tvm import s_tir, tirx
from tvm.ir.expr import TensorLoad  # what tirx.BufferLoad builds in TVM 0.27
from tvm.s_tir.schedule import LoopRV, SBlockRV

from .cpu_target import CpuInfo

logger = logging.getLogger(__name__)

_has_if_then_else = tvm.get_global_func("s_tir.schedule.HasIfThenElse")

# Below this much work a parallel loop costs more than it saves. A fork/join costs a few
# microseconds on an idle machine, but when another process holds the core of a worker
# thread, TVM's static split makes the whole kernel wait for that worker's next time
# slice (milliseconds). Elementwise/reduction work counts elements, multiply-accumulate
# kernels count MACs (vectorized, about 16 per cycle).
MIN_PARALLEL_ELEMENTS = 32768
MIN_PARALLEL_MACS = 1 << 20


def as_int(expr) -> int | None:
    """``expr`` as a Python int when it is a constant, else None."""
    if isinstance(expr, int):
        return expr
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    return None


def loop_extent(sch: s_tir.Schedule, loop: LoopRV) -> int | None:
    """Constant extent of a loop, or None when it is symbolic."""
    return as_int(sch.get(loop).extent)


def root_block(sch: s_tir.Schedule) -> SBlockRV:
    """The root block of the schedule's ``main`` function."""
    return sch.get_sblock(sch.mod["main"].body.block.name_hint)


def child_blocks(sch: s_tir.Schedule) -> list[SBlockRV]:
    """Blocks directly under the root block, in program order."""
    return list(sch.get_child_blocks(root_block(sch)))


def iter_kinds(sch: s_tir.Schedule, block: SBlockRV) -> str:
    """One letter per block iter: S (spatial), R (reduction), O (other)."""
    kinds = {tirx.IterVar.DataPar: "S", tirx.IterVar.CommReduce: "R"}
    return "".join(kinds.get(iv.iter_type, "O") for iv in sch.get(block).iter_vars)


def spatial_and_reduction_iters(
    sch: s_tir.Schedule, block: SBlockRV
) -> tuple[list[int], list[int]]:
    """Positions of the block's spatial (S) iters and of its reduction (R) iters."""
    kinds = iter_kinds(sch, block)
    spatial = [i for i, k in enumerate(kinds) if k == "S"]
    return spatial, [i for i, k in enumerate(kinds) if k == "R"]


def blocks_around(sch: s_tir.Schedule, block: SBlockRV) -> tuple[list[SBlockRV], list[SBlockRV]]:
    """The root-level blocks before ``block`` and those after it, in program order."""
    blocks = child_blocks(sch)
    pos = next(i for i, b in enumerate(blocks) if sch.get(b).same_as(sch.get(block)))
    return blocks[:pos], blocks[pos + 1 :]


def is_spatial(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """True when every block iter is data-parallel."""
    return set(iter_kinds(sch, block)) <= {"S"}


def is_reduction(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """True for a block with an init statement and only S/R iters, at least one R."""
    kinds = iter_kinds(sch, block)
    return "R" in kinds and "O" not in kinds and sch.get(block).init is not None


def has_if_then_else(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """True when the block body selects with if_then_else (padding, masking)."""
    return bool(_has_if_then_else(sch.get(block)))


def write_dtype_bits(sch: s_tir.Schedule, block: SBlockRV) -> int:
    """Bit width of the element type the block writes (32 when unknown)."""
    writes = sch.get(block).writes
    if not writes:
        return 32
    return tvm.runtime.DataType(writes[0].source.dtype).bits


def expr_vars(expr) -> set:
    """The free variables of a TIR expression."""
    return set(tirx.analysis.undefined_vars(expr))


def loops_bind_iters(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """True when the block's loops map 1:1, in order, onto its iters (the legalized form)."""
    loops = sch.get_loops(block)
    realize = sch.get(block)
    binding = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")(sch, block).iter_values
    if len(loops) != len(realize.iter_vars) or len(binding) != len(loops):
        return False
    for loop, value in zip(loops, binding):
        if not value.same_as(sch.get(loop).loop_var):
            return False
    return True


# Inlining copies a producer's expression into every load of it in its consumers. A
# consumer that loads it k times (TOPI's fast_exp loads its input 29 times) multiplies
# the expression, and a chain of such ops grows exponentially (5 Sigmoids: > 5 GiB of
# compiler memory). Above this many copied nodes the producer stays a buffer, so the
# growth is linear in the chain length. A conv's bias add under a SiLU copies ~300
# nodes and one Sigmoid inlined into the next ~15000.
MAX_INLINE_DUPLICATION = 2048


_CHILD_FIELDS = ("a", "b", "value", "args", "indices", "condition", "true_value",
                 "false_value", "body", "seq")


def _tir_nodes(node) -> Iterator:
    """Every expression and statement node of a TIR tree.

    TVM 0.27 has no Python-side TIR visitor, so the tree is walked through the child
    fields that expressions and the statements of a block body have."""
    stack = [node]
    while stack:
        n = stack.pop()
        if isinstance(n, (list, tuple)) or type(n).__name__ == "Array":
            stack.extend(n)
            continue
        if not isinstance(n, (tvm.ir.expr.Expr, tirx.Stmt)):
            continue
        yield n
        for name in _CHILD_FIELDS:
            child = getattr(n, name, None)
            if child is not None:
                stack.append(child)


def _count_nodes(node, buffer=None) -> int:
    """Nodes of a TIR statement/expression tree, or only its loads of ``buffer``."""
    if buffer is None:
        return sum(1 for _ in _tir_nodes(node))
    return sum(1 for n in _tir_nodes(node)
               if isinstance(n, TensorLoad) and n.source.same_as(buffer))


def _has_modular_load(node) -> bool:
    """Whether a block body loads with a floordiv/floormod index (a circular pad's wrap,
    a reshape's unflattening)."""
    return any(isinstance(n, (tirx.FloorMod, tirx.FloorDiv)) for n in _tir_nodes(node))


def duplicates_modular_loads(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """True when inlining ``block`` would copy a load with a floordiv/floormod index to
    more than one place (its consumers read the block's value more than once in all).

    TVM 0.27 then computes wrong values once the consumer's outer loops are fused: Pad
    (wrap) > Sigmoid or Erf over [1, 3, 23, 16] (the fast exp/erf read their input ~20
    times) gave errors up to 1.99 and NaN, while the same function unfused, or with the
    pad kept as its own block, was exact (found by the fuzzer; the trigger in TVM's
    lowering was not isolated)."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1 or not _has_modular_load(stmt.body):
        return False
    buffer = stmt.writes[0].source
    return sum(_count_nodes(sch.get(c).body, buffer) for c in sch.get_consumers(block)) > 1


def inline_duplication(sch: s_tir.Schedule, block: SBlockRV) -> int:
    """How many expression nodes inlining ``block`` into its consumers would copy."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return 0
    buffer = stmt.writes[0].source
    size = _count_nodes(stmt.body)
    extra = 0
    for consumer in sch.get_consumers(block):
        loads = _count_nodes(sch.get(consumer).body, buffer)
        extra += max(loads - 1, 0) * size
    return extra


def try_compute_inline(sch: s_tir.Schedule, block: SBlockRV) -> bool:
    """compute_inline that reports failure instead of raising; refuses (False) when it
    would copy more than ``MAX_INLINE_DUPLICATION`` expression nodes, or copy a
    floordiv/floormod-indexed load (``duplicates_modular_loads``)."""
    if inline_duplication(sch, block) > MAX_INLINE_DUPLICATION or \
            duplicates_modular_loads(sch, block):
        return False
    try:
        sch.compute_inline(block)
        return True
    except Exception:  # noqa: BLE001 - the schedule state is unchanged on failure
        return False


def inline_prologue(sch: s_tir.Schedule, prologue: list[SBlockRV]) -> list[SBlockRV]:
    """Inline the producers before an anchor block, last first; the ones kept (padding
    with ``if_then_else``, blocks that do not inline) are returned in program order."""
    kept = []
    for block in reversed(prologue):
        if has_if_then_else(sch, block) or not try_compute_inline(sch, block):
            kept.append(block)
    kept.reverse()
    return kept


def inline_epilogue_chain(sch: s_tir.Schedule, blocks: list[SBlockRV]) -> list[SBlockRV]:
    """Inline a chain of elementwise epilogue blocks into its last member.

    ``blocks`` are the spatial blocks that follow an anchor block, in program order.
    Every block but the ones writing function outputs is inlined forward into its
    consumer; what remains (normally one block) is returned.
    """
    remaining = []
    for i, block in enumerate(blocks):
        if i < len(blocks) - 1 and try_compute_inline(sch, block):
            continue
        remaining.append(block)
    return remaining


def reads_pointwise(sch: s_tir.Schedule, anchor: SBlockRV, block: SBlockRV) -> bool:
    """True when every element ``block`` reads from the anchor's output lies inside the
    anchor's output domain and is read as is: each index is one of the block's own iters
    (distinct, with an extent within the dimension) or a constant inside the dimension (a
    broadcast, as in a squeeze-excite ``x * gate[n, c, 0, 0]``), and every read of it
    uses the same indices.

    Only such a consumer can be computed at a tile of the anchor
    (``reverse_compute_at``): a consumer that reads the output shifted or guarded (a Pad
    after a conv: ``if 1 <= y < 11: conv[y - 1]``) or reshaped has elements that no tile
    produces, and TVM would leave them unwritten (uninitialised memory in the output).
    """
    out = sch.get(anchor).writes[0].source
    stmt = sch.get(block)
    if has_if_then_else(sch, block):
        return False
    ivars = [iv.var for iv in stmt.iter_vars]
    extents = [as_int(iv.dom.extent) for iv in stmt.iter_vars]
    reads = [r for r in stmt.reads if r.source.same_as(out)]
    if not reads:
        return False
    mappings = set()
    for region in reads:
        index_map = []  # per dimension: ("iter", position) or ("const", value)
        for rng, dim in zip(region.region, out.shape):
            dim = as_int(dim)
            if as_int(rng.extent) != 1 or dim is None:
                return False
            index = as_int(rng.min)
            if index is not None:
                if not 0 <= index < dim:
                    return False
                index_map.append(("const", index))
                continue
            pos = [i for i, v in enumerate(ivars) if rng.min.same_as(v)]
            if len(pos) != 1 or ("iter", pos[0]) in index_map or extents[pos[0]] is None \
                    or extents[pos[0]] > dim:
                return False
            index_map.append(("iter", pos[0]))
        mappings.add(tuple(index_map))
    # two different reads (x[i, j] + x[j, i]) need elements of tiles not produced yet
    return len(mappings) == 1


def tile_epilogue(
    sch: s_tir.Schedule, anchor: SBlockRV, blocks: list[SBlockRV]
) -> tuple[SBlockRV, list[SBlockRV]]:
    """Split the blocks after an anchor into (the one to compute at the anchor's tile,
    those left at the root, to be scheduled on their own).

    The elementwise chain is inlined into its last block; that block is fused into the
    tile only when it ``reads_pointwise`` from the anchor, otherwise the tile gets a plain
    write-back block and the rest stays a separate loop nest. Raises ValueError for more
    than one epilogue output.
    """
    rest = inline_epilogue_chain(sch, blocks)
    if len(rest) > 1:
        raise ValueError("more than one epilogue output")
    if rest and reads_pointwise(sch, anchor, rest[0]):
        return rest[0], []
    return sch.cache_write(anchor, 0, "global"), rest


def divisors(n: int) -> list[int]:
    """All positive divisors of n, ascending."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d * d != n:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def pick_vector_width(extent: int, lanes: int) -> int:
    """A power-of-two vector width that divides ``extent`` (0 when none is worth it).

    Widths are powers of two up to two registers: LLVM splits ``<48 x float>`` or
    ``<28 x float>`` into 128-bit pieces and the kernel slows down several times. A
    divisor narrower than half a register (or 4 lanes) does not count.
    """
    cap = 2 * lanes
    width = 1
    while width * 2 <= cap and extent % (width * 2) == 0:
        width *= 2
    if width == extent and width >= 2:
        return width
    return width if width >= max(lanes // 2, 4) else 0


def vectorize_inner(sch: s_tir.Schedule, loop: LoopRV, lanes: int) -> bool:
    """Vectorize the innermost loop ``loop`` of a block with a power-of-two width.

    The width divides the extent (``pick_vector_width``). An extent with no such divisor
    (47, 49) stays scalar: a split would leave a predicate that makes TVM scalarize the
    whole vector loop, and ``loop_partition`` (vector body + scalar tail) emits blocks
    that share iter vars, which TVM's well-formedness check rejects. Returns True when
    the loop was vectorized.
    """
    extent = loop_extent(sch, loop)
    if extent is None or extent < 2:
        return False
    width = pick_vector_width(extent, lanes)
    if not width:
        return False
    if width != extent:
        _, loop = sch.split(loop, [None, width])
    sch.vectorize(loop)
    return True


def parallelize_prefix(
    sch: s_tir.Schedule, loops: list[LoopRV], cpu: CpuInfo, work: int
) -> LoopRV | None:
    """Fuse a prefix of ``loops`` into one loop and mark it parallel.

    ``work`` is the number of elements the block computes; tiny blocks, or a single core,
    stay serial. The prefix grows until it has at least 4 chunks per core. Returns the
    fused loop (parallel or not), or None when ``loops`` is empty.
    """
    if not loops:
        return None
    extents = [loop_extent(sch, lp) for lp in loops]
    prefix, total = [], 1
    for lp, ext in zip(loops, extents):
        if ext is None:
            break
        prefix.append(lp)
        total *= ext
        if total >= 4 * cpu.num_cores:
            break
    if not prefix:
        return None
    fused = sch.fuse(*prefix) if len(prefix) > 1 else prefix[0]
    if cpu.num_cores > 1 and work >= MIN_PARALLEL_ELEMENTS and total > 1:
        sch.parallel(fused)
    return fused


def schedule_spatial_block(
    sch: s_tir.Schedule, block: SBlockRV, cpu: CpuInfo, vectorize: bool = True
) -> None:
    """Parallelize the outer loops and vectorize the innermost loop of a spatial block.

    Padding blocks are split first with ``decompose_padding`` (a vectorized fill and a
    vectorized interior copy). Other if_then_else bodies (concat, masks) are vectorized as
    they are: TVM scalarizes a select whose condition varies along the vector.
    """
    loops = sch.get_loops(block)
    if not loops:
        return
    if vectorize and has_if_then_else(sch, block):
        try:
            fill = sch.decompose_padding(block, loops[0])
            schedule_spatial_block(sch, fill, cpu, vectorize=True)
            loops = sch.get_loops(block)
        except Exception:  # noqa: BLE001 - not a padding pattern
            loops = sch.get_loops(block)
    work = 1
    for lp in loops:
        work *= loop_extent(sch, lp) or 1024
    lanes = cpu.lanes(write_dtype_bits(sch, block))
    inner = loops[-1]
    outer = loops[:-1]
    if not outer:  # a single loop: split it so that it can be both parallel and vector
        extent = loop_extent(sch, inner)
        chunk = 16 * lanes
        if extent is not None and extent >= 4 * chunk and extent % chunk == 0:
            outer_loop, inner = sch.split(inner, [None, chunk])
            outer = [outer_loop]
    parallelize_prefix(sch, outer, cpu, work)
    if vectorize:
        try:
            vectorize_inner(sch, inner, lanes)
        except Exception:  # noqa: BLE001 - e.g. a loop the vectorizer cannot take
            logger.debug("inner loop of %s left scalar", sch.get(block).name_hint)
