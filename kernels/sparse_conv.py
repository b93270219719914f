"""Block-sparse (BSR) weight x shifted input rows: sparse convolutions without im2col.

A float32 NCHW convolution with stride 1 is ``Y[o, p] = sum_j W[o, j] * X_j[p]`` with
``W`` the weight's 2-D view [O, I*kh*kw] (columns in (c, i, j) order, as
``passes/sparsity`` sees it) and ``X_j`` the input row that column j reads. On the input
padded and flattened per image, ``X_j`` for column (c, i, j) is a contiguous slice that
starts at ``c*Hp*Wp + i*Wp + j`` when the output is computed on the padded width
(p = h*Wp + w; the ``kw - 1`` columns past the real output width are thrown away
afterwards). So one kernel serves 1x1 convs (offsets ``c*H*W``, nothing thrown away) and
kxk convs (one extra zero row at the bottom keeps the last slice inside the buffer): for
each block row it walks the nonzero blocks and adds ``w * X[offset[col] + p]`` into
accumulators held in vector registers, a tile of output positions at a time (the tile
is vector lanes x a few vectors per output row of the block, so it fits the register
file); block rows x images are spread over the threads. Nothing is vectorised along the
block, so any R x C block works; a tail shorter than the tile runs as one narrower
vector.

The same row kernel is the int8 path later: ``data`` would hold int8 blocks with a
per-row scale, the accumulators int32 (see the README, "Sparse kernels in compiled code").
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm.script import tirx as T

PARALLEL_CHUNKS = 64  # parallel tasks per kernel (more than the threads, few allocations)
ACCUMULATOR_VECTORS = 8  # vector registers of accumulators per tile (of 16 or 32 in all)


def row_tile(lanes: int, rows: int) -> int:
    """Output positions per tile: ACCUMULATOR_VECTORS vectors spread over the R rows."""
    return lanes * max(1, ACCUMULATOR_VECTORS // rows)


def conv_offsets(channels: int, kernel: tuple[int, int], plane: tuple[int, int]) -> np.ndarray:
    """Start of column (c, i, j)'s input row in one image's flattened [C, Hp, Wp] buffer."""
    kh, kw = kernel
    height, width = plane
    c, i, j = np.meshgrid(np.arange(channels), np.arange(kh), np.arange(kw), indexing="ij")
    return (c * height * width + i * width + j).reshape(-1).astype(np.int32)


def _tile_of_outputs(rows: int, cols: int):
    """Y[b, block row, start:start+width] of one tile: accumulate over the row's nonzero
    blocks in ``acc`` (registers), then store."""
    @T.macro
    def tile_of_outputs(x, data, indices, indptr, offsets, bias, y, vb, v, acc, start, width):
        for r in T.unroll(rows):
            for mi in T.vectorized(width):
                acc[r, mi] = bias[v * rows + r]
        for b in range(indptr[v], indptr[v + 1]):
            for c in T.unroll(cols):
                for r in T.unroll(rows):
                    for mi in T.vectorized(width):
                        acc[r, mi] = acc[r, mi] + data[b, r, c] * x[
                            vb, offsets[indices[b] * cols + c] + start + mi]
        for r in T.unroll(rows):
            for mi in T.vectorized(width):
                y[vb, v * rows + r, start + mi] = acc[r, mi]

    return tile_of_outputs


def bsr_rows(batch: int, length: int, n_out: int, m: int, rows: int, cols: int, nnz: int,
             ncols: int, lanes: int, out_shape: tuple[int, ...] | None = None,
             in_shape: tuple[int, ...] | None = None) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``(X [batch, length], data [nnz, R, C], indices [nnz],
    indptr [n_out/R + 1], offsets [K], bias [n_out]) -> Y [batch, n_out, m]`` with
    ``Y[b, o, p] = bias[o] + sum_col W[o, col] * X[b, offsets[col] + p]`` (K = columns of
    W); X and Y are declared with ``in_shape`` and ``out_shape`` (same sizes, e.g. NCHW) so
    the caller needs no reshape (Relax would fuse it into the pad or bias add around the
    kernel, as a slow index-remapping copy)."""
    block_rows = n_out // rows
    out_shape = out_shape or (batch, n_out, m)
    in_shape = in_shape or (batch, length)
    in_region = tuple(slice(0, d) for d in in_shape)
    out_region = tuple(slice(0, d) for d in out_shape)
    tile = row_tile(lanes, rows)
    full, tail = divmod(m, tile)
    tail_width, has_tail = max(tail, 1), int(tail > 0)
    tasks = batch * block_rows
    chunks = min(tasks, PARALLEL_CHUNKS)
    per_chunk = -(-tasks // chunks)


    tile_of_outputs = _tile_of_outputs(rows, cols)

    @T.macro
    def one_task(x, data, indices, indptr, offsets, bias, y, acc, vb, v):
        for mo in range(full):
            tile_of_outputs(x, data, indices, indptr, offsets, bias, y, vb, v, acc, mo * tile,
                            tile)
        for _ in range(has_tail):
            tile_of_outputs(x, data, indices, indptr, offsets, bias, y, vb, v, acc,
                            full * tile, tail_width)

    @T.prim_func(private=True, s_tir=True)
    def bsr(x_in: T.Buffer(in_shape, "float32"),
            data: T.Buffer((nnz, rows, cols), "float32"),
            indices: T.Buffer((nnz,), "int32"),
            indptr: T.Buffer((block_rows + 1,), "int32"),
            offsets: T.Buffer((ncols,), "int32"),
            bias: T.Buffer((n_out,), "float32"),
            y_out: T.Buffer(out_shape, "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        for chunk in T.parallel(chunks):
            # one opaque block per chunk of (image, block row) tasks: the loop over a row's
            # nonzero blocks has data-dependent bounds, and the accumulators are allocated
            # once per chunk (TVM takes them from the workspace, a call, not the stack)
            with T.sblock("block_rows"):
                vc = T.axis.spatial(chunks, chunk)
                T.reads(indptr[0:block_rows + 1], indices[0:nnz],
                        data[0:nnz, 0:rows, 0:cols], offsets[0:ncols], bias[0:n_out],
                        x_in[in_region])
                T.writes(y_out[out_region])
                # flat views, declared inside the block: Relax's layout-rewrite split wants
                # every statement under the root to hold a block
                x = T.decl_buffer((batch, length), "float32", data=x_in.data)
                y = T.decl_buffer((batch, n_out, m), "float32", data=y_out.data)
                acc = T.sblock_alloc_buffer((rows, tile), "float32", scope="local")
                for step in range(per_chunk):
                    if vc * per_chunk + step < tasks:
                        one_task(x, data, indices, indptr, offsets, bias, y, acc,
                                 (vc * per_chunk + step) // block_rows,
                                 (vc * per_chunk + step) % block_rows)

    return bsr
