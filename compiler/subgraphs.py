"""Control-flow subgraphs (`If` branches, `Loop` and `Scan` bodies): where they are,
what compute they hold, and how to observe values inside them.

Passes and metrics that only walk `model.graph` miss everything in these bodies (the
Silero VAD keeps all its Conv and LSTM layers inside `If` branches). This module gives
them a census (`subgraph_compute`) to report what they skipped, and `expose_values`,
which makes values computed inside bodies readable from onnxruntime: onnxruntime only
returns main-graph outputs, so each observed value is lifted out scope by scope:

  * `If`: the value (through an Identity) becomes a new output of its branch; every
    other branch outputs an empty tensor of the same element type in that slot, so the
    If gets one more output; a run through the other branch reads an empty array.
  * `Loop` / `Scan`: the value becomes a new scan output of the body, so the node
    returns its values of all iterations stacked along a new leading axis.

Lifting repeats until the value reaches the main graph, where it becomes a graph
output. The exposed model is a copy used for reading only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

CONTROL_FLOW_OPS = ("If", "Loop", "Scan")
# Ops that hold a layer's compute (weights x activations): what a pass that skips a
# body would leave untouched. Kept here so metrics and the pass manager agree.
COMPUTE_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger",
                         "MatMulInteger", "QLinearConv", "QLinearMatMul", "LSTM", "GRU",
                         "RNN", "DynamicQuantizeLSTM", "MatMulNBits"})


def node_subgraphs(node: ir.Node) -> list[tuple[str, ir.Graph]]:
    """(attribute name, graph) of every subgraph attribute of `node`."""
    out = []
    for name, attr in node.attributes.items():
        if not isinstance(attr, ir.Attr):
            continue
        if attr.type == ir.AttributeType.GRAPH:
            out.append((name, attr.value))
        elif attr.type == ir.AttributeType.GRAPHS:
            out.extend((name, g) for g in attr.value)
    return out


@dataclass(frozen=True)
class Scope:
    """Where a subgraph sits: its owner node and the attribute holding it."""

    owner: ir.Node
    attribute: str
    graph: ir.Graph


def iter_scopes(graph: ir.Graph) -> Iterator[Scope]:
    """Every subgraph under `graph`, recursively, outer scopes first."""
    for node in graph:
        for name, sub in node_subgraphs(node):
            yield Scope(node, name, sub)
            yield from iter_scopes(sub)


def owners(graph: ir.Graph) -> dict[int, Scope]:
    """id(subgraph) -> its Scope, for every subgraph under `graph`."""
    return {id(s.graph): s for s in iter_scopes(graph)}


def scope_path(g: ir.Graph, by_graph: dict[int, Scope]) -> list[Scope]:
    """The chain of scopes from the main graph down to `g` (empty for the main graph)."""
    path = []
    while id(g) in by_graph:
        scope = by_graph[id(g)]
        path.append(scope)
        g = scope.owner.graph
    return path[::-1]


def describe_path(path: list[Scope]) -> str:
    """'If_0.then_branch/Loop_3.body' (empty for the main graph)."""
    return "/".join(f"{s.owner.name or s.owner.op_type}.{s.attribute}" for s in path)


def subgraph_compute(model: ir.Model) -> list[dict[str, str]]:
    """Compute nodes (COMPUTE_OPS) inside If/Loop/Scan bodies: name, op, where."""
    found = []
    for scope in iter_scopes(model.graph):
        where = None
        for node in scope.graph:
            if node.op_type in COMPUTE_OPS:
                if where is None:
                    where = describe_path(scope_path(scope.graph, owners(model.graph)))
                found.append({"node": node.name or node.op_type, "op": node.op_type,
                              "in": where})
    return found


def summarize_compute(found: list[dict[str, str]], limit: int = 4) -> str:
    """'12 node(s) (Conv×8, LSTM×4) in If_0.then_branch, If_0.else_branch'."""
    ops: dict[str, int] = {}
    for f in found:
        ops[f["op"]] = ops.get(f["op"], 0) + 1
    where = sorted({f["in"].split("/")[0] for f in found})
    more = f" and {len(where) - limit} more" if len(where) > limit else ""
    return (f"{len(found)} node(s) ({', '.join(f'{k}×{v}' for k, v in sorted(ops.items()))}) "
            f"in {', '.join(where[:limit])}{more}")


# ------------------------------------------------------------------ observation


def _values_by_name(graph: ir.Graph) -> dict[str, tuple[ir.Value, ir.Graph]]:
    """Every value defined in `graph` or a subgraph (inputs, node outputs), by name, with
    the graph defining it."""
    found: dict[str, tuple[ir.Value, ir.Graph]] = {}
    stack = [graph]
    while stack:
        g = stack.pop()
        for v in g.inputs:
            found.setdefault(v.name, (v, g))
        for v in g.initializers.values():
            found.setdefault(v.name, (v, g))
        for node in g:
            for v in node.outputs:
                found.setdefault(v.name, (v, g))
            stack.extend(sub for _, sub in node_subgraphs(node))
    return found


def _elem_type(value: ir.Value) -> ir.DataType:
    return value.dtype if value.dtype is not None else ir.DataType.FLOAT


class _Lifter:
    """Moves values out of subgraphs one scope at a time (see the module docstring)."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.by_graph = owners(model.graph)
        from .passes.naming import NameAllocator  # passes imports compiler modules

        self.names = NameAllocator(model.graph)

    def lift(self, value: ir.Value, graph: ir.Graph) -> ir.Value:
        """A main-graph value carrying `value` (defined in `graph`)."""
        while id(graph) in self.by_graph:
            scope = self.by_graph[id(graph)]
            value = self._lift_once(value, scope)
            graph = scope.owner.graph
        return value

    def _identity(self, value: ir.Value, graph: ir.Graph) -> ir.Value:
        node = self.names.make_node("Identity", [value], name=f"{value.name}_observe",
                                    output_names=[f"{value.name}_observed"])
        out = node.outputs[0]
        out.type = ir.TensorType(_elem_type(value))
        graph.append(node)
        graph.outputs.append(out)
        return out

    def _empty(self, graph: ir.Graph, dtype: ir.DataType, base: str) -> None:
        empty = ir.tensor(np.zeros((0,), dtype=dtype.numpy()))
        node = self.names.make_node("Constant", [], {"value": empty}, name=f"{base}_absent",
                                    output_names=[f"{base}_absent"])
        node.outputs[0].type = ir.TensorType(dtype)
        graph.append(node)
        graph.outputs.append(node.outputs[0])

    def _lift_once(self, value: ir.Value, scope: Scope) -> ir.Value:
        owner = scope.owner
        dtype = _elem_type(value)
        self._identity(value, scope.graph)
        if owner.op_type == "If":
            for _, other in node_subgraphs(owner):
                if other is not scope.graph:
                    self._empty(other, dtype, value.name)
        elif owner.op_type == "Scan":
            for key in ("scan_output_axes", "scan_output_directions"):
                attr = owner.attributes.get(key)
                if attr is not None:
                    owner.attributes[key] = ir.AttrInt64s(key, [*attr.value, 0])
        elif owner.op_type != "Loop":
            raise ValueError(f"cannot observe values inside {owner.op_type} node "
                             f"{owner.name!r}: only If, Loop and Scan bodies are supported")
        owner.resize_outputs(len(owner.outputs) + 1)
        out = owner.outputs[-1]
        out.name = self.names.value(f"{value.name}_lifted")
        out.type = ir.TensorType(dtype)
        return out


def expose_values(model: ir.Model, names: Iterable[str]) -> dict[str, str]:
    """Make every named value readable as a main-graph output of `model` (in place: pass
    a copy). Returns name -> the graph output carrying it (the name itself for values of
    the main graph; a lifted output for values inside subgraphs, which reads as an empty
    array on runs where the value's If branch was not taken, or stacked over the
    iterations of a Loop/Scan). KeyError for a name defined nowhere."""
    graph = model.graph
    values = _values_by_name(graph)
    existing = {v.name for v in graph.outputs}
    main = {id(graph)}
    lifter: _Lifter | None = None
    carried: dict[str, str] = {}
    for name in names:
        if name in carried:
            continue
        if name not in values:
            raise KeyError(f"no value named {name!r} in the model")
        value, where = values[name]
        if id(where) in main:
            if name not in existing:
                graph.outputs.append(value)
                existing.add(name)
            carried[name] = name
            continue
        lifter = lifter or _Lifter(model)
        out = lifter.lift(value, where)
        graph.outputs.append(out)
        carried[name] = out.name
    return carried
