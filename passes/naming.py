"""Fresh value and node names that cannot collide with the names already in a graph.

Every pass that invents a name (`<x>_quantized`, `<x>_dequantized`, `<node>_scale`,
`<node>_fused`, ...) takes it from a `NameAllocator`, never from a bare f-string: the
model may already hold that name (onnxsim and constant folding leave names like
`auto.cast.74`, a previous quantize run leaves `X_dequantized`, a user may name a
tensor anything), and ONNX requires every value name to be assigned once in a graph
and its subgraphs. A taken name gets the first free `_1`, `_2`, ... suffix.

Value and node names are two namespaces (ONNX checks the first; node names only need
to be unique for readers and reports). Both cover the graph's inputs, outputs,
initializers, every node and every subgraph of a node attribute, recursively.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from ..ir import add_initializer


def _subgraphs(node: ir.Node) -> Iterable[ir.Graph]:
    for attr in node.attributes.values():
        if not isinstance(attr, ir.Attr):
            continue
        if attr.type == ir.AttributeType.GRAPH:
            yield attr.value
        elif attr.type == ir.AttributeType.GRAPHS:
            yield from attr.value


def collect_names(graph: ir.Graph) -> tuple[set[str], set[str]]:
    """(value names, node names) used anywhere in `graph` and its subgraphs."""
    values: set[str] = set()
    nodes: set[str] = set()
    stack = [graph]
    while stack:
        g = stack.pop()
        values.update(v.name for v in g.inputs if v.name)
        values.update(v.name for v in g.outputs if v.name)
        values.update(name for name in g.initializers if name)
        for node in g:
            if node.name:
                nodes.add(node.name)
            values.update(v.name for v in node.outputs if v.name)
            values.update(v.name for v in node.inputs if v is not None and v.name)
            stack.extend(_subgraphs(node))
    return values, nodes


def take_free_name(base: str, taken: set[str], sep: str = "_") -> str:
    """`base`, or the first of `base_1`, `base_2`, ... (with `sep`) not in `taken`; it is
    added to `taken`."""
    name, i = base, 0
    while name in taken:
        i += 1
        name = f"{base}{sep}{i}"
    taken.add(name)
    return name


class NameAllocator:
    """Hands out value and node names unused in a graph (and by earlier allocations).

    Build one per pass run on the top-level graph (it is scanned once, subgraphs
    included) and take every new name from it; names it returned stay reserved even
    before they are attached to the graph.
    """

    def __init__(self, graph: ir.Graph):
        self.graph = graph
        self.values, self.nodes = collect_names(graph)

    def value(self, base: str) -> str:
        """A free value name: `base` itself when free, else `base_1`, `base_2`, ..."""
        return take_free_name(base or "value", self.values)

    def node(self, base: str) -> str:
        """A free node name: `base` itself when free, else `base_1`, `base_2`, ..."""
        return take_free_name(base or "node", self.nodes)

    def name_value(self, value: ir.Value, base: str) -> ir.Value:
        value.name = self.value(base)
        return value

    def make_node(self, op_type: str, inputs, attributes=None, *, name: str,
                  num_outputs: int = 1, output_names: Iterable[str] | None = None) -> ir.Node:
        """`ir.node` with a free node name and free names for its outputs.

        Outputs are named from `output_names` when given, else `<node name>_out`
        (`_out<i>` for several outputs)."""
        node = ir.node(op_type, inputs, attributes or {}, num_outputs=num_outputs,
                       name=self.node(name))
        bases = list(output_names) if output_names is not None else (
            [f"{node.name}_out"] if num_outputs == 1
            else [f"{node.name}_out{i}" for i in range(num_outputs)])
        for out, base in zip(node.outputs, bases, strict=True):
            self.name_value(out, base)
        return node

    def initializer(self, base: str, array: np.ndarray) -> ir.Value:
        """A new initializer holding `array` under a free name (0-d arrays stay 0-d)."""
        name = self.value(base)
        array = np.asarray(array)
        value = add_initializer(self.graph, name, array)
        if value.name != name:  # cannot happen: the allocator's view is a superset
            raise AssertionError(f"initializer name {name!r} became {value.name!r}")
        if array.ndim == 0 and value.const_value is not None and value.const_value.shape.dims:
            tensor = ir.tensor(array.copy(), name=name)
            value.const_value = tensor
            value.shape = tensor.shape
        return value
