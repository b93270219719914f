"""Physical channel removal: slice weights and fix shape-carrying ops.

Given the dependency analysis (`groups.analyze`) and, per axis node, the
indices to remove, this rewrites the graph in place so every op is smaller (no
masks):

- weights (initializers and `Constant` nodes) are sliced along each pruned axis;
  a weight shared by several ops is sliced once (the analysis coupled its users);
- grouped / depthwise Conv: `group` drops by the number of removed groups;
- Reshape: pruned positions of a constant target shape get the new size; a target
  built at run time (Shape/Gather/Concat) gets a `Where` that overrides only the
  constant positions that changed;
- Split: the split sizes; Slice: starts/ends re-indexed into the kept channels;
  Resize with `sizes`: the pruned axis size;
- value shape annotations along pruned axes.

Preconditions were checked by the analysis (an op it could not follow blocked
the axis), so apply never guesses; it raises `PruneApplyError` on an
inconsistency, and the pass then leaves the model unchanged.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_ir as ir

from ...ir import add_initializer
from ..graph import attr, drop_if_unused
from .groups import (
    Analysis,
    Blocked,
    _norm_axis,
    _Shapes,
    reshape_target,
    slice_params,
    slice_range,
    split_sizes,
)

logger = logging.getLogger(__name__)


class PruneApplyError(RuntimeError):
    """The plan could not be applied consistently (the pass refuses)."""


def kept_indices(analysis: Analysis, removed: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Axis node id -> kept indices, for every axis node that loses something."""
    kept = {}
    for nid, rem in removed.items():
        if len(rem) == 0:
            continue
        size = analysis.nodes[nid].size
        keep = np.setdiff1d(np.arange(size), rem)
        if len(keep) == 0:
            raise PruneApplyError(f"{analysis.nodes[nid].label()}: every channel removed")
        kept[nid] = keep
    return kept


def set_constant(value: ir.Value, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    if value.const_value is not None or value.is_initializer():
        value.const_value = ir.tensor(array, name=value.name)
    else:
        node = value.producer()
        if node is None or node.op_type != "Constant":
            raise PruneApplyError(f"{value.name}: not a constant")
        for key in list(node.attributes):
            del node.attributes[key]
        node.attributes["value"] = ir.AttrTensor("value", ir.tensor(array, name=value.name))
    value.shape = ir.Shape(array.shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))


def apply_plan(model: ir.Model, analysis: Analysis, removed: dict[int, np.ndarray]
               ) -> dict[str, int]:
    """Remove the channels in `removed` (axis node id -> indices) from `model` in place.

    `model` must be the model `analysis` was computed on. Returns counts.
    """
    s = _Shapes(model)
    graph = model.graph
    kept = kept_indices(analysis, removed)
    by_value: dict[int, tuple[ir.Value, dict[int, np.ndarray]]] = {}
    for nid, keep in kept.items():
        an = analysis.nodes[nid]
        by_value.setdefault(id(an.value), (an.value, {}))[1][an.axis] = keep
    def new_dim(value: ir.Value, axis: int) -> int | None:
        entry = by_value.get(id(value))
        if entry is None or axis not in entry[1]:
            return None
        return len(entry[1][axis])

    # 1. node attributes / shape parameters (read the old constants before slicing)
    edits = _edit_op_parameters(s, graph, new_dim, by_value)
    # 2. slice constants, update shapes of activations
    sliced = _slice_values(s, by_value)
    logger.info("pruning applied: %d constants sliced, %d op parameters edited", sliced, edits)
    return {"constants_sliced": sliced, "op_parameters_edited": edits}


def _edit_op_parameters(s: _Shapes, graph: ir.Graph, new_dim,
                        by_value: dict[int, tuple[ir.Value, dict[int, np.ndarray]]]) -> int:
    """Group counts and shape parameters (Reshape targets, Split sizes, Slice bounds,
    Resize sizes) made to match the kept channels; the number of nodes edited."""
    edits = 0
    for node in list(graph):
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            if op == "Conv" and int(attr(node, "group", 1)) > 1:
                edits += _fix_group(s, node, new_dim)
            elif op == "Reshape":
                edits += _fix_reshape(s, graph, node, new_dim)
            elif op == "Split":
                edits += _fix_split(s, graph, node, new_dim)
            elif op == "Slice":
                edits += _fix_slice(s, graph, node, by_value)
            elif op == "Resize" and len(node.inputs) > 3 and node.inputs[3] is not None:
                edits += _fix_resize_sizes(s, graph, node, new_dim)
        except Blocked as exc:
            raise PruneApplyError(f"{op} {node.name}: {exc}") from exc
    return edits


def _slice_values(s: _Shapes,
                  by_value: dict[int, tuple[ir.Value, dict[int, np.ndarray]]]) -> int:
    """Constants sliced to the kept indices, activation shapes updated; the number of
    constants sliced."""
    sliced = 0
    for value, axes in by_value.values():
        arr = s.const(value)
        if arr is not None:
            for axis, keep in sorted(axes.items()):
                arr = np.take(arr, keep, axis=axis)
            set_constant(value, arr)
            sliced += 1
        elif value.shape is not None:
            dims = list(value.shape)
            for axis, keep in axes.items():
                if axis < len(dims) and isinstance(dims[axis], int):
                    dims[axis] = len(keep)
            value.shape = ir.Shape(dims)
    return sliced


def _fix_group(s: _Shapes, node: ir.Node, new_dim) -> int:
    w = node.inputs[1]
    n = new_dim(w, 0)
    if n is None:
        return 0
    group = int(attr(node, "group", 1))
    cout = s.dim(w, 0)
    per_group = cout // group
    if n % per_group:
        raise PruneApplyError(f"Conv {node.name}: {n} channels left is not whole groups")
    node.attributes["group"] = ir.AttrInt64("group", n // per_group)
    return 1


def _new_shape_input(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray,
                     name: str) -> None:
    old = node.inputs[index]
    value = add_initializer(graph, name, np.asarray(array, dtype=np.int64))
    node.replace_input_with(index, value)
    drop_if_unused(graph, old)  # else the old constant stays in the file (fuzzer)


def _fix_reshape(s: _Shapes, graph: ir.Graph, node: ir.Node, new_dim) -> int:
    y = node.outputs[0]
    rank = len(s.shape(y) or ())
    changes = {}
    for b in range(rank):
        n = new_dim(y, b)
        if n is None:
            continue
        tag = reshape_target(s, node, b)
        if tag[0] == "const" and tag[1] > 0:
            changes[b] = n
    if not changes:
        return 0
    target = s.ints(node.inputs[1])
    name = f"{node.name or 'reshape'}_pruned_shape"
    if target is not None:
        for b, n in changes.items():
            target[b] = n
        _new_shape_input(graph, node, 1, np.array(target), name)
        return 1
    if _rebuild_concat_target(s, graph, node, changes, name):
        return 1
    # other computed targets: override the changed constant positions with Where
    mask = np.zeros(rank, dtype=bool)
    values = np.zeros(rank, dtype=np.int64)
    for b, n in changes.items():
        mask[b], values[b] = True, n
    cond = add_initializer(graph, f"{name}_mask", mask)
    new = add_initializer(graph, f"{name}_values", values)
    out = ir.Value(name=f"{name}_computed", shape=ir.Shape([rank]),
                   type=ir.TensorType(ir.DataType.INT64))
    where = ir.Node("", "Where", [cond, new, node.inputs[1]], outputs=[out],
                    name=f"{name}_where")
    graph.insert_before(node, where)
    node.replace_input_with(1, out)
    return 1


def _rebuild_concat_target(s: _Shapes, graph: ir.Graph, node: ir.Node, changes: dict[int, int],
                           name: str) -> bool:
    """Target = Concat(Shape-read dims..., constants): a new Concat with updated constants.

    Keeps the target readable by ONNX shape inference (data propagation), so MAC
    counts of the pruned model stay exact. False if the target is not built so.
    """
    concat = node.inputs[1].producer()
    if concat is None or concat.op_type != "Concat":
        return False
    new_inputs = []
    pos = 0
    for piece in concat.inputs:
        elems = s.shape_elements(piece)
        if piece is None or elems is None:
            return False
        touched = {b - pos: n for b, n in changes.items() if pos <= b < pos + len(elems)}
        if touched:
            if any(e is None or e[0] != "const" for e in elems):
                return False
            values = [e[1] for e in elems]
            for k, n in touched.items():
                values[k] = n
            piece = add_initializer(graph, f"{name}_part", np.array(values, dtype=np.int64))
        new_inputs.append(piece)
        pos += len(elems)
    out = ir.Value(name=f"{name}_target", shape=ir.Shape([pos]),
                   type=ir.TensorType(ir.DataType.INT64))
    rebuilt = ir.Node("", "Concat", new_inputs, attributes=[ir.AttrInt64("axis", 0)],
                      outputs=[out], name=f"{name}_concat")
    graph.insert_before(node, rebuilt)
    node.replace_input_with(1, out)
    if not concat.outputs[0].uses() and not concat.outputs[0].is_graph_output():
        graph.remove(concat, safe=True)
    return True


def _fix_split(s: _Shapes, graph: ir.Graph, node: ir.Node, new_dim) -> int:
    x = node.inputs[0]
    axis = _norm_axis(int(attr(node, "axis", 0)), s.rank(x))
    sizes = split_sizes(s, node)
    new_sizes = []
    changed = False
    for out, size in zip(node.outputs, sizes):
        n = new_dim(out, axis)
        changed |= n is not None and n != size
        new_sizes.append(size if n is None else n)
    if not changed:
        return 0
    if s.opset < 13:
        node.attributes["split"] = ir.AttrInt64s("split", new_sizes)
        return 1
    node.attributes.pop("num_outputs", None)
    value = add_initializer(graph, f"{node.name or 'split'}_pruned_sizes",
                            np.array(new_sizes, dtype=np.int64))
    if len(node.inputs) > 1:
        old = node.inputs[1]
        node.replace_input_with(1, value)
        drop_if_unused(graph, old)
    else:
        node.resize_inputs(2)
        node.replace_input_with(1, value)
    return 1


def _fix_slice(s: _Shapes, graph: ir.Graph, node: ir.Node, by_value) -> int:
    x = node.inputs[0]
    entry = by_value.get(id(x))
    if entry is None:
        return 0
    r = s.rank(x)
    starts, ends, axes, steps = slice_params(s, node)
    axes_n = [_norm_axis(ax, r) for ax in axes]
    changed = False
    for k, ax in enumerate(axes_n):
        keep = entry[1].get(ax)
        if keep is None:
            continue
        start, end = slice_range(starts[k], ends[k], steps[k], s.dim(x, ax))
        new_start = int(np.sum(keep < start))
        new_end = new_start + int(np.sum((keep >= start) & (keep < end)))
        if new_end == new_start:
            raise PruneApplyError(f"Slice {node.name}: every sliced channel removed")
        starts[k], ends[k] = new_start, new_end
        changed = True
    if not changed:
        return 0
    if len(node.inputs) == 1:
        node.attributes["starts"] = ir.AttrInt64s("starts", starts)
        node.attributes["ends"] = ir.AttrInt64s("ends", ends)
        return 1
    base = node.name or "slice"
    _new_shape_input(graph, node, 1, np.array(starts), f"{base}_pruned_starts")
    _new_shape_input(graph, node, 2, np.array(ends), f"{base}_pruned_ends")
    return 1


def _fix_resize_sizes(s: _Shapes, graph: ir.Graph, node: ir.Node, new_dim) -> int:
    y = node.outputs[0]
    sizes = s.ints(node.inputs[3])
    if sizes is None:
        raise PruneApplyError(f"Resize {node.name}: sizes are computed")
    changed = False
    for b in range(len(sizes)):
        n = new_dim(y, b)
        if n is not None:
            sizes[b] = n
            changed = True
    if changed:
        _new_shape_input(graph, node, 3, np.array(sizes), f"{node.name or 'resize'}_pruned_sizes")
    return int(changed)


def group_removed(analysis: Analysis, units_removed: list[int]) -> dict[int, np.ndarray]:
    """Axis node id -> removed indices, from a list of unit ids."""
    parts: dict[int, list[np.ndarray]] = defaultdict(list)
    for uid in units_removed:
        for nid, idx in analysis.units[uid].members.items():
            parts[nid].append(idx)
    return {nid: np.unique(np.concatenate(ix)) for nid, ix in parts.items()}


def _masked_weight(k, analysis: Analysis) -> tuple[ir.Value | None, int | None, int]:
    """(weight, axis node of the channels it reads, its input axis) of kernel `k`. A
    MatMul with a batched constant weight [B, K, N] is a kernel without `weight` (the
    analysis follows K as a value axis): its K axis counts too (fuzzer: the oracle missed
    it, the pass was right)."""
    op = k.node.op_type
    if k.weight is None and op == "MatMul":
        w = k.node.inputs[1]
        shape = w.shape if w is not None else None
        if w is None or w.const_value is None or shape is None or len(shape) < 3:
            return None, None, 0
        axis = len(shape) - 2
        return w, analysis.index.get((id(w), axis)), axis
    if k.in_axis is None or k.weight is None:
        return None, None, 0
    nid = analysis.index.get((id(k.in_axis[0]), k.in_axis[1]))
    if op == "Conv":
        axis = 1
    elif op == "ConvTranspose":
        axis = 0
    elif op == "Gemm":
        axis = 1 if int(attr(k.node, "transB", 0)) else 0
    else:
        axis = 0
    return k.weight, nid, axis


def masked_reference(original: ir.Model, analysis: Analysis,
                     removed: dict[int, np.ndarray]) -> ir.Model:
    """A copy of `original` whose weight layers ignore the removed channels (test oracle).

    Every kernel that reads removed channels (Conv group 1, ConvTranspose, Gemm,
    MatMul with a constant weight) gets zeros in those input columns. Channels
    only ever end in such kernels (units never reach a graph output), so the
    pruned model without recovery must compute the same outputs as this copy:
    a direct check that the dependency analysis and the removal agree.
    """
    from ...ir import load_model

    copy = load_model(original, check=False)
    consts: dict[str, ir.Value] = dict(copy.graph.initializers)
    for node in copy.graph:
        if node.op_type == "Constant":
            consts[node.outputs[0].name] = node.outputs[0]
    s = _Shapes(copy)
    for k in analysis.kernels:
        weight, nid, axis = _masked_weight(k, analysis)
        if weight is None or nid not in removed or len(removed[nid]) == 0:
            continue
        value = consts.get(weight.name)
        arr = s.const(value)
        if value is None or arr is None:
            raise PruneApplyError(f"{weight.name}: weight not found in the copy")
        arr = arr.copy()
        index = [slice(None)] * arr.ndim
        index[axis] = removed[nid]
        arr[tuple(index)] = 0
        set_constant(value, arr)
    return copy
