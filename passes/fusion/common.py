"""Shared helpers of the exact graph rewrites (`fold-bn`, `fuse-*`, `fuse`).

Not a pass itself. The helpers (with the general ones in `passes/graph.py`) encode the
preconditions every rewrite checks: a weight must be a constant that the rewritten
node alone reads (so it can be replaced by a new initializer without duplicating
storage or changing another node), and an intermediate value that a rewrite removes
must have exactly one consumer and must not be a graph output.

New weights are always written as new initializers (`add_initializer`); shared
tensors are never modified in place. A rewrite pass runs its rewrite to a fixed
point, then drops dead nodes/initializers and sorts the graph topologically.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from ...ir import add_initializer, infer_shapes
from ..base import ForgePass
from ..graph import attr, float_const, output_channels


def exclusive(value: ir.Value | None, node: ir.Node) -> bool:
    """True when `node` is the only reader of `value` and it is not a graph output."""
    if value is None or value.is_graph_output():
        return False
    return all(use.node is node for use in value.uses())


def exclusive_const(value: ir.Value | None, node: ir.Node) -> np.ndarray | None:
    """Float constant read by `node` alone (a weight the rewrite may replace)."""
    arr = float_const(value)
    if arr is None or not exclusive(value, node):
        return None
    return arr


class ConvParts(NamedTuple):
    w: np.ndarray
    b: np.ndarray | None  # float64 [M], None when the conv has no bias
    m: int  # output channels


def conv_parts(conv: ir.Node) -> ConvParts | None:
    """Weight, bias and output channels of a Conv / ConvTranspose whose weight (rank >= 3)
    and bias (M values) are float constants it alone reads; None otherwise."""
    w = exclusive_const(conv.inputs[1] if len(conv.inputs) > 1 else None, conv)
    if w is None or w.ndim < 3:
        return None
    m = output_channels(conv, w)
    if m is None:
        return None
    has_bias = len(conv.inputs) > 2 and conv.inputs[2] is not None
    b = exclusive_const(conv.inputs[2], conv) if has_bias else None
    if has_bias and (b is None or b.size != m):
        return None
    return ConvParts(w, b.astype(np.float64).reshape(-1) if b is not None else None, m)


def gemm_weight(gemm: ir.Node) -> tuple[np.ndarray, int, int] | None:
    """(B, transB, output columns M) of a Gemm whose B is a 2-D float constant it alone
    reads; None otherwise."""
    w = exclusive_const(gemm.inputs[1], gemm)
    if w is None or w.ndim != 2:
        return None
    trans_b = int(attr(gemm, "transB", 0))
    return w, trans_b, int(w.shape[0] if trans_b else w.shape[1])


class GemmParts(NamedTuple):
    w: np.ndarray
    trans_b: int
    m: int  # output columns
    c: np.ndarray | None  # beta * C in float64, None when the Gemm has no C


def gemm_parts(gemm: ir.Node) -> GemmParts | None:
    """`gemm_weight` and beta * C of a Gemm with a 2-D output (or one of unknown rank)
    whose C, if any, is a float constant of rank <= 2 it alone reads; None otherwise."""
    if rank(gemm.outputs[0]) not in (None, 2):
        return None
    weight = gemm_weight(gemm)
    if weight is None:
        return None
    has_c = len(gemm.inputs) > 2 and gemm.inputs[2] is not None
    c = exclusive_const(gemm.inputs[2], gemm) if has_c else None
    if has_c and (c is None or c.ndim > 2):
        return None
    beta = float(attr(gemm, "beta", 1.0))
    return GemmParts(*weight, beta * c.astype(np.float64) if c is not None else None)


def set_weight(node: ir.Node, index: int, array: np.ndarray, name: str) -> ir.Value:
    """Point input `index` of `node` at a new initializer holding `array`."""
    graph = node.graph
    assert graph is not None
    old = node.inputs[index] if index < len(node.inputs) else None
    base = old.name if old is not None and old.name else f"{node.name or node.op_type}_{name}"
    value = add_initializer(graph, f"{base}_{name}", np.ascontiguousarray(array))
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)
    return value


def rank(value: ir.Value | None) -> int | None:
    if value is None or value.shape is None:
        return None
    return len(value.shape)


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def all_nodes(model: ir.Model) -> list[ir.Node]:
    """Every node of the model, subgraphs included, as a list (safe to mutate while looping)."""
    return list(ir.traversal.RecursiveGraphIterator(model.graph))


class RewritePass(ForgePass):
    """A pass made of one local rewrite applied to every matching node until none is left.

    Subclasses set `rule`, the rewrite of one node (`rule(model, node) -> bool`, True when
    the graph changed), or override `rewrite`; `stat` names the counter the number of
    rewrites goes to. Every rewrite is exact (`ForgePass.exact`).
    """

    rule: ClassVar[Callable[[ir.Model, ir.Node], bool]]
    stat: ClassVar[str] = "rewrites"
    max_rounds: ClassVar[int] = 8
    # The `fuse` driver infers shapes once and turns this off for its sub-passes.
    infer: bool = True
    # every node is visited, bodies included (shapes are inferred in the main graph only,
    # so rules that need a shape do not fire inside bodies)
    descends_into_subgraphs = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.infer:
            infer_shapes(model, missing_only=True)
        self.model = model
        total = 0
        for _ in range(self.max_rounds):
            changed = 0
            for node in all_nodes(model):
                if node.graph is None:  # removed by an earlier rewrite of this round
                    continue
                if self.rewrite(model, node):
                    changed += 1
            total += changed
            if not changed:
                break
        if total:
            self.count(self.stat, total)
            ir_common.RemoveUnusedNodesPass()(model)
            ir_common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=bool(total))

    def rewrite(self, model: ir.Model, node: ir.Node) -> bool:
        return self.rule(model, node)
