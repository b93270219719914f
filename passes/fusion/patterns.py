"""`fuse-layernorm` and `fuse-gelu`: recognise primitive subgraphs of standard ops.

LayerNormalization (needs default opset >= 17), over the last axis:

    mean = ReduceMean(x, axes=[-1]);  d = Sub(x, mean);  p = Pow(d, 2) | Mul(d, d)
    var = ReduceMean(p, axes=[-1]);   s = Sqrt(Add(var, eps))
    n = Div(d, s) | Mul(d, Reciprocal(s));  [m = Mul(n, gamma)];  [y = Add(m, beta)]
    =>  y = LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps)

  Preconditions: both ReduceMeans use keepdims=1 and only the last axis (attribute
  or constant input); the exponent is 2; eps, gamma and beta are float constants
  whose elements vary along the last axis only (they are reshaped to [D]; a scalar
  gamma/beta needs a static D); every intermediate value has only the consumers of
  the pattern (d: exactly the square and the division) and is not a graph output.

Gelu (needs default opset >= 20; below that the primitives are left unchanged,
since raising the opset would change the meaning of other ops, and onnxruntime
already fuses these primitives itself — only standard ONNX ops are produced):

    erf form:   y = x * 0.5 * (1 + Erf(x / sqrt(2)))             (x * (1/sqrt 2) also)
    tanh form:  y = x * 0.5 * (1 + Tanh(sqrt(2/pi) * (x + 0.044715 * x^3)))
                (x^3 as Pow(x, 3), Mul(Mul(x, x), x) or Mul(x, Mul(x, x)))
    =>  y = Gelu(x, approximate="none" | "tanh")

  The final product x * 0.5 * (...) may be bracketed in any order, and `1 + ...`
  may be a two-input `Sum` (as in the ONNX function body of Gelu). Preconditions:
  constants match to 1e-4 relative, and every intermediate value has a single
  consumer and is not a graph output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from ...ir import add_initializer
from ..base import register
from ..graph import (
    attr,
    bypass,
    const,
    float_const,
    is_op,
    opset,
    remove_nodes,
    scalar,
    sole_consumer,
)
from .common import RewritePass, rank, static_shape

logger = logging.getLogger(__name__)


def _producer(value: ir.Value | None, *ops: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if is_op(node, *ops) else None


def _close(a: float | None, b: float, rtol: float = 1e-4) -> bool:
    return a is not None and abs(a - b) <= rtol * abs(b)


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a binary node, given one of them."""
    if len(node.inputs) != 2:
        return None
    a, b = node.inputs
    if a is value and b is not value:
        return b
    if b is value and a is not value:
        return a
    return None


def _shape_preserved(x: ir.Value, out: ir.Value, nodes: list[ir.Node]) -> bool:
    """True when the pattern's output has x's rank, so one op on x can replace it.

    A constant with more dimensions than x (e.g. a [1, 1, 1] "scalar") broadcasts
    the result to a higher rank, which the fused op would not do. Without known
    ranks, only 0-d constants are accepted.
    """
    rx, ro = rank(x), rank(out)
    if rx is not None and ro is not None:
        return rx == ro
    for node in nodes:
        for v in node.inputs:
            arr = const(v) if v is not None and v is not x else None
            if arr is not None and arr.ndim != 0:
                return False
    return True


def _uses_only(value: ir.Value, nodes: list[ir.Node]) -> bool:
    if value.is_graph_output():
        return False
    allowed = {id(n) for n in nodes}
    return all(id(u.node) in allowed for u in value.uses())


# ------------------------------------------------------------------ LayerNorm


def _last_axis_mean(model: ir.Model, node: ir.Node | None, x: ir.Value) -> bool:
    if not is_op(node, "ReduceMean") or int(attr(node, "keepdims", 1)) != 1:
        return False
    if opset(model) >= 18:
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return False
        axes = const(node.inputs[1])
        axes = None if axes is None else [int(a) for a in axes.reshape(-1)]
    else:
        axes = attr(node, "axes")
    if axes is None or len(axes) != 1:
        return False
    r = rank(x)
    return axes[0] == -1 or (r is not None and axes[0] == r - 1)


def _as_vector(arr: np.ndarray, d: int | None) -> np.ndarray | None:
    if arr.size == 1 and d is not None:
        return np.full(d, arr.reshape(-1)[0], arr.dtype)
    if any(s != 1 for s in arr.shape[:-1]) or (d is not None and arr.size != d):
        return None
    return arr.reshape(-1)


def fuse_layernorm(model: ir.Model, div: ir.Node) -> bool:
    """Replace the LayerNorm pattern ending in `div` (Div or Mul by Reciprocal)."""
    if opset(model) < 17:
        return False
    ln = _match_layernorm(model, div)
    if ln is None or not ln.private():
        return False
    vectors = _layernorm_vectors(ln)
    if vectors is None or not _shape_preserved(ln.x, ln.out, ln.nodes()):
        return False
    g, b = vectors
    graph = div.graph
    assert graph is not None
    base = div.name or "layernorm"
    g_val = add_initializer(graph, f"{base}_ln_scale", g)
    b_val = add_initializer(graph, f"{base}_ln_bias", b)
    node = ir.node("LayerNormalization", [ln.x, g_val, b_val], {"axis": -1, "epsilon": ln.eps},
                   name=f"{base}_layernorm")
    graph.insert_before(ln.tail[-1] if ln.tail else div, node)
    bypass(ln.out, node.outputs[0])
    remove_nodes(list(reversed(ln.tail)) + [div] + ([ln.recip] if ln.recip else []) +
                 [ln.sqrt, ln.add_eps, ln.var_node, ln.sq, ln.sub, ln.mean_node])
    return True


@dataclass
class _LayerNorm:
    """A matched primitive LayerNorm: x -> mean_node, sub (d), sq, var_node, add_eps, sqrt
    (s), div (or Mul by recip), then the optional tail Mul(gamma) -> Add(beta) -> out."""

    x: ir.Value
    mean_node: ir.Node
    sub: ir.Node
    sq: ir.Node
    var_node: ir.Node
    add_eps: ir.Node
    sqrt: ir.Node
    div: ir.Node
    recip: ir.Node | None
    eps: float
    tail: list[ir.Node] = field(default_factory=list)
    gamma: np.ndarray | None = None
    beta: np.ndarray | None = None
    out: ir.Value | None = None

    def nodes(self) -> list[ir.Node]:
        return [self.mean_node, self.sub, self.sq, self.var_node, self.add_eps, self.sqrt,
                self.div, *self.tail] + ([self.recip] if self.recip else [])

    def private(self) -> bool:
        """Every intermediate value is read by the pattern alone (and is not an output)."""
        d, s = self.sub.outputs[0], self.sqrt.outputs[0]
        checks = [(self.mean_node.outputs[0], [self.sub]), (d, [self.sq, self.div]),
                  (self.sq.outputs[0], [self.var_node]), (self.var_node.outputs[0], [self.add_eps]),
                  (self.add_eps.outputs[0], [self.sqrt]),
                  (s, [self.recip] if self.recip else [self.div])]
        if self.recip is not None:
            checks.append((self.recip.outputs[0], [self.div]))
        if self.tail:
            checks.append((self.div.outputs[0], [self.tail[0]]))
            if len(self.tail) == 2:
                checks.append((self.tail[0].outputs[0], [self.tail[1]]))
        return all(_uses_only(v, ns) for v, ns in checks)


def _match_layernorm(model: ir.Model, div: ir.Node) -> _LayerNorm | None:
    """The LayerNorm pattern ending in `div` with its affine tail, or None."""
    if is_op(div, "Div") and len(div.inputs) == 2:
        d, s = div.inputs
        recip = None
    elif is_op(div, "Mul") and len(div.inputs) == 2:
        recip = _producer(div.inputs[1], "Reciprocal") or _producer(div.inputs[0], "Reciprocal")
        if recip is None:
            return None
        s = recip.inputs[0]
        d = _other(div, recip.outputs[0])
    else:
        return None
    sub = _producer(d, "Sub")
    sqrt = _producer(s, "Sqrt")
    if sub is None or sqrt is None:
        return None
    x, mean = sub.inputs
    mean_node = _producer(mean, "ReduceMean")
    if mean_node is None or mean_node.inputs[0] is not x \
            or not _last_axis_mean(model, mean_node, x):
        return None
    add_eps = _producer(sqrt.inputs[0], "Add")
    if add_eps is None:
        return None
    var = next((v for v in add_eps.inputs if _producer(v, "ReduceMean") is not None), None)
    if var is None:
        return None
    eps = scalar(_other(add_eps, var))
    var_node = _producer(var, "ReduceMean")
    if eps is None or not _last_axis_mean(model, var_node, x):
        return None
    sq = _producer(var_node.inputs[0], "Pow", "Mul")
    if sq is None or sq.inputs[0] is not d:
        return None
    if sq.op_type == "Pow" and not _close(scalar(sq.inputs[1]), 2.0, 0.0):
        return None
    if sq.op_type == "Mul" and sq.inputs[1] is not d:
        return None
    ln = _LayerNorm(x, mean_node, sub, sq, var_node, add_eps, sqrt, div, recip, eps)
    _match_affine_tail(ln)
    return ln


def _match_affine_tail(ln: _LayerNorm) -> None:
    """The optional Mul(gamma) and Add(beta) after the normalization, and the output."""
    out = ln.div.outputs[0]
    nxt = sole_consumer(out)
    if is_op(nxt, "Mul") and float_const(_other(nxt, out)) is not None:
        ln.gamma = float_const(_other(nxt, out))
        ln.tail.append(nxt)
        out = nxt.outputs[0]
        nxt = sole_consumer(out)
    if is_op(nxt, "Add") and float_const(_other(nxt, out)) is not None:
        ln.beta = float_const(_other(nxt, out))
        ln.tail.append(nxt)
        out = nxt.outputs[0]
    ln.out = out


def _layernorm_vectors(ln: _LayerNorm) -> tuple[np.ndarray, np.ndarray] | None:
    """gamma and beta as [D] vectors of x's dtype (ones / zeros when absent), or None
    when D is unknown, a dtype differs, or they do not vary along the last axis only."""
    gamma, beta = ln.gamma, ln.beta
    xs = static_shape(ln.x)
    dim = xs[-1] if xs else None
    for arr in (gamma, beta):
        if arr is not None and arr.size > 1:
            dim = dim or int(arr.shape[-1])
    if gamma is None and beta is None and dim is None:
        return None
    dtype = (gamma if gamma is not None else beta if beta is not None
             else np.zeros(0, np.float32)).dtype
    if ln.x.dtype is not None and ln.x.dtype.numpy() != dtype:
        return None
    g = _as_vector(gamma, dim) if gamma is not None else np.ones(dim, dtype)
    b = _as_vector(beta, dim) if beta is not None else np.zeros(dim, dtype)
    if g is None or b is None or g.shape != b.shape:
        return None
    return g.astype(dtype), b.astype(dtype)


# ------------------------------------------------------------------ GELU


def _half_times_x_chain(start: ir.Value, x: ir.Value) -> tuple[list[ir.Node], ir.Value] | None:
    """Follow single-consumer Muls from `start` collecting the factors x and 0.5.

    Returns (Mul nodes of the chain and helper Muls, final value) when the chain
    computes start * x * 0.5 in any bracketing, else None.
    """
    need_x, need_half = True, True
    cur = start
    nodes: list[ir.Node] = []
    while need_x or need_half:
        mul = sole_consumer(cur)
        if not is_op(mul, "Mul"):
            return None
        other = _other(mul, cur)
        if other is None:
            return None
        if other is x and need_x:
            need_x = False
        elif need_half and _close(scalar(other), 0.5):
            need_half = False
        else:
            helper = _producer(other, "Mul")
            if helper is None or not (need_x and need_half) or sole_consumer(other) is not mul:
                return None
            h_other = _other(helper, x)
            if h_other is None or not _close(scalar(h_other), 0.5):
                return None
            nodes.append(helper)
            need_x = need_half = False
        nodes.append(mul)
        cur = mul.outputs[0]
    return nodes, cur


def _match_erf(erf: ir.Node) -> tuple[ir.Value, list[ir.Node], ir.Node] | None:
    h = erf.inputs[0]
    scale = _producer(h, "Div", "Mul")
    if scale is None or sole_consumer(h) is not erf:
        return None
    x, c_value = scale.inputs
    if scale.op_type == "Mul" and scalar(x) is not None:
        x, c_value = c_value, x
    c = scalar(c_value)
    if x is None or not (_close(c, np.sqrt(2.0)) if scale.op_type == "Div"
                         else _close(c, 1 / np.sqrt(2.0))):
        return None
    return x, [scale, erf], erf


def _binary_add(node: ir.Node | None) -> bool:
    """Add, or a Sum of exactly two inputs (the same thing)."""
    return is_op(node, "Add") or (is_op(node, "Sum") and len(node.inputs) == 2)


def _cube_of(value: ir.Value, x: ir.Value) -> list[ir.Node] | None:
    """Nodes computing value = x^3 (Pow(x, 3) or two Muls), private to the pattern."""
    node = _producer(value, "Pow", "Mul")
    if node is None:
        return None
    if node.op_type == "Pow":
        return [node] if node.inputs[0] is x and _close(scalar(node.inputs[1]), 3.0) else None
    a, b = node.inputs
    square, other = (a, b) if b is x else (b, a) if a is x else (None, None)
    if square is None:
        return None
    sq = _producer(square, "Mul")
    if sq is None or sq.inputs[0] is not x or sq.inputs[1] is not x or \
            sole_consumer(square) is not node or other is not x:
        return None
    return [sq, node]


def _match_tanh(tanh: ir.Node) -> tuple[ir.Value, list[ir.Node], ir.Node] | None:
    m2 = _producer(tanh.inputs[0], "Mul")
    if m2 is None or sole_consumer(tanh.inputs[0]) is not tanh:
        return None
    inner = next((v for v in m2.inputs if _binary_add(_producer(v, "Add", "Sum"))), None)
    if inner is None or not _close(scalar(_other(m2, inner)), float(np.sqrt(2.0 / np.pi))):
        return None
    add = _producer(inner, "Add", "Sum")
    if sole_consumer(inner) is not m2:
        return None
    for x, cubic in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        m1 = _producer(cubic, "Mul")
        if m1 is None or sole_consumer(cubic) is not add:
            continue
        for cube in m1.inputs:
            if not _close(scalar(_other(m1, cube)), 0.044715):
                continue
            cube_nodes = _cube_of(cube, x)
            if cube_nodes is None or sole_consumer(cube) is not m1:
                continue
            return x, cube_nodes + [m1, add, m2, tanh], tanh
    return None


def fuse_gelu(model: ir.Model, node: ir.Node) -> bool:
    """Replace the GELU pattern around `node` (an Erf or Tanh) by `Gelu`."""
    if is_op(node, "Erf"):
        match, approximate = _match_erf(node), "none"
    elif is_op(node, "Tanh"):
        match, approximate = _match_tanh(node), "tanh"
    else:
        return False
    if match is None or opset(model) < 20:
        return False
    x, nodes, last = match
    e = last.outputs[0]
    one = sole_consumer(e)
    if not _binary_add(one) or not _close(scalar(_other(one, e)), 1.0):
        return False
    chain = _half_times_x_chain(one.outputs[0], x)
    if chain is None:
        return False
    chain_nodes, out = chain
    if not _shape_preserved(x, out, [*nodes, one, *chain_nodes]):
        return False
    graph = node.graph
    assert graph is not None
    gelu = ir.node("Gelu", [x], {"approximate": approximate},
                   name=f"{node.name or 'gelu'}_gelu")
    graph.insert_before(chain_nodes[-1], gelu)
    bypass(out, gelu.outputs[0])
    remove_nodes(list(reversed(chain_nodes)) + [one] + list(reversed(nodes)))
    return True


@register
class FuseLayerNormPass(RewritePass):
    """Replace primitive LayerNorm subgraphs by LayerNormalization (opset >= 17)."""

    name = "fuse-layernorm"
    summary = "ReduceMean-Sub-Pow-ReduceMean-Add-Sqrt-Div(-Mul-Add) -> LayerNormalization"
    stat = "layernorm_fused"
    rule = staticmethod(fuse_layernorm)


@register
class FuseGeluPass(RewritePass):
    """Replace primitive GELU subgraphs (erf and tanh forms) by Gelu (opset >= 20)."""

    name = "fuse-gelu"
    summary = "GELU written with Erf or Tanh primitives -> Gelu (opset >= 20 only)"
    stat = "gelu_fused"
    rule = staticmethod(fuse_gelu)
