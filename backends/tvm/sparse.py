"""Sparse weights -> the BSR kernel, where it measured faster (``kernels.sparse_matmul``).

A model from the ``sparsify`` pass stays dense ONNX and says in its metadata
(``onnxforge.sparsity``) which block patterns it used. For every float32 ``matmul``
(MatMul, Gemm) of the imported Relax module whose weight is a 2-D constant (or a
``permute_dims`` of one, Gemm's ``transB``), with a ``block(RxC)`` pattern from that
record: the weight's fraction of nonzero R x C blocks is compared with the break-even
measured for the target's CPU class; at or below it the matmul becomes a call to the
BSR kernel (the activation reshaped to [M, K], the result back), above it the dense
default schedule stays. Each decision and its reason is counted (``SparseReport``).

Unstructured and N:M patterns have no kernel here yet (they stay dense, and say so).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import ir, relax

from ...kernels.sparse_matmul import VECTOR_ROWS, block_density, bsr_matmul, to_bsr
from ...passes.sparsity.metadata import SPARSITY_KEY

_BLOCK = re.compile(r"block\((\d+)x(\d+)\)")


@dataclass
class SparseReport:
    sparse: int = 0
    dense: Counter = field(default_factory=Counter)  # reason -> count

    def as_dict(self) -> dict:
        return {"sparse_ops": self.sparse,
                "dense_ops": [{"reason": r, "count": n} for r, n in sorted(self.dense.items())]}


def block_patterns(metadata: dict[str, str]) -> list[tuple[int, int]]:
    """The (R, C) block shapes the model's sparsity record names."""
    try:
        record = json.loads(metadata.get(SPARSITY_KEY, "{}"))
    except ValueError:
        return []
    shapes = set()
    for entry in record.values() if isinstance(record, dict) else []:
        found = _BLOCK.fullmatch(str(entry.get("pattern", ""))) if isinstance(entry, dict) else None
        if found:
            shapes.add((int(found.group(1)), int(found.group(2))))
    return sorted(shapes)


class _Dense(Exception):
    """Raised with the reason a matmul keeps its dense form."""


@relax.expr_functor.mutator
class _SparseMatmuls(relax.PyExprMutator):
    def __init__(self, mod, patterns, thresholds):
        super().__init__(mod)
        self.patterns, self.thresholds = patterns, thresholds
        self.report = SparseReport()

    def _weight_nk(self, expr) -> np.ndarray | None:
        """The [N, K] weight of ``x @ W``: W constant [K, N], or permute_dims([N, K])."""
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            expr = bound if bound is not None else expr
        if isinstance(expr, ir.expr.Constant):
            return expr.value.numpy().T
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", "") == \
                "relax.permute_dims" and isinstance(expr.args[0], ir.expr.Constant):
            axes = expr.attrs.axes
            if axes is None or [int(a) for a in axes] == [1, 0]:
                return expr.args[0].value.numpy()
        return None

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if getattr(call.op, "name", "") != "relax.matmul":
            return call
        weight = self._weight_nk(call.args[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            return call
        try:
            new = self._sparse(call.args[0], weight)
        except _Dense as why:
            self.report.dense[str(why)] += 1
            return call
        self.report.sparse += 1
        return new

    def _choose(self, weight: np.ndarray) -> tuple[int, int, float]:
        best = None
        for rows, cols in self.patterns:
            if weight.shape[0] % rows or weight.shape[1] % cols:
                continue
            density = block_density(weight, rows, cols)
            if best is None or density < best[2]:
                best = (rows, cols, density)
        if best is None:
            raise _Dense("the weight's shape is not a multiple of its block")
        return best

    def _sparse(self, x, weight: np.ndarray):
        rows, cols, density = self._choose(weight)
        limit = self.thresholds.get(f"block({rows}x{cols})")
        if limit is None:
            raise _Dense(f"no measured break-even for block({rows}x{cols}) on this target")
        if density > limit:
            raise _Dense(f"nonzero blocks above the measured break-even ({limit:.2f})")
        shape = [int(d) for d in x.ty.shape]
        n, k = weight.shape
        m = math.prod(shape[:-1])
        if m % VECTOR_ROWS:
            raise _Dense(f"activation rows not a multiple of {VECTOR_ROWS}")
        data, indices, indptr = to_bsr(weight, rows, cols)
        bb = self.builder_
        x2d = bb.emit(relax.op.reshape(x, [m, k])) if len(shape) != 2 else x
        kernel = bb.add_func(bsr_matmul(m, k, n, rows, cols, len(indices)), "bsr_matmul")
        y = bb.emit(relax.call_tir(
            kernel, [x2d, relax.const(data), relax.const(indices), relax.const(indptr)],
            relax.TensorType([m, n], "float32")))
        return relax.op.reshape(y, [*shape[:-1], n]) if len(shape) != 2 else y


def sparse_contractions(mod: tvm.IRModule, metadata: dict[str, str],
                        thresholds: dict[str, float]) -> tuple[tvm.IRModule, SparseReport]:
    """Replace the block-sparse matmuls that are below break-even by the BSR kernel."""
    patterns = block_patterns(metadata)
    if not patterns:
        return mod, SparseReport()
    mutator = _SparseMatmuls(mod, patterns, thresholds)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return relax.transform.DeadCodeElimination()(mutator.builder_.get()), mutator.report
