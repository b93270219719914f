"""Which layers `sparsify` may touch, their 2-D weight view, and which are kept dense.

A candidate is a Conv, Gemm or MatMul (default ONNX domain) whose weight (input 1) is a
float initializer of the main graph, not a graph input, read by this node only. Its
*view* is the 2-D matrix [outputs, inputs] with the reduction axis last:

- Conv W [O, I/group, kh, kw] -> W.reshape(O, I/group*kh*kw) (columns in (c, kh, kw)
  order, the weight's own memory order; for a grouped conv the columns of row o are
  the channels of o's group);
- Gemm B -> B when transB = 1, else B.T ([N, K]);
- MatMul X @ W with a 2-D W [K, N] -> W.T ([N, K]).

Kept dense by default (`keep="first,last,depthwise"`): the first Conv of the graph (few
inputs, most of the signal), the last Gemm/MatMul with a constant weight (usually the
classifier) and depthwise convs (group = input channels = output channels / k: a row
holds one channel's kh*kw taps). `keep` also takes fnmatch patterns of layer or weight
names, or `none`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ...ir import constant_array
from ..graph import FLOAT_DTYPES, attr, is_op
from ..naming import take_free_name
from ..overrides import names_match

KEEP_RULES = ("first", "last", "depthwise")


@dataclass
class SparseLayer:
    key: str  # node name (else its output's name), unique in the run
    node: ir.Node
    weight: ir.Value
    array: np.ndarray  # the weight as stored (ONNX layout, its own dtype)

    @property
    def op(self) -> str:
        return self.node.op_type

    @property
    def names(self) -> list[str]:
        """Names an override or keep pattern is matched against."""
        return [n for n in (self.key, self.node.name, self.weight.name) if n]

    @property
    def transposed(self) -> bool:
        """The view is the stored weight transposed (MatMul, Gemm with transB = 0)."""
        return self.op == "MatMul" or (self.op == "Gemm" and not int(attr(self.node, "transB", 0)))

    @property
    def group(self) -> int:
        return int(attr(self.node, "group", 1)) if self.op == "Conv" else 1

    @property
    def depthwise(self) -> bool:
        return self.op == "Conv" and self.group > 1 and self.array.shape[1] == 1

    def view(self) -> np.ndarray:
        """The weight as float64 [outputs, inputs]."""
        w = self.array.astype(np.float64)
        if self.op == "Conv":
            return w.reshape(w.shape[0], -1)
        return w.T if self.transposed else w

    def unview(self, view: np.ndarray) -> np.ndarray:
        """A view-shaped matrix back in the weight's layout and dtype."""
        w = view.T if self.transposed else view
        return np.ascontiguousarray(w.reshape(self.array.shape).astype(self.array.dtype))


def _candidate(node: ir.Node) -> ir.Value | str | None:
    """The weight value of a candidate node, a reason string when refused, None if not one."""
    if not is_op(node, "Conv", "Gemm", "MatMul") or len(node.inputs) < 2:
        return None
    weight = node.inputs[1]
    if weight is None:
        return None
    if not weight.is_initializer():
        if is_op(weight.producer(), "Constant"):
            return "weight is a Constant node, not an initializer (run cleanup first)"
        return None  # computed operand (e.g. attention scores): not a weight layer
    if weight.is_graph_input():
        return "weight is also a graph input (can be overridden at run time)"
    if weight.const_value is None:
        return "weight initializer has no value"
    if len(weight.uses()) != 1:
        return f"weight shared by {len(weight.uses())} uses"
    dtype = weight.const_value.dtype.numpy()
    if dtype.type not in FLOAT_DTYPES:
        return f"weight dtype {dtype} (float only)"
    ndim = len(weight.const_value.shape)
    if node.op_type in ("Gemm", "MatMul") and ndim != 2:
        return f"weight has rank {ndim}, not 2"
    if node.op_type == "Conv" and ndim < 3:
        return f"conv weight has rank {ndim}"
    return weight


def find_layers(graph: ir.Graph) -> tuple[list[SparseLayer], dict[str, str]]:
    """Candidate layers in graph order, and the other Conv/Gemm/MatMul nodes with the
    reason each cannot be sparsified (non-constant weights, e.g. attention products, are
    not candidates and not listed)."""
    layers: list[SparseLayer] = []
    refused: dict[str, str] = {}
    taken: set[str] = set()
    for node in graph:
        found = _candidate(node)
        if found is None:
            continue
        base = node.name or (node.outputs[0].name if node.outputs else "") or node.op_type
        key = take_free_name(base, taken, "#")
        if isinstance(found, str):
            refused[key] = found
        else:
            layers.append(SparseLayer(key, node, found, found.const_value.numpy()))
    return layers, refused


def parse_keep(text: str) -> tuple[set[str], list[str]]:
    """`keep` text -> (rules among first/last/depthwise, name patterns); `none` = neither."""
    rules: set[str] = set()
    patterns: list[str] = []
    for part in (text or "").replace(";", ",").split(","):
        part = part.strip()
        if not part or part.lower() == "none":
            continue
        if part.lower() in KEEP_RULES:
            rules.add(part.lower())
        else:
            patterns.append(part)
    return rules, patterns


def kept_dense(graph: ir.Graph, layers: list[SparseLayer], text: str) -> dict[str, str]:
    """Layer key -> why `keep` keeps it dense. The first Conv and the last Gemm/MatMul with
    a constant weight are those of the graph, candidates or not."""
    rules, patterns = parse_keep(text)
    convs = [n for n in graph if is_op(n, "Conv")]
    linears = [n for n in graph if is_op(n, "Gemm", "MatMul") and len(n.inputs) > 1
               and n.inputs[1] is not None and constant_array(n.inputs[1]) is not None]
    reasons: dict[str, str] = {}
    for layer in layers:
        if "first" in rules and convs and layer.node is convs[0]:
            reasons[layer.key] = "first conv (keep=first)"
        if "last" in rules and linears and layer.node is linears[-1]:
            reasons[layer.key] = "last Gemm/MatMul, usually the classifier (keep=last)"
        if "depthwise" in rules and layer.depthwise and layer.key not in reasons:
            reasons[layer.key] = "depthwise conv (keep=depthwise)"
        hit = next((p for p in patterns if names_match(layer.names, p)), None)
        if hit is not None and layer.key not in reasons:
            reasons[layer.key] = f"matches keep pattern {hit!r}"
    return reasons
