"""Graph side of the `lowrank` pass: find decomposable layers and emit their factors.

A `Layer` is one Gemm / MatMul / Conv whose weight is a constant (initializer or
`Constant` node) together with everything the rewrite needs: the weight in
canonical layout (linear: (out, in) with Gemm's alpha and transB folded in; conv:
(C_out, C_in, kh, kw)), the activation input, where a bias correction can go, and
the conv attributes. `find_layers` returns the layers and, for every other
candidate node, the reason it is left alone.

A decomposition is a chain of `Stage`s (one ONNX op each) that `emit_chain` turns
into nodes; the same chains build the single-layer models the latency guard times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir import add_initializer, constant_array
from ..graph import attr, is_op, sole_consumer
from ..naming import take_free_name

LINEAR_OPS = ("Gemm", "MatMul")


@dataclass
class Layer:
    key: str
    node: ir.Node
    op: str  # Gemm | MatMul | Conv
    method: str  # svd (linear or 1×1 conv) | tucker2 | spatial
    weight: np.ndarray  # canonical float64 weight (see module docstring)
    weight_value: ir.Value
    x: ir.Value
    bias_value: ir.Value | None = None  # the node's own bias input (Gemm C, Conv B)
    bias: np.ndarray | None = None  # current bias vector (out,), if constant
    # Where a bias vector can be rewritten: conv | gemm | add | None (keep bias_value as is)
    bias_kind: str | None = None
    add_node: ir.Node | None = None  # MatMul's bias Add
    add_index: int = 0  # input index of the bias in add_node
    x_shape: tuple[int, ...] | None = None
    y_shape: tuple[int, ...] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)  # conv / gemm attributes
    # Per-output-channel scale of a BatchNormalization reading only this layer's output:
    # the data-aware objective weights each channel's error by it.
    out_scale: np.ndarray | None = None

    @property
    def kernel(self) -> tuple[int, int]:
        return self.weight.shape[2], self.weight.shape[3]


@dataclass
class Stage:
    """One op of a decomposition: weight (ONNX layout), attributes, optional bias."""

    op: str
    weight: np.ndarray
    attrs: dict[str, Any] = field(default_factory=dict)
    bias: np.ndarray | ir.Value | None = None


def layer_key(node: ir.Node, taken: set[str]) -> str:
    """A key naming the layer in stats and rank overrides: its node name (else its output's
    name, else its op type), made unique among `taken` with `#1`, `#2`, ..."""
    base = node.name or (node.outputs[0].name if node.outputs else node.op_type) or node.op_type
    return take_free_name(base, taken, "#")


def _shared(value: ir.Value) -> int:
    return len(list(value.uses()))


def _matmul_bias(node: ir.Node, n_out: int) -> tuple[ir.Node, int, np.ndarray] | None:
    """The Add that adds a constant vector of length n_out right after a MatMul."""
    out = node.outputs[0]
    add = sole_consumer(out)
    if not is_op(add, "Add") or len(add.inputs) != 2:
        return None
    index = 1 if add.inputs[0] is out else 0
    bias = constant_array(add.inputs[index])
    if bias is None or bias.dtype != np.float32 or bias.size != n_out:
        return None
    if bias.ndim == 0 or bias.shape[-1] != n_out:
        return None
    return add, index, bias.reshape(-1).astype(np.float64)


def following_bn_scale(node: ir.Node, n_out: int) -> np.ndarray | None:
    """|γ| / sqrt(var + ε) of an inference BatchNormalization that alone reads the output."""
    out = node.outputs[0]
    bn = sole_consumer(out)
    if not is_op(bn, "BatchNormalization") or bn.inputs[0] is not out:
        return None
    if int(attr(bn, "training_mode", 0)) != 0 or len(bn.inputs) < 5:
        return None
    scale, var = constant_array(bn.inputs[1]), constant_array(bn.inputs[4])
    if scale is None or var is None or scale.size != n_out or var.size != n_out:
        return None
    eps = float(attr(bn, "epsilon", 1e-5))
    return np.abs(scale.astype(np.float64).reshape(-1)) / np.sqrt(
        var.astype(np.float64).reshape(-1) + eps)


def inspect_node(node: ir.Node, conv_method: str) -> Layer | str | None:
    """A Layer for a decomposable node, a reason string when refused, None if not a candidate."""
    if not is_op(node, "Gemm", "MatMul", "Conv"):
        return None
    if node.op_type == "MatMul":
        return _inspect_matmul(node)
    if node.op_type == "Gemm":
        return _inspect_gemm(node)
    return _inspect_conv(node, conv_method)


def _inspect_matmul(node: ir.Node) -> Layer | str:
    """X @ W with a constant 2-D W, and the constant-bias Add after it if there is one."""
    a, b = node.inputs[0], node.inputs[1]
    wa, wb = constant_array(a), constant_array(b)
    if wb is None:
        return "weight on the left operand" if wa is not None else "no constant weight"
    if wa is not None:
        return "both operands constant (fold constants first)"
    if wb.ndim != 2:
        return f"weight has rank {wb.ndim}, not 2"
    if wb.dtype != np.float32:
        return f"weight dtype {wb.dtype} (float32 only)"
    if _shared(b) > 1:
        return f"weight shared by {_shared(b)} nodes"
    weight = wb.astype(np.float64).T  # (N, K)
    layer = Layer("", node, "MatMul", "svd", weight, b, a)
    found = _matmul_bias(node, weight.shape[0])
    if found is not None:
        layer.add_node, layer.add_index, layer.bias = found
        layer.bias_kind = "add"
    return layer


def _inspect_gemm(node: ir.Node) -> Layer | str:
    """Gemm with a constant B: alpha and transB folded into the weight, beta·C a bias."""
    a, b = node.inputs[0], node.inputs[1]
    c = node.inputs[2] if len(node.inputs) > 2 else None
    wb = constant_array(b)
    if wb is None:
        return "no constant weight"
    if constant_array(a) is not None:
        return "both operands constant (fold constants first)"
    if wb.dtype != np.float32 or wb.ndim != 2:
        return f"weight dtype {wb.dtype} / rank {wb.ndim} (float32 2-D only)"
    if _shared(b) > 1:
        return f"weight shared by {_shared(b)} nodes"
    alpha = float(attr(node, "alpha", 1.0))
    beta = float(attr(node, "beta", 1.0))
    trans_a = int(attr(node, "transA", 0))
    trans_b = int(attr(node, "transB", 0))
    weight = alpha * (wb if trans_b else wb.T).astype(np.float64)  # (N, K)
    layer = Layer("", node, "Gemm", "svd", weight, b, a, bias_value=c,
                  attrs={"transA": trans_a, "beta": beta})
    n_out = weight.shape[0]
    carr = constant_array(c)
    if c is None:
        layer.bias_kind = "gemm"
    elif (carr is not None and beta != 0.0 and carr.size in (1, n_out)
          and (carr.ndim == 0 or carr.shape[-1] == carr.size)):
        # A constant vector C (or scalar): fold beta·C into one bias vector.
        layer.bias_kind = "gemm"
        layer.bias = np.broadcast_to(beta * carr.astype(np.float64).reshape(-1),
                                     (n_out,)).copy()
    layer.out_scale = following_bn_scale(node, n_out)
    return layer


def _inspect_conv(node: ir.Node, conv_method: str) -> Layer | str:
    """A 2-D group-1 Conv: SVD for 1×1, else `conv_method` (tucker2 | spatial)."""
    x, w = node.inputs[0], node.inputs[1]
    bias_value = node.inputs[2] if len(node.inputs) > 2 else None
    wc = constant_array(w)
    if wc is None:
        return "no constant weight"
    if wc.ndim != 4:
        return f"{wc.ndim - 2}-D conv (2-D only)"
    if wc.dtype != np.float32:
        return f"weight dtype {wc.dtype} (float32 only)"
    group = int(attr(node, "group", 1))
    if group != 1:
        return f"grouped conv (group={group})"
    if _shared(w) > 1:
        return f"weight shared by {_shared(w)} nodes"
    kh, kw = wc.shape[2:]
    attrs = {
        "strides": attr(node, "strides", [1, 1]),
        "pads": attr(node, "pads", [0, 0, 0, 0]),
        "dilations": attr(node, "dilations", [1, 1]),
        "auto_pad": attr(node, "auto_pad", "NOTSET"),
    }
    if isinstance(attrs["auto_pad"], bytes):
        attrs["auto_pad"] = attrs["auto_pad"].decode()
    if kh == 1 and kw == 1:
        method = "svd"
    elif conv_method == "spatial":
        if kh == 1 or kw == 1:
            return f"spatial SVD needs a k×k kernel, got {kh}×{kw}"
        if attrs["auto_pad"] not in ("NOTSET", ""):
            return f"spatial SVD with auto_pad={attrs['auto_pad']} (explicit pads only)"
        method = "spatial"
    else:
        method = "tucker2"
    layer = Layer("", node, "Conv", method, wc.astype(np.float64), w, x, bias_value=bias_value,
                  attrs=attrs)
    if bias_value is None:
        layer.bias_kind = "conv"
    else:
        barr = constant_array(bias_value)
        if barr is not None:
            layer.bias_kind = "conv"
            layer.bias = barr.astype(np.float64).reshape(-1)
    layer.out_scale = following_bn_scale(node, wc.shape[0])
    return layer


# ---------------------------------------------------------------- chains


def _conv_attrs(kernel: tuple[int, int], strides=(1, 1), pads=(0, 0, 0, 0), dilations=(1, 1),
                auto_pad: str = "NOTSET") -> dict[str, Any]:
    attrs: dict[str, Any] = {"kernel_shape": list(kernel), "group": 1}
    if auto_pad not in ("NOTSET", ""):
        attrs["auto_pad"] = auto_pad
    else:
        attrs["pads"] = list(pads)
    attrs["strides"] = list(strides)
    attrs["dilations"] = list(dilations)
    return attrs


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def original_chain(layer: Layer, *, with_bias: bool = True) -> list[Stage]:
    """The layer as it is (for the guard's single-layer model)."""
    if layer.op == "MatMul":
        return [Stage("MatMul", _f32(layer.weight.T))]
    if layer.op == "Gemm":
        bias = _f32(layer.bias) if with_bias and layer.bias is not None else None
        return [Stage("Gemm", _f32(layer.weight), {"transA": layer.attrs["transA"], "transB": 1},
                      bias)]
    a = layer.attrs
    bias = _f32(layer.bias) if with_bias and layer.bias is not None else None
    return [Stage("Conv", _f32(layer.weight),
                  _conv_attrs(layer.kernel, a["strides"], a["pads"], a["dilations"], a["auto_pad"]),
                  bias)]


def decomposed_chain(layer: Layer, factors: tuple[np.ndarray, ...],
                     bias: np.ndarray | ir.Value | None) -> list[Stage]:
    """Stages of the decomposition; `bias` goes on the last stage (Gemm C / Conv B)."""
    if isinstance(bias, np.ndarray):
        bias = _f32(bias)
    if layer.op == "MatMul":
        a, b = factors  # a (r, in), b (out, r)
        return [Stage("MatMul", _f32(a.T)), Stage("MatMul", _f32(b.T))]
    if layer.op == "Gemm":
        a, b = factors
        second: dict[str, Any] = {"transB": 1}
        if bias is not None:
            second["beta"] = layer.attrs["beta"] if isinstance(bias, ir.Value) else 1.0
        return [Stage("Gemm", _f32(a), {"transA": layer.attrs["transA"], "transB": 1}),
                Stage("Gemm", _f32(b), second, bias)]
    at = layer.attrs
    if layer.method == "svd":  # 1×1 conv: the first 1×1 carries stride and padding
        first, second = factors
        return [Stage("Conv", _f32(first), _conv_attrs((1, 1), at["strides"], at["pads"],
                                                        at["dilations"], at["auto_pad"])),
                Stage("Conv", _f32(second), _conv_attrs((1, 1)), bias)]
    if layer.method == "tucker2":
        # first / last may be None when that mode is kept whole (merged into the core).
        first, core, last = factors
        stages = []
        if first is not None:
            stages.append(Stage("Conv", _f32(first), _conv_attrs((1, 1))))
        stages.append(Stage("Conv", _f32(core), _conv_attrs(layer.kernel, at["strides"],
                                                             at["pads"], at["dilations"],
                                                             at["auto_pad"])))
        if last is not None:
            stages.append(Stage("Conv", _f32(last), _conv_attrs((1, 1))))
        stages[-1].bias = bias
        return stages
    vertical, horizontal = factors  # spatial
    (sh, sw), (dh, dw) = at["strides"], at["dilations"]
    top, left, bottom, right = at["pads"]
    kh, kw = layer.kernel
    return [Stage("Conv", _f32(vertical), _conv_attrs((kh, 1), (sh, 1), (top, 0, bottom, 0),
                                                      (dh, 1))),
            Stage("Conv", _f32(horizontal), _conv_attrs((1, kw), (1, sw), (0, left, 0, right),
                                                        (1, dw)), bias)]


def emit_chain(graph: ir.Graph, x: ir.Value, stages: list[Stage], prefix: str,
               opset: int) -> tuple[list[ir.Node], ir.Value]:
    """Nodes (not yet inserted) computing the chain on `x`; weights become initializers."""
    nodes: list[ir.Node] = []
    current = x
    for i, stage in enumerate(stages):
        weight = add_initializer(graph, f"{prefix}.lowrank_w{i}", stage.weight)
        inputs: list[ir.Value | None] = [current, weight]
        bias = stage.bias
        if bias is None and stage.op == "Gemm" and opset < 11:
            bias = np.zeros(stage.weight.shape[0], dtype=np.float32)  # C is required before 11
            stage.attrs = {**stage.attrs, "beta": 0.0}
        if isinstance(bias, np.ndarray):
            inputs.append(add_initializer(graph, f"{prefix}.lowrank_b{i}", bias))
        elif bias is not None:
            inputs.append(bias)
        out = ir.Value(name=f"{prefix}/lowrank_{i}")
        node = ir.Node("", stage.op, inputs, ir.convenience.convert_attributes(stage.attrs),
                       outputs=[out], name=f"{prefix}/lowrank_{i}")
        nodes.append(node)
        current = out
    return nodes, current
