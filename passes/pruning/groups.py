"""Channel dependency analysis for structured pruning on ONNX graphs.

Structured pruning removes whole channels (conv filters, linear neurons,
attention heads). Removing channel `c` of one tensor forces removals elsewhere:
the producer must stop computing it, every consumer must stop reading it, and a
residual `Add`, a `Concat` or a depthwise conv pass the constraint on. This module
finds those constraints for an `onnx_ir` graph with concrete shapes.

Model of the analysis
---------------------
An *axis node* is a pair (tensor, axis): a weight (initializer or `Constant`
output) or an activation, with one axis whose indices are channels. Op rules
relate two axis nodes element by element ("index i of A goes with index j of
B"). Exploration starts at the output-channel axis of every weight-bearing op
(Conv/ConvTranspose weights, Gemm/MatMul right-hand weights) and follows the
rules in both directions. A union-find over all visited elements then yields
*units*: sets of elements that must be removed together (one conv channel with
its BN entries and the matching input column of every consumer; one attention
head with its Q/K/V columns and output-projection rows; one group of a grouped
conv). Units touching the same axis nodes form a *group* (Torch-Pruning's
dependency group: index i of every member goes together).

Coupling rules (`_RULES`), per op:
- Conv: weight axis 0 <-> output axis 1 <-> bias. group == 1: input axis 1 <->
  weight axis 1 (consumer side). group > 1 (depthwise included): input channel c
  and output channel o are coupled when they are in the same conv group, so a
  unit is a whole group (depthwise: one channel through the conv).
- ConvTranspose (group 1): input axis 1 <-> weight axis 0; weight axis 1 <->
  output axis 1 <-> bias.
- Gemm: contraction axes of A and B; B's output axis <-> Y axis 1 <-> C (broadcast).
- MatMul: A[..., k] <-> B[..., k, :]; B's last axis <-> Y's last; A's rows <-> Y's
  rows; batch axes with broadcasting (this is how attention heads flow through
  Q @ K^T and P @ V).
- BatchNormalization / InstanceNormalization: channel axis <-> all parameter vectors.
- Elementwise (Add, Mul, Sub, Div, Where, PRelu, ...): right-aligned broadcasting;
  two activations of one Add are coupled (residual connections); a size-1
  broadcast axis is not coupled.
- Unary activations, Cast, Identity, Dropout, Clip: same axis in and out.
- Pooling, Resize (scale 1 / same size on that axis), Pad (no padding on that
  axis), Slice (step 1 on that axis: index shift), Split and Concat (offset
  mapping along the axis), Transpose (axis permuted), Squeeze / Unsqueeze (axis
  renumbered), Gather (other axes renumbered).
- Reshape / Flatten: shapes are aligned into blocks of equal element count; an
  axis is coupled to the major axis of the other side of its block by digit
  co-occurrence, so NCHW -> N,(C*H*W) maps channel c to H*W consecutive features
  and (S, 384) -> (S, 12, 32) maps features to heads. The target shape must be a
  constant, -1, or a dimension read with Shape from a tensor (then that tensor's
  axis is coupled too).
- Shape: allowed when the dimension read only reaches Reshape targets through
  Gather/Slice/Concat/Unsqueeze/Squeeze/Cast; anything else blocks.
- Softmax / LogSoftmax / LayerNormalization / Reduce* over the visited axis, any
  unknown op, graph inputs and outputs, and tensors read inside subgraphs block
  the axis: every unit with an element there is *unprunable*. Blocking is never
  wrong, only conservative.

Weights are ordinary axis nodes, so one initializer used by two convs couples
those convs' channels (or blocks them, if the other use is not understood).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_ir as ir

from ...ir import constant_array
from ..graph import attr, weight_out_axis

logger = logging.getLogger(__name__)

# Element count above which a Reshape block is not expanded (treated as blocking).
_MAX_RESHAPE_BLOCK = 1 << 22

UNARY_OPS = {
    "Relu", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Celu",
    "Softplus", "Softsign", "Mish", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg",
    "Abs", "Sign", "Floor", "Ceil", "Round", "Sin", "Cos", "Identity", "Cast", "Not", "IsNaN",
    "IsInf", "ThresholdedRelu", "Shrink", "Clip", "Dropout", "Swish",
}
BROADCAST_OPS = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where", "PRelu", "Equal",
    "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod",
}
POOL_OPS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
            "GlobalLpPool"}
REDUCE_OPS = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
              "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
SOFTMAX_OPS = {"Softmax", "LogSoftmax", "Hardmax"}
# Ops that may carry a Shape-read dimension on its way to a Reshape target.
SHAPE_CHAIN_OPS = {"Gather", "Slice", "Concat", "Unsqueeze", "Squeeze", "Cast", "Identity"}
KERNEL_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


class Blocked(Exception):
    """An op cannot follow channels along this axis: the axis is unprunable."""


@dataclass
class Link:
    """Index `pairs[0][k]` of the visited axis goes with `pairs[1][k]` of (value, axis).

    `pairs=None` means identity (sizes must match).
    """

    value: ir.Value
    axis: int
    pairs: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class AxisNode:
    """One (tensor, axis) whose indices are channels."""

    id: int
    value: ir.Value
    axis: int
    size: int
    offset: int = 0
    blocked: str | None = None
    constant: bool = False

    @property
    def key(self) -> tuple[int, int]:
        return (id(self.value), self.axis)

    def label(self) -> str:
        return f"{self.value.name}[{self.axis}]"


@dataclass
class Unit:
    """Elements removed together: axis-node id -> indices on that axis."""

    id: int
    members: dict[int, np.ndarray]

    @property
    def width(self) -> int:
        return max(len(ix) for ix in self.members.values())


@dataclass
class Group:
    """Units with the same member axis nodes (index i of each member goes together)."""

    id: int
    nodes: tuple[int, ...]
    units: list[Unit]
    kind: str = "conv"  # conv | linear | heads
    name: str = ""
    names: list[str] = field(default_factory=list)  # node and weight names, for overrides

    @property
    def width(self) -> int:
        return max(u.width for u in self.units)


@dataclass
class KernelUse:
    """A weight-bearing node: which axis nodes scale its MACs and read its input."""

    node: ir.Node
    weight: ir.Value | None
    in_axis: tuple[ir.Value, int] | None  # activation input axis that the kernel contracts
    mac_axes: list[tuple[ir.Value, int]]


@dataclass
class Analysis:
    """Result of `analyze`: axis nodes, units, groups and the coupling graph."""

    nodes: list[AxisNode]
    units: list[Unit]
    groups: list[Group]
    blocked_units: int
    graph: nx.Graph
    index: dict[tuple[int, int], int]
    kernels: list[KernelUse]
    block_reasons: dict[str, int]

    def node_of(self, value: ir.Value, axis: int) -> AxisNode | None:
        i = self.index.get((id(value), axis))
        return None if i is None else self.nodes[i]


# ---------------------------------------------------------------- helpers


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


class _Shapes:
    """Static shapes and constant values, memoized per value."""

    def __init__(self, model: ir.Model):
        self.model = model
        self.opset = model.opset_imports.get("", 13)
        self._const: dict[int, np.ndarray | None] = {}
        self._shape_elems: dict[int, list | None] = {}

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None:
            return None
        key = id(value)
        if key not in self._const:
            try:
                self._const[key] = constant_array(value)
            except (ValueError, TypeError, OSError):  # a tensor kind that cannot be read
                self._const[key] = None
        return self._const[key]

    def shape(self, value: ir.Value | None) -> tuple[int | None, ...] | None:
        if value is None:
            return None
        arr = self.const(value)
        if arr is not None:
            return tuple(int(d) for d in arr.shape)
        if value.shape is None:
            return None
        return tuple(d if isinstance(d, int) else None for d in value.shape)

    def rank(self, value: ir.Value | None) -> int:
        shape = self.shape(value)
        if shape is None:
            raise Blocked(f"rank of {value.name if value else '?'} unknown")
        return len(shape)

    def dim(self, value: ir.Value, axis: int) -> int:
        shape = self.shape(value)
        if shape is None or not -len(shape) <= axis < len(shape):
            raise Blocked(f"shape of {value.name} unknown")
        d = shape[axis]
        if d is None:
            raise Blocked(f"dimension {axis} of {value.name} is not static")
        return d

    def full_shape(self, value: ir.Value) -> tuple[int, ...]:
        shape = self.shape(value)
        if shape is None or any(d is None for d in shape):
            raise Blocked(f"shape of {value.name} is not static")
        return shape  # type: ignore[return-value]

    def ints(self, value: ir.Value | None) -> list[int] | None:
        arr = self.const(value)
        return None if arr is None else [int(x) for x in np.asarray(arr).reshape(-1)]

    def axes_of(self, node: ir.Node, input_index: int = 1) -> list[int] | None:
        """`axes` from the attribute (old opsets) or the input (new opsets)."""
        axes = attr(node, "axes")
        if axes is not None:
            return axes
        if len(node.inputs) > input_index and node.inputs[input_index] is not None:
            ints = self.ints(node.inputs[input_index])
            if ints is None:
                raise Blocked(f"{node.op_type} {node.name}: axes are not constant")
            return ints
        return None

    # -- shape tensors: where each element of a 1-D int64 shape tensor comes from

    def shape_elements(self, value: ir.Value | None) -> list | None:
        """Per element: ('const', int) or ('dim', Value, axis) or None (unknown)."""
        if value is None:
            return None
        key = id(value)
        if key in self._shape_elems:
            return self._shape_elems[key]
        self._shape_elems[key] = None  # cycle guard
        result = self._shape_elements(value)
        self._shape_elems[key] = result
        return result

    def _shape_elements(self, value: ir.Value) -> list | None:
        arr = self.const(value)
        if arr is not None:
            if arr.ndim > 1 or not np.issubdtype(arr.dtype, np.integer):
                return None
            return [("const", int(x)) for x in arr.reshape(-1)]
        node = value.producer()
        if node is None or node.domain not in ("", "ai.onnx"):
            return None
        op = node.op_type
        if op == "Shape":
            src = node.inputs[0]
            shape = self.shape(src)
            if shape is None:
                return None
            r = len(shape)
            start = _norm_axis(int(attr(node, "start", 0)), r)
            end = attr(node, "end", None)
            end = r if end is None else _norm_axis(int(end), r)
            start, end = max(0, min(start, r)), max(0, min(end, r))
            return [("dim", src, k) for k in range(start, end)]
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
            return self.shape_elements(node.inputs[0])
        if op == "Concat":
            out = []
            for x in node.inputs:
                elems = self.shape_elements(x)
                if elems is None:
                    return None
                out.extend(elems)
            return out
        if op == "Gather":
            data = self.shape_elements(node.inputs[0])
            idx = self.const(node.inputs[1])
            if data is None or idx is None or int(attr(node, "axis", 0)) != 0:
                return None
            n = len(data)
            try:
                return [data[int(i) % n if n else 0] for i in np.asarray(idx).reshape(-1)]
            except IndexError:
                return None
        if op == "Slice" and len(node.inputs) >= 3:
            data = self.shape_elements(node.inputs[0])
            starts, ends = self.ints(node.inputs[1]), self.ints(node.inputs[2])
            steps = self.ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else [1]
            if data is None or starts is None or ends is None or steps is None:
                return None
            return data[slice(starts[0], ends[0], steps[0])]
        return None


# ---------------------------------------------------------------- op rules
# A rule gets (shapes, node, value, axis, port) where port = ("in"|"out", index)
# and returns the links of (value, axis) through that node, or raises Blocked.


def _rule_unary(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if kind == "in" and i != 0:
        raise Blocked(f"{node.op_type} {node.name}: input {i} is a parameter")
    links = [Link(node.inputs[0], a)] + [Link(o, a) for o in node.outputs if o is not None]
    return [lk for lk in links if lk.value is not v]


def _rule_broadcast(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    out = node.outputs[0]
    r = s.rank(out)
    links = []
    if kind == "in":
        b = a + (r - s.rank(v))
        if s.dim(v, a) == 1 and s.dim(out, b) != 1:
            raise Blocked(f"{node.op_type} {node.name}: broadcast axis")
        links.append(Link(out, b))
    else:
        if i != 0:
            raise Blocked(f"{node.op_type} {node.name}: extra output")
        b = a
    for j, x in enumerate(node.inputs):
        if x is None or (kind == "in" and j == i):
            continue
        aj = b - (r - s.rank(x))
        if aj < 0:
            continue
        if s.dim(x, aj) == 1 and s.dim(out, b) != 1:
            continue
        links.append(Link(x, aj))
    return links


def _rule_conv(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    group = int(attr(node, "group", 1))
    wshape = s.shape(w)
    if wshape is None or any(d is None for d in wshape):
        raise Blocked(f"Conv {node.name}: weight shape unknown")
    cout, cin_g = wshape[0], wshape[1]
    cout_g = cout // group

    def grouped_pairs(from_out: bool) -> tuple[np.ndarray, np.ndarray]:
        # spanning pairs of "same conv group": out o <-> in c iff o//cout_g == c//cin_g
        outs = np.arange(cout)
        ins = np.arange(cin_g * group)
        o_side = np.concatenate([outs, (ins // cin_g) * cout_g])
        i_side = np.concatenate([(outs // cout_g) * cin_g, ins])
        return (o_side, i_side) if from_out else (i_side, o_side)

    out_side = ((kind == "out" and i == 0 and a == 1) or (kind == "in" and i == 1 and a == 0)
                or (kind == "in" and i == 2 and a == 0))
    if out_side:
        links = [Link(y, 1), Link(w, 0)]
        if b is not None:
            links.append(Link(b, 0))
        if group > 1:
            links.append(Link(x, 1, grouped_pairs(True)))
        return [lk for lk in links if not (lk.value is v and lk.axis == a)]
    if kind == "in" and i == 0 and a == 1:
        if group == 1:
            return [Link(w, 1)]
        return [Link(w, 0, grouped_pairs(False))]
    if kind == "in" and i == 1 and a == 1 and group == 1:
        return [Link(x, 1)]
    raise Blocked(f"Conv {node.name}: axis {a} of {'output' if kind == 'out' else f'input {i}'}")


def _rule_conv_transpose(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if int(attr(node, "group", 1)) != 1:
        raise Blocked(f"ConvTranspose {node.name}: grouped")
    x, w = node.inputs[0], node.inputs[1]
    b = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    if (kind == "in" and i == 0 and a == 1) or (kind == "in" and i == 1 and a == 0):
        return [lk for lk in (Link(x, 1), Link(w, 0)) if lk.value is not v]
    if (kind == "out" and a == 1) or (kind == "in" and i == 1 and a == 1) or (
            kind == "in" and i == 2 and a == 0):
        links = [Link(y, 1), Link(w, 1)] + ([Link(b, 0)] if b is not None else [])
        return [lk for lk in links if not (lk.value is v and lk.axis == a)]
    raise Blocked(f"ConvTranspose {node.name}: axis {a}")


def _rule_gemm(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    A, B = node.inputs[0], node.inputs[1]
    C = node.inputs[2] if len(node.inputs) > 2 else None
    y = node.outputs[0]
    ta, tb = int(attr(node, "transA", 0)), int(attr(node, "transB", 0))
    a_k, a_m = (0, 1) if ta else (1, 0)
    b_k, b_n = (1, 0) if tb else (0, 1)
    role = None
    if kind == "in" and i == 0:
        role = "k" if a == a_k else "m"
    elif kind == "in" and i == 1:
        role = "k" if a == b_k else "n"
    elif kind == "out":
        role = "m" if a == 0 else "n"
    elif kind == "in" and i == 2:
        cr = s.rank(C)
        role = "n" if a == cr - 1 else "m"
    if role == "k":
        return [lk for lk in (Link(A, a_k), Link(B, b_k)) if lk.value is not v]
    links = [Link(y, 0), Link(A, a_m)] if role == "m" else [Link(y, 1), Link(B, b_n)]
    yaxis = 0 if role == "m" else 1
    if C is not None:
        cr = s.rank(C)
        ca = yaxis - (2 - cr)
        if ca >= 0 and not (s.dim(C, ca) == 1 and s.dim(y, yaxis) != 1):
            links.append(Link(C, ca))
    return [lk for lk in links if not (lk.value is v and lk.axis == a)]


def _rule_matmul(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    A, B = node.inputs[0], node.inputs[1]
    y = node.outputs[0]
    ra, rb = s.rank(A), s.rank(B)
    if ra < 2 or rb < 2:
        raise Blocked(f"MatMul {node.name}: 1-D operand")
    r = max(ra, rb)
    # role of the visited axis: A is [..., M, K], B [..., K, N], Y [..., M, N]
    if kind == "in" and i in (0, 1):
        x, rx = (A, ra) if i == 0 else (B, rb)
        k_axis, kept_axis = (ra - 1, ra - 2) if i == 0 else (rb - 2, rb - 1)
        if a == k_axis:  # contracted with the other operand's K axis
            return [Link(B, rb - 2) if i == 0 else Link(A, ra - 1)]
        if a == kept_axis:  # M or N: the same axis of Y
            return [Link(y, r - 2 if i == 0 else r - 1)]
        yb = a + (r - rx)
        if s.dim(x, a) == 1 and s.dim(y, yb) != 1:
            raise Blocked(f"MatMul {node.name}: broadcast batch axis")
    else:
        yb = a
        if a == r - 1:
            return [Link(B, rb - 1)]
        if a == r - 2:
            return [Link(A, ra - 2)]
    links = [Link(y, yb)]
    for x, rx in ((A, ra), (B, rb)):
        ax = yb - (r - rx)
        if ax < 0 or (s.dim(x, ax) == 1 and s.dim(y, yb) != 1):
            continue
        links.append(Link(x, ax))
    return [lk for lk in links if not (lk.value is v and lk.axis == a)]


def _rule_batchnorm(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if any(o is not None and o.uses() for o in node.outputs[1:]):
        raise Blocked(f"{node.op_type} {node.name}: training outputs are used")
    x, y = node.inputs[0], node.outputs[0]
    on_channel = (a == 1 and ((kind == "in" and i == 0) or kind == "out")) or (
        kind == "in" and i > 0 and a == 0)
    if not on_channel:
        raise Blocked(f"{node.op_type} {node.name}: axis {a} is not the channel axis")
    links = [Link(x, 1), Link(y, 1)] + [Link(p, 0) for p in node.inputs[1:] if p is not None]
    return [lk for lk in links if not (lk.value is v and lk.axis == a)]


def _rule_layernorm(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    x, y = node.inputs[0], node.outputs[0]
    r = s.rank(x)
    start = _norm_axis(int(attr(node, "axis", -1)), r)
    if (kind == "in" and i != 0) or (kind == "out" and i != 0) or a >= start:
        raise Blocked(f"LayerNormalization {node.name}: normalizes over the axis")
    if any(o is not None and o.uses() for o in node.outputs[1:]):
        raise Blocked(f"LayerNormalization {node.name}: statistics outputs are used")
    return [Link(y, a)] if kind == "in" else [Link(x, a)]


def _rule_pool(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if a > 1 or i != 0:
        raise Blocked(f"{node.op_type} {node.name}: axis {a}")
    if len(node.outputs) > 1 and node.outputs[1] is not None and node.outputs[1].uses():
        raise Blocked(f"{node.op_type} {node.name}: indices output is used")
    return [Link(node.outputs[0], a)] if kind == "in" else [Link(node.inputs[0], a)]


def _rule_softmax(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    r = s.rank(node.inputs[0])
    default = -1 if s.opset >= 13 else 1
    axis = _norm_axis(int(attr(node, "axis", default)), r)
    if a == axis or (s.opset < 13 and a >= axis):
        raise Blocked(f"{node.op_type} {node.name}: normalizes over the axis")
    return [Link(node.outputs[0], a)] if port[0] == "in" else [Link(node.inputs[0], a)]


def _rule_reduce(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if i != 0:
        raise Blocked(f"{node.op_type} {node.name}: axes input")
    x, y = node.inputs[0], node.outputs[0]
    r = s.rank(x)
    axes = s.axes_of(node)
    if not axes:
        raise Blocked(f"{node.op_type} {node.name}: reduces all axes")
    axes = sorted(_norm_axis(ax, r) for ax in axes)
    keep = int(attr(node, "keepdims", 1))
    kept = [k for k in range(r) if k not in axes]
    if kind == "in":
        if a in axes:
            raise Blocked(f"{node.op_type} {node.name}: reduces over the axis")
        return [Link(y, a if keep else kept.index(a))]
    xa = a if keep else kept[a]
    if xa in axes:
        raise Blocked(f"{node.op_type} {node.name}: reduced axis")
    return [Link(x, xa)]


def _rule_transpose(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    r = s.rank(node.inputs[0])
    perm = list(attr(node, "perm", list(range(r))[::-1]))
    if port[0] == "in":
        return [Link(node.outputs[0], perm.index(a))]
    return [Link(node.inputs[0], perm[a])]


def _rule_unsqueeze(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if i != 0:
        raise Blocked(f"Unsqueeze {node.name}: axes input")
    ry = s.rank(node.outputs[0])
    axes = sorted(_norm_axis(ax, ry) for ax in (s.axes_of(node) or []))
    return _kept_axes_link(node, kind, a, axes, ry, "inserted")


def _rule_squeeze(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if i != 0:
        raise Blocked(f"Squeeze {node.name}: axes input")
    x = node.inputs[0]
    shape = s.full_shape(x)
    axes = s.axes_of(node)
    if axes is None:
        axes = [k for k, d in enumerate(shape) if d == 1]
    axes = sorted(_norm_axis(ax, len(shape)) for ax in axes)
    return _kept_axes_link(node, kind, a, axes, len(shape), "squeezed")


def _kept_axes_link(node: ir.Node, kind: str, a: int, axes: list[int], rank: int,
                    what: str) -> list[Link]:
    """Squeeze / Unsqueeze: the axes of the rank-`rank` side (Squeeze's input, Unsqueeze's
    output) that are not in `axes` map in order to the axes of the other side."""
    rest = [k for k in range(rank) if k not in axes]
    other = node.outputs[0] if kind == "in" else node.inputs[0]
    if (kind == "in") == (what == "squeezed"):  # `a` is on the full-rank side
        if a in axes:
            raise Blocked(f"{node.op_type} {node.name}: {what} axis")
        return [Link(other, rest.index(a))]
    return [Link(other, rest[a])]


def _block_of(shape_in: tuple[int, ...], shape_out: tuple[int, ...], axis: int, from_input: bool):
    """Axes of both sides in the aligned block containing `axis`, plus block bounds."""
    ci = np.concatenate([[1], np.cumprod(shape_in, dtype=np.int64)])
    co = np.concatenate([[1], np.cumprod(shape_out, dtype=np.int64)])
    if ci[-1] != co[-1]:
        raise Blocked("reshape changes the element count")
    common = sorted(set(ci.tolist()) & set(co.tolist()))
    c = ci if from_input else co
    start, end = int(c[axis]), int(c[axis + 1])
    lo = max(x for x in common if x <= start)
    hi = min(x for x in common if x >= end)
    in_axes = [k for k in range(len(shape_in))
               if ci[k] >= lo and ci[k + 1] <= hi and shape_in[k] > 1]
    out_axes = [k for k in range(len(shape_out))
                if co[k] >= lo and co[k + 1] <= hi and shape_out[k] > 1]
    return in_axes, out_axes, ci, co, lo, hi


def _digits(f: np.ndarray, cum: np.ndarray, shape: tuple[int, ...], axis: int,
            hi: int) -> np.ndarray:
    stride = hi // int(cum[axis + 1])
    return (f // stride) % shape[axis]


def _reshape_links(shape_in, shape_out, a: int, from_input: bool, other: ir.Value) -> Link:
    if (shape_in if from_input else shape_out)[a] == 1:
        raise Blocked("reshape of a size-1 axis")
    in_axes, out_axes, ci, co, lo, hi = _block_of(shape_in, shape_out, a, from_input)
    partners = out_axes if from_input else in_axes
    if not partners:
        raise Blocked("reshape axis has no counterpart")
    b = partners[0]  # the major axis of the other side
    count = hi // lo
    if count > _MAX_RESHAPE_BLOCK:
        raise Blocked("reshape block too large to map")
    f = np.arange(count, dtype=np.int64)
    if from_input:
        mine, theirs = _digits(f, ci, shape_in, a, hi), _digits(f, co, shape_out, b, hi)
        other_size = shape_out[b]
    else:
        mine, theirs = _digits(f, co, shape_out, a, hi), _digits(f, ci, shape_in, b, hi)
        other_size = shape_in[b]
    keys = np.unique(mine * other_size + theirs)
    return Link(other, b, (keys // other_size, keys % other_size))


def _rule_flatten(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    x, y = node.inputs[0], node.outputs[0]
    shape_in = s.full_shape(x)
    axis = _norm_axis(int(attr(node, "axis", 1)), len(shape_in))
    shape_out = (int(np.prod(shape_in[:axis], dtype=np.int64)),
                 int(np.prod(shape_in[axis:], dtype=np.int64)))
    if port[0] == "in":
        return [_reshape_links(shape_in, shape_out, a, True, y)]
    return [_reshape_links(shape_in, shape_out, a, False, x)]


def reshape_target(s: _Shapes, node: ir.Node, b: int) -> tuple:
    """What position `b` of a Reshape target is: ('const', n) | ('dim', v, k); else Blocked."""
    elems = s.shape_elements(node.inputs[1])
    if elems is None or b >= len(elems) or elems[b] is None:
        raise Blocked(f"Reshape {node.name}: target shape is computed")
    return elems[b]


def _rule_reshape(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if kind == "in" and i != 0:
        raise Blocked(f"Reshape {node.name}: shape input")
    x, y = node.inputs[0], node.outputs[0]
    shape_in, shape_out = s.full_shape(x), s.full_shape(y)
    if kind == "in":
        # the output side's visit checks the target shape at the coupled position
        return [_reshape_links(shape_in, shape_out, a, True, y)]
    links = [_reshape_links(shape_in, shape_out, a, False, x)]
    tag = reshape_target(s, node, a)
    if tag[0] == "const":
        if tag[1] == 0:
            in_axes, out_axes, *_ = _block_of(shape_in, shape_out, a, False)
            if int(attr(node, "allowzero", 0)) or in_axes != [a] or out_axes != [a]:
                raise Blocked(f"Reshape {node.name}: 0 in target shape")
        elif tag[1] < -1:
            raise Blocked(f"Reshape {node.name}: bad target shape")
    else:
        # the target dimension is read from another tensor: couple that axis too
        links.append(Link(tag[1], tag[2]))
    return links


def _rule_concat(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    y = node.outputs[0]
    r = s.rank(y)
    axis = _norm_axis(int(attr(node, "axis", 0)), r)
    inputs = [x for x in node.inputs]
    if a != axis:
        links = [Link(y, a)] + [Link(x, a) for x in inputs if x is not None]
        return [lk for lk in links if lk.value is not v]
    sizes = [s.dim(x, axis) for x in inputs]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if kind == "in":
        n = sizes[i]
        return [Link(y, axis, (np.arange(n), offsets[i] + np.arange(n)))]
    links = []
    for j, x in enumerate(inputs):
        n = sizes[j]
        if n:
            links.append(Link(x, axis, (offsets[j] + np.arange(n), np.arange(n))))
    return links


def split_sizes(s: _Shapes, node: ir.Node) -> list[int]:
    x = node.inputs[0]
    r = s.rank(x)
    axis = _norm_axis(int(attr(node, "axis", 0)), r)
    total = s.dim(x, axis)
    sizes = attr(node, "split")
    if sizes is None and len(node.inputs) > 1 and node.inputs[1] is not None:
        sizes = s.ints(node.inputs[1])
        if sizes is None:
            raise Blocked(f"Split {node.name}: split sizes are computed")
    if sizes is None:
        n = len(node.outputs)
        if total % n:
            chunk = -(-total // n)
            sizes = [chunk] * (n - 1) + [total - chunk * (n - 1)]
        else:
            sizes = [total // n] * n
    return [int(x) for x in sizes]


def _rule_split(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if kind == "in" and i != 0:
        raise Blocked(f"Split {node.name}: sizes input")
    x = node.inputs[0]
    r = s.rank(x)
    axis = _norm_axis(int(attr(node, "axis", 0)), r)
    outs = list(node.outputs)
    if a != axis:
        links = [Link(x, a)] + [Link(o, a) for o in outs]
        return [lk for lk in links if lk.value is not v]
    sizes = split_sizes(s, node)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if kind == "out":
        n = sizes[i]
        return [Link(x, axis, (np.arange(n), offsets[i] + np.arange(n)))]
    return [Link(o, axis, (offsets[j] + np.arange(sizes[j]), np.arange(sizes[j])))
            for j, o in enumerate(outs) if sizes[j]]


def slice_params(s: _Shapes, node: ir.Node) -> tuple[list[int], list[int], list[int], list[int]]:
    """(starts, ends, axes, steps) as constants, else Blocked."""
    if len(node.inputs) == 1:  # opset < 10: attributes
        starts, ends = list(attr(node, "starts")), list(attr(node, "ends"))
        axes = list(attr(node, "axes", range(len(starts))))
        return starts, ends, axes, [1] * len(starts)
    starts, ends = s.ints(node.inputs[1]), s.ints(node.inputs[2])
    axes = s.ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    steps = s.ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else None
    if starts is None or ends is None:
        raise Blocked(f"Slice {node.name}: starts/ends are computed")
    if axes is None:
        if len(node.inputs) > 3 and node.inputs[3] is not None:
            raise Blocked(f"Slice {node.name}: axes are computed")
        axes = list(range(len(starts)))
    if steps is None:
        if len(node.inputs) > 4 and node.inputs[4] is not None:
            raise Blocked(f"Slice {node.name}: steps are computed")
        steps = [1] * len(starts)
    return starts, ends, axes, steps


def slice_range(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """Clamped [start, end) of a step-1 slice over `dim` elements."""
    if step != 1:
        raise Blocked("strided slice along the axis")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    start, end = max(0, min(start, dim)), max(0, min(end, dim))
    return start, max(start, end)


def _rule_slice(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if kind == "in" and i != 0:
        raise Blocked(f"Slice {node.name}: parameter input")
    x, y = node.inputs[0], node.outputs[0]
    r = s.rank(x)
    starts, ends, axes, steps = slice_params(s, node)
    axes = [_norm_axis(ax, r) for ax in axes]
    if a not in axes:
        return [Link(y, a)] if kind == "in" else [Link(x, a)]
    k = axes.index(a)
    start, end = slice_range(starts[k], ends[k], steps[k], s.dim(x, a))
    n = end - start
    if n == 0:
        raise Blocked(f"Slice {node.name}: empty")
    if kind == "in":
        return [Link(y, a, (start + np.arange(n), np.arange(n)))]
    return [Link(x, a, (np.arange(n), start + np.arange(n)))]


def _rule_resize(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if kind == "in" and i != 0:
        raise Blocked(f"{node.op_type} {node.name}: parameter input")
    x, y = node.inputs[0], node.outputs[0]
    if s.dim(x, a) != s.dim(y, a):
        raise Blocked(f"{node.op_type} {node.name}: resizes the axis")
    return [Link(y, a)] if kind == "in" else [Link(x, a)]


def pad_amounts(s: _Shapes, node: ir.Node, rank: int) -> dict[int, tuple[int, int]]:
    pads = attr(node, "pads")
    if pads is None:
        pads = s.ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] else None
        if pads is None:
            raise Blocked(f"Pad {node.name}: pads are computed")
    axes = list(range(rank))
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        axes_in = s.ints(node.inputs[3])
        if axes_in is None:
            raise Blocked(f"Pad {node.name}: axes are computed")
        axes = [_norm_axis(ax, rank) for ax in axes_in]
    n = len(axes)
    return {ax: (int(pads[k]), int(pads[k + n])) for k, ax in enumerate(axes)}


def _rule_pad(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if kind == "in" and i != 0:
        raise Blocked(f"Pad {node.name}: parameter input")
    x, y = node.inputs[0], node.outputs[0]
    if pad_amounts(s, node, s.rank(x)).get(a, (0, 0)) != (0, 0):
        raise Blocked(f"Pad {node.name}: pads the axis")
    return [Link(y, a)] if kind == "in" else [Link(x, a)]


def _rule_gather(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    kind, i = port
    if kind == "in" and i != 0:
        raise Blocked(f"Gather {node.name}: indices")
    x, y = node.inputs[0], node.outputs[0]
    r = s.rank(x)
    g = _norm_axis(int(attr(node, "axis", 0)), r)
    qr = s.rank(node.inputs[1])
    if kind == "in":
        if a == g:
            raise Blocked(f"Gather {node.name}: gathers along the axis")
        return [Link(y, a if a < g else a + qr - 1)]
    if g <= a < g + qr:
        raise Blocked(f"Gather {node.name}: index axis")
    return [Link(x, a if a < g else a - qr + 1)]


def _rule_shape(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    """A Shape read of the axis is fine if it only feeds Reshape targets."""
    tag = ("dim", v, a)
    if tag not in (s.shape_elements(node.outputs[0]) or []):
        if s.shape_elements(node.outputs[0]) is None:
            raise Blocked(f"Shape {node.name}: unreadable")
        return []
    links: list[Link] = []
    frontier, seen = [node.outputs[0]], set()
    while frontier:
        val = frontier.pop()
        if id(val) in seen:
            continue
        seen.add(id(val))
        if val.is_graph_output():
            raise Blocked(f"Shape {node.name}: dimension reaches a graph output")
        for user, idx in val.uses():
            if user.op_type == "Reshape" and idx == 1:
                elems = s.shape_elements(val)
                if elems is None:
                    raise Blocked(f"Reshape {user.name}: target shape not traceable")
                links.extend(Link(user.outputs[0], pos) for pos, e in enumerate(elems) if e == tag)
            elif user.op_type in SHAPE_CHAIN_OPS:
                out = user.outputs[0]
                elems = s.shape_elements(out)
                if elems is None:
                    raise Blocked(f"{user.op_type} {user.name}: computes with a pruned dimension")
                if tag in elems:
                    frontier.append(out)
            else:
                raise Blocked(f"{user.op_type} {user.name}: computes with a pruned dimension")
    return links


_RULES = {
    **{op: _rule_unary for op in UNARY_OPS},
    **{op: _rule_broadcast for op in BROADCAST_OPS},
    **{op: _rule_pool for op in POOL_OPS},
    **{op: _rule_reduce for op in REDUCE_OPS},
    **{op: _rule_softmax for op in SOFTMAX_OPS},
    "Conv": _rule_conv,
    "ConvTranspose": _rule_conv_transpose,
    "Gemm": _rule_gemm,
    "MatMul": _rule_matmul,
    "BatchNormalization": _rule_batchnorm,
    "InstanceNormalization": _rule_batchnorm,
    "LayerNormalization": _rule_layernorm,
    "Transpose": _rule_transpose,
    "Unsqueeze": _rule_unsqueeze,
    "Squeeze": _rule_squeeze,
    "Flatten": _rule_flatten,
    "Reshape": _rule_reshape,
    "Concat": _rule_concat,
    "Split": _rule_split,
    "Slice": _rule_slice,
    "Resize": _rule_resize,
    "Upsample": _rule_resize,
    "Pad": _rule_pad,
    "Gather": _rule_gather,
    "Shape": _rule_shape,
}


def _apply_rule(s: _Shapes, node: ir.Node, v: ir.Value, a: int, port) -> list[Link]:
    if node.domain not in ("", "ai.onnx"):
        raise Blocked(f"{node.domain}::{node.op_type} {node.name}: unknown op")
    rule = _RULES.get(node.op_type)
    if rule is None:
        raise Blocked(f"{node.op_type} {node.name}: op not supported by the pruning analysis")
    if node.op_type in UNARY_OPS and port[0] == "in" and port[1] != 0:
        raise Blocked(f"{node.op_type} {node.name}: parameter input")
    return rule(s, node, v, a, port)


# ---------------------------------------------------------------- union-find


def _components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Connected-component label (smallest member) of each of n elements."""
    parent = np.arange(n, dtype=np.int64)
    if len(a) == 0:
        return parent
    while True:
        ra, rb = parent[a], parent[b]
        diff = ra != rb
        if not diff.any():
            return parent
        lo, hi = np.minimum(ra[diff], rb[diff]), np.maximum(ra[diff], rb[diff])
        np.minimum.at(parent, hi, lo)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt


# ---------------------------------------------------------------- analysis


def kernel_uses(s: _Shapes, graph: ir.Graph) -> list[KernelUse]:
    """Every Conv/ConvTranspose/Gemm/MatMul with its MAC-scaling axes."""
    uses = []
    for node in graph:
        op = node.op_type
        if node.domain not in ("", "ai.onnx") or op not in KERNEL_OPS:
            continue
        try:
            if op == "Conv":
                w = node.inputs[1]
                g = int(attr(node, "group", 1))
                uses.append(KernelUse(node, w, (node.inputs[0], 1) if g == 1 else None,
                                      [(w, 0), (w, 1)]))
            elif op == "ConvTranspose":
                w = node.inputs[1]
                uses.append(KernelUse(node, w, (node.inputs[0], 1), [(w, 0), (w, 1)]))
            elif op == "Gemm":
                w = node.inputs[1]
                ka = 0 if int(attr(node, "transA", 0)) else 1
                uses.append(KernelUse(node, w, (node.inputs[0], ka), [(w, 0), (w, 1)]))
            else:
                A, B, y = node.inputs[0], node.inputs[1], node.outputs[0]
                ra, ry = s.rank(A), s.rank(y)
                weight = B if s.const(B) is not None and s.rank(B) == 2 else None
                mac_axes = [(y, k) for k in range(ry)] + [(A, ra - 1)]
                uses.append(KernelUse(node, weight, (A, ra - 1) if weight is not None else None,
                                      mac_axes))
        except Blocked:
            continue
    return uses


def _sources(s: _Shapes, kernels: list[KernelUse]) -> list[tuple[ir.Value, int]]:
    """The output-channel axis of every constant kernel weight (a MatMul's is constant
    whenever `kernel_uses` recorded one)."""
    return [(k.weight, weight_out_axis(k.node)) for k in kernels
            if k.weight is not None and s.const(k.weight) is not None]


def _visit(s: _Shapes, graph: ir.Graph, v: ir.Value, a: int) -> tuple[list[Link], list[str]]:
    """Links of (v, a) through its producer and all consumers, and block reasons."""
    links: list[Link] = []
    reasons: list[str] = []
    if v.is_graph_output():
        reasons.append("graph output")
    producer = v.producer()
    if producer is None:
        if v.is_graph_input():
            reasons.append("graph input")
        elif s.const(v) is None:
            reasons.append(f"{v.name}: no producer")
    elif producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        pass
    elif producer.graph is not graph:
        reasons.append("produced in a subgraph")
    else:
        try:
            links += _apply_rule(s, producer, v, a, ("out", v.index()))
        except Blocked as exc:
            reasons.append(str(exc))
    for user, idx in v.uses():
        if user.graph is not graph:
            reasons.append(f"{v.name} is read inside a subgraph")
            continue
        try:
            links += _apply_rule(s, user, v, a, ("in", idx))
        except Blocked as exc:
            reasons.append(str(exc))
    return links, reasons


def _classify(s: _Shapes, group_nodes: list[AxisNode],
              kernels_by_weight) -> tuple[str, str, list[str]]:
    kind, name, names = "linear", "", []
    has_conv = has_heads = False
    for an in group_nodes:
        for user, idx in an.value.uses():
            if user.op_type == "MatMul" and all(s.const(x) is None for x in user.inputs):
                has_heads = True
            if user.op_type in ("Conv", "ConvTranspose") and idx == 1:
                has_conv = True
        if an.constant and id(an.value) in kernels_by_weight:
            for k in kernels_by_weight[id(an.value)]:
                out_axis = weight_out_axis(k.node)
                if an.axis == out_axis:
                    if not name:
                        name = k.node.name or an.value.name
                    names.extend([k.node.name or "", an.value.name or ""])
    if has_conv:
        kind = "conv"
    elif has_heads:
        kind = "heads"
    if not names:
        for an in group_nodes:
            if an.constant:
                names.append(an.value.name or "")
        name = names[0] if names else group_nodes[0].label()
    return kind, name, [n for n in names if n]


def analyze(model: ir.Model) -> Analysis:
    """Dependency analysis of `model` (shapes must be inferred and static).

    Returns every axis node reached from a weight's output-channel axis, the
    units (sets of channels removed together), groups of units, and counts of
    why axes were blocked.
    """
    graph = model.graph
    s = _Shapes(model)
    kernels = kernel_uses(s, graph)
    found = _explore(s, graph, kernels)
    coupling, labels = _couple(found)
    units, blocked_units, by_signature = _units(found.nodes, labels)
    groups = _groups(s, found.nodes, by_signature, kernels)
    logger.info("pruning analysis: %d axis nodes, %d units in %d groups, %d unprunable units",
                len(found.nodes), len(units), len(groups), blocked_units)
    return Analysis(found.nodes, units, groups, blocked_units, coupling, found.index, kernels,
                    dict(found.reasons))


@dataclass
class _Exploration:
    """What `_explore` reached: axis nodes (by id), their index by (id(value), axis), the
    links found from each (axis node id, link), and block reasons counted by kind."""

    nodes: list[AxisNode] = field(default_factory=list)
    index: dict[tuple[int, int], int] = field(default_factory=dict)
    links: list[tuple[int, Link]] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def node_for(self, s: _Shapes, v: ir.Value, a: int) -> int:
        """The id of axis node (v, a), created on first use."""
        rank = len(s.shape(v) or ())
        key = (id(v), a)
        if key in self.index:
            return self.index[key]
        size = None
        shape = s.shape(v)
        if shape is not None and 0 <= a < rank:
            size = shape[a]
        an = AxisNode(len(self.nodes), v, a, int(size or 0), constant=s.const(v) is not None)
        if size is None or size <= 0:
            an.blocked = "size unknown"
        self.nodes.append(an)
        self.index[key] = an.id
        return an.id


def _explore(s: _Shapes, graph: ir.Graph, kernels: list[KernelUse]) -> _Exploration:
    """Follow the op rules from every weight's output-channel axis to all coupled axes."""
    found = _Exploration()
    queue = list(_sources(s, kernels))
    done: set[int] = set()
    while queue:
        v, a = queue.pop()
        rank = len(s.shape(v) or ())
        if rank and a < 0:
            a += rank
        nid = found.node_for(s, v, a)
        if nid in done:
            continue
        done.add(nid)
        an = found.nodes[nid]
        if an.blocked:
            found.reasons[an.blocked] += 1
            continue
        links, reasons = _visit(s, graph, v, a)
        if reasons:
            an.blocked = reasons[0]
            found.reasons[_reason_kind(reasons[0])] += 1
        for link in links:
            lrank = len(s.shape(link.value) or ())
            if lrank and link.axis < 0:
                link.axis += lrank
            found.links.append((nid, link))
            if found.index.get((id(link.value), link.axis)) not in done:
                queue.append((link.value, link.axis))
    return found


def _couple(found: _Exploration) -> tuple[nx.Graph, np.ndarray]:
    """The coupling graph of the axis nodes, and the connected-component label of every
    element (axis nodes laid end to end: `offset` is set here). Links whose sizes or
    index maps do not fit block both ends."""
    nodes = found.nodes
    total = 0
    for an in nodes:
        an.offset = total
        total += an.size
    graph_nx = nx.Graph()
    graph_nx.add_nodes_from(range(len(nodes)))
    ea, eb = [], []
    for nid, link in found.links:
        src = nodes[nid]
        dst = nodes[found.index[(id(link.value), link.axis)]]
        graph_nx.add_edge(src.id, dst.id)
        pi, pj = _element_pairs(src, dst, link, found.reasons)
        ea.append(src.offset + pi)
        eb.append(dst.offset + pj)
    a_arr = np.concatenate(ea) if ea else np.zeros(0, np.int64)
    b_arr = np.concatenate(eb) if eb else np.zeros(0, np.int64)
    return graph_nx, _components(total, a_arr.astype(np.int64), b_arr.astype(np.int64))


def _element_pairs(src: AxisNode, dst: AxisNode, link: Link,
                   reasons: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Indices of `src` and of `dst` that `link` couples, pairwise."""
    if link.pairs is None:
        if src.size != dst.size:
            _block(src, f"size mismatch with {dst.label()}", reasons)
            _block(dst, f"size mismatch with {src.label()}", reasons)
            n = min(src.size, dst.size)
            return np.arange(n), np.arange(n)
        return np.arange(src.size), np.arange(src.size)
    pi, pj = np.asarray(link.pairs[0]), np.asarray(link.pairs[1])
    bad = (pi < 0) | (pi >= src.size) | (pj < 0) | (pj >= dst.size)
    if bad.any():
        _block(src, "index map out of range", reasons)
        _block(dst, "index map out of range", reasons)
        pi, pj = pi[~bad], pj[~bad]
    return pi, pj


def _units(nodes: list[AxisNode], labels: np.ndarray
           ) -> tuple[list[Unit], int, dict[tuple[int, ...], list[Unit]]]:
    """One unit per component of elements without a blocked element; the number of
    blocked components; the units by the axis nodes they touch (their signature)."""
    total = len(labels)
    elem_node = np.repeat(np.arange(len(nodes)), [an.size for an in nodes])
    elem_index = np.concatenate([np.arange(an.size) for an in nodes]) if nodes else np.zeros(0, int)
    blocked_elem = np.repeat([an.blocked is not None for an in nodes], [an.size for an in nodes])
    blocked_labels = np.unique(labels[blocked_elem]) if total else np.zeros(0, np.int64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.flatnonzero(np.r_[True, sorted_labels[1:] != sorted_labels[:-1]]) if total else []
    ends = np.r_[starts[1:], total] if total else []
    blocked_set = set(blocked_labels.tolist())
    units: list[Unit] = []
    blocked_units = 0
    by_signature: dict[tuple[int, ...], list[Unit]] = defaultdict(list)
    for st, en in zip(starts, ends):
        label = int(sorted_labels[st])
        if label in blocked_set:
            blocked_units += 1
            continue
        elems = order[st:en]
        en_nodes = elem_node[elems]
        members: dict[int, np.ndarray] = {}
        for nid in np.unique(en_nodes):
            members[int(nid)] = np.sort(elem_index[elems[en_nodes == nid]])
        unit = Unit(len(units), members)
        units.append(unit)
        by_signature[tuple(sorted(members))].append(unit)
    return units, blocked_units, by_signature


def _groups(s: _Shapes, nodes: list[AxisNode], by_signature: dict[tuple[int, ...], list[Unit]],
            kernels: list[KernelUse]) -> list[Group]:
    """A group per signature, classified (conv / linear / heads) and named."""
    kernels_by_weight: dict[int, list[KernelUse]] = defaultdict(list)
    for k in kernels:
        if k.weight is not None:
            kernels_by_weight[id(k.weight)].append(k)
    groups = []
    for sig, us in by_signature.items():
        kind, name, names = _classify(s, [nodes[i] for i in sig], kernels_by_weight)
        groups.append(Group(len(groups), sig, us, kind, name, names))
    return groups


def _reason_kind(reason: str) -> str:
    # "Softmax /attn/Softmax: normalizes over the axis" -> "Softmax: normalizes over the axis"
    head, _, tail = reason.partition(":")
    op = head.split(" ")[0]
    return f"{op}:{tail}" if tail else reason


def _block(an: AxisNode, reason: str, counts: dict[str, int]) -> None:
    if an.blocked is None:
        an.blocked = reason
        counts[reason.split(" with ")[0]] += 1
