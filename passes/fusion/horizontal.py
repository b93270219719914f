"""`fuse-horizontal`: merge sibling Conv / MatMul / Gemm nodes reading the same input.

Rewrite rules (x shared, k >= 2 siblings):

- `Conv_i(x, W_i, b_i)` for i = 1..k  =>  `Conv(x, concat(W_i, axis 0), concat(b_i))` followed
  by `Split(axis=1, [M_1..M_k])` whose outputs replace the sibling outputs.
- `MatMul_i(x, W_i)` (2-D W_i) => `MatMul(x, concat(W_i, axis 1))` + `Split(axis=-1)`. When
  every sibling is followed by its own `Add(Y_i, bias_i)` with a constant bias of
  shape [M_i] (its only consumer), the biases are merged too: `MatMul -> Add(concat(bias_i))
  -> Split` replaces the k Adds as well (Q/K/V projections of a transformer).
- `Gemm_i(x, B_i, C_i)` (same transB, alpha, beta; transA = 0)  =>  `Gemm(x, concat(B_i),
  concat(C_i))` + `Split(axis=1)`; B_i is concatenated along its output axis (0 with
  transB=1, else 1); C_i must be absent (zeros), a scalar or one value per output column.

Preconditions: the siblings read x as their data input (Conv input 0 / MatMul input
0); weights (and biases) are float constants read by that sibling alone, of the
same dtype; Conv siblings have identical attributes (kernel shape, strides, pads,
dilations, auto_pad) and `group == 1` (a grouped conv maps channels by group, so
concatenation would change which input channels each output sees) and the same
weight shape apart from the output channels; MatMul weights have the same number
of rows. A group whose members do not all satisfy this is split into the subsets
that do (by attributes); singletons are left alone.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from ...ir import add_initializer
from ..base import register
from ..graph import attr, bypass, is_op, opset, remove_nodes, sole_consumer
from .common import RewritePass, exclusive_const, gemm_weight

logger = logging.getLogger(__name__)


def _conv_key(conv: ir.Node) -> tuple | None:
    w = exclusive_const(conv.inputs[1] if len(conv.inputs) > 1 else None, conv)
    if w is None or int(conv.attributes["group"].value if "group" in conv.attributes else 1) != 1:
        return None
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        b = exclusive_const(conv.inputs[2], conv)
        if b is None or b.dtype != w.dtype:
            return None
    attrs = tuple(sorted((k, repr(a.value)) for k, a in conv.attributes.items()))
    return ("Conv", w.dtype.str, w.shape[1:], attrs)


def _matmul_key(mm: ir.Node) -> tuple | None:
    w = exclusive_const(mm.inputs[1], mm)
    if w is None or w.ndim != 2:
        return None
    return ("MatMul", w.dtype.str, w.shape[0])


def _gemm_key(gemm: ir.Node) -> tuple | None:
    weight = gemm_weight(gemm) if not int(attr(gemm, "transA", 0)) else None
    if weight is None:
        return None
    w, trans_b, m = weight
    if len(gemm.inputs) > 2 and gemm.inputs[2] is not None:
        c = exclusive_const(gemm.inputs[2], gemm)
        if c is None or c.dtype != w.dtype or c.size not in (1, m) or c.ndim > 2:
            return None
    k = w.shape[1] if trans_b else w.shape[0]
    return ("Gemm", w.dtype.str, k, trans_b, float(attr(gemm, "alpha", 1.0)),
            float(attr(gemm, "beta", 1.0)))


def _bias_add(mm: ir.Node, m: int) -> tuple[ir.Node, np.ndarray] | None:
    y = mm.outputs[0]
    add = sole_consumer(y)
    if not is_op(add, "Add") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if other is y:
        return None
    bias = exclusive_const(other, add)
    if bias is None or bias.shape != (m,):
        return None
    return add, bias


def fuse_siblings(model: ir.Model, x: ir.Value) -> bool:
    """Merge each group of compatible sibling Conv/MatMul nodes reading `x`."""
    groups: dict[tuple, list[ir.Node]] = defaultdict(list)
    seen: set[int] = set()
    for use in list(x.uses()):
        node = use.node
        if use.idx != 0 or id(node) in seen or node.graph is None:
            continue
        seen.add(id(node))
        key = None
        if is_op(node, "Conv"):
            key = _conv_key(node)
        elif is_op(node, "MatMul") and node.inputs[1] is not x:
            key = _matmul_key(node)
        elif is_op(node, "Gemm") and node.inputs[1] is not x:
            key = _gemm_key(node)
        if key is not None:
            groups[(id(node.graph),) + key].append(node)
    changed = False
    for members in groups.values():
        if len(members) < 2:
            continue
        if members[0].op_type == "Conv":
            _merge_convs(model, x, members)
        elif members[0].op_type == "Gemm":
            _merge_gemms(model, x, members)
        else:
            _merge_matmuls(model, x, members)
        changed = True
    return changed


def _split_node(model: ir.Model, graph: ir.Graph, data: ir.Value, sizes: list[int], axis: int,
                name: str) -> ir.Node:
    if opset(model) >= 13:
        split = add_initializer(graph, f"{name}_split", np.asarray(sizes, np.int64))
        return ir.node("Split", [data, split], {"axis": axis}, num_outputs=len(sizes), name=name)
    return ir.node("Split", [data], {"axis": axis, "split": sizes}, num_outputs=len(sizes),
                   name=name)


def _first_in_graph(graph: ir.Graph, members: list[ir.Node]) -> ir.Node:
    wanted = {id(n) for n in members}
    for node in graph:
        if id(node) in wanted:
            return node
    return members[0]


def _merge_convs(model: ir.Model, x: ir.Value, convs: list[ir.Node]) -> None:
    weights = [exclusive_const(c.inputs[1], c) for c in convs]
    sizes = [int(w.shape[0]) for w in weights]
    biases = []
    for c, w in zip(convs, weights):
        if len(c.inputs) > 2 and c.inputs[2] is not None:
            biases.append(exclusive_const(c.inputs[2], c).reshape(-1))
        else:
            biases.append(np.zeros(w.shape[0], w.dtype))
    _merge_with_bias(model, x, convs, np.concatenate(weights, axis=0), biases, sizes, "B")


def _merge_matmuls(model: ir.Model, x: ir.Value, mms: list[ir.Node]) -> None:
    graph = mms[0].graph
    assert graph is not None
    weights = [exclusive_const(m.inputs[1], m) for m in mms]
    sizes = [int(w.shape[1]) for w in weights]
    adds = [_bias_add(m, s) for m, s in zip(mms, sizes)]
    with_bias = all(a is not None and a[1].dtype == weights[0].dtype for a in adds)
    name = "_".join(m.name or "matmul" for m in mms[:3]) + "_hfused"
    w_all = add_initializer(graph, f"{name}_W", np.concatenate(weights, axis=1))
    merged = ir.Node("", "MatMul", [x, w_all], name=name)
    new_nodes = [merged]
    data = merged.outputs[0]
    if with_bias:
        b_all = add_initializer(graph, f"{name}_B", np.concatenate([a[1] for a in adds]))
        bias_node = ir.Node("", "Add", [data, b_all], name=f"{name}_bias")
        new_nodes.append(bias_node)
        data = bias_node.outputs[0]
    split = _split_node(model, graph, data, sizes, -1, f"{name}_split")
    new_nodes.append(split)
    anchor = _first_in_graph(graph, mms)
    graph.insert_before(anchor, new_nodes)
    if with_bias:
        for (add, _), out in zip(adds, split.outputs):
            bypass(add.outputs[0], out)
        remove_nodes([a[0] for a in adds])
    else:
        for mm, out in zip(mms, split.outputs):
            bypass(mm.outputs[0], out)
    remove_nodes(mms)
    logger.debug("fuse-horizontal: merged %d MatMul nodes reading %s", len(mms), x.name)


def _merge_gemms(model: ir.Model, x: ir.Value, gemms: list[ir.Node]) -> None:
    trans_b = int(attr(gemms[0], "transB", 0))
    weights = [exclusive_const(g.inputs[1], g) for g in gemms]
    sizes = [int(w.shape[0] if trans_b else w.shape[1]) for w in weights]
    biases = []
    for g, w, m in zip(gemms, weights, sizes):
        if len(g.inputs) > 2 and g.inputs[2] is not None:
            c = exclusive_const(g.inputs[2], g).reshape(-1)
            biases.append(np.broadcast_to(c, (m,)))  # a single value applies to every column
        else:
            biases.append(np.zeros(m, w.dtype))
    _merge_with_bias(model, x, gemms, np.concatenate(weights, axis=0 if trans_b else 1), biases,
                     sizes, "C")


def _merge_with_bias(model: ir.Model, x: ir.Value, members: list[ir.Node], weight: np.ndarray,
                     biases: list[np.ndarray], sizes: list[int], bias_name: str) -> None:
    """One node like `members[0]` (Conv or Gemm: same attributes) with the concatenated
    `weight` and `biases`, then a Split along axis 1 whose outputs replace the members'."""
    graph = members[0].graph
    assert graph is not None
    op = members[0].op_type
    name = "_".join(n.name or op.lower() for n in members[:3]) + "_hfused"
    w_all = add_initializer(graph, f"{name}_W", weight)
    b_all = add_initializer(graph, f"{name}_{bias_name}",
                            np.concatenate(biases).astype(weight.dtype))
    attrs = [ir.Attr(a.name, a.type, a.value) for a in members[0].attributes.values()]
    merged = ir.Node("", op, [x, w_all, b_all], attributes=attrs, name=name)
    split = _split_node(model, graph, merged.outputs[0], sizes, 1, f"{name}_split")
    graph.insert_before(_first_in_graph(graph, members), [merged, split])
    for node, out in zip(members, split.outputs):
        bypass(node.outputs[0], out)
    remove_nodes(members)
    logger.debug("fuse-horizontal: merged %d %s nodes reading %s", len(members), op, x.name)


@register
class FuseHorizontalPass(RewritePass):
    """Merge sibling Conv/MatMul nodes with constant weights reading the same input."""

    name = "fuse-horizontal"
    summary = "merge sibling Conv/MatMul/Gemm (e.g. Q/K/V projections) into one wider op + Split"
    stat = "sibling_groups_fused"

    def rewrite(self, model: ir.Model, node: ir.Node) -> bool:
        changed = False
        for out in node.outputs:
            changed |= fuse_siblings(model, out)
        return changed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # Graph inputs have no producer node: handle their readers first.
        done = 0
        for graph in model.graphs():
            for value in list(graph.inputs):
                if fuse_siblings(model, value):
                    done += 1
        result = super().call(model)
        if done:
            self.count(self.stat, done)
            if not result.modified:
                from onnx_ir.passes import common as ir_common
                ir_common.RemoveUnusedNodesPass()(model)
                ir_common.TopologicalSortPass()(model)
        return ir.passes.PassResult(model, modified=bool(done) or result.modified)
