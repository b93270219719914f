"""`fold-bn`: fold inference BatchNormalization into the producer's weights and bias.

Rewrite rules, with s = scale / sqrt(var + epsilon), t = B - mean * s:

- `Conv(x, W, b?) -> BN`  =>  `Conv(x, W * s[:, None, ...], b * s + t)` (b = 0 when absent;
  grouped and depthwise convs included: the output channel is W's first axis).
- `ConvTranspose(x, W, b?) -> BN`  =>  W of shape [C, M/g, k...]: output channel
  `o = (c // (C/g)) * (M/g) + j` is scaled by s[o]; bias as for Conv.
- `Gemm(A, B, C?) -> BN` (2-D output, channel = column)  =>  B's output columns scaled by s
  (rows when transB=1), C' = beta * C * s + t, beta = 1.
- `MatMul(A, W) [-> Add(bias)] -> BN` with a rank-2 MatMul output and a 2-D W  =>
  `MatMul(A, W * s) -> Add(bias * s + t)`.

Preconditions (otherwise the BN is left alone):
- BN is in inference form: one used output (no running mean/var outputs read),
  `training_mode` absent or 0, and its scale, B, mean and var are constants;
- the BN input has exactly one consumer (the BN) and is not a graph output
  (a BN feeding two consumers is fine: only its input matters);
- the weight (and bias / Add constant) is a float constant read only by that node
  (a shared initializer is never changed);
- the channel axis of the BN (axis 1) is the producer's output-channel axis:
  always for Conv/ConvTranspose; for Gemm/MatMul only with a rank-2 output.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ..base import register
from ..graph import (
    batchnorm_affine,
    bypass,
    is_op,
    remove_nodes,
    scale_output_channels,
    set_attr,
    sole_consumer,
)
from .common import RewritePass, conv_parts, exclusive_const, gemm_parts, rank, set_weight

logger = logging.getLogger(__name__)


def fold_batchnorm(model: ir.Model, bn: ir.Node) -> bool:
    """Fold one BatchNormalization node into its producer; False when refused."""
    if not is_op(bn, "BatchNormalization"):
        return False
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    if producer is None or sole_consumer(x) is not bn:
        return False
    params = batchnorm_affine(bn)
    if params is None:
        return False
    s, t = params
    out = bn.outputs[0]
    if is_op(producer, "Conv", "ConvTranspose"):
        done = _fold_conv(producer, s, t)
    elif is_op(producer, "Gemm"):
        done = _fold_gemm(producer, s, t)
    elif is_op(producer, "MatMul"):
        done = _fold_matmul(producer, s, t, None)
    elif is_op(producer, "Add"):
        mm = _matmul_add(producer)
        done = mm is not None and _fold_matmul(mm, s, t, producer)
    else:
        return False
    if not done:
        return False
    bypass(out, bn.inputs[0])  # re-read: a MatMul without Add now feeds BN through an Add
    remove_nodes([bn])
    return True


def _fold_conv(conv: ir.Node, s: np.ndarray, t: np.ndarray) -> bool:
    parts = conv_parts(conv)
    if parts is None or parts.m != s.size:
        return False
    w, b, m = parts
    b_new = (b if b is not None else np.zeros(m)) * s + t
    set_weight(conv, 1, scale_output_channels(conv, w, s).astype(w.dtype), "bnfold")
    set_weight(conv, 2, b_new.astype(w.dtype), "bnfold")
    return True


def _fold_gemm(gemm: ir.Node, s: np.ndarray, t: np.ndarray) -> bool:
    parts = gemm_parts(gemm)
    if parts is None or parts.m != s.size:
        return False
    w, trans_b, m, c_old = parts
    if c_old is None:
        c_old = np.zeros(m)
    if c_old.ndim >= 1 and c_old.shape[-1] not in (1, m):
        return False
    w_new = w * (s[:, None] if trans_b else s[None, :])
    c_new = c_old * s + t  # broadcasts over the column axis; keeps rows of a [N, M] C
    set_weight(gemm, 1, w_new.astype(w.dtype), "bnfold")
    set_weight(gemm, 2, c_new.astype(w.dtype), "bnfold")
    set_attr(gemm, "beta", 1.0)
    return True


def _matmul_add(add: ir.Node) -> ir.Node | None:
    """The MatMul feeding `add` (as MatMul(A, W) + bias), if that is the pattern."""
    for i in (0, 1):
        v = add.inputs[i]
        p = v.producer() if v is not None else None
        if is_op(p, "MatMul") and sole_consumer(v) is add:
            return p
    return None


def _fold_matmul(mm: ir.Node, s: np.ndarray, t: np.ndarray, add: ir.Node | None) -> bool:
    out = add.outputs[0] if add is not None else mm.outputs[0]
    if rank(mm.outputs[0]) != 2 or rank(out) != 2:
        return False
    w = exclusive_const(mm.inputs[1], mm)
    if w is None or w.ndim != 2 or w.shape[1] != s.size:
        return False
    if add is not None:
        bias_index = 1 if add.inputs[0] is mm.outputs[0] else 0
        bias = exclusive_const(add.inputs[bias_index], add)
        if bias is None or bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1):
            return False
        if bias.ndim >= 1 and bias.shape[-1] not in (1, s.size):
            return False
        new_bias = (bias.astype(np.float64) * s + t).reshape(-1)
        set_weight(mm, 1, (w * s[None, :]).astype(w.dtype), "bnfold")
        set_weight(add, bias_index, new_bias.astype(w.dtype), "bnfold")
        return True
    graph = mm.graph
    assert graph is not None
    set_weight(mm, 1, (w * s[None, :]).astype(w.dtype), "bnfold")
    # The BN's shift becomes an Add after the MatMul (fuse-matmul-add may make it a Gemm).
    bias_node = ir.node("Add", [mm.outputs[0], None], name=f"{mm.name or 'matmul'}_bn_shift")
    graph.insert_after(mm, bias_node)
    mm_out = mm.outputs[0]
    # every former reader of the MatMul output was the BN: move it to the Add
    for use in list(mm_out.uses()):
        if use.node is not bias_node:
            use.node.replace_input_with(use.idx, bias_node.outputs[0])
    set_weight(bias_node, 1, t.astype(w.dtype), "bnfold")
    bias_node.outputs[0].shape = mm_out.shape
    bias_node.outputs[0].type = mm_out.type
    return True


@register
class FoldBatchNormPass(RewritePass):
    """Fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul(+Add)."""

    name = "fold-bn"
    summary = "fold BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul(+Add)"
    stat = "bn_folded"
    rule = staticmethod(fold_batchnorm)
