"""Layer-input Hessians H = XᵀX of Conv/Gemm/MatMul weights from calibration data, and
the 2-D `[output channels, input features]` view of their weights (for gptq.py).

X has one row per output position and one column per input feature of the weight:
  MatMul  A[..., K] @ W[K, N]       rows = A reshaped to [-1, K], weight view Wᵀ
  Gemm    A[M, K] @ B (transB: Bᵀ)  rows = A,                    weight view B or Bᵀ
  Conv    W[Cout, Cin/g, k...]      rows = image patches (im2col), one Hessian per group g,
                                    weight view W[g-th Cout/g rows].reshape(Cout/g, -1)

The calibration batches are split: batches 1, 5, 9, ... are held out
(`HessianPair.held_out`) so that rounding methods are compared on inputs they were not
fitted on; with a single batch both Hessians are that batch (the report says so).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ...activations import ActivationReader
from ...ir import constant_array
from ..graph import attr


@dataclass
class HessianPair:
    """XᵀX per group ([groups, d, d]) on the fitting and on the held-out batches."""

    fit: np.ndarray | None = None
    held_out: np.ndarray | None = None
    fit_rows: int = 0
    held_out_rows: int = 0

    def add(self, x: np.ndarray, held_out: bool) -> None:
        xg = np.ascontiguousarray(x.transpose(1, 0, 2))  # [groups, rows, d]
        h = np.matmul(xg.transpose(0, 2, 1), xg)  # BLAS per group (einsum would not be)
        if held_out:
            self.held_out = h if self.held_out is None else self.held_out + h
            self.held_out_rows += x.shape[0]
        else:
            self.fit = h if self.fit is None else self.fit + h
            self.fit_rows += x.shape[0]


def gptq_unsupported(node: ir.Node) -> str | None:
    """None if GPTQ can round `node`'s weight, else why not (it is then rounded to nearest)."""
    w = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if w is None:
        return "weight is not constant"
    if node.op_type == "MatMul":
        return None if w.ndim == 2 else "MatMul weight is not 2-D"
    if node.op_type == "Gemm":
        return "Gemm transA=1" if int(attr(node, "transA", 0)) else None
    if node.op_type == "Conv":
        if str(attr(node, "auto_pad", "NOTSET")) not in ("NOTSET", "VALID"):
            return "Conv auto_pad SAME_* (explicit pads only)"
        return None
    return f"{node.op_type} is not rounded by GPTQ"


def weight_rows(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """The weight as [groups, Cout/groups, d] (d = input features per group)."""
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not int(attr(node, "transB", 0))):
        return w.T[None]
    if node.op_type == "Gemm":
        return w[None]
    groups = int(attr(node, "group", 1))
    return w.reshape(groups, w.shape[0] // groups, -1)


def from_rows(node: ir.Node, rows: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of `weight_rows`: the weight in its ONNX layout."""
    if node.op_type == "MatMul" or (node.op_type == "Gemm" and not int(attr(node, "transB", 0))):
        return rows[0].T.reshape(shape)
    return rows.reshape(shape)


def _conv_patches(node: ir.Node, x: np.ndarray, kernel: tuple[int, ...]) -> np.ndarray:
    """im2col: [N * output positions, groups, Cin/groups * prod(kernel)]."""
    nd = len(kernel)
    strides = list(attr(node, "strides", None) or [1] * nd)
    dil = list(attr(node, "dilations", None) or [1] * nd)
    pads = list(attr(node, "pads", None) or [0] * (2 * nd))
    if str(attr(node, "auto_pad", "NOTSET")) == "VALID":
        pads = [0] * (2 * nd)
    groups = int(attr(node, "group", 1))
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    span = tuple((k - 1) * d + 1 for k, d in zip(kernel, dil))
    win = np.lib.stride_tricks.sliding_window_view(xp, span, axis=tuple(range(2, 2 + nd)))
    index = (slice(None), slice(None), *[slice(None, None, s) for s in strides],
             *[slice(None, None, d) for d in dil])
    win = win[index]  # [N, C, out..., k...]
    n, c = win.shape[:2]
    out = win.shape[2:2 + nd]
    win = np.moveaxis(win, 1, 1 + nd)  # [N, out..., C, k...]
    return win.reshape(n * int(np.prod(out)), groups, (c // groups) * int(np.prod(kernel)))


def layer_inputs(node: ir.Node, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The rows X of `node`'s Hessian from its data input: [rows, groups, d] float64."""
    if node.op_type == "Conv":
        rows = _conv_patches(node, x, tuple(w.shape[2:]))
    else:
        rows = x.reshape(-1, 1, x.shape[-1])
    return rows.astype(np.float64)


def _layer_key(node: ir.Node, w: np.ndarray) -> tuple[Any, ...]:
    """Nodes with equal keys share a Hessian (the same input read the same way)."""
    if node.op_type != "Conv":
        return (node.inputs[0].name, "dense")
    return (node.inputs[0].name, tuple(w.shape[1:]), int(attr(node, "group", 1)),
            *(tuple(attr(node, a, None) or ()) for a in ("strides", "dilations", "pads")),
            str(attr(node, "auto_pad", "NOTSET")))


@dataclass
class LayerHessians:
    by_node: dict[str, HessianPair] = field(default_factory=dict)
    batches: int = 0
    held_out_batches: int = 0


def collect_hessians(model: ir.Model, nodes: list[ir.Node],
                     batches: Iterable[dict[str, np.ndarray]], *,
                     threads: int | None = None) -> LayerHessians:
    """One pass over `batches`: XᵀX of every node's weight input (fit and held-out)."""
    weights = {n.name: constant_array(n.inputs[1]) for n in nodes}
    keys = {n.name: _layer_key(n, weights[n.name]) for n in nodes}
    pairs: dict[tuple[Any, ...], HessianPair] = {k: HessianPair() for k in keys.values()}
    names = sorted({n.inputs[0].name for n in nodes})
    reader = ActivationReader(model, names, threads=threads)
    out = LayerHessians()
    seen: list[dict[str, np.ndarray]] = []
    for i, batch in enumerate(batches):
        held_out = i % 4 == 1
        _accumulate(nodes, weights, keys, pairs, reader.read(batch, names), held_out)
        out.batches += 1
        out.held_out_batches += held_out
        if i == 0:
            seen.append(batch)
    if out.batches and not out.held_out_batches:
        # A single batch: the held-out Hessian is that batch's (not disjoint).
        _accumulate(nodes, weights, keys, pairs, reader.read(seen[0], names), True)
    for n in nodes:
        out.by_node[n.name] = pairs[keys[n.name]]
    return out


def _accumulate(nodes, weights, keys, pairs, acts, held_out) -> None:
    done = set()
    for n in nodes:
        key = keys[n.name]
        if key in done:
            continue
        done.add(key)
        x = np.asarray(acts[n.inputs[0].name])
        pairs[key].add(layer_inputs(n, x, weights[n.name]), held_out)
