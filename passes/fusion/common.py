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

from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from ...ir import add_initializer, infer_shapes
from ..base import ForgePass
from ..graph import float_const


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

    Subclasses implement `rewrite(model, node) -> bool` (True when the graph changed);
    `stat` names the counter the number of rewrites goes to.
    """

    stat: ClassVar[str] = "rewrites"
    max_rounds: ClassVar[int] = 8
    # The `fuse` driver infers shapes once and turns this off for its sub-passes.
    infer: bool = True

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

    def rewrite(self, model: ir.Model, node: ir.Node) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError
