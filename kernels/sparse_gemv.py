"""Block-sparse (BSR) weight x a few activation rows (GEMV: batch 1, classifiers).

``Y[m, n] = sum_k X[m, k] * W[n, k]`` like ``sparse_matmul``, for activations with few
rows (fewer than that kernel's 16-row vector). With one row there is nothing to
vectorise along the rows, so this variant vectorises along the block instead: for each
block row and each activation row it keeps two R x C accumulators in registers (the
row's blocks alternate between them, so the FMAs do not wait on each other), adds
``data[b] * X[m, block columns]`` for every nonzero block (a vector along C, or along R
for column blocks like 16x1, where C = 1: then X is broadcast), and sums the C lanes at
the end. Block rows are spread over the threads. X is read in place (no transpose).

int8 blocks would keep the same walk with an int32 accumulator (README, "Sparse kernels
in compiled code").
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

PARALLEL_CHUNKS = 64  # parallel tasks per kernel (more than the threads, few allocations)


def _add_block(rows: int, cols: int):
    """acc += data[b] * X[m, the block's columns], vectorised along C (1x8, 4x4) or, for
    column blocks (16x1), along R with X broadcast."""
    along_c = cols >= rows
    outer, inner = (rows, cols) if along_c else (cols, rows)

    @T.macro
    def add_block(acc, a, data, x, mm, b, column):
        for i in T.unroll(outer):
            for j in T.vectorized(inner):
                acc[a, i if along_c else j, j if along_c else i] = (
                    acc[a, i if along_c else j, j if along_c else i]
                    + data[b, i if along_c else j, j if along_c else i]
                    * x[mm, column * cols + (j if along_c else i)])

    return add_block


def bsr_gemv(m: int, k: int, n: int, rows: int, cols: int, nnz: int) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``(X [m, k], data, indices, indptr) -> Y [m, n]``."""
    block_rows = n // rows
    chunks = min(block_rows, PARALLEL_CHUNKS)
    per_chunk = -(-block_rows // chunks)

    add_block = _add_block(rows, cols)

    @T.macro
    def block_row(acc, data, indices, indptr, x, y, mm, v):
        # two accumulators take the row's blocks in turn: one would chain every FMA on
        # the one before (latency-bound)
        for a in T.unroll(2):
            for r in T.unroll(rows):
                for c in T.vectorized(cols):
                    acc[a, r, c] = T.float32(0)
        for pair in range((indptr[v + 1] - indptr[v]) // 2):
            for a in T.unroll(2):
                add_block(acc, a, data, x, mm, indptr[v] + pair * 2 + a,
                          indices[indptr[v] + pair * 2 + a])
        for _ in range((indptr[v + 1] - indptr[v]) % 2):
            add_block(acc, 0, data, x, mm, indptr[v + 1] - 1, indices[indptr[v + 1] - 1])
        for r in T.unroll(rows):
            y[mm, v * rows + r] = T.float32(0)
            for c in T.unroll(cols):
                y[mm, v * rows + r] = y[mm, v * rows + r] + acc[0, r, c] + acc[1, r, c]

    @T.prim_func(private=True, s_tir=True)
    def gemv(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnz, rows, cols), "float32"),
             indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
             y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for chunk in T.parallel(chunks):
            # one opaque block per chunk of block rows: the loop over a row's nonzero
            # blocks has data-dependent bounds, and the accumulator is allocated once per
            # chunk (TVM allocates it from the workspace, a call, not on the stack)
            with T.sblock("block_rows"):
                vc = T.axis.spatial(chunks, chunk)
                T.reads(indptr[0:block_rows + 1], indices[0:nnz],
                        data[0:nnz, 0:rows, 0:cols], x[0:m, 0:k])
                T.writes(y[0:m, 0:n])
                acc = T.sblock_alloc_buffer((2, rows, cols), "float32", scope="local")
                for step in range(per_chunk):
                    for mm in range(m * (vc * per_chunk + step < block_rows)):
                        block_row(acc, data, indices, indptr, x, y, mm, vc * per_chunk + step)

    return gemv
