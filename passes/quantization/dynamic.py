"""Dynamic INT8 quantization (`quantize(mode=dynamic)`): int8 weights, activations
quantized at run time. No calibration data needed.

Rewrite rules, for MatMul(x, W) with a constant 2-D W and Gemm(x, B, C) (transA=0,
constant B) turned into MatMul + Add:
    xq, xs, xzp = DynamicQuantizeLinear(x)                 (u8, per tensor, per run)
    y_i32       = MatMulInteger(xq, Wq, xzp, Wzp)          (Wq int8, per-column, Wzp = 0)
    y           = Mul(Cast<float>(y_i32), Mul(xs, Ws))
onnxruntime fuses this into DynamicQuantizeMatMul / MatMulIntegerToFloat. Conv is left
in float (ConvInteger is slower than float Conv in onnxruntime); so are MatMuls of
two activations.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir import constant_array
from ..graph import attr, bypass, remove_unused
from ..naming import NameAllocator
from .core import quantize_embeddings
from .observers import quantize_weight
from .prepare import add_const, ensure_node_names, is_float

logger = logging.getLogger(__name__)


def _keep_names(model: ir.Model, spec: str, eligible: list[ir.Node]) -> set[str]:
    names = set()
    for token in (t.strip() for t in spec.split(",")):
        if token == "first" and eligible:
            names.add(eligible[0].name)
        elif token == "last" and eligible:
            names.add(eligible[-1].name)
        elif token:
            names.add(token)
    return names


def quantize_dynamic(model: ir.Model, opts: Any) -> dict[str, Any]:
    """Rewrite eligible MatMul/Gemm nodes of `model` in place; returns stats."""
    graph = model.graph
    ensure_node_names(graph)
    allowed = {o.strip() for o in opts.ops.split(",")}
    eligible = []
    skipped: dict[str, str] = {}
    for n in list(graph):
        if n.op_type not in ("MatMul", "Gemm") or n.op_type not in allowed:
            if n.op_type in ("Conv", "ConvTranspose"):
                skipped[n.name] = "dynamic mode leaves convolutions in float"
            continue
        w = constant_array(n.inputs[1])
        if w is None or w.ndim != 2 or w.dtype != np.float32 or not is_float(n.inputs[0]) \
                or constant_array(n.inputs[0]) is not None:
            skipped[n.name] = "needs an activation input and a constant 2-D float32 weight"
            continue
        if n.op_type == "Gemm" and (int(attr(n, "transA", 0))
                                    or float(attr(n, "alpha", 1.0)) != 1.0):
            skipped[n.name] = "Gemm with transA or alpha != 1"
            continue
        eligible.append(n)
    keep = _keep_names(model, opts.keep_float, eligible)
    count = 0
    names = NameAllocator(graph)
    for n in eligible:
        if n.name in keep:
            skipped[n.name] = "kept float (keep_float)"
            continue
        _rewrite(graph, n, opts.per_channel, names)
        count += 1
    remove_unused(model)
    stats: dict[str, Any] = {"dynamic_matmuls": count, "kept_float": skipped}
    if getattr(opts, "embeddings", False):
        stats["embeddings_quantized"] = quantize_embeddings(model, keep)
    return stats


def _rewrite(graph: ir.Graph, n: ir.Node, per_channel: bool, names: NameAllocator) -> None:
    w = constant_array(n.inputs[1])
    bias = None
    if n.op_type == "Gemm":
        if int(attr(n, "transB", 0)):
            w = w.T
        if len(n.inputs) > 2 and n.inputs[2] is not None:
            c = constant_array(n.inputs[2])
            beta = float(attr(n, "beta", 1.0))
            bias = add_const(graph, f"{n.name}_C",
                             (c * beta).astype(np.float32), names) if c is not None \
                else None
            if c is None:  # non-constant C: keep it as an input of the Add
                bias = n.inputs[2]
    w = np.ascontiguousarray(w, dtype=np.float32)
    axis = 1 if per_channel else None
    q, scales, _ = quantize_weight(w, axis)
    base = n.name
    wq = add_const(graph, f"{base}_W_quantized", q, names)
    if axis is None:
        ws = add_const(graph, f"{base}_W_scale", np.array(scales[0], dtype=np.float32), names)
        wz = add_const(graph, f"{base}_W_zero_point", np.array(0, dtype=np.int8), names)
    else:
        ws = add_const(graph, f"{base}_W_scale", scales, names)
        wz = add_const(graph, f"{base}_W_zero_point", np.zeros(scales.size, dtype=np.int8), names)
    x = n.inputs[0]
    dql = names.make_node("DynamicQuantizeLinear", [x], num_outputs=3,
                          name=f"{base}_DynamicQuantizeLinear",
                          output_names=[f"{base}_x_quantized", f"{base}_x_scale",
                                        f"{base}_x_zero_point"])
    xq, xs, xz = dql.outputs
    scale_mul = names.make_node("Mul", [xs, ws], name=f"{base}_scale_mul")
    mmi = names.make_node("MatMulInteger", [xq, wq, xz, wz], name=f"{base}_MatMulInteger")
    cast = names.make_node("Cast", [mmi.outputs[0]], {"to": int(ir.DataType.FLOAT)},
                           name=f"{base}_Cast")
    out = names.make_node("Mul", [cast.outputs[0], scale_mul.outputs[0]], name=f"{base}_rescale")
    new_nodes = [dql, scale_mul, mmi, cast, out]
    result = out.outputs[0]
    if bias is not None:
        add = names.make_node("Add", [result, bias], name=f"{base}_bias")
        new_nodes.append(add)
        result = add.outputs[0]
    graph.insert_before(n, new_nodes)
    y = n.outputs[0]
    result.type, result.shape = ir.TensorType(ir.DataType.FLOAT), y.shape
    bypass(y, result)
    graph.remove(n, safe=True)
