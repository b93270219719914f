"""Dependency analysis for structured pruning, on hand-built hard cases (onnx.helper).

The graphs here are the ones pruning tools get wrong: residual add chains (ResNet
basic block, MobileNetV2 inverted residual), concats (SqueezeNet fire, Inception),
depthwise and grouped convs, conv -> flatten/reshape -> Gemm, shared weights, two
branches into one Add, attention heads and FFN neurons of a transformer block.
`tests/test_pruning.py` prunes every case here and checks it end to end.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import make_model
from onnx import TensorProto, helper, numpy_helper
from onnxforge.ir import infer_shapes, load_model
from onnxforge.passes.pruning.groups import Analysis, analyze


class GraphBuilder:
    """Tiny onnx.helper DSL: each method appends nodes and returns the output name."""

    def __init__(self, seed: int = 0, const_nodes: bool = False):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.counts: dict[str, int] = {}
        self.const_nodes = const_nodes  # weights as Constant nodes (like PP-OCR)

    def _name(self, prefix: str) -> str:
        self.counts[prefix] = self.counts.get(prefix, 0) + 1
        return f"{prefix}{self.counts[prefix]}"

    def weight(self, shape, name: str | None = None, scale: float | None = None,
               positive: bool = False) -> str:
        name = name or self._name("w")
        fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = scale if scale is not None else 1.0 / np.sqrt(max(fan_in, 1))
        arr = self.rng.standard_normal(shape) * scale
        if positive:
            arr = np.abs(arr) + 0.5
        self.const(arr.astype(np.float32), name)
        return name

    def const(self, arr: np.ndarray, name: str) -> str:
        if self.const_nodes and arr.dtype == np.float32:
            self.nodes.append(helper.make_node("Constant", [], [name], name=f"{name}_const",
                                               value=numpy_helper.from_array(arr, name)))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def node(self, op: str, inputs: list[str], n_out: int = 1, name: str | None = None,
             **attrs) -> str | list[str]:
        name = name or self._name(op.lower())
        outs = [f"{name}_out{i}" if n_out > 1 else f"{name}_out" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if n_out > 1 else outs[0]

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bias: bool = True, name: str | None = None, weight: str | None = None) -> str:
        name = name or self._name("conv")
        w = weight or self.weight((cout, cin // group, k, k), f"{name}.weight")
        inputs = [x, w]
        if bias:
            inputs.append(self.weight((cout,), f"{name}.bias", scale=0.1))
        return self.node("Conv", inputs, name=name, kernel_shape=[k, k], strides=[stride, stride],
                         pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int) -> str:
        name = self._name("bn")
        params = [self.weight((c,), f"{name}.weight", positive=True),
                  self.weight((c,), f"{name}.bias", scale=0.1),
                  self.weight((c,), f"{name}.mean", scale=0.1),
                  self.weight((c,), f"{name}.var", positive=True)]
        return self.node("BatchNormalization", [x, *params], name=name)

    def relu(self, x: str) -> str:
        return self.node("Relu", [x])

    def relu6(self, x: str) -> str:
        lo = self.const(np.array(0, np.float32).reshape(()), self._name("lo"))
        hi = self.const(np.array(6, np.float32).reshape(()), self._name("hi"))
        return self.node("Clip", [x, lo, hi])

    def cbr(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
            act: bool = True) -> str:
        y = self.bn(self.conv(x, cin, cout, k, stride, group, bias=False), cout)
        return self.relu(y) if act else y

    def head(self, x: str, c: int, classes: int = 10) -> str:
        f = self.node("Flatten", [self.node("GlobalAveragePool", [x])])
        return self.gemm(f, c, classes)

    def gemm(self, x: str, k: int, n: int, name: str | None = None) -> str:
        name = name or self._name("fc")
        w = self.weight((n, k), f"{name}.weight")
        b = self.weight((n,), f"{name}.bias", scale=0.1)
        return self.node("Gemm", [x, w, b], name=name, transB=1)

    def build(self, inputs: list[tuple[str, list]], outputs: list[str]) -> onnx.ModelProto:
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs]
        outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs]
        model = make_model(self.nodes, ins, outs, self.inits)
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        model.graph.ClearField("output")
        model.graph.output.extend(inferred.graph.output)
        return model


# ---------------------------------------------------------------- cases

def resnet_blocks(const_nodes: bool = False) -> onnx.ModelProto:
    """Stem + two basic blocks (identity shortcut, then stride-2 with 1x1 downsample)."""
    b = GraphBuilder(1, const_nodes)
    x = b.cbr("x", 3, 16)
    y = b.cbr(b.cbr(x, 16, 16), 16, 16, act=False)
    x = b.relu(b.node("Add", [y, x]))
    y = b.cbr(b.cbr(x, 16, 32, stride=2), 32, 32, act=False)
    x = b.relu(b.node("Add", [y, b.cbr(x, 16, 32, k=1, stride=2, act=False)]))
    return b.build([("x", ["N", 3, 16, 16])], [b.head(x, 32)])


def mobilenet_v2_blocks() -> onnx.ModelProto:
    """Inverted residuals: expand 1x1 -> depthwise 3x3 -> project 1x1 (+ residual)."""
    b = GraphBuilder(2)
    x = b.relu6(b.bn(b.conv("x", 3, 16, bias=False), 16))

    def block(x, cin, cout, expand, stride):
        h = b.relu6(b.bn(b.conv(x, cin, cin * expand, k=1, bias=False), cin * expand))
        h = b.relu6(b.bn(b.conv(h, cin * expand, cin * expand, stride=stride,
                                group=cin * expand, bias=False), cin * expand))
        h = b.bn(b.conv(h, cin * expand, cout, k=1, bias=False), cout)
        return b.node("Add", [h, x]) if stride == 1 and cin == cout else h

    x = block(x, 16, 16, 4, 1)
    x = block(x, 16, 24, 4, 2)
    x = block(x, 24, 24, 4, 1)
    return b.build([("x", [1, 3, 16, 16])], [b.head(x, 24)])


def squeezenet_fire() -> onnx.ModelProto:
    """Two fire modules: squeeze 1x1 -> (expand 1x1 || expand 3x3) -> Concat."""
    b = GraphBuilder(3)
    x = b.relu(b.conv("x", 3, 32, stride=2))

    def fire(x, cin, sq, e1, e3):
        s = b.relu(b.conv(x, cin, sq, k=1))
        return b.node("Concat", [b.relu(b.conv(s, sq, e1, k=1)), b.relu(b.conv(s, sq, e3))],
                      axis=1)

    x = fire(x, 32, 8, 16, 16)
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = fire(x, 32, 8, 24, 24)
    y = b.conv(x, 48, 10, k=1)
    y = b.node("Flatten", [b.node("GlobalAveragePool", [b.relu(y)])])
    return b.build([("x", [1, 3, 16, 16])], [y])


def inception() -> onnx.ModelProto:
    """Four branches (1x1, 1x1->3x3, 1x1->5x5, maxpool->1x1) concatenated, then a conv."""
    b = GraphBuilder(4)
    x = b.cbr("x", 3, 16)
    b1 = b.cbr(x, 16, 8, k=1)
    b2 = b.cbr(b.cbr(x, 16, 8, k=1), 8, 12)
    b3 = b.cbr(b.cbr(x, 16, 4, k=1), 4, 6, k=5)
    pool = b.node("MaxPool", [x], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    b4 = b.cbr(pool, 16, 6, k=1)
    x = b.node("Concat", [b1, b2, b3, b4], axis=1)
    x = b.cbr(x, 32, 16)
    return b.build([("x", [1, 3, 12, 12])], [b.head(x, 16)])


def depthwise_grouped() -> onnx.ModelProto:
    """Depthwise conv, then a 4-group conv, then a depthwise conv with multiplier 2."""
    b = GraphBuilder(5)
    x = b.cbr("x", 3, 16)
    x = b.cbr(x, 16, 16, group=16)  # depthwise
    x = b.cbr(x, 16, 32, k=1)
    x = b.cbr(x, 32, 32, group=4)  # grouped
    x = b.cbr(x, 32, 64, group=32)  # depthwise, multiplier 2
    x = b.cbr(x, 64, 32, k=1)
    return b.build([("x", [1, 3, 12, 12])], [b.head(x, 32)])


def conv_flatten_gemm() -> onnx.ModelProto:
    """conv -> relu -> flatten (C*4*4 features) -> Gemm -> relu -> Gemm; plus Reshape path."""
    b = GraphBuilder(6)
    x = b.relu(b.conv("x", 3, 16))
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.relu(b.conv(x, 16, 12))
    f = b.node("Flatten", [x])
    h = b.relu(b.gemm(f, 12 * 4 * 4, 32))
    shape = b.const(np.array([1, 12 * 16], np.int64), "flat_shape")
    r = b.node("Reshape", [x, shape])
    w = b.weight((12 * 16, 32), "mm.weight")
    h2 = b.relu(b.node("MatMul", [r, w]))
    h = b.node("Add", [h, h2])
    return b.build([("x", [1, 3, 8, 8])], [b.gemm(h, 32, 10)])


def shared_weights() -> onnx.ModelProto:
    """One initializer used by two convs on two branches that meet in an Add."""
    b = GraphBuilder(7)
    x = b.cbr("x", 3, 16)
    w = b.weight((16, 16, 3, 3), "shared.weight")
    left = b.relu(b.conv(x, 16, 16, weight=w, bias=False))
    right = b.relu(b.conv(b.cbr(x, 16, 16, k=1), 16, 16, weight=w, bias=False))
    x = b.node("Add", [left, right])
    x = b.cbr(x, 16, 24)
    return b.build([("x", [1, 3, 8, 8])], [b.head(x, 24)])


def two_branch_add() -> onnx.ModelProto:
    """Two independent conv branches (different depths) summed, then mixed by Mul/Sub."""
    b = GraphBuilder(8)
    x = b.cbr("x", 3, 16)
    left = b.cbr(b.cbr(x, 16, 24), 24, 32, act=False)
    right = b.cbr(x, 16, 32, k=1, act=False)
    s = b.relu(b.node("Add", [left, right]))
    gate = b.node("Sigmoid", [b.conv(b.node("GlobalAveragePool", [s]), 32, 32, k=1)])
    s = b.node("Mul", [s, gate])  # squeeze-excitation style gate
    s = b.cbr(s, 32, 16)
    return b.build([("x", [1, 3, 8, 8])], [b.head(s, 16)])


def split_slice_resize_pad() -> onnx.ModelProto:
    """Split into halves, Slice, Resize x2, Pad, Transpose to NHWC and back."""
    b = GraphBuilder(9)
    x = b.cbr("x", 3, 16)
    sizes = b.const(np.array([8, 8], np.int64), "split_sizes")
    h1, h2 = b.node("Split", [x, sizes], n_out=2, axis=1)
    h1 = b.cbr(h1, 8, 8)
    starts = b.const(np.array([2], np.int64), "sl_starts")
    ends = b.const(np.array([8], np.int64), "sl_ends")
    axes = b.const(np.array([1], np.int64), "sl_axes")
    h2 = b.node("Slice", [h2, starts, ends, axes])
    x = b.node("Concat", [h1, h2], axis=1)  # 14 channels
    x = b.cbr(x, 14, 16)
    scales = b.const(np.array([1, 1, 2, 2], np.float32), "scales")
    x = b.node("Resize", [x, "", scales], mode="nearest")
    pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    x = b.node("Pad", [x, pads])
    x = b.cbr(x, 16, 16, stride=2)
    t = b.node("Transpose", [x], perm=[0, 2, 3, 1])  # NHWC
    t = b.relu(b.node("MatMul", [t, b.weight((16, 16), "nhwc.weight")]))
    x = b.node("Transpose", [t], perm=[0, 3, 1, 2])
    return b.build([("x", [1, 3, 8, 8])], [b.head(x, 16)])


def transformer_block(heads: int = 4, dim: int = 32, seq: int = 6, ffn: int = 64,
                      dynamic_shape: bool = True) -> onnx.ModelProto:
    """BERT-style layer: Q/K/V -> heads (Reshape/Transpose) -> softmax(QK^T/sqrt d) V ->
    merge heads -> output projection + residual -> LayerNorm -> FFN (MatMul-Gelu-MatMul)
    + residual -> LayerNorm. Head reshapes read batch/seq with Shape like torch exports."""
    b = GraphBuilder(10)
    hd = dim // heads
    x = "x"

    def linear(x, k, n, name):
        return b.node("Add", [b.node("MatMul", [x, b.weight((k, n), f"{name}.weight")]),
                              b.weight((n,), f"{name}.bias", scale=0.1)])

    if dynamic_shape:
        shp = b.node("Shape", [x])
        bs = b.node("Gather", [shp, b.const(np.array([0], np.int64), "i0")], axis=0)
        sq = b.node("Gather", [shp, b.const(np.array([1], np.int64), "i1")], axis=0)
        split_shape = b.node("Concat", [bs, sq, b.const(np.array([heads, hd], np.int64), "hh")],
                             axis=0)
        merge_shape = b.node("Concat", [bs, sq, b.const(np.array([dim], np.int64), "dd")],
                             axis=0)
    else:
        split_shape = b.const(np.array([1, seq, heads, hd], np.int64), "split_shape")
        merge_shape = b.const(np.array([1, seq, dim], np.int64), "merge_shape")

    def to_heads(t, perm):
        return b.node("Transpose", [b.node("Reshape", [t, split_shape])], perm=perm)

    q = to_heads(linear(x, dim, dim, "q"), [0, 2, 1, 3])
    k = to_heads(linear(x, dim, dim, "k"), [0, 2, 3, 1])
    v = to_heads(linear(x, dim, dim, "v"), [0, 2, 1, 3])
    scores = b.node("Div", [b.node("MatMul", [q, k]),
                            b.const(np.array(np.sqrt(hd), np.float32), "sqrt_d")])
    mask = b.const(np.zeros((1, 1, 1, seq), np.float32), "mask")
    probs = b.node("Softmax", [b.node("Add", [scores, mask])], axis=-1)
    ctx = b.node("Transpose", [b.node("MatMul", [probs, v])], perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, merge_shape])
    h = b.node("Add", [linear(ctx, dim, dim, "o"), x])
    h = b.node("LayerNormalization", [h, b.weight((dim,), "ln1.weight", positive=True),
                                      b.weight((dim,), "ln1.bias", scale=0.1)], axis=-1)
    f = linear(h, dim, ffn, "ffn1")
    f = b.node("Mul", [f, b.node("Sigmoid", [f])])  # SiLU/GELU-like gate
    f = linear(f, ffn, dim, "ffn2")
    out = b.node("LayerNormalization", [b.node("Add", [f, h]),
                                        b.weight((dim,), "ln2.weight", positive=True),
                                        b.weight((dim,), "ln2.bias", scale=0.1)], axis=-1)
    return b.build([("x", [1, seq, dim])], [out])


CASES = {
    "resnet_blocks": resnet_blocks,
    "resnet_const_nodes": lambda: resnet_blocks(const_nodes=True),
    "mobilenet_v2_blocks": mobilenet_v2_blocks,
    "squeezenet_fire": squeezenet_fire,
    "inception": inception,
    "depthwise_grouped": depthwise_grouped,
    "conv_flatten_gemm": conv_flatten_gemm,
    "shared_weights": shared_weights,
    "two_branch_add": two_branch_add,
    "split_slice_resize_pad": split_slice_resize_pad,
    "transformer_block": transformer_block,
    "transformer_static_shape": lambda: transformer_block(dynamic_shape=False),
}


def analyzed(proto: onnx.ModelProto, shapes: dict | None = None) -> tuple[ir.Model, Analysis]:
    model = load_model(proto)
    for value in model.graph.inputs:
        if shapes and value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])
        elif value.shape is not None:
            value.shape = ir.Shape([d if isinstance(d, int) else 1 for d in value.shape])
    infer_shapes(model)
    return model, analyze(model)


def group_with(analysis: Analysis, label: str):
    """The group whose member axis nodes include `label` ("name[axis]")."""
    for g in analysis.groups:
        if any(analysis.nodes[i].label() == label for i in g.nodes):
            return g
    return None


def labels(analysis: Analysis, group) -> set[str]:
    return {analysis.nodes[i].label() for i in group.nodes}


# ---------------------------------------------------------------- tests


@pytest.mark.parametrize("name", sorted(CASES))
def test_cases_are_valid_onnx(name):
    proto = CASES[name]()
    onnx.checker.check_model(proto)
    _, analysis = analyzed(proto)
    assert analysis.units, f"{name}: nothing prunable found"


def test_resnet_residual_chain_is_one_group():
    _, an = analyzed(resnet_blocks())
    # stage 1: the stem conv and block 1's second conv both write the residual stream
    g = group_with(an, "conv1.weight[0]")
    got = labels(an, g)
    assert "conv3.weight[0]" in got and len(g.units) == 16
    # every reader of the stream: block 1 conv1, block 2 conv1 and the 1x1 downsample
    assert got >= {"conv2.weight[1]", "conv4.weight[1]", "conv6.weight[1]"}
    # stage 2: block 2's second conv and the downsample are coupled through the Add
    g2 = group_with(an, "conv5.weight[0]")
    assert labels(an, g2) >= {"conv6.weight[0]", "fc1.weight[1]"} and len(g2.units) == 32
    # the inner conv of each block is a free group of its own
    inner = group_with(an, "conv2.weight[0]")
    weights = {lb for lb in labels(an, inner) if ".weight" in lb}
    assert weights == {"conv2.weight[0]", "conv3.weight[1]", "bn2.weight[0]"}


def test_depthwise_couples_input_and_output_channels():
    _, an = analyzed(mobilenet_v2_blocks())
    # block 1: expand conv (conv2, 64 ch) is coupled through the depthwise conv3
    g = group_with(an, "conv2.weight[0]")
    assert labels(an, g) >= {"conv3.weight[0]", "conv4.weight[1]"}
    assert all(u.width == 1 for u in g.units) and len(g.units) == 64
    # residual stream: block 1's project conv with the stem (through the Add)
    assert "conv1.weight[0]" in labels(an, group_with(an, "conv4.weight[0]"))
    # block 3 adds onto block 2's projection
    assert "conv7.weight[0]" in labels(an, group_with(an, "conv10.weight[0]"))


def test_grouped_conv_units_are_whole_groups():
    _, an = analyzed(depthwise_grouped())
    # conv4 is the 4-group conv (32 -> 32): its groups of 8, the 1x1 producer conv3
    # and the depthwise x2 conv5 after it are all in one group of 4 units
    g = group_with(an, "conv4.weight[0]")
    assert len(g.units) == 4
    assert labels(an, g) >= {"conv3.weight[0]", "conv5.weight[0]", "conv6.weight[1]"}
    for unit in g.units:
        sizes = {an.nodes[n].label(): len(ix) for n, ix in unit.members.items()}
        assert sizes["conv3.weight[0]"] == 8 and sizes["conv4.weight[0]"] == 8
        assert sizes["conv5.weight[0]"] == 16  # depthwise multiplier 2
    # plain depthwise (conv2) couples with its producer conv1
    assert "conv1.weight[0]" in labels(an, group_with(an, "conv2.weight[0]"))


def test_concat_maps_offsets():
    _, an = analyzed(squeezenet_fire())
    g1 = group_with(an, "conv3.weight[0]")  # fire 1 expand 1x1 -> concat[0:16]
    g3 = group_with(an, "conv4.weight[0]")  # fire 1 expand 3x3 -> concat[16:32]
    assert g1 is not g3 and len(g1.units) == 16 and len(g3.units) == 16
    reader = "conv5.weight[1]"  # next squeeze conv reads the concat
    for g, own, offset in ((g1, "conv3.weight[0]", 0), (g3, "conv4.weight[0]", 16)):
        for u in g.units:
            idx = {an.nodes[n].label(): ix for n, ix in u.members.items()}
            assert idx[reader].tolist() == (idx[own] + offset).tolist()


def test_inception_concat_branches():
    _, an = analyzed(inception())
    sizes = sorted(len(group_with(an, f"conv{i}.weight[0]").units) for i in (2, 4, 6, 7))
    assert sizes == [6, 6, 8, 12]


def test_flatten_maps_channel_to_spatial_features():
    _, an = analyzed(conv_flatten_gemm())
    g = group_with(an, "conv2.weight[0]")
    got = labels(an, g)
    assert "fc1.weight[1]" in got and "mm.weight[0]" in got
    unit = g.units[0]
    feats = next(ix for n, ix in unit.members.items() if an.nodes[n].label() == "fc1.weight[1]")
    ch = next(ix for n, ix in unit.members.items() if an.nodes[n].label() == "conv2.weight[0]")
    assert len(feats) == 16 and np.array_equal(feats, ch[0] * 16 + np.arange(16))


def test_shared_weight_couples_both_convs():
    _, an = analyzed(shared_weights())
    g = group_with(an, "shared.weight[0]")
    assert g is not None and len(g.units) == 16
    # the shared weight's input axis couples what both convs read: the stem output
    # (left branch) and the 1x1 conv3 output (right branch), index by index
    g_in = group_with(an, "shared.weight[1]")
    assert labels(an, g_in) >= {"conv1.weight[0]", "conv3.weight[0]"}


def test_transformer_heads_and_ffn_neurons():
    for dynamic in (True, False):
        _, an = analyzed(transformer_block(dynamic_shape=dynamic))
        heads = group_with(an, "q.weight[1]")
        assert heads is not None and heads.kind == "heads"
        assert len(heads.units) == 4 and all(u.width == 8 for u in heads.units)
        assert labels(an, heads) >= {"k.weight[1]", "v.weight[1]", "o.weight[0]"}
        ffn = group_with(an, "ffn1.weight[1]")
        assert ffn.kind == "linear" and len(ffn.units) == 64
        assert "ffn2.weight[0]" in labels(an, ffn)
        # the hidden axis goes through LayerNorm and the graph output: never prunable
        assert group_with(an, "o.weight[1]") is None
        assert group_with(an, "ffn2.weight[1]") is None


def _blocked(proto) -> set[str]:
    _, an = analyzed(proto)
    return {an.nodes[i].value.name for g in an.groups for i in g.nodes}


def test_softmax_over_channels_blocks():
    b = GraphBuilder(11)
    x = b.relu(b.conv("x", 3, 8))
    s = b.node("Softmax", [x], axis=1)
    y = b.conv(s, 8, 4)
    _, an = analyzed(b.build([("x", [1, 3, 4, 4])], [y]))
    assert group_with(an, "conv1.weight[0]") is None  # softmax normalizes over channels
    assert group_with(an, "conv2.weight[0]") is None  # graph output


def test_unknown_op_and_graph_output_block():
    b = GraphBuilder(12)
    x = b.relu(b.conv("x", 3, 8))
    y = b.node("LpNormalization", [x], axis=1)  # not in the rule table
    z = b.relu(b.conv("x", 3, 8))
    extra = b.conv(z, 8, 4)
    _, an = analyzed(b.build([("x", [1, 3, 4, 4])], [y, z, extra]))
    assert group_with(an, "conv1.weight[0]") is None  # unknown consumer
    assert group_with(an, "conv3.weight[0]") is None  # z is a graph output
    assert an.blocked_units >= 8 + 8 + 4


def test_layernorm_over_other_axis_passes():
    """LayerNormalization over spatial axes keeps channels prunable; over channels blocks."""
    for axis, prunable in ((2, True), (1, False)):
        b = GraphBuilder(13)
        x = b.relu(b.conv("x", 3, 8))
        ln = b.node("LayerNormalization", [x, b.weight((4, 4), f"g{axis}"),
                                           b.weight((4, 4), f"b{axis}")], axis=2)
        if axis == 1:
            ln = b.node("LayerNormalization", [x, b.weight((8, 4, 4), "g"),
                                               b.weight((8, 4, 4), "b")], axis=1)
        y = b.head(ln, 8)
        _, an = analyzed(b.build([("x", [1, 3, 4, 4])], [y]))
        assert (group_with(an, "conv1.weight[0]") is not None) is prunable
