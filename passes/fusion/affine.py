"""`fold-affine` and `fuse-matmul-add`: fold constant scales and shifts into linear ops.

`fold-affine` rewrite rules (Y = output of the linear node, c a float constant):

- `Conv(x, W, b) -> Mul(Y, c)`  =>  `Conv(x, W * c_o, b * c_o)`
- `Conv(x, W, b) -> Add(Y, c)`  =>  `Conv(x, W, b + c_o)`  (a missing b counts as 0)
- the same for `ConvTranspose` (W is [C, M/g, k...]; output channel o of group g is
  scaled in W[g*C/g:(g+1)*C/g, o - g*M/g]), e.g. PP-OCR's ConvTranspose -> Add(bias) -> BN.
- `Sub(Y, c)` is `Add(Y, -c)`; `Div(Y, c)` is `Mul(Y, 1/c)`.
- `Gemm(A, B, C)`: Mul scales B's output columns and C (beta folded in); Add adds to C.
- `MatMul(A, W)` (2-D W) `-> Mul(Y, c)` with c constant over all but the last axis:
  W's columns are scaled (any rank of A).

  c_o is c viewed per output channel. Preconditions: c broadcasts to the linear
  node's output without changing its shape, i.e. after left-padding c to the output
  rank, every axis but the channel axis (1 for Conv, last for Gemm/MatMul) has size 1
  and the channel axis has size 1 or M (c's rank may not exceed the output rank);
  Y has exactly one consumer and is not a graph output; W, b and C are float
  constants read by this node only; `c - Y` and `c / Y` are refused.

`fuse-matmul-add` rewrite rule:

- `MatMul(A, B) -> Add(Y, C)`  =>  `Gemm(A, B, C)` when A and Y are known to be
  rank 2, B is a 2-D constant, C is a constant of shape [], [M], [1, M] or [N, M]
  (N known) with the same float dtype, and Y has one consumer and is not a graph
  output. A 3-D MatMul is kept (Gemm is 2-D only; onnxruntime fuses MatMul+Add
  itself there).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ..base import register
from ..graph import (
    bypass,
    float_const,
    is_op,
    remove_nodes,
    scale_output_channels,
    set_attr,
    sole_consumer,
)
from .common import (
    RewritePass,
    conv_parts,
    exclusive_const,
    gemm_parts,
    rank,
    set_weight,
    static_shape,
)

logger = logging.getLogger(__name__)


def _affine_operand(op: ir.Node, y: ir.Value) -> tuple[str, np.ndarray] | None:
    """('mul'|'add', c) when `op` is Y*c, c*Y, Y+c, c+Y, Y-c or Y/c with constant c."""
    if len(op.inputs) != 2:
        return None
    a, b = op.inputs
    if a is y and b is not y:
        other, y_first = b, True
    elif b is y and a is not y:
        other, y_first = a, False
    else:
        return None
    c = float_const(other)
    if c is None:
        return None
    if op.op_type == "Mul":
        return "mul", c
    if op.op_type == "Add":
        return "add", c
    if op.op_type == "Sub" and y_first:
        return "add", -c
    if op.op_type == "Div" and y_first:
        if np.any(c == 0):
            return None
        return "mul", (1.0 / c.astype(np.float64)).astype(c.dtype)
    return None


def _per_channel(c: np.ndarray, out_rank: int, channel_axis: int, m: int) -> np.ndarray | None:
    """c as a length-M vector when it only varies along `channel_axis`, else None."""
    if c.ndim > out_rank:
        return None
    padded = c.reshape((1,) * (out_rank - c.ndim) + c.shape)
    for axis, size in enumerate(padded.shape):
        if axis == channel_axis % out_rank:
            if size not in (1, m):
                return None
        elif size != 1:
            return None
    return np.broadcast_to(padded.reshape(-1), (m,)).astype(np.float64)


def fold_affine(model: ir.Model, op: ir.Node) -> bool:
    """Fold Mul/Add/Sub/Div-by-constant `op` into the Conv/Gemm/MatMul producing its input."""
    if not is_op(op, "Mul", "Add", "Sub", "Div"):
        return False
    for y in op.inputs:
        producer = y.producer() if y is not None else None
        if producer is None or sole_consumer(y) is not op:
            continue
        if not is_op(producer, "Conv", "ConvTranspose", "Gemm", "MatMul"):
            continue
        spec = _affine_operand(op, y)
        if spec is None:
            return False
        kind, c = spec
        if producer.op_type in ("Conv", "ConvTranspose"):
            done = _into_conv(producer, kind, c)
        elif producer.op_type == "Gemm":
            done = _into_gemm(producer, kind, c)
        else:
            done = kind == "mul" and _into_matmul(producer, c)
        if not done:
            return False
        bypass(op.outputs[0], y)
        remove_nodes([op])
        return True
    return False


def _into_conv(conv: ir.Node, kind: str, c: np.ndarray) -> bool:
    parts = conv_parts(conv)
    if parts is None or c.dtype != parts.w.dtype:
        return False
    w, b, m = parts
    vec = _per_channel(c, w.ndim, 1, m)
    if vec is None:
        return False
    if kind == "mul":
        set_weight(conv, 1, scale_output_channels(conv, w, vec).astype(w.dtype), "scaled")
        if b is not None:
            set_weight(conv, 2, (b * vec).astype(w.dtype), "scaled")
    else:
        b_new = (b if b is not None else np.zeros(m)) + vec
        set_weight(conv, 2, b_new.astype(w.dtype), "shifted")
    return True


def _into_gemm(gemm: ir.Node, kind: str, c: np.ndarray) -> bool:
    parts = gemm_parts(gemm)
    if parts is None or c.dtype != parts.w.dtype:
        return False
    w, trans_b, m, c_old = parts
    vec = _per_channel(c, 2, 1, m)
    if vec is None:
        return False
    if kind == "mul":
        set_weight(gemm, 1, (w * (vec[:, None] if trans_b else vec[None, :])).astype(w.dtype),
                   "scaled")
        if c_old is not None:
            set_weight(gemm, 2, (c_old * vec).astype(w.dtype), "scaled")
            set_attr(gemm, "beta", 1.0)
    else:
        new_c = (c_old if c_old is not None else np.zeros(m)) + vec
        set_weight(gemm, 2, new_c.astype(w.dtype), "shifted")
        set_attr(gemm, "beta", 1.0)
    return True


def _into_matmul(mm: ir.Node, c: np.ndarray) -> bool:
    w = exclusive_const(mm.inputs[1], mm)
    out_rank = rank(mm.outputs[0])
    if w is None or w.ndim != 2 or out_rank is None or c.dtype != w.dtype:
        return False
    vec = _per_channel(c, out_rank, -1, w.shape[1])
    if vec is None:
        return False
    set_weight(mm, 1, (w * vec[None, :]).astype(w.dtype), "scaled")
    return True


def fuse_matmul_add(model: ir.Model, add: ir.Node) -> bool:
    """Replace `MatMul(A, B) + C` by `Gemm(A, B, C)` for 2-D A; False when refused."""
    if not is_op(add, "Add") or len(add.inputs) != 2:
        return False
    for idx in (0, 1):
        y = add.inputs[idx]
        mm = y.producer() if y is not None else None
        if not is_op(mm, "MatMul") or sole_consumer(y) is not add:
            continue
        a, b = mm.inputs[0], mm.inputs[1]
        if rank(a) != 2 or rank(y) != 2 or rank(add.outputs[0]) != 2:
            return False
        w = float_const(b)
        bias = float_const(add.inputs[1 - idx])
        if w is None or bias is None or w.ndim != 2 or bias.dtype != w.dtype:
            return False
        m = w.shape[1]
        if bias.ndim > 2 or (bias.ndim >= 1 and bias.shape[-1] not in (1, m)):
            return False
        if bias.ndim == 2 and bias.shape[0] != 1:
            rows = static_shape(a)
            if rows is None or rows[0] != bias.shape[0]:
                return False
        graph = add.graph
        assert graph is not None
        gemm = ir.node("Gemm", [a, b, add.inputs[1 - idx]],
                       name=(mm.name or "matmul") + "_gemm")
        graph.insert_before(add, gemm)
        bypass(add.outputs[0], gemm.outputs[0])
        remove_nodes([add, mm])
        return True
    return False


@register
class FoldAffinePass(RewritePass):
    """Fold Mul/Add/Sub/Div by constants into the preceding Conv/Gemm/MatMul."""

    name = "fold-affine"
    summary = "fold Mul/Add/Sub/Div by per-channel constants into the preceding Conv/Gemm/MatMul"
    stat = "affine_folded"
    rule = staticmethod(fold_affine)


@register
class FuseMatMulAddPass(RewritePass):
    """MatMul + Add(constant bias) -> Gemm for 2-D inputs."""

    name = "fuse-matmul-add"
    summary = "MatMul + Add(constant) -> Gemm when the input is 2-D (3-D MatMul kept)"
    stat = "matmul_add_to_gemm"
    rule = staticmethod(fuse_matmul_add)
