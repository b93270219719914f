"""Sparse weights -> BSR kernels, where they measured faster (``kernels.sparse_*``).

A model from the ``sparsify`` pass stays dense ONNX and says in its metadata
(``onnxforge.sparsity``) which block patterns it used. For every float32 op of the
imported Relax module below whose weight is a constant, with a ``block(RxC)`` pattern from
that record, the weight's fraction of nonzero R x C blocks (on its 2-D view [outputs,
inputs]) is compared with the break-even measured for the target's CPU class and that
kernel kind; at or below it the op becomes a call to the BSR kernel, above it the dense
default schedule stays:

- ``matmul`` (MatMul, Gemm; the weight a 2-D constant or a ``permute_dims`` of one,
  Gemm's ``transB``) with M activation rows (all but the last axis): a multiple of 16 ->
  ``sparse_matmul`` (kind ``matmul``), fewer than 16 -> ``sparse_gemv`` (kind ``gemv``),
  others stay dense;
- ``conv2d`` (NCHW, groups 1, dilation 1): 1x1 with any stride and padding -> the input
  is padded/subsampled in Relax, then ``sparse_conv.bsr_rows`` (kind ``conv1x1``); kxk
  with stride 1 -> padded (one extra zero row), ``bsr_rows`` on the padded width, the
  extra columns sliced off (kind ``conv``); strided kxk, grouped and dilated convs stay
  dense.

Each decision and its reason is counted (``SparseReport``). Unstructured and N:M patterns
have no kernel here yet (they stay dense, and say so).
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

from ...kernels.cpu_target import cpu_info
from ...kernels.sparse_conv import bsr_rows, conv_offsets
from ...kernels.sparse_gemv import bsr_gemv
from ...kernels.sparse_matmul import VECTOR_ROWS, block_density, bsr_matmul, to_bsr
from ...passes.sparsity.metadata import SPARSITY_KEY
from .relax_util import rewrite_functions

_BLOCK = re.compile(r"block\((\d+)x(\d+)\)")
# sparsify zeros floor(ratio x blocks) blocks, so a layer sparsified to the break-even
# ratio keeps a fraction of a block more than it: counted as at the break-even
DENSITY_SLACK = 0.005


@dataclass
class SparseReport:
    kinds: Counter = field(default_factory=Counter)  # kernel kind -> ops that use it
    dense: Counter = field(default_factory=Counter)  # reason -> count

    @property
    def sparse(self) -> int:
        return sum(self.kinds.values())

    def as_dict(self) -> dict:
        return {"sparse_ops": self.sparse, "sparse_kernels": dict(sorted(self.kinds.items())),
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
class _SparseContractions(relax.PyExprMutator):
    def __init__(self, mod, patterns, thresholds, lanes):
        super().__init__(mod)
        self.patterns, self.thresholds, self.lanes = patterns, thresholds, lanes
        self.conv_kernels: set[str] = set()  # names of the added bsr_rows kernels
        self.report = SparseReport()

    def _constant(self, expr):
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            expr = bound if bound is not None else expr
        return expr

    def _weight_nk(self, expr) -> np.ndarray | None:
        """The [N, K] weight of ``x @ W``: W constant [K, N], or permute_dims([N, K])."""
        expr = self._constant(expr)
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
        name = getattr(call.op, "name", "")
        if name == "relax.add":
            return self._fold_bias(call)
        if name == "relax.matmul":
            weight = self._weight_nk(call.args[1])
            rewrite = self._sparse_matmul
        elif name == "relax.nn.conv2d":
            weight = self._constant(call.args[1])
            weight = weight.value.numpy() if isinstance(weight, ir.expr.Constant) else None
            rewrite = self._sparse_conv
        else:
            return call
        if weight is None or weight.dtype != np.float32 or \
                weight.ndim != (2 if name == "relax.matmul" else 4) or not np.any(weight == 0):
            return call  # not a float weight, or nothing zero in it: not a sparse layer
        try:
            new, kind = rewrite(call, weight)
        except _Dense as why:
            self.report.dense[str(why)] += 1
            return call
        self.report.kinds[kind] += 1
        return new

    def _choose(self, weight: np.ndarray, kind: str) -> tuple[int, int]:
        """The record's block shape with the fewest nonzero blocks, if at break-even."""
        best = None
        for rows, cols in self.patterns:
            if weight.shape[0] % rows or weight.shape[1] % cols:
                continue
            density = block_density(weight, rows, cols)
            if best is None or density < best[2]:
                best = (rows, cols, density)
        if best is None:
            raise _Dense("the weight's shape is not a multiple of its block")
        rows, cols, density = best
        limit = self.thresholds.get(kind, {}).get(f"block({rows}x{cols})")
        if limit is None:
            raise _Dense(f"no measured break-even for {kind} block({rows}x{cols}) on this "
                         "target")
        if density > limit + DENSITY_SLACK:
            raise _Dense(f"nonzero blocks above the measured {kind} break-even ({limit:.2f})")
        return rows, cols

    def _sparse_matmul(self, call, weight: np.ndarray):
        x = call.args[0]
        shape = [int(d) for d in x.ty.shape]
        n, k = weight.shape
        m = math.prod(shape[:-1])
        if m % VECTOR_ROWS and m > VECTOR_ROWS:
            raise _Dense(f"activation rows not a multiple of {VECTOR_ROWS} (and more than "
                         f"{VECTOR_ROWS})")
        kind = "gemv" if m < VECTOR_ROWS else "matmul"
        rows, cols = self._choose(weight, kind)
        data, indices, indptr = to_bsr(weight, rows, cols)
        bb = self.builder_
        x2d = bb.emit(relax.op.reshape(x, [m, k])) if len(shape) != 2 else x
        func = (bsr_gemv if kind == "gemv" else bsr_matmul)(m, k, n, rows, cols, len(indices))
        kernel = bb.add_func(func, f"bsr_{kind}")
        y = bb.emit(relax.call_tir(
            kernel, [x2d, relax.const(data), relax.const(indices), relax.const(indptr)],
            relax.TensorType([m, n], "float32")))
        return (relax.op.reshape(y, [*shape[:-1], n]) if len(shape) != 2 else y), kind

    def _fold_bias(self, call):
        """``sparse conv + per-channel constant`` (the importer's conv bias) -> the conv
        kernel with that bias (its accumulators start from it). The conv's own call stays
        for any other user; dead code elimination removes it otherwise."""
        conv = self._constant(call.args[0])
        sliced = None
        if isinstance(conv, relax.Call) and getattr(conv.op, "name", "") == \
                "relax.strided_slice":
            sliced, conv = conv, self._constant(conv.args[0])
        if not (isinstance(conv, relax.Call) and getattr(conv.op, "name", "") ==
                "relax.call_tir" and conv.args[0].name_hint in self.conv_kernels):
            return call
        args = list(conv.args[1].fields)
        out_c = int(args[-1].value.shape[0])
        bias = self._constant(call.args[1])
        if isinstance(bias, relax.Call) and getattr(bias.op, "name", "") == "relax.reshape":
            bias = self._constant(bias.args[0])
        shape = [int(d) for d in call.args[1].ty.shape]
        if not isinstance(bias, ir.expr.Constant) or shape not in ([1, out_c, 1, 1],
                                                                   [out_c, 1, 1]) \
                or bias.value.dtype != "float32" or np.any(args[-1].value.numpy()):
            return call
        args[-1] = relax.const(bias.value.numpy().reshape(out_c))
        y = relax.call_tir(conv.args[0], args, conv.ty_args[0])
        if sliced is not None:
            y = relax.Call(sliced.op, [self.builder_.emit(y), *sliced.args[1:]], sliced.attrs)
        return y

    def _sparse_conv(self, call, weight: np.ndarray):
        attrs = call.attrs
        if int(attrs.groups) != 1:
            raise _Dense("grouped conv (no sparse kernel)")
        if any(int(d) != 1 for d in attrs.dilation):
            raise _Dense("dilated conv (no sparse kernel)")
        if (attrs.data_layout, attrs.kernel_layout, attrs.out_layout) != ("NCHW", "OIHW",
                                                                           "NCHW"):
            raise _Dense("conv layout not NCHW/OIHW")
        out_c, in_c, kh, kw = weight.shape
        strides = [int(s) for s in attrs.strides]
        top, left, bottom, right = [int(p) for p in attrs.padding]
        if (kh, kw) != (1, 1) and strides != [1, 1]:
            raise _Dense(f"strided {kh}x{kw} conv (stride {strides[0]}x{strides[1]}: no "
                         "sparse kernel)")
        kind = "conv1x1" if (kh, kw) == (1, 1) else "conv"
        rows, cols = self._choose(weight.reshape(out_c, -1), kind)
        x = call.args[0]
        batch, _, height, width = [int(d) for d in x.ty.shape]
        bb = self.builder_
        # 1x1: pad, then subsample the stride; kxk (stride 1): pad with one more zero row
        # at the bottom so the last column's shifted row stays inside the buffer
        extra = 0 if kind == "conv1x1" else 1
        if top or bottom or left or right or extra:
            x = bb.emit(relax.op.nn.pad(x, [0, 0, 0, 0, top, bottom + extra, left, right]))
        height, width = height + top + bottom, width + left + right
        if strides != [1, 1]:
            x = bb.emit(relax.op.strided_slice(x, [2, 3], [0, 0], [height, width], strides))
            height, width = -(-height // strides[0]), -(-width // strides[1])
        out_h, out_w = height - kh + 1, width - kw + 1
        m = out_h * width  # output positions on the (padded) input width
        length = in_c * (height + extra) * width
        data, indices, indptr = to_bsr(weight.reshape(out_c, -1), rows, cols)
        offsets = conv_offsets(in_c, (kh, kw), (height + extra, width))
        # the kernel reads [batch, I, H', W'] and writes [batch, O, out_h, padded width]
        # as flat rows itself (reshapes here would be fused into the pad or the bias add
        # around it, as slow index-remapping copies)
        out_shape = (batch, out_c, out_h, width)
        in_shape = (batch, in_c, height + extra, width)
        kernel = bb.add_func(bsr_rows(batch, length, out_c, m, rows, cols, len(indices),
                                      len(offsets), self.lanes, out_shape, in_shape),
                             f"bsr_{kind}")
        self.conv_kernels.add(kernel.name_hint)
        y = relax.call_tir(
            kernel, [x, relax.const(data), relax.const(indices), relax.const(indptr),
                     relax.const(offsets), relax.const(np.zeros(out_c, np.float32))],
            relax.TensorType(list(out_shape), "float32"))
        if out_w != width:
            y = relax.op.strided_slice(bb.emit(y), [3], [0], [out_w])
        return y, kind


def sparse_contractions(mod: tvm.IRModule, metadata: dict[str, str],
                        thresholds: dict[str, dict[str, float]], target=None
                        ) -> tuple[tvm.IRModule, SparseReport]:
    """Replace the block-sparse matmuls and convs that are below break-even by BSR kernels.

    ``thresholds``: kernel kind -> block pattern -> largest nonzero-block fraction
    (``kernels.sparse_matmul.break_even``); ``target`` sets the conv kernel's vector width.
    """
    patterns = block_patterns(metadata)
    if not patterns:
        return mod, SparseReport()
    lanes = cpu_info(target).lanes(32) if target is not None else VECTOR_ROWS
    mutator = _SparseContractions(mod, patterns, thresholds, lanes)
    return relax.transform.DeadCodeElimination()(rewrite_functions(mutator, mod)), mutator.report
