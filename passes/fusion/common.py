"""Shared helpers of the exact graph rewrites (`fold-bn`, `fuse-*`, `fuse`).

Not a pass itself. The helpers encode the preconditions every rewrite checks:
a weight must be a constant that the rewritten node alone reads (so it can be
replaced by a new initializer without duplicating storage or changing another
node), and an intermediate value that a rewrite removes must have exactly one
consumer and must not be a graph output.

New weights are always written as new initializers (`add_initializer`); shared
tensors are never modified in place. A rewrite pass runs its rewrite to a fixed
point, then drops dead nodes/initializers and sorts the graph topologically.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from ...ir import add_initializer, constant_array, infer_shapes
from ..base import ForgePass

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
STANDARD_DOMAINS = ("", "ai.onnx")


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    return node is not None and node.domain in STANDARD_DOMAINS and node.op_type in op_types


def const(value: ir.Value | None) -> np.ndarray | None:
    """Constant value of an initializer or Constant output; None for graph inputs."""
    if value is None or value.is_graph_input():
        return None
    return constant_array(value)


def float_const(value: ir.Value | None) -> np.ndarray | None:
    arr = const(value)
    if arr is None or arr.dtype.type not in FLOAT_DTYPES:
        return None
    return arr


def sole_consumer(value: ir.Value | None) -> ir.Node | None:
    """The single node reading `value` (once), or None if it has 0 or >1 uses or is an output."""
    if value is None or value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    return uses[0].node


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


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    if a is None:
        return default
    value = a.value
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def set_attr(node: ir.Node, name: str, value: Any) -> None:
    node.attributes[name] = ir.convenience.convert_attribute(name, value)


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


def output_channels(op_type: str, w: np.ndarray, group: int) -> int | None:
    """Number of output channels of a Conv / ConvTranspose with weight `w`."""
    if op_type == "Conv":
        return int(w.shape[0])
    if w.shape[0] % group:
        return None
    return int(w.shape[1]) * group


def scale_output_channels(op_type: str, w: np.ndarray, s: np.ndarray, group: int) -> np.ndarray:
    """`w` with output channel o multiplied by s[o] (Conv: axis 0; ConvTranspose:
    W is [C, M/g, k...] and output channel o = (c // (C/g)) * (M/g) + j)."""
    s = np.asarray(s, np.float64)
    if op_type == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    c, mg = w.shape[0], w.shape[1]
    shaped = w.reshape((group, c // group, mg) + w.shape[2:])
    return (shaped * s.reshape((group, 1, mg) + (1,) * (w.ndim - 2))).reshape(w.shape)


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


def bypass(old: ir.Value, new: ir.Value) -> None:
    """Make every reader of `old` (graph outputs included) read `new`; `new` takes the name.

    `old` must be about to disappear (its producer is removed by the caller or by
    dead code elimination). Keeping the name keeps graph output names stable.
    """
    name = old.name
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if name:
        old.name = f"{name}__replaced"
        new.name = name
    if new.shape is None and old.shape is not None:
        new.shape = old.shape
    if new.type is None and old.type is not None:
        new.type = old.type


def remove_nodes(nodes: list[ir.Node]) -> None:
    """Detach and remove nodes whose outputs no longer have readers."""
    for node in nodes:
        graph = node.graph
        if graph is not None:
            graph.remove(node, safe=True)


def opset(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


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
