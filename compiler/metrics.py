"""Static model metrics: parameters, weight bytes, node counts and MACs.

Convention: 1 MAC (multiply-accumulate) = 2 FLOPs. MACs are counted for the ops
that dominate compute (Conv, ConvTranspose, Gemm, MatMul, their integer/QLinear
forms); every other op counts 0. Shapes come from ONNX shape inference on a copy
of the model with the given concrete input shapes.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .ir import constant_array, infer_shapes
from .shapes import model_inputs

MAC_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "ConvInteger", "MatMulInteger",
           "QLinearConv", "QLinearMatMul"}


@dataclass
class ModelMetrics:
    nodes: int
    params: int
    weight_bytes: int
    macs: int
    op_counts: dict[str, int]
    node_macs: dict[str, int] = field(default_factory=dict)
    unknown_mac_nodes: list[str] = field(default_factory=list)

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
    return 0


def compute_metrics(model: ir.Model, input_shapes: dict[str, tuple[int, ...]] | None = None,
                    *, with_macs: bool = True) -> ModelMetrics:
    """Count nodes, parameters (initializers + Constant nodes) and MACs of `model`."""
    graph = model.graph
    params = 0
    weight_bytes = 0
    for value in graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        params += int(np.prod(tuple(tensor.shape)))
        weight_bytes += int(tensor.nbytes)
    op_counts: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(graph):
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
    for node in shaped.graph:
        if node.op_type not in MAC_OPS:
            continue
        macs = node_macs(node)
        if macs is None:
            metrics.unknown_mac_nodes.append(node.name or node.op_type)
            continue
        metrics.node_macs[node.name or f"{node.op_type}_{len(metrics.node_macs)}"] = macs
        metrics.macs += macs
    return metrics


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
