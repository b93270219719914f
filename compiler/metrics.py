"""Static model metrics: parameters, weight bytes, node counts and MACs.

Convention: 1 MAC (multiply-accumulate) = 2 FLOPs. MACs are counted for the ops
that dominate compute (Conv, ConvTranspose, Gemm, MatMul, their integer/QLinear
forms, and the recurrent LSTM / GRU / RNN: seq x batch x directions x gates x H x
(input + H)); every other op counts 0. Shapes come from ONNX shape inference on a copy
of the model with the given concrete input shapes.

Control flow (If / Loop / Scan bodies) is counted too, per run of the model:
  * `If`: the **maximum** over its branches (one branch runs; the max is the cost of
    the dearer path). A branch whose shapes are unknown is left out of the max and its
    nodes are listed in `unknown_mac_nodes`.
  * `Loop`: body MACs x the trip count `M` when `M` is a constant (an upper bound when
    the loop condition can stop it early), else the body **once**, flagged in
    `subgraph_notes`.
  * `Scan`: body MACs x the length of the first scan input along its scan axis when
    static, else once, flagged.
Shape inference often cannot size the values inside bodies (a Pad with computed pads
is enough); `probe` (one input batch) then runs the model once in onnxruntime to read
the missing shapes (`activations.probe_shapes`): the branch taken on that batch gets
sized, the other stays unknown.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .ir import constant_array, infer_shapes
from .shapes import model_inputs
from .subgraphs import node_subgraphs

MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger",
           "QLinearConv", "QLinearMatMul", "MatMulNBits"}
# Gates per recurrent op (W is [directions, gates*H, input], R [directions, gates*H, H]).
RECURRENT_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1, "DynamicQuantizeLSTM": 4}


@dataclass
class ModelMetrics:
    nodes: int
    params: int
    weight_bytes: int
    macs: int
    op_counts: dict[str, int]
    node_macs: dict[str, int] = field(default_factory=dict)
    unknown_mac_nodes: list[str] = field(default_factory=list)
    # How If/Loop/Scan bodies were counted when not exactly (see the module docstring).
    subgraph_notes: list[str] = field(default_factory=list)

    def unknown_note(self, limit: int = 5) -> str | None:
        """'MACs unknown for N node(s): a, b, ... and M more' (None when all are known)."""
        names = self.unknown_mac_nodes
        if not names:
            return None
        more = f" and {len(names) - limit} more" if len(names) > limit else ""
        return (f"MACs unknown for {len(names)} node(s) (shapes not inferable): "
                f"{', '.join(names[:limit])}{more}")

    @property
    def flops(self) -> int:
        return 2 * self.macs

    def to_dict(self) -> dict:
        return {
            "nodes": self.nodes,
            "params": self.params,
            "weight_bytes": self.weight_bytes,
            "macs": self.macs,
            "flops": self.flops,
            "op_counts": self.op_counts,
            "unknown_mac_nodes": self.unknown_mac_nodes,
            "subgraph_notes": self.subgraph_notes,
        }


def _static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is None or value.shape is None:
        return None
    dims = tuple(value.shape)
    if all(isinstance(d, int) and d >= 0 for d in dims):  # -1: an exporter's "any size"
        return dims  # type: ignore[return-value]
    return None


def _weight_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    if value is not None and value.const_value is not None:
        return tuple(value.const_value.shape)  # no need to read (external) data
    arr = constant_array(value)
    if arr is not None:
        return arr.shape
    return _static_shape(value)


def node_macs(node: ir.Node) -> int | None:
    """MACs of one node from its inferred shapes, None if shapes are unknown."""
    macs = _node_macs(node)
    return None if macs is None or macs < 0 else macs


def _node_macs(node: ir.Node) -> int | None:
    op = node.op_type
    prod = math.prod
    out = _static_shape(node.outputs[0]) if node.outputs else None
    if op in ("Conv", "ConvInteger", "QLinearConv"):
        w_index = 3 if op == "QLinearConv" else 1
        w = _weight_shape(node.inputs[w_index])
        if out is None or w is None:
            return None
        # out: N, Cout, *spatial; w: Cout, Cin/groups, *kernel
        return int(prod(out)) * int(prod(w[1:]))
    if op == "ConvTranspose":
        x = _static_shape(node.inputs[0])
        w = _weight_shape(node.inputs[1])
        if x is None or w is None:
            return None
        # x: N, Cin, *spatial; w: Cin, Cout/groups, *kernel
        return int(prod(x)) * int(prod(w[1:]))
    if op == "Gemm":
        a = _static_shape(node.inputs[0])
        if a is None or out is None:
            return None
        trans_a = node.attributes.get("transA")
        k = a[0] if trans_a is not None and trans_a.value else a[1]
        return int(prod(out)) * int(k)
    if op in ("MatMul", "MatMulInteger", "QLinearMatMul"):
        a = _static_shape(node.inputs[0])
        if a is None or out is None:
            return None
        k = a[-1]
        return int(prod(out)) * int(k)
    if op == "MatMulNBits":  # com.microsoft, 4-bit weights: A[..., K] x [K, N]
        a = _static_shape(node.inputs[0])
        k, n = node.attributes.get("K"), node.attributes.get("N")
        if a is None or k is None or n is None:
            return None
        return int(prod(a[:-1])) * int(k.value) * int(n.value)
    if op in RECURRENT_GATES and node.domain in ("", "ai.onnx", "com.microsoft"):
        return _recurrent_macs(node)
    return 0


def _recurrent_macs(node: ir.Node) -> int | None:
    """seq x batch x directions x gates*H x (input + H): the W and R products per step."""
    x = _static_shape(node.inputs[0])
    hidden = node.attributes.get("hidden_size")
    if x is None or hidden is None:
        return None
    h = int(hidden.value)
    batch_first = node.attributes.get("layout")
    seq, batch, size = (x[1], x[0], x[2]) if batch_first and batch_first.value else x
    direction = node.attributes.get("direction")
    dirs = 2 if direction is not None and direction.value == "bidirectional" else 1
    gates = RECURRENT_GATES[node.op_type]
    return int(seq) * int(batch) * dirs * gates * h * (int(size) + h)


def compute_metrics(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None,
                    *, with_macs: bool = True,
                    probe: dict[str, np.ndarray] | None = None) -> ModelMetrics:
    """Count nodes, parameters (initializers + Constant nodes, subgraphs included) and MACs
    of `model` (If/Loop/Scan bodies as the module docstring says). `probe`: one input
    batch used only when shapes inside subgraphs stay unknown after shape inference."""
    params = 0
    weight_bytes = 0
    for graph in [model.graph, *(g for n in ir.traversal.RecursiveGraphIterator(model.graph)
                                 for _, g in node_subgraphs(n))]:
        for value in graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            params += int(np.prod(tuple(tensor.shape)))
            weight_bytes += int(tensor.nbytes)
    op_counts: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        op_counts[node.op_type] += 1
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            arr = constant_array(node.outputs[0])
            if arr is not None and arr.size > 1:  # scalars/shape constants are not weights
                params += int(arr.size)
                weight_bytes += int(arr.nbytes)
    total_nodes = sum(op_counts.values())
    metrics = ModelMetrics(total_nodes, params, weight_bytes, 0, dict(op_counts))
    if not with_macs:
        return metrics
    shaped = _shape_skeleton(model)
    for value in model_inputs(shaped):
        if input_shapes and value.name in input_shapes:
            value.shape = ir.Shape(input_shapes[value.name])
    infer_shapes(shaped)
    if any(True for _ in _all_subgraphs(shaped)):
        _subgraph_shapes(shaped, model, probe)
    metrics.macs = _graph_macs(shaped.graph, metrics)
    return metrics


def _all_subgraphs(model: ir.Model):
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for _, g in node_subgraphs(node):
            yield g


def _graph_macs(graph: ir.Graph, metrics: ModelMetrics) -> int:
    """MACs of one run of `graph`, recording per-node MACs and unknown nodes in `metrics`."""
    total = 0
    for node in graph:
        subs = node_subgraphs(node)
        if subs:
            total += _control_flow_macs(node, subs, metrics)
            continue
        if node.op_type not in MAC_OPS and node.op_type not in RECURRENT_GATES:
            continue
        macs = node_macs(node)
        if macs is None:
            metrics.unknown_mac_nodes.append(node.name or node.op_type)
            continue
        metrics.node_macs[node.name or f"{node.op_type}_{len(metrics.node_macs)}"] = macs
        total += macs
    return total


def _control_flow_macs(node: ir.Node, subs: list[tuple[str, ir.Graph]],
                       metrics: ModelMetrics) -> int:
    label = node.name or node.op_type
    per_body = []
    for _, g in subs:
        unknown_before = len(metrics.unknown_mac_nodes)
        macs = _graph_macs(g, metrics)
        per_body.append((macs, len(metrics.unknown_mac_nodes) == unknown_before))
    if node.op_type == "If":
        # a branch counts when fully sized or partly sized (a nested If's other path)
        known = [m for m, complete in per_body if complete or m > 0]
        if len(known) < len(per_body):
            metrics.subgraph_notes.append(
                f"{label}: {len(per_body) - len(known)} branch(es) with unknown shapes "
                "left out of the max over branches")
        return max(known or [m for m, _ in per_body] or [0])
    body = sum(m for m, _ in per_body)
    trips = _trip_count(node)
    if trips is None:
        if body:
            metrics.subgraph_notes.append(
                f"{node.op_type} {label}: trip count not static, body counted once")
        return body
    return body * trips


def _trip_count(node: ir.Node) -> int | None:
    """Iterations of a Loop (constant M) or Scan (static scan length), else None."""
    if node.op_type == "Loop":
        m = constant_array(node.inputs[0]) if node.inputs and node.inputs[0] is not None \
            else None
        return int(np.asarray(m).reshape(-1)[0]) if m is not None and m.size == 1 else None
    if node.op_type == "Scan":
        n_scan = node.attributes.get("num_scan_inputs")
        if n_scan is None:
            return None
        first = node.inputs[len(node.inputs) - int(n_scan.value)]
        shape = _static_shape(first)
        axes = node.attributes.get("scan_input_axes")
        axis = int(axes.value[0]) if axes is not None else 0
        return int(shape[axis]) if shape is not None else None
    return None


def _subgraph_shapes(shaped: ir.Model, model: ir.Model,
                     probe: dict[str, np.ndarray] | None) -> None:
    """Shapes of values inside subgraphs: ONNX inference writes them into the proto's
    subgraph value_info, which `infer_shapes` does not copy back; what stays unknown
    is read by running `model` on `probe` when given."""
    import onnx

    try:
        proto = onnx.shape_inference.infer_shapes(ir.to_proto(shaped), data_prop=True)
        inferred = ir.from_proto(proto)
        found = {v.name: v.shape for n in ir.traversal.RecursiveGraphIterator(inferred.graph)
                 for v in n.outputs if v.shape is not None}
    except Exception:  # noqa: BLE001 - best effort, as infer_shapes
        found = {}
    missing = []
    for node in _nodes_in_subgraphs(shaped):
        for v in [*node.outputs, *node.inputs]:
            if v is None or not v.name:
                continue
            if _static_shape(v) is None and v.name in found:
                v.shape = found[v.name]
            if _static_shape(v) is None and node.op_type in (MAC_OPS | set(RECURRENT_GATES)):
                missing.append(v.name)
    if missing and probe is not None:
        from .activations import probe_shapes

        try:
            probed = probe_shapes(model, sorted(set(missing)), probe)
        except Exception:  # noqa: BLE001 - shapes simply stay unknown
            probed = {}
        for node in _nodes_in_subgraphs(shaped):
            for v in [*node.outputs, *node.inputs]:
                shape = probed.get(v.name) if v is not None else None
                if shape and all(d > 0 for d in shape):  # () or (0,): branch not taken
                    v.shape = ir.Shape(shape)


def _nodes_in_subgraphs(model: ir.Model):
    for g in _all_subgraphs(model):
        yield from g


# Initializers above this many bytes are hidden from shape inference (shapes only).
SKELETON_TENSOR_BYTES = 1 << 20


def _shape_skeleton(model: ir.Model) -> ir.Model:
    """A copy of `model` for shape inference that holds no large weights.

    Large initializers become typed graph inputs, so the copy serializes to a small
    protobuf whatever the model's size (a 2 GiB model with external data included),
    and no external data is read. Small ones stay: shape inference folds them
    (Reshape targets, Slice bounds).
    """
    skeleton = model.clone()  # new graph objects; tensors shared, never modified here
    graph = skeleton.graph
    for node in graph:
        for out in node.outputs:  # an exporter's -1 would clash with the inferred size
            if out.shape is not None and any(isinstance(d, int) and d < 0 for d in out.shape):
                out.shape = None
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= SKELETON_TENSOR_BYTES:
            continue
        value.shape = ir.Shape(tuple(tensor.shape))
        value.type = ir.TensorType(tensor.dtype)
        graph.initializers.pop(name)
        value.const_value = None
        if value not in graph.inputs:
            graph.inputs.append(value)
    return skeleton
