"""float16 conversion (`quantize(mode=fp16)`): weights and compute in float16, float32
graph inputs and outputs kept through Cast nodes.

Rewrite rules:
  * every float32 initializer / Constant becomes float16, except operands that the
    ONNX spec requires in float32 (Resize roi/scales, Upsample scales);
  * Cast(to=float32) inside the graph becomes Cast(to=float16);
  * each float32 graph input gets Cast(->fp16) after it, each float32 graph output
    Cast(->fp32) before it (names unchanged);
  * ops named in `fp16_keep_fp32` (op types or node names) stay float32 between Casts.

Targets: GPUs (CUDA/TensorRT/DirectML) and ARM CPUs with fp16 units. onnxruntime's
x86 CPU provider has few fp16 kernels and inserts Casts around the rest itself, so on
x86 the model is correct (verified in tests) but not faster than fp32.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir import constant_array
from ..graph import remove_unused
from ..naming import NameAllocator
from .prepare import add_const, ensure_node_names

logger = logging.getLogger(__name__)

FLOAT, FLOAT16 = ir.DataType.FLOAT, ir.DataType.FLOAT16
# (op type -> input indices that must stay float32)
FP32_OPERANDS = {"Resize": {1, 2}, "Upsample": {1}}


def convert_fp16(model: ir.Model, opts: Any) -> dict[str, Any]:
    """Rewrite `model` in place to float16 (module docstring); returns stats."""
    graph = model.graph
    ensure_node_names(graph)
    names = NameAllocator(graph)
    keep = {t.strip() for t in getattr(opts, "fp16_keep_fp32", "").split(",") if t.strip()}
    fp32_nodes = {n for n in graph if n.op_type in keep or n.name in keep}
    converted = _halve_constants(graph, fp32_nodes, names)
    casts = _retarget_casts(graph, fp32_nodes)
    # Intermediate values: float -> float16 outside the fp32 islands.
    for n in graph:
        if n in fp32_nodes:
            continue
        for o in n.outputs:
            if o.dtype == FLOAT:
                # A new type object: onnx_ir may share one TensorType between values
                # (and between copies of a model), so never mutate it in place.
                o.type = ir.TensorType(FLOAT16)
    _cast_islands(graph, fp32_nodes, names)
    _keep_io_float(graph, names)
    remove_unused(model)
    return {"fp16_constants": converted, "casts_retargeted": casts, "fp32_nodes": len(fp32_nodes)}


def _halve_constants(graph: ir.Graph, fp32_nodes: set[ir.Node], names: NameAllocator) -> int:
    """Constants (initializers and Constant nodes) read in fp16 positions become float16
    initializers (one per constant, clipped to the float16 range); returns how many."""
    converted = 0
    cache: dict[int, ir.Value] = {}
    for n in list(graph):
        if n in fp32_nodes or n.op_type == "Constant":
            continue
        for i, v in enumerate(n.inputs):
            if v is None or i in FP32_OPERANDS.get(n.op_type, ()):
                continue
            arr = constant_array(v)
            if arr is None or arr.dtype != np.float32:
                continue
            if id(v) not in cache:
                half = np.clip(arr, -65504, 65504).astype(np.float16)
                cache[id(v)] = add_const(graph, f"{v.name}_fp16", half, names)
                converted += 1
            n.replace_input_with(i, cache[id(v)])
    return converted


def _retarget_casts(graph: ir.Graph, fp32_nodes: set[ir.Node]) -> int:
    """Casts to float inside the graph now cast to half (and float ConstantOfShape values
    become half); returns the number of Casts changed."""
    casts = 0
    for n in graph:
        if n.op_type == "Cast" and n not in fp32_nodes \
                and int(n.attributes["to"].value) == int(FLOAT):
            n.attributes["to"] = ir.AttrInt64("to", int(FLOAT16))
            casts += 1
        if n.op_type == "ConstantOfShape" and "value" in n.attributes:
            t = n.attributes["value"].value.numpy()
            if t.dtype == np.float32:
                n.attributes["value"] = ir.AttrTensor("value", ir.tensor(t.astype(np.float16)))
    return casts


def _cast_islands(graph: ir.Graph, fp32_nodes: set[ir.Node], names: NameAllocator) -> None:
    """fp32 islands: their float16 inputs are cast up and their outputs down."""
    for n in fp32_nodes:
        for i, v in enumerate(n.inputs):
            if v is not None and v.dtype == FLOAT16 and constant_array(v) is None:
                up = names.make_node("Cast", [v], {"to": int(FLOAT)},
                                     name=f"{n.name}_in{i}_to_fp32")
                up.outputs[0].type = ir.TensorType(FLOAT)
                graph.insert_before(n, up)
                n.replace_input_with(i, up.outputs[0])
        for o in n.outputs:
            if o.dtype == FLOAT and not o.is_graph_output():
                down = names.make_node("Cast", [o], {"to": int(FLOAT16)},
                                       name=f"{n.name}_{o.name}_to_fp16")
                down.outputs[0].type = ir.TensorType(FLOAT16)
                graph.insert_after(n, down)
                for use in o.uses():
                    if use.node is not down:
                        use.node.replace_input_with(use.idx, down.outputs[0])


def _keep_io_float(graph: ir.Graph, names: NameAllocator) -> None:
    """Graph inputs and outputs stay float32: a Cast after each float input, before each
    output now float16 (which keeps its name)."""
    first = next(iter(graph), None)
    for v in graph.inputs:
        if v.dtype != FLOAT or not v.uses():
            continue
        cast = names.make_node("Cast", [v], {"to": int(FLOAT16)}, name=f"{v.name}_to_fp16",
                               output_names=[f"{v.name}_fp16"])
        cast.outputs[0].type = ir.TensorType(FLOAT16)
        for use in v.uses():
            if use.node is not cast:
                use.node.replace_input_with(use.idx, cast.outputs[0])
        if first is not None:
            graph.insert_before(first, cast)
        else:
            graph.append(cast)
    for idx, v in enumerate(list(graph.outputs)):
        if v.dtype != FLOAT16:
            continue
        name = v.name
        names.name_value(v, f"{name}_fp16")
        cast = names.make_node("Cast", [v], {"to": int(FLOAT)}, name=f"{name}_to_fp32")
        out = cast.outputs[0]
        out.type, out.shape, out.name = ir.TensorType(FLOAT), v.shape, name
        graph.append(cast)
        graph.outputs[idx] = out
