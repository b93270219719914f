"""Graph helpers shared by the pass families (fusion, pruning, low rank, quantization).

Reading a node (`is_op`, `attr`), a constant (`const`, `float_const`, `scalar`) and who
reads a value (`sole_consumer`); replacing a value by another (`bypass`) and removing
what is left (`remove_nodes`, `remove_unused`); the channel axes of a layer's weight
(`weight_out_axis`, `weight_axis`, `output_channels`, `scale_output_channels`); the
per-channel affine of an inference BatchNormalization (`batchnorm_affine`).

New names come from `naming.NameAllocator`; shape inference is `onnxforge.ir.infer_shapes`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes import common as ir_common

from ..ir import constant_array

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
STANDARD_DOMAINS = ("", "ai.onnx")
# How a helper reads a constant: `const`, `float_const` or `onnxforge.ir.constant_array`.
Reader = Callable[[ir.Value | None], np.ndarray | None]


# ---------------------------------------------------------------- reading nodes and values


def is_op(node: ir.Node | None, *op_types: str) -> bool:
    """`node` is one of `op_types` of the default ONNX domain."""
    return node is not None and node.domain in STANDARD_DOMAINS and node.op_type in op_types


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """Python value of a node attribute (sequences as lists), or `default`."""
    a = node.attributes.get(name)
    if a is None:
        return default
    value = a.value
    if isinstance(value, (list, tuple)):
        return list(value)
    return value


def set_attr(node: ir.Node, name: str, value: Any) -> None:
    node.attributes[name] = ir.convenience.convert_attribute(name, value)


def opset(model: ir.Model) -> int:
    """The model's default-domain opset (0 when it imports none)."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


def const(value: ir.Value | None) -> np.ndarray | None:
    """Constant value of an initializer or Constant output; None for graph inputs (an
    initializer that is also a graph input can be overridden at run time)."""
    if value is None or value.is_graph_input():
        return None
    return constant_array(value)


def float_const(value: ir.Value | None) -> np.ndarray | None:
    """`const(value)` when it is a float16/32/64 array, else None."""
    arr = const(value)
    if arr is None or arr.dtype.type not in FLOAT_DTYPES:
        return None
    return arr


def scalar(value: ir.Value | None, read: Reader = float_const) -> float | None:
    """The value of a one-element constant as a float, else None; `read` reads the
    constant (`float_const` by default, `constant_array` for any dtype, graph inputs too)."""
    arr = read(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(-1)[0])


def sole_consumer(value: ir.Value | None) -> ir.Node | None:
    """The single node reading `value` (once), or None if it has 0 or >1 uses or is an output."""
    if value is None or value.is_graph_output():
        return None
    uses = list(value.uses())
    if len(uses) != 1:
        return None
    return uses[0].node


# ---------------------------------------------------------------- rewiring


def bypass(old: ir.Value, new: ir.Value, *, rename: bool = True, annotate: bool = True) -> None:
    """Make every reader of `old` (graph outputs included) read `new`.

    `old` must be about to disappear (its producer is removed by the caller or by dead
    code elimination). `new` takes `old`'s name, which keeps graph output names stable:
    always, or with `rename=False` only when `old` is a graph output. With `annotate`,
    `new` takes `old`'s shape and type where it has none.
    """
    name = old.name
    take_name = bool(name) and (rename or old.is_graph_output())
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if take_name:
        old.name = f"{name}__replaced"
        new.name = name
    if annotate:
        if new.shape is None and old.shape is not None:
            new.shape = old.shape
        if new.type is None and old.type is not None:
            new.type = old.type


def can_take_output_name(source: ir.Value, graph: ir.Graph | None) -> bool:
    """Whether `source` may replace a graph output of `graph` under that output's name:
    it is computed by a node of `graph` itself and is not a graph input, an initializer
    or another graph output (whose names must stay)."""
    producer = source.producer()
    return not (source.is_graph_input() or source.is_initializer() or source.is_graph_output()
                or producer is None or producer.graph is not graph)


def remove_nodes(nodes: list[ir.Node]) -> None:
    """Detach and remove nodes whose outputs no longer have readers."""
    for node in nodes:
        graph = node.graph
        if graph is not None:
            graph.remove(node, safe=True)


def drop_if_unused(graph: ir.Graph, value: ir.Value | None) -> None:
    """Remove an initializer or Constant node that nothing reads any more."""
    if value is None or list(value.uses()) or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant":
        graph.remove(producer, safe=True)
        return
    if value.is_initializer() and value.name in graph.initializers:
        if value.is_graph_input():
            graph.inputs.remove(value)
        graph.initializers.pop(value.name)


def remove_unused(model: ir.Model) -> None:
    """Dead-code elimination of nodes and initializers (onnx_ir's common pass)."""
    ir_common.RemoveUnusedNodesPass()(model)


# ---------------------------------------------------------------- weights


def weight_out_axis(node: ir.Node) -> int:
    """Output-channel axis of the weight (input 1) of a Conv, ConvTranspose, Gemm or MatMul."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if int(attr(node, "transB", 0)) else 1
    return 1  # ConvTranspose [C, M/g, k...], MatMul [K, N]


def weight_axis(node: ir.Node, w: np.ndarray) -> int | None:
    """Per-channel (quantization) axis of a compute node's weight `w`: its output-channel
    axis, or None when only per-tensor works (grouped ConvTranspose, MatMul weight not 2-D)."""
    if node.op_type == "ConvTranspose" and int(attr(node, "group", 1)) != 1:
        return None
    if node.op_type == "MatMul" and w.ndim != 2:
        return None
    if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul"):
        return None
    return weight_out_axis(node)


def output_channels(node: ir.Node, w: np.ndarray) -> int | None:
    """Number of output channels of a Conv/ConvTranspose/Gemm/MatMul (2-D weight) with
    weight `w`; None for a ConvTranspose weight whose first axis is not whole groups."""
    if node.op_type == "ConvTranspose":
        group = int(attr(node, "group", 1))
        return None if w.shape[0] % group else int(w.shape[1]) * group
    return int(w.shape[weight_out_axis(node)])


def scale_output_channels(node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """`w` (float64) with output channel o of Conv/ConvTranspose `node` multiplied by s[o]
    (Conv: axis 0; ConvTranspose: W is [C, M/g, k...] and output channel
    o = (c // (C/g)) * (M/g) + j)."""
    s = np.asarray(s, np.float64)
    if node.op_type == "Conv":
        return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
    group = int(attr(node, "group", 1))
    c, mg = w.shape[0], w.shape[1]
    shaped = w.reshape((group, c // group, mg) + w.shape[2:])
    return (shaped * s.reshape((group, 1, mg) + (1,) * (w.ndim - 2))).reshape(w.shape)


def batchnorm_affine(bn: ir.Node, read: Reader = const) -> tuple[np.ndarray, np.ndarray] | None:
    """(s, t), float64 per channel, with BN(x) = s * x + t for an inference
    BatchNormalization: s = scale / sqrt(var + epsilon), t = B - mean * s.

    None unless it is in inference form (`training_mode` absent or 0, no running
    statistics output read) and its four parameters are float constants of one size.
    `read` reads a parameter: `const` refuses initializers that are also graph inputs,
    `constant_array` accepts them.
    """
    if len(bn.inputs) < 5 or attr(bn, "training_mode", 0):
        return None
    if any(o.uses() or o.is_graph_output() for o in bn.outputs[1:]):
        return None
    arrays = [read(v) for v in bn.inputs[1:5]]
    if any(a is None or a.dtype.type not in FLOAT_DTYPES for a in arrays):
        return None
    scale, bias, mean, var = (a.astype(np.float64).reshape(-1) for a in arrays)
    if not (scale.size == bias.size == mean.size == var.size):
        return None
    s = scale / np.sqrt(var + float(attr(bn, "epsilon", 1e-5)))
    return s, bias - mean * s
