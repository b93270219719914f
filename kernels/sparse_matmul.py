"""Block-sparse (BSR) x dense matmul for float32 weights, and when to use it.

``Y[m, n] = sum_k X[m, k] * W[n, k]`` with ``W`` ([N outputs, K inputs], the weight's
view in ``passes/sparsity``) stored as BSR in blocks of R outputs x C inputs: ``data``
[nnz, R, C], ``indices`` [nnz] (block column) and ``indptr`` [N/R + 1] (block row
start). TVM 0.27 has no sparse kernels (``sparse_dense`` went with Relay), so this is
written in TIR here: X is transposed once into a [K, M] copy, each nonzero block adds
``w * X^T[k, :]`` to its output rows with M as the vector axis, block rows are spread
over the threads, and the [N, M] result is transposed back. M (the rows of the
activation, e.g. tokens) must be a multiple of the vector width.

The break-even is measured, not assumed (``tools/bench_sparse.py`` on this machine
class): per kernel kind and block shape, the largest fraction of nonzero blocks at which
the sparse kernel was faster than the dense default schedule on every shape measured.
Above it ``backends.tvm.sparse`` keeps the dense op.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import tvm
from tvm.script import tirx as T

VECTOR_ROWS = 16  # M is the vector axis (16 float32 lanes on AVX-512)
BREAK_EVEN_FILE = "sparse_break_even.json"


def to_bsr(weight_nk: np.ndarray, rows: int, cols: int):
    """(data [nnz, R, C], indices [nnz] int32, indptr [N/R + 1] int32) of a [N, K] weight
    whose shape is a multiple of the block; blocks that are all zero are dropped. ``data``
    keeps the weight's dtype: int8 weights give int8 blocks (the int8 kernels' input, with
    a per-output-row scale kept beside them)."""
    n, k = weight_nk.shape
    blocks = weight_nk.reshape(n // rows, rows, k // cols, cols).transpose(0, 2, 1, 3)
    nonzero = np.any(blocks != 0, axis=(2, 3))
    indptr = np.concatenate([[0], np.cumsum(nonzero.sum(axis=1))]).astype(np.int32)
    indices = np.nonzero(nonzero)[1].astype(np.int32)
    return np.ascontiguousarray(blocks[nonzero]), indices, indptr


def block_density(weight_nk: np.ndarray, rows: int, cols: int) -> float:
    """Fraction of the R x C blocks of a [N, K] weight that hold a nonzero."""
    n, k = weight_nk.shape
    blocks = weight_nk.reshape(n // rows, rows, k // cols, cols)
    return float(np.any(blocks != 0, axis=(1, 3)).mean())


def bsr_matmul(m: int, k: int, n: int, rows: int, cols: int, nnz: int) -> tvm.tirx.PrimFunc:
    """The scheduled PrimFunc ``(X [m, k], data, indices, indptr) -> Y [m, n]``."""
    block_rows = n // rows
    lanes = VECTOR_ROWS

    @T.prim_func(private=True, s_tir=True)
    def bsr(x: T.Buffer((m, k), "float32"), data: T.Buffer((nnz, rows, cols), "float32"),
            indices: T.Buffer((nnz,), "int32"), indptr: T.Buffer((block_rows + 1,), "int32"),
            y: T.Buffer((m, n), "float32")):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        xt = T.sblock_alloc_buffer((k, m), "float32")
        yt = T.sblock_alloc_buffer((n, m), "float32")
        for kk in T.parallel(k):
            for mm in range(m):
                with T.sblock("transpose"):
                    vk, vm = T.axis.remap("SS", [kk, mm])
                    xt[vk, vm] = x[vm, vk]
        for nb in T.parallel(block_rows):
            # one opaque block per block row: its loop over the row's nonzero blocks has
            # data-dependent bounds
            with T.sblock("block_row"):
                v = T.axis.spatial(block_rows, nb)
                T.reads(indptr[v:v + 2], indices[0:nnz], data[0:nnz, 0:rows, 0:cols],
                        xt[0:k, 0:m])
                T.writes(yt[v * rows:v * rows + rows, 0:m])
                for r in range(rows):
                    for mm in T.vectorized(m):
                        yt[v * rows + r, mm] = T.float32(0)
                for b in range(indptr[v], indptr[v + 1]):
                    for r in range(rows):
                        for c in range(cols):
                            for mo in range(m // lanes):
                                for mi in T.vectorized(lanes):
                                    yt[v * rows + r, mo * lanes + mi] = (
                                        yt[v * rows + r, mo * lanes + mi]
                                        + data[b, r, c]
                                        * xt[indices[b] * cols + c, mo * lanes + mi])
        for mm in T.parallel(m):
            for nn in range(n):
                with T.sblock("transpose_back"):
                    vm, vn = T.axis.remap("SS", [mm, nn])
                    y[vm, vn] = yt[vn, vm]

    return bsr


def break_even(target_class: str | None) -> dict[str, dict[str, float]]:
    """Kernel kind (``matmul``, ``gemv``, ``conv1x1``, ``conv``) -> block pattern
    (``block(RxC)``) -> largest nonzero-block fraction where that sparse kernel measured
    faster than dense, for a shipped CPU class ({} when none was measured). The file's
    ``kernels`` holds one table per kind; a format-1 file's ``patterns`` is ``matmul``'s."""
    if target_class is None:
        return {}
    path = resources.files("onnxforge.kernels") / "tuning_db" / target_class / BREAK_EVEN_FILE
    try:
        table = json.loads(path.read_text())
    except (FileNotFoundError, ValueError, OSError):
        return {}
    kinds = dict(table.get("kernels", {}))
    if "patterns" in table:
        kinds.setdefault("matmul", table["patterns"])
    return {kind: {pattern: float(entry["max_density"]) for pattern, entry in per.items()}
            for kind, per in kinds.items()}
