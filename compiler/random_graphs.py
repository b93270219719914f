"""Seeded random ONNX graphs for differential testing (`onnxforge.fuzz`).

`generate_graph(seed, index)` builds a small valid float32 model (opset 17-20, one input
[1, C, H, W] with C in 1..16 and H, W in 3..20) as a weighted random chain of op
*families*, each of which adds one to a dozen nodes; join families (`residual`,
`concat`, `split`) open branches that rejoin through Add/Mul/Concat, and may reach back
to an earlier value of the chain, so the graph is a DAG. Every node's output shape
comes from ONNX shape inference on that node (a family whose parameters give an
invalid or empty shape is rolled back and another is drawn), tensors stay rank 4
between families, and sizes are capped (C <= 32, H, W <= 32) so a TVM compile stays
quick. The same (seed, index, attempt) always gives the same model, byte for byte.

Families (the names `--ops` takes): conv (groups, depthwise, bias, stride, dilation,
asymmetric pads, auto_pad), convtranspose, batchnorm, act (Relu, LeakyRelu, Clip,
Sigmoid, Tanh, HardSwish, HardSigmoid), gelu (erf and tanh forms from primitives, Gelu
at opset 20), chain (consecutive Sigmoid/Tanh), binary (Add/Sub/Mul/Div by broadcast
constants), matmul (4-D, 3-D, 2-D + bias, x @ x^T), gemm (transB, alpha/beta),
softmax, layernorm (ReduceMean/Sub/Pow/ReduceMean/Add/Sqrt/Div, affine), transpose
and reshape (pairs that restore the layout), slice (negative indices and steps), pad
(constant with any value, reflect, edge, wrap; asymmetric; often followed by a Conv),
pool (MaxPool/AveragePool with pads, ceil_mode, dilation, count_include_pad), gap
(GlobalAveragePool, squeeze-excitation), resize (nearest and linear, scales or sizes),
split, concat, residual; opt-in (only when named): prunable (Conv -> act -> Conv or
MatMul -> Relu -> MatMul around a hidden width of 8-32, for the lossy stages), upsample
(ConvTranspose with kernel == stride, which compile rewrites as a conv).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

WINDOW_OPS = ("Conv", "MaxPool", "AveragePool")
MAX_CHANNELS = 32
MAX_SPATIAL = 32
MAX_ELEMENTS = 16 * 32 * 32
INPUT_NAME = "input"


class Reject(Exception):
    """The parameters a family drew give no valid node here: roll back, draw again."""


@dataclass
class RandomGraph:
    """A generated model and what it is made of."""

    model: onnx.ModelProto
    seed: int
    index: int
    attempt: int
    families: list[str]
    input_shape: tuple[int, ...]
    output_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.seed}-{self.index}"

    @property
    def ops(self) -> list[str]:
        """Op types in graph order."""
        return [n.op_type for n in self.model.graph.node]

    def describe(self) -> str:
        """`opset 18, [1,4,9,7], 12 nodes: Conv>Relu>...` in one line."""
        return describe_model(self.model)


def describe_model(model: onnx.ModelProto) -> str:
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
    shapes = []
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        shapes.append("[" + ",".join(str(d.dim_value) for d in dims) + "]")
    ops = ">".join(n.op_type for n in model.graph.node)
    return f"opset {opset}, input {' '.join(shapes)}, {len(model.graph.node)} nodes: {ops}"


class GraphBuilder:
    """Nodes, initializers and the shape of every value, with rollback."""

    def __init__(self, rng: np.random.Generator, opset: int):
        self.rng = rng
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: dict[str, TensorProto] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.inputs: list[str] = []
        self._counter = 0

    # -- names and constants -----------------------------------------------------------
    def fresh(self, prefix: str) -> str:
        self._counter += 1
        return f"{prefix}_{self._counter}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.fresh(prefix)
        self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def ints(self, values: Sequence[int], prefix: str = "i") -> str:
        return self.const(np.asarray(values, dtype=np.int64), prefix)

    def floats(self, shape: Sequence[int], scale: float = 1.0, prefix: str = "w",
               low: float | None = None) -> str:
        """Normal values times `scale`; with `low`, magnitudes in [low, low + scale]."""
        if low is None:
            data = self.rng.standard_normal(tuple(shape)) * scale
        else:
            sign = self.rng.choice([-1.0, 1.0], size=tuple(shape))
            data = sign * (low + self.rng.random(tuple(shape)) * scale)
        return self.const(np.asarray(data, dtype=np.float32), prefix)

    def scalar(self, value: float, prefix: str = "s") -> str:
        return self.const(np.asarray(value, dtype=np.float32), prefix)

    def input(self, name: str, shape: tuple[int, ...]) -> str:
        self.shapes[name] = tuple(shape)
        self.inputs.append(name)
        return name

    # -- rollback ----------------------------------------------------------------------
    def checkpoint(self) -> tuple[int, set[str], set[str], int]:
        return len(self.nodes), set(self.initializers), set(self.shapes), self._counter

    def restore(self, point: tuple[int, set[str], set[str], int]) -> None:
        count, inits, shapes, counter = point
        del self.nodes[count:]
        for name in set(self.initializers) - inits:
            del self.initializers[name]
        for name in set(self.shapes) - shapes:
            del self.shapes[name]
        self._counter = counter

    # -- nodes -------------------------------------------------------------------------
    def add(self, op: str, inputs: Sequence[str], outputs: int = 1, **attrs) -> list[str]:
        """Append a node; its outputs' shapes come from ONNX shape inference on it."""
        names = [self.fresh(op.lower()) for _ in range(outputs)]
        node = helper.make_node(op, list(inputs), names, name=self.fresh(f"n_{op}"),
                                **{k: v for k, v in attrs.items() if v is not None})
        if op in WINDOW_OPS:
            self._check_window(inputs[0], attrs)
        for name, shape in zip(names, self._infer(node)):
            self.shapes[name] = shape
        self.nodes.append(node)
        return names

    def op(self, op: str, *inputs: str, **attrs) -> str:
        return self.add(op, inputs, 1, **attrs)[0]

    def _check_window(self, x: str, attrs: dict) -> None:
        """A window wider than the padded input has no valid output (the spec's floor
        gives 0; onnxruntime and shape inference truncate to 1): not a graph to test."""
        if str(attrs.get("auto_pad", "NOTSET")).startswith("SAME"):
            return
        kernel = attrs.get("kernel_shape") or []
        dilations = attrs.get("dilations") or [1] * len(kernel)
        pads = attrs.get("pads") or [0] * (2 * len(kernel))
        sizes = self.shapes[x][2:]
        for i, (k, d) in enumerate(zip(kernel, dilations)):
            if d * (k - 1) + 1 > sizes[i] + pads[i] + pads[i + len(kernel)]:
                raise Reject(f"window {kernel} wider than the padded input {sizes}")

    def _infer(self, node: onnx.NodeProto) -> list[tuple[int, ...]]:
        seen: set[str] = set()
        values, inits = [], []
        for name in node.input:
            if not name or name in seen:
                continue
            seen.add(name)
            if name in self.initializers:
                inits.append(self.initializers[name])
            elif name in self.shapes:
                values.append(helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                                            list(self.shapes[name])))
            else:  # pragma: no cover - a family bug
                raise KeyError(f"{node.op_type} reads unknown value {name!r}")
        graph = helper.make_graph([node], "one", values, [], inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  ir_version=ir_version(self.opset))
        try:
            inferred = shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
        except Exception as exc:  # onnx raises several error types
            raise Reject(f"{node.op_type}: {exc}") from exc
        found = {v.name: v for v in inferred.graph.value_info}
        shapes = []
        for name in node.output:
            value = found.get(name)
            if value is None or not value.type.tensor_type.HasField("shape"):
                raise Reject(f"{node.op_type}: no inferred shape")
            dims = value.type.tensor_type.shape.dim
            shape = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in dims)
            if any(d <= 0 for d in shape):
                raise Reject(f"{node.op_type}: inferred shape {shape}")
            shapes.append(shape)
        return shapes

    def model(self, outputs: Sequence[str]) -> onnx.ModelProto:
        graph = helper.make_graph(
            list(self.nodes), "fuzz",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(self.shapes[n]))
             for n in self.inputs],
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(self.shapes[n]))
             for n in outputs],
            [self.initializers[n] for n in sorted(self.initializers)],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)],
                                  ir_version=ir_version(self.opset),
                                  producer_name="onnxforge.random_graphs")
        return model


def ir_version(opset: int) -> int:
    """The IR version onnx pairs with the opset (onnxruntime 1.31 reads IR <= 13)."""
    return 8 if opset <= 18 else 9


# ------------------------------------------------------------------------ helpers


def _pick(rng: np.random.Generator, options: Sequence, weights: Sequence[float] | None = None):
    if weights is None:
        return options[int(rng.integers(len(options)))]
    p = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _chance(rng: np.random.Generator, p: float) -> bool:
    return bool(rng.random() < p)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _check_size(b: GraphBuilder, name: str) -> str:
    shape = b.shapes[name]
    if len(shape) != 4:
        raise Reject(f"rank {len(shape)}")
    if shape[1] > MAX_CHANNELS or max(shape[2:]) > MAX_SPATIAL or \
            math.prod(shape) > MAX_ELEMENTS:
        raise Reject(f"too large: {shape}")
    return name


def _reduce_mean(b: GraphBuilder, x: str, axes: Sequence[int]) -> str:
    if b.opset >= 18:
        return b.op("ReduceMean", x, b.ints(axes, "axes"), keepdims=1)
    return b.op("ReduceMean", x, axes=list(axes), keepdims=1)


# ------------------------------------------------------------------------ families
# Each takes (builder, current value, earlier values, options) and returns the new
# current value, a rank-4 tensor. `keep` asks for the same shape ("shape"), the same
# N/H/W ("spatial"), or anything (None).


def conv(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    c = b.shapes[x][1]
    kind = _pick(rng, ["dense", "depthwise", "grouped"], [0.5, 0.3, 0.2])
    if kind == "depthwise":
        group, out = c, c * (1 if keep == "shape" or _chance(rng, 0.7) else 2)
    elif kind == "grouped" and len(_divisors(c)) > 2:
        group = _pick(rng, _divisors(c)[1:-1])
        out = c if keep == "shape" else group * int(rng.integers(1, max(2, 16 // group) + 1))
    else:
        group, out = 1, c if keep == "shape" else int(rng.integers(1, 17))
    if out % group:
        raise Reject("channels")
    kh, kw = _pick(rng, [(1, 1), (3, 3), (3, 3), (5, 5), (2, 2), (1, 3), (3, 1)])
    stride = 1 if keep else int(_pick(rng, [1, 1, 2]))
    dil = int(_pick(rng, [1, 1, 1, 2])) if max(kh, kw) > 1 else 1
    attrs: dict = {"kernel_shape": [kh, kw], "group": group}
    if stride > 1:
        attrs["strides"] = [stride, stride]
    if dil > 1:
        attrs["dilations"] = [dil, dil]
    total_h, total_w = dil * (kh - 1), dil * (kw - 1)
    style = "same" if keep else _pick(rng, ["same", "none", "asym", "auto"], [4, 2, 2, 1])
    if style == "same":
        if stride == 1 and (total_h % 2 or total_w % 2) and not keep:
            style = "asym"
        attrs["pads"] = [total_h // 2, total_w // 2, total_h - total_h // 2,
                         total_w - total_w // 2]
    if style == "asym":
        attrs["pads"] = [int(rng.integers(0, total_h + 1)), int(rng.integers(0, total_w + 1)),
                         int(rng.integers(0, total_h + 1)), int(rng.integers(0, total_w + 1))]
    elif style == "auto":
        # onnxruntime refuses SAME auto_pad with dilations
        attrs["auto_pad"] = _pick(rng, ["SAME_UPPER", "SAME_LOWER", "VALID"] if dil == 1
                                  else ["VALID"])
    fan_in = (c // group) * kh * kw
    inputs = [x, b.floats((out, c // group, kh, kw), 1.0 / math.sqrt(fan_in))]
    if _chance(rng, 0.7):
        inputs.append(b.floats((out,), 0.5, "bias"))
    y = b.op("Conv", *inputs, **attrs)
    if keep == "shape" and b.shapes[y] != b.shapes[x]:
        raise Reject("conv changed the shape")
    follow = _pick(rng, ["", "bn", "affine"], [6, 3, 1])
    if follow == "bn":  # what fold-bn folds
        y = batchnorm(b, y)
    elif follow == "affine":  # what fold-affine folds: a per-channel Mul or Add
        op = _pick(rng, ["Mul", "Add"])
        y = b.op(op, y, b.floats((out, 1, 1), 1.0, "k", low=0.25 if op == "Mul" else None))
    return _check_size(b, y)


def convtranspose(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    if keep:
        raise Reject("convtranspose changes the shape")
    rng = b.rng
    c = b.shapes[x][1]
    depthwise = _chance(rng, 0.25)
    group = c if depthwise else 1
    out = c if depthwise else int(rng.integers(1, 17))
    k = int(_pick(rng, [2, 3, 4]))
    stride = int(_pick(rng, [1, 2, 2]))
    dil = int(_pick(rng, [1, 1, 2]))
    attrs: dict = {"kernel_shape": [k, k], "strides": [stride, stride], "group": group}
    if dil > 1:
        attrs["dilations"] = [dil, dil]
    span = dil * (k - 1)
    attrs["pads"] = [int(rng.integers(0, span + 1)) for _ in range(4)]
    if stride > 1 and _chance(rng, 0.4):
        attrs["output_padding"] = [int(rng.integers(0, stride)), int(rng.integers(0, stride))]
    inputs = [x, b.floats((c, out // group, k, k), 1.0 / math.sqrt(c // group * k))]
    if _chance(rng, 0.7):
        inputs.append(b.floats((out,), 0.5, "bias"))
    return _check_size(b, b.op("ConvTranspose", *inputs, **attrs))


def upsample(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    """ConvTranspose with kernel == stride and no padding (a 2x or 3x upsampling layer),
    which compile rewrites as a 1x1 conv + pixel shuffle; depthwise ones stay transposes."""
    if keep:
        raise Reject("upsample changes the shape")
    rng = b.rng
    if max(b.shapes[x][2:]) > 16:  # halve it first, or 2x would pass the size cap
        x = b.op("MaxPool", x, kernel_shape=[2, 2], strides=[2, 2])
    c, side = b.shapes[x][1], max(b.shapes[x][2:])
    s = int(_pick(rng, [2, 2, 3])) if side <= 10 else 2
    group = c if _chance(rng, 0.2) else 1
    out = c if group > 1 else int(rng.integers(1, 17))
    inputs = [x, b.floats((c, out // group, s, s), 1.0 / math.sqrt(c // group * s))]
    if _chance(rng, 0.7):
        inputs.append(b.floats((out,), 0.5, "bias"))
    return _check_size(b, b.op("ConvTranspose", *inputs, kernel_shape=[s, s],
                               strides=[s, s], group=group))


def batchnorm(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    c = b.shapes[x][1]
    rng = b.rng
    scale = b.floats((c,), 0.5, "gamma", low=0.5)
    bias = b.floats((c,), 0.5, "beta")
    mean = b.floats((c,), 0.5, "mean")
    var = b.const((0.5 + rng.random(c)).astype(np.float32), "var")
    eps = float(_pick(rng, [1e-5, 1e-3]))
    return b.op("BatchNormalization", x, scale, bias, mean, var, epsilon=eps)


def act(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    op = _pick(rng, ["Relu", "LeakyRelu", "Clip", "Sigmoid", "Tanh", "HardSwish",
                     "HardSigmoid"], [3, 1, 2, 2, 2, 2, 2])
    if op == "LeakyRelu":
        return b.op(op, x, alpha=float(_pick(rng, [0.01, 0.1, 0.2])))
    if op == "Clip":
        style = _pick(rng, ["relu6", "both", "min", "max"])
        lo = 0.0 if style == "relu6" else float(-rng.random())
        hi = 6.0 if style == "relu6" else float(rng.random() + 0.1)
        if style == "min":
            return b.op(op, x, b.scalar(lo, "min"))
        if style == "max":
            return b.op(op, x, "", b.scalar(hi, "max"))
        return b.op(op, x, b.scalar(lo, "min"), b.scalar(hi, "max"))
    if op == "HardSigmoid":
        if _chance(rng, 0.5):
            return b.op(op, x, alpha=1.0 / 6.0, beta=0.5)
        return b.op(op, x, alpha=float(0.1 + rng.random() * 0.3),
                    beta=float(0.3 + rng.random() * 0.4))
    return b.op(op, x)


def gelu(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    form = _pick(rng, ["erf", "erf-mul", "tanh", "op"], [4, 1, 2, 1 if b.opset >= 20 else 0])
    if form == "op":
        return b.op("Gelu", x, approximate=_pick(rng, ["none", "tanh"]))
    if form == "tanh":  # 0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
        cube = b.op("Pow", x, b.scalar(3.0))
        inner = b.op("Add", x, b.op("Mul", cube, b.scalar(0.044715)))
        t = b.op("Tanh", b.op("Mul", inner, b.scalar(math.sqrt(2.0 / math.pi))))
        return b.op("Mul", b.op("Mul", x, b.scalar(0.5)), b.op("Add", t, b.scalar(1.0)))
    if form == "erf":  # x * 0.5 * (1 + erf(x / sqrt 2)), as torch exports it
        e = b.op("Erf", b.op("Div", x, b.scalar(math.sqrt(2.0))))
        return b.op("Mul", b.op("Mul", x, b.op("Add", e, b.scalar(1.0))), b.scalar(0.5))
    e = b.op("Erf", b.op("Mul", x, b.scalar(1.0 / math.sqrt(2.0))))
    return b.op("Mul", b.op("Mul", x, b.scalar(0.5)), b.op("Add", e, b.scalar(1.0)))


def chain(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    for _ in range(int(b.rng.integers(3, 9))):
        x = b.op(_pick(b.rng, ["Sigmoid", "Tanh"]), x)
    return x


def binary(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    _, c, h, w = b.shapes[x]
    op = _pick(rng, ["Add", "Mul", "Sub", "Div"], [3, 3, 1, 1])
    shape = _pick(rng, [(), (1,), (c, 1, 1), (1, c, 1, 1), (w,), (h, w), (1, 1, h, 1),
                        (1, c, h, w)])
    if op == "Div":
        const = b.floats(shape, 1.5, "k", low=0.5)
    elif op == "Mul":
        const = b.floats(shape, 1.0, "k", low=0.25)
    else:
        const = b.floats(shape, 1.0, "k")
    if op in ("Sub", "Add", "Mul") and _chance(rng, 0.3):
        return b.op(op, const, x)
    return b.op(op, x, const)


def matmul(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    _, c, h, w = b.shapes[x]
    k = w if keep == "shape" else int(rng.integers(1, 17))
    form = _pick(rng, ["4d", "3d", "3d-batched", "2d-bias", "self"])
    if form == "self" and (keep != "shape" or h == w):  # x @ x^T: [1,c,h,h]
        t = b.op("Transpose", x, perm=[0, 1, 3, 2])
        return _check_size(b, b.op("MatMul", x, t))
    weight = b.floats((w, k), 1.0 / math.sqrt(w))
    if form == "4d":
        return _check_size(b, b.op("MatMul", x, weight))
    if form.startswith("3d"):
        r = b.op("Reshape", x, b.ints([c, h, w], "shape"))
        if form == "3d-batched":
            weight = b.floats((c, w, k), 1.0 / math.sqrt(w))
        m = b.op("MatMul", r, weight)
    else:
        r = b.op("Reshape", x, b.ints([c * h, w], "shape"))
        m = b.op("Add", b.op("MatMul", r, weight), b.floats((k,), 0.5, "bias"))
    return _check_size(b, b.op("Reshape", m, b.ints([1, c, h, k], "shape")))


def gemm(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    _, c, h, w = b.shapes[x]
    k = w if keep == "shape" else int(rng.integers(1, 17))
    r = b.op("Reshape", x, b.ints([c * h, w], "shape"))
    trans_b = _chance(rng, 0.7)
    weight = b.floats((k, w) if trans_b else (w, k), 1.0 / math.sqrt(w))
    inputs = [r, weight]
    if _chance(rng, 0.7):
        inputs.append(b.floats(_pick(rng, [(k,), (1, k), (c * h, k)]), 0.5, "bias"))
    alpha = float(_pick(rng, [1.0, 1.0, 0.5]))
    beta = float(_pick(rng, [1.0, 1.0, 2.0])) if len(inputs) == 3 else None
    g = b.op("Gemm", *inputs, transB=int(trans_b), alpha=alpha, beta=beta)
    return _check_size(b, b.op("Reshape", g, b.ints([1, c, h, k], "shape")))


def softmax(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    axis = int(_pick(b.rng, [-1, -1, 1, 2]))
    return b.op(_pick(b.rng, ["Softmax", "Softmax", "LogSoftmax"]), x, axis=axis)


def layernorm(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    """LayerNorm over the last axis from primitives (the pattern torch exports)."""
    w = b.shapes[x][-1]
    mean = _reduce_mean(b, x, [-1])
    d = b.op("Sub", x, mean)
    var = _reduce_mean(b, b.op("Pow", d, b.scalar(2.0)), [-1])
    # eps >= 1e-5: a row of equal values (a padded border) makes x - mean pure rounding
    # noise, which a tiny eps scales up to O(1): any exact rewrite would "differ" there.
    std = b.op("Sqrt", b.op("Add", var, b.scalar(float(_pick(b.rng, [1e-5, 1e-3])))))
    y = b.op("Div", d, std)
    if _chance(b.rng, 0.8):
        y = b.op("Add", b.op("Mul", y, b.floats((w,), 0.5, "gamma", low=0.5)),
                 b.floats((w,), 0.5, "beta"))
    return y


def _inverse(perm: Sequence[int]) -> list[int]:
    return [int(i) for i in np.argsort(perm)]


def transpose(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    perm = [0] + [int(i) + 1 for i in rng.permutation(3)]
    if perm == [0, 1, 2, 3]:
        perm = [0, 2, 3, 1]
    t = b.op("Transpose", x, perm=perm)
    if _chance(rng, 0.6):
        t = _pick(rng, [act, binary, softmax])(b, t)
    if keep is None and _chance(rng, 0.2):  # swap H and W for good
        return b.op("Transpose", t, perm=[_inverse(perm)[i] for i in (0, 1, 3, 2)])
    return b.op("Transpose", t, perm=_inverse(perm))


def reshape(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    _, c, h, w = b.shapes[x]
    form = _pick(rng, ["flatten-hw", "flatten", "split-c", "minus-one"])
    if form == "flatten":
        r = b.op("Flatten", x, axis=int(_pick(rng, [1, 2])))
    elif form == "split-c" and c % 2 == 0:
        r = b.op("Reshape", x, b.ints([1, 2, c // 2, h, w], "shape"))
    elif form == "minus-one":
        r = b.op("Reshape", x, b.ints([1, c, -1], "shape"))
    else:
        r = b.op("Reshape", x, b.ints([0, c, h * w], "shape"))
    if _chance(rng, 0.6):
        r = _pick(rng, [act, softmax, chain])(b, r)
    return b.op("Reshape", r, b.ints([1, c, h, w], "shape"))


def slice_(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    if keep:
        raise Reject("slice changes the shape")
    rng = b.rng
    shape = b.shapes[x]
    axes = sorted({int(a) for a in rng.choice([1, 2, 3], size=int(rng.integers(1, 3)))})
    starts, ends, steps = [], [], []
    for axis in axes:
        n = shape[axis]
        step = int(_pick(rng, [1, 1, 1, 2, -1]))
        if step > 0:
            start = int(rng.integers(0, max(1, n // 2)))
            end = int(_pick(rng, [n, n - 1, -1, 2**62, start + 1 + int(rng.integers(0, n))]))
            if _chance(rng, 0.2):
                start -= n  # a negative start
        else:
            start = int(_pick(rng, [-1, n - 1, 2**62]))
            end = int(_pick(rng, [-(2**62), 0, -n - 1]))
        starts.append(start)
        ends.append(end)
        steps.append(step)
    inputs = [x, b.ints(starts, "starts"), b.ints(ends, "ends")]
    if _chance(rng, 0.8) or any(s != 1 for s in steps):
        inputs += [b.ints(axes, "axes"), b.ints(steps, "steps")]
    elif axes != [1, 2, 3][: len(axes)]:
        inputs.append(b.ints(axes, "axes"))
    return _check_size(b, b.op("Slice", *inputs))


def pad(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    if keep == "shape":
        raise Reject("pad changes the shape")
    rng = b.rng
    h, w = b.shapes[x][2:]
    modes = ["constant", "reflect", "edge"] + (["wrap"] if b.opset >= 19 else [])
    mode = _pick(rng, modes, [4, 2, 2, 1][: len(modes)])
    limit_h, limit_w = (h - 1, w - 1) if mode in ("reflect", "wrap") else (3, 3)
    if mode == "wrap":
        limit_h, limit_w = h, w
    pads = [0] * 8
    for axis, limit in ((2, limit_h), (3, limit_w)):
        for side in (0, 4):
            pads[axis + side] = int(rng.integers(0, min(limit, 3) + 1))
    if mode == "constant" and keep is None and _chance(rng, 0.2):
        pads[1], pads[5] = int(rng.integers(0, 3)), int(rng.integers(0, 3))
    if mode == "constant" and _chance(rng, 0.15):  # a negative pad crops
        axis = int(_pick(rng, [2, 3]))
        if b.shapes[x][axis] > 2:
            pads[axis + int(_pick(rng, [0, 4]))] = -1
    if not any(pads):
        pads[7] = 1 if mode != "reflect" or w > 1 else 0
    inputs = [x]
    use_axes = b.opset >= 18 and _chance(rng, 0.3) and pads[:2] == [0, 0] == pads[4:6]
    inputs.append(b.ints([pads[2], pads[3], pads[6], pads[7]] if use_axes else pads, "pads"))
    if mode == "constant":
        value = 0.0 if _chance(rng, 0.4) else float(_pick(rng, [1.0, -1.5, 0.25, 3.0]))
        inputs.append(b.scalar(value, "value"))
    elif use_axes:
        inputs.append("")
    if use_axes:
        inputs.append(b.ints([2, 3], "axes"))
    y = b.op("Pad", *inputs, mode=mode)
    if keep is None and _chance(rng, 0.6):  # Conv -> Pad -> Conv: a Conv reads the pad
        y = conv(b, _check_size(b, y))
    return _check_size(b, y)


def pool(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    op = _pick(rng, ["MaxPool", "AveragePool"])
    k = int(_pick(rng, [2, 3, 3]))
    stride = 1 if keep else int(_pick(rng, [1, 2, 2]))
    attrs: dict = {"kernel_shape": [k, k], "strides": [stride, stride]}
    if keep:
        if k % 2 == 0:
            raise Reject("even pool kernel cannot keep the shape")
        attrs["pads"] = [k // 2] * 4
    elif _chance(rng, 0.6):
        attrs["pads"] = [int(rng.integers(0, k // 2 + 1 if k > 2 else 2)) for _ in range(4)]
        attrs["pads"] = [min(p, k - 1) for p in attrs["pads"]]
    if not keep and _chance(rng, 0.3):
        attrs["ceil_mode"] = 1
    if op == "AveragePool" and "pads" in attrs:
        attrs["count_include_pad"] = int(_pick(rng, [0, 1]))
    if op == "MaxPool" and not keep and _chance(rng, 0.2):
        attrs["dilations"] = [2, 2]
    return _check_size(b, b.op(op, x, **attrs))


def gap(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    rng = b.rng
    c = b.shapes[x][1]
    if keep is None and _chance(rng, 0.25):
        return b.op("GlobalAveragePool", x)
    # squeeze-excitation: x * gate(conv(relu(conv(gap(x)))))
    s = b.op("GlobalAveragePool", x) if _chance(rng, 0.7) else _reduce_mean(b, x, [2, 3])
    r = max(1, c // int(_pick(rng, [2, 4])))
    s = b.op("Conv", s, b.floats((r, c, 1, 1), 1.0 / math.sqrt(c)), b.floats((r,), 0.5),
             kernel_shape=[1, 1])
    s = b.op(_pick(rng, ["Relu", "HardSwish"]), s)
    s = b.op("Conv", s, b.floats((c, r, 1, 1), 1.0 / math.sqrt(r)), b.floats((c,), 0.5),
             kernel_shape=[1, 1])
    s = b.op(_pick(rng, ["Sigmoid", "HardSigmoid"]), s)
    return b.op("Mul", x, s)


def _nearest_is_ambiguous(size_in: int, size_out: int, scale: float, attrs: dict) -> bool:
    """True when an output pixel's source coordinate (ONNX's formula, in float64) sits on
    the rounding boundary of `nearest_mode` and the scale is not a power of two: float32
    implementations then legitimately pick either neighbour (onnxruntime computes
    i / (16/14) = 6.9999995 and floors to 6 where the exact value is 7; TVM gets 7), so
    such a graph tests the reference's rounding, not the compiler."""
    if float(np.log2(scale)).is_integer():
        return False
    mode = attrs["coordinate_transformation_mode"]
    boundary = 0.0 if attrs["nearest_mode"] in ("floor", "ceil") else 0.5
    for i in range(size_out):
        if mode == "align_corners":
            x = i * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
        elif mode == "asymmetric":
            x = i / scale
        elif mode == "pytorch_half_pixel" and size_out == 1:
            x = 0.0
        else:
            x = (i + 0.5) / scale - 0.5
        if abs((x - boundary) - round(x - boundary)) < 1e-4:
            return True
    return False


def resize(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    if keep:
        raise Reject("resize changes the shape")
    rng = b.rng
    _, c, h, w = b.shapes[x]
    mode = _pick(rng, ["nearest", "linear"])
    attrs: dict = {"mode": mode}
    if mode == "nearest":
        attrs["coordinate_transformation_mode"] = _pick(
            rng, ["asymmetric", "half_pixel", "align_corners", "pytorch_half_pixel"], [3, 2, 1, 1])
        attrs["nearest_mode"] = _pick(rng, ["floor", "round_prefer_floor", "round_prefer_ceil",
                                            "ceil"], [3, 2, 1, 1])
    else:
        attrs["coordinate_transformation_mode"] = _pick(
            rng, ["half_pixel", "align_corners", "asymmetric", "pytorch_half_pixel"], [3, 2, 1, 1])
    scales = None
    if _chance(rng, 0.7):
        factor = float(_pick(rng, [2.0, 2.0, 3.0, 0.5] if mode == "nearest" else [2.0, 2.0, 1.5]))
        out_h, out_w, scale_h, scale_w = int(h * factor), int(w * factor), factor, factor
        scales = b.const(np.asarray([1, 1, factor, factor], dtype=np.float32), "scales")
    else:
        out_h, out_w = int(rng.integers(2, 2 * h + 1)), int(rng.integers(2, 2 * w + 1))
        scale_h, scale_w = out_h / h, out_w / w
    if mode == "nearest" and (_nearest_is_ambiguous(h, out_h, scale_h, attrs)
                              or _nearest_is_ambiguous(w, out_w, scale_w, attrs)):
        raise Reject("nearest Resize with a source coordinate on a rounding boundary")
    if scales is not None:
        y = b.op("Resize", x, "", scales, **attrs)
    else:
        y = b.op("Resize", x, "", "", b.ints([1, c, out_h, out_w], "sizes"), **attrs)
    return _check_size(b, y)


def split(b: GraphBuilder, x: str, keep: str | None = None,
          allowed: Sequence[str] = ()) -> str:
    rng = b.rng
    shape = b.shapes[x]
    axis = int(_pick(rng, [1, 1, 2, 3]))
    n = shape[axis]
    if n < 2:
        raise Reject("nothing to split")
    parts = int(rng.integers(2, min(3, n) + 1))
    if b.opset >= 18 and _chance(rng, 0.3) and n % parts == 0:
        outs = b.add("Split", [x], parts, axis=axis, num_outputs=parts)
    else:
        cuts = sorted(int(v) for v in rng.choice(np.arange(1, n), size=parts - 1,
                                                 replace=False))
        sizes = [e - s for s, e in zip([0] + cuts, cuts + [n])]
        outs = b.add("Split", [x, b.ints(sizes, "split")], parts, axis=axis)
    outs = [_branch(b, o, "shape", allowed) if _chance(rng, 0.7) else o for o in outs]
    shapes = {b.shapes[o] for o in outs}
    if len(shapes) == 1 and _chance(rng, 0.4):
        y = outs[0]
        for o in outs[1:]:
            y = b.op(_pick(rng, ["Add", "Mul"]), y, o)
        return y
    if _chance(rng, 0.5):
        outs = outs[::-1]
    return b.op("Concat", *outs, axis=axis)


def concat(b: GraphBuilder, x: str, keep: str | None = None, earlier: Sequence[str] = (),
           allowed: Sequence[str] = ()) -> str:
    if keep == "shape":
        raise Reject("concat changes the shape")
    rng = b.rng
    shape = b.shapes[x]
    axis = int(_pick(rng, [1, 1, 1, 2, 3]))
    same = [e for e in earlier if e != x and all(
        d == shape[i] for i, d in enumerate(b.shapes[e]) if i != axis)]
    other = _pick(rng, same) if same and _chance(rng, 0.4) else \
        _branch(b, x, "spatial" if axis == 1 else "shape", allowed)
    inputs = [x, other] if _chance(rng, 0.6) else [other, x]
    if _chance(rng, 0.2):
        inputs.append(x)
    return _check_size(b, b.op("Concat", *inputs, axis=axis))


def residual(b: GraphBuilder, x: str, keep: str | None = None, earlier: Sequence[str] = (),
             allowed: Sequence[str] = ()) -> str:
    rng = b.rng
    same = [e for e in earlier if e != x and b.shapes[e] == b.shapes[x]]
    other = _pick(rng, same) if same and _chance(rng, 0.3) else \
        _branch(b, x, "shape", allowed)
    op = _pick(rng, ["Add", "Add", "Mul", "Sub"])
    return b.op(op, x, other) if _chance(rng, 0.7) else b.op(op, other, x)


def _hidden_structure(b: GraphBuilder, x: str, y: str, hidden: int) -> str:
    """What sits between the two layers of `prunable`, on the hidden channels: nothing, a
    depthwise or grouped conv, a residual 1x1 conv, a Concat with a second branch of the
    block's input, a channel Split rejoined in another order, a channel Slice, a MaxPool."""
    rng = b.rng
    kind = _pick(rng, ["plain", "depthwise", "grouped", "residual", "concat", "split", "slice",
                       "pool"], [3, 1, 1, 1, 1, 1, 1, 1])
    if kind == "depthwise":
        return b.op("Conv", y, b.floats((hidden, 1, 3, 3), 1.0 / 3), kernel_shape=[3, 3],
                    pads=[1, 1, 1, 1], group=hidden)
    if kind == "grouped":
        g = int(_pick(rng, [2, 4]))
        return b.op("Conv", y, b.floats((hidden, hidden // g, 1, 1), math.sqrt(g / hidden)),
                    b.floats((hidden,), 0.5, "bias"), kernel_shape=[1, 1], group=g)
    if kind == "residual":
        z = b.op("Conv", y, b.floats((hidden, hidden, 1, 1), 1.0 / math.sqrt(hidden)),
                 kernel_shape=[1, 1])
        return b.op("Add", y, z) if _chance(rng, 0.5) else b.op("Add", z, y)
    if kind == "concat":
        c = b.shapes[x][1]
        other = b.op("Conv", x, b.floats((8, c, 1, 1), 1.0 / math.sqrt(c)), kernel_shape=[1, 1])
        return b.op("Concat", *([y, other] if _chance(rng, 0.5) else [other, y]), axis=1)
    if kind == "split":
        parts = b.add("Split", [y, b.ints([hidden // 2, hidden - hidden // 2], "split")], 2,
                      axis=1)
        return b.op("Concat", b.op("Sigmoid", parts[1]), parts[0], axis=1)
    if kind == "slice":
        start = int(rng.integers(0, hidden // 2))
        return b.op("Slice", y, b.ints([start], "starts"), b.ints([hidden], "ends"),
                    b.ints([1], "axes"))
    if kind == "pool":
        return b.op("MaxPool", y, kernel_shape=[3, 3], pads=[1, 1, 1, 1])
    return y


def prunable(b: GraphBuilder, x: str, keep: str | None = None) -> str:
    """Two weight layers around a hidden width of 8-32 that `prune`, `lowrank` and
    `sparsify` can cut, sized for the sparse kernels' blocks: Conv (1x1 or 3x3, stride 1)
    -> activation [-> BatchNormalization] [-> a structure pruning must follow:
    `_hidden_structure`] -> Conv (or, changing the shape, GlobalAveragePool -> Flatten ->
    Gemm, a classifier head); or MatMul (+ bias) -> Relu -> MatMul on the rows of a
    [C*H, W] reshape."""
    rng = b.rng
    _, c, h, w = b.shapes[x]
    hidden = int(_pick(rng, [8, 16, 16, 24, 32]))
    if _chance(rng, 0.7):
        k = int(_pick(rng, [1, 3, 3]))
        inputs = [x, b.floats((hidden, c, k, k), 1.0 / math.sqrt(c * k * k))]
        if _chance(rng, 0.7):
            inputs.append(b.floats((hidden,), 0.5, "bias"))
        y = b.op("Conv", *inputs, kernel_shape=[k, k], pads=[k // 2] * 4)
        y = b.op(_pick(rng, ["Relu", "Relu", "HardSwish", "Sigmoid"]), y)
        if _chance(rng, 0.3):
            y = batchnorm(b, y)
        if _chance(rng, 0.5):
            y = _hidden_structure(b, x, y, hidden)
        width = b.shapes[y][1]
        if keep is None and _chance(rng, 0.15):  # classifier head: [1, out, 1, 1]
            out = int(_pick(rng, [8, 16]))
            flat = b.op("Flatten", b.op("GlobalAveragePool", y), axis=1)
            trans_b = _chance(rng, 0.5)
            weight = b.floats((out, width) if trans_b else (width, out), 1.0 / math.sqrt(width))
            g = b.op("Gemm", flat, weight, b.floats((out,), 0.5, "bias"), transB=int(trans_b))
            return _check_size(b, b.op("Reshape", g, b.ints([1, out, 1, 1], "shape")))
        out = c if keep == "shape" else int(_pick(rng, [c, 8, 16]))
        k = int(_pick(rng, [1, 3, 3]))
        inputs = [y, b.floats((out, width, k, k), 1.0 / math.sqrt(width * k * k))]
        if _chance(rng, 0.7):
            inputs.append(b.floats((out,), 0.5, "bias"))
        return _check_size(b, b.op("Conv", *inputs, kernel_shape=[k, k], pads=[k // 2] * 4))
    k = w if keep == "shape" else int(_pick(rng, [w, 8, 16]))
    r = b.op("Reshape", x, b.ints([c * h, w], "shape"))
    m = b.op("MatMul", r, b.floats((w, hidden), 1.0 / math.sqrt(w)))
    m = b.op("Relu", b.op("Add", m, b.floats((hidden,), 0.5, "bias")))
    m = b.op("MatMul", m, b.floats((hidden, k), 1.0 / math.sqrt(hidden)))
    return _check_size(b, b.op("Reshape", m, b.ints([1, c, h, k], "shape")))


BranchFamily = Callable[..., str]

FAMILIES: dict[str, tuple[float, BranchFamily]] = {
    "conv": (6, conv),
    "convtranspose": (2, convtranspose),
    "batchnorm": (2, batchnorm),
    "act": (5, act),
    "gelu": (2, gelu),
    "chain": (1.5, chain),
    "binary": (3, binary),
    "matmul": (2, matmul),
    "gemm": (1.5, gemm),
    "softmax": (1, softmax),
    "layernorm": (1.5, layernorm),
    "transpose": (1.5, transpose),
    "reshape": (1.5, reshape),
    "slice": (2, slice_),
    "pad": (3, pad),
    "pool": (2.5, pool),
    "gap": (1.5, gap),
    "resize": (2, resize),
    "split": (1.5, split),
    "concat": (2, concat),
    "residual": (3, residual),
    "prunable": (3, prunable),
    "upsample": (2, upsample),
}
# Drawn only when named (`--ops`, the lossy stages' samples): the default draw, and so
# every graph of an earlier seed, stays what it was.
OPT_IN_FAMILIES = ("prunable", "upsample")
JOIN_FAMILIES = ("split", "concat", "residual")
# Families a branch may use when it must keep the shape (or N/H/W) of its input.
BRANCH_FAMILIES = ("conv", "batchnorm", "act", "gelu", "chain", "binary", "matmul", "softmax",
                   "layernorm", "transpose", "reshape", "pool", "gap", "gemm", "prunable")


def _branch(b: GraphBuilder, x: str, keep: str, allowed: Sequence[str]) -> str:
    """One or two families applied to `x` keeping its shape (or its N/H/W)."""
    names = [f for f in BRANCH_FAMILIES if f in allowed] or ["act"]
    y = x
    for _ in range(int(b.rng.integers(1, 3))):
        for _attempt in range(6):
            point = b.checkpoint()
            family = _pick(b.rng, names, [FAMILIES[n][0] for n in names])
            try:
                z = FAMILIES[family][1](b, y, keep=keep)
                if keep == "shape" and b.shapes[z] != b.shapes[y]:
                    raise Reject("branch changed the shape")
                if keep == "spatial" and (b.shapes[z][0], b.shapes[z][2:]) != \
                        (b.shapes[y][0], b.shapes[y][2:]):
                    raise Reject("branch changed N/H/W")
                y = z
                break
            except Reject:
                b.restore(point)
    if y == x:  # nothing fitted: a plain activation
        y = b.op(_pick(b.rng, ["Relu", "Sigmoid", "Tanh"]), x)
    return y


def family_names() -> list[str]:
    """The default draw: every family but the opt-in ones."""
    return [f for f in FAMILIES if f not in OPT_IN_FAMILIES]


def parse_families(text: str | Sequence[str] | None) -> list[str]:
    """`conv,pad` -> ["conv", "pad"]; None or "" -> every family. Unknown names raise."""
    if not text:
        return family_names()
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text)]
    names = [n for n in names if n]
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown op families {unknown}; known: {', '.join(FAMILIES)}")
    return names


def generate_graph(seed: int, index: int, families: Sequence[str] | None = None,
                   attempt: int = 0, max_nodes: int = 10) -> RandomGraph:
    """The random graph number `index` of `seed` (`attempt` > 0 draws a replacement)."""
    allowed = list(families) if families else family_names()
    rng = np.random.default_rng([seed, index, attempt])
    opset = int(rng.integers(17, 21))
    b = GraphBuilder(rng, opset)
    shape = (1, int(rng.integers(1, 17)), int(rng.integers(3, 21)), int(rng.integers(3, 21)))
    current = b.input(INPUT_NAME, shape)
    earlier = [current]
    used: list[str] = []
    target = int(rng.integers(3, max_nodes + 1))
    weights = [FAMILIES[n][0] for n in allowed]
    tries = 0
    while len(b.nodes) < target and tries < 60:
        tries += 1
        family = _pick(rng, allowed, weights)
        point = b.checkpoint()
        fn = FAMILIES[family][1]
        try:
            if family in ("concat", "residual"):
                y = fn(b, current, earlier=earlier, allowed=allowed)
            elif family == "split":
                y = fn(b, current, allowed=allowed)
            else:
                y = fn(b, current)
            _check_size(b, y)
        except Reject:
            b.restore(point)
            continue
        if len(b.nodes) > 2 * max_nodes + 6:  # a family overshot by far: draw again
            b.restore(point)
            continue
        used.append(family)
        current = y
        earlier.append(y)
    if not b.nodes:
        current = b.op("Relu", current)
        used.append("act")
    outputs = [current]
    extra = [e for e in earlier[1:-1] if e != current]
    if extra and _chance(rng, 0.15):
        outputs.append(_pick(rng, extra))
    model = b.model(outputs)
    return RandomGraph(model, seed, index, attempt, used, shape,
                       {o: b.shapes[o] for o in outputs})


def random_inputs(model: onnx.ModelProto, seed: int, count: int = 3) -> list[dict[str, np.ndarray]]:
    """`count` seeded input sets (float32 N(0,1), the third one scaled by 3 to saturate)."""
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    sets = []
    for k in range(count):
        feed = {}
        for value in model.graph.input:
            if value.name in initializers:
                continue
            shape = [d.dim_value for d in value.type.tensor_type.shape.dim]
            scale = 3.0 if k % 3 == 2 else 1.0
            feed[value.name] = (rng.standard_normal(shape) * scale).astype(np.float32)
        sets.append(feed)
    return sets
