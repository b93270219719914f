"""Tests of the exact fusion rewrites (`fold-bn`, `fold-affine`, `fuse-*`, `fuse`).

Every case runs the original and the rewritten model in onnxruntime on the same
random inputs and compares the outputs, and asserts that the rewrite happened
(op counts) or was refused (graph unchanged).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxforge.ir import load_model, model_bytes
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.sample_inputs import zoo_feeds as zoo_feeds_of

RNG = np.random.default_rng(0)
F = TensorProto.FLOAT


def rand(*shape: int, scale: float = 1.0) -> np.ndarray:
    return (RNG.standard_normal(shape) * scale).astype(np.float32)


def init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def vi(name: str, shape: list, elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def make(nodes, inputs, outputs, inits=(), opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def bn_inits(prefix: str, c: int) -> list[onnx.TensorProto]:
    return [init(f"{prefix}_s", rand(c) * 0.5 + 1), init(f"{prefix}_b", rand(c)),
            init(f"{prefix}_m", rand(c)), init(f"{prefix}_v", np.abs(rand(c)) + 0.5)]


def bn(x: str, y: str, prefix: str, **kw) -> onnx.NodeProto:
    return helper.make_node("BatchNormalization",
                            [x, f"{prefix}_s", f"{prefix}_b", f"{prefix}_m", f"{prefix}_v"], [y],
                            epsilon=1e-3, **kw)


def run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes(model), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def feeds_for(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    feeds = {}
    inits = {i.name for i in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in inits:
            continue
        shape = [d.dim_value for d in inp.type.tensor_type.shape.dim]
        feeds[inp.name] = rand(*shape)
    return feeds


def ops(model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def check(proto: onnx.ModelProto, pipeline: str, rtol: float = 1e-5):
    """Apply `pipeline`; assert outputs equal to the original's; return (model, stats)."""
    original = load_model(proto)
    model = load_model(proto)
    model, steps = PassManager(pipeline, PassContext()).run(model)
    feeds = feeds_for(proto)
    ref, got = run(original, feeds), run(model, feeds)
    assert [v.name for v in model.graph.outputs] == [o.name for o in proto.graph.output]
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        np.testing.assert_allclose(b, a, rtol=rtol, atol=rtol * float(np.abs(a).max()))
    stats: dict = {}
    for step in steps:
        stats.update(step.stats)
    return model, stats


def assert_unchanged(proto: onnx.ModelProto, pipeline: str) -> None:
    model, stats = check(proto, pipeline)
    assert ops(model) == Counter(n.op_type for n in proto.graph.node), stats
    assert not {k: v for k, v in stats.items() if isinstance(v, int) and v}, stats


# ------------------------------------------------------------------ fold-bn


def conv_bn(group: int = 1, bias: bool = True, cin: int = 4, cout: int = 6,
            transpose: bool = False) -> onnx.ModelProto:
    if transpose:
        w = rand(cin, cout // group, 3, 3, scale=0.3)
    else:
        w = rand(cout, cin // group, 3, 3, scale=0.3)
    op = "ConvTranspose" if transpose else "Conv"
    inputs = ["x", "w"] + (["b"] if bias else [])
    nodes = [helper.make_node(op, inputs, ["c"], group=group, pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3]),
             bn("c", "y", "bn")]
    inits = [init("w", w)] + ([init("b", rand(cout))] if bias else []) + bn_inits("bn", cout)
    return make(nodes, [vi("x", [2, cin, 7, 7])], [vi("y", [2, cout, 7, 7])], inits)


@pytest.mark.parametrize("group, bias, cin, cout", [
    (1, True, 4, 6), (1, False, 4, 6),     # plain conv, conv without bias
    (2, True, 4, 6), (4, False, 4, 8),     # grouped conv
    (4, True, 4, 4),                       # depthwise conv
])
def test_fold_bn_into_conv(group: int, bias: bool, cin: int, cout: int) -> None:
    model, stats = check(conv_bn(group, bias, cin, cout), "fold-bn")
    assert ops(model) == Counter({"Conv": 1})
    assert stats["bn_folded"] == 1


@pytest.mark.parametrize("group, bias", [(1, True), (2, False)])
def test_fold_bn_into_conv_transpose(group: int, bias: bool) -> None:
    model, stats = check(conv_bn(group, bias, cin=4, cout=6, transpose=True), "fold-bn")
    assert ops(model) == Counter({"ConvTranspose": 1})
    assert stats["bn_folded"] == 1


def test_conv_transpose_add_mul_bn_folded_by_fuse() -> None:
    """ConvTranspose(group 2) -> Add(bias) -> Mul -> BN, as in PP-OCR's detection head."""
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], group=2, strides=[2, 2],
                              kernel_shape=[2, 2]),
             helper.make_node("Add", ["c", "b"], ["a"]),
             helper.make_node("Mul", ["a", "k"], ["m"]),
             bn("m", "y", "bn")]
    inits = [init("w", rand(4, 3, 2, 2)), init("b", rand(1, 6, 1, 1)), init("k", rand(6, 1, 1))]
    inits += bn_inits("bn", 6)
    proto = make(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 6, 10, 10])], inits)
    model, stats = check(proto, "fuse")
    assert ops(model) == Counter({"ConvTranspose": 1})
    assert (stats["affine_folded"], stats["bn_folded"]) == (2, 1)


@pytest.mark.parametrize("trans_b, c_shape, beta", [
    (1, (5,), 1.0), (0, (1, 5), 0.5), (1, None, 1.0), (0, (3, 5), 2.0),
])
def test_fold_bn_into_gemm(trans_b: int, c_shape, beta: float) -> None:
    w = rand(5, 8) if trans_b else rand(8, 5)
    inputs = ["x", "w"] + (["c"] if c_shape else [])
    nodes = [helper.make_node("Gemm", inputs, ["g"], transB=trans_b, beta=beta, alpha=0.7),
             bn("g", "y", "bn")]
    inits = [init("w", w)] + ([init("c", rand(*c_shape))] if c_shape else []) + bn_inits("bn", 5)
    model, stats = check(make(nodes, [vi("x", [3, 8])], [vi("y", [3, 5])], inits), "fold-bn")
    assert ops(model) == Counter({"Gemm": 1})
    assert stats["bn_folded"] == 1


def test_fold_bn_into_matmul_add_then_gemm() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]),
             bn("a", "y", "bn")]
    inits = [init("w", rand(8, 5)), init("b", rand(5))] + bn_inits("bn", 5)
    proto = make(nodes, [vi("x", [3, 8])], [vi("y", [3, 5])], inits)
    model, _ = check(proto, "fold-bn")
    assert ops(model) == Counter({"MatMul": 1, "Add": 1})
    model, stats = check(proto, "fuse")
    assert ops(model) == Counter({"Gemm": 1})
    assert stats["bn_folded"] == 1 and stats["matmul_add_to_gemm"] == 1


def test_fold_bn_into_bare_matmul() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), bn("m", "y", "bn")]
    inits = [init("w", rand(8, 5))] + bn_inits("bn", 5)
    model, _ = check(make(nodes, [vi("x", [3, 8])], [vi("y", [3, 5])], inits), "fold-bn")
    assert ops(model) == Counter({"MatMul": 1, "Add": 1})


def test_fold_bn_feeding_two_consumers() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             bn("c", "n", "bn"),
             helper.make_node("Relu", ["n"], ["y"]),
             helper.make_node("Sigmoid", ["n"], ["z"])]
    inits = [init("w", rand(6, 4, 1, 1))] + bn_inits("bn", 6)
    proto = make(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 6, 5, 5]), vi("z", [1, 6, 5, 5])],
                 inits)
    model, stats = check(proto, "fold-bn")
    assert ops(model) == Counter({"Conv": 1, "Relu": 1, "Sigmoid": 1})
    assert stats["bn_folded"] == 1


def test_fold_bn_output_is_graph_output_keeps_name() -> None:
    model, _ = check(conv_bn(), "fold-bn")
    assert model.graph.outputs[0].name == "y"
    assert model.graph.outputs[0].producer().op_type == "Conv"


def test_fold_bn_refuses_shared_weight() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]),
             bn("c", "y", "bn"),
             helper.make_node("Conv", ["x", "w"], ["z"], kernel_shape=[1, 1])]
    inits = [init("w", rand(6, 4, 1, 1))] + bn_inits("bn", 6)
    proto = make(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 6, 5, 5]), vi("z", [1, 6, 5, 5])],
                 inits)
    assert_unchanged(proto, "fold-bn")


def test_fold_bn_refuses_intermediate_graph_output_or_second_consumer() -> None:
    # conv output c is a graph output
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), bn("c", "y", "bn")]
    inits = [init("w", rand(6, 4, 1, 1))] + bn_inits("bn", 6)
    proto = make(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 6, 5, 5]), vi("c", [1, 6, 5, 5])],
                 inits)
    assert_unchanged(proto, "fold-bn")
    # conv output c also feeds a Relu
    nodes.append(helper.make_node("Relu", ["c"], ["r"]))
    proto = make(nodes, [vi("x", [1, 4, 5, 5])], [vi("y", [1, 6, 5, 5]), vi("r", [1, 6, 5, 5])],
                 inits)
    assert_unchanged(proto, "fold-bn")


def test_fold_bn_refuses_non_constant_params_and_3d_matmul() -> None:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], kernel_shape=[1, 1]), bn("c", "y", "bn")]
    inits = [init("w", rand(6, 4, 1, 1))] + bn_inits("bn", 6)[1:]
    proto = make(nodes, [vi("x", [1, 4, 5, 5]), vi("bn_s", [6])], [vi("y", [1, 6, 5, 5])], inits)
    assert_unchanged(proto, "fold-bn")
    # MatMul on a 3-D input: BN's channel axis (1) is not the MatMul's output axis
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]), bn("m", "y", "bn")]
    inits = [init("w", rand(8, 5))] + bn_inits("bn", 4)
    proto = make(nodes, [vi("x", [2, 4, 8])], [vi("y", [2, 4, 5])], inits)
    assert_unchanged(proto, "fold-bn")


# ------------------------------------------------------------------ fold-affine


def conv_then(ops_and_consts: list[tuple[str, np.ndarray, bool]], bias: bool = True,
              opset: int = 17) -> onnx.ModelProto:
    """x -> Conv -> op_1(., c_1) -> ... ; the bool puts the constant first."""
    nodes = [helper.make_node("Conv", ["x", "w"] + (["b"] if bias else []), ["t0"],
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    inits = [init("w", rand(6, 3, 3, 3, scale=0.3))] + ([init("b", rand(6))] if bias else [])
    for i, (op, c, const_first) in enumerate(ops_and_consts):
        args = [f"k{i}", f"t{i}"] if const_first else [f"t{i}", f"k{i}"]
        out = "y" if i == len(ops_and_consts) - 1 else f"t{i + 1}"
        nodes.append(helper.make_node(op, args, [out]))
        inits.append(init(f"k{i}", c))
    return make(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", [2, 6, 6, 6])], inits, opset)


def test_fold_affine_chain_into_conv() -> None:
    proto = conv_then([("Mul", rand(1, 6, 1, 1), False), ("Add", rand(6, 1, 1), True),
                       ("Sub", np.float32(0.5), False), ("Div", rand(1, 6, 1, 1) + 3, False)],
                      bias=False)
    model, stats = check(proto, "fold-affine")
    assert ops(model) == Counter({"Conv": 1})
    assert stats["affine_folded"] == 4


@pytest.mark.parametrize("op, c, const_first", [
    ("Mul", rand(1, 1, 6, 6), False),       # varies over space, not per channel
    ("Add", rand(1, 1, 6, 1, 1), False),    # rank 5: broadcasting would change the shape
    ("Sub", rand(1, 6, 1, 1), True),        # c - Y is not affine in the right direction
    ("Div", rand(1, 6, 1, 1), True),        # c / Y
])
def test_fold_affine_refusals(op: str, c: np.ndarray, const_first: bool) -> None:
    if c.ndim == 5:
        nodes = [helper.make_node("Conv", ["x", "w"], ["t0"], kernel_shape=[1, 1]),
                 helper.make_node(op, ["t0", "k"], ["y"])]
        proto = make(nodes, [vi("x", [2, 3, 6, 6])], [vi("y", [1, 2, 6, 6, 6])],
                     [init("w", rand(6, 3, 1, 1)), init("k", c)])
    else:
        proto = conv_then([(op, c, const_first)])
    assert_unchanged(proto, "fold-affine")


def test_fold_affine_into_gemm_and_3d_matmul() -> None:
    nodes = [helper.make_node("Gemm", ["x", "w", "c"], ["g"], transB=1, beta=0.5),
             helper.make_node("Mul", ["g", "s"], ["g2"]),
             helper.make_node("Add", ["g2", "t"], ["y"]),
             helper.make_node("MatMul", ["x3", "w3"], ["m"]),
             helper.make_node("Mul", ["m", "s3"], ["z"])]
    inits = [init("w", rand(5, 8)), init("c", rand(5)), init("s", rand(1, 5)), init("t", rand(5)),
             init("w3", rand(8, 5)), init("s3", rand(5))]
    proto = make(nodes, [vi("x", [3, 8]), vi("x3", [2, 3, 8])],
                 [vi("y", [3, 5]), vi("z", [2, 3, 5])], inits)
    model, stats = check(proto, "fold-affine")
    assert ops(model) == Counter({"Gemm": 1, "MatMul": 1})
    assert stats["affine_folded"] == 3


# ------------------------------------------------------------------ fuse-matmul-add


def test_matmul_add_to_gemm_2d_only() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["b", "m"], ["y"]),
             helper.make_node("MatMul", ["x3", "w3"], ["m3"]),
             helper.make_node("Add", ["m3", "b3"], ["z"])]
    inits = [init("w", rand(8, 5)), init("b", rand(1, 5)), init("w3", rand(8, 5)),
             init("b3", rand(5))]
    proto = make(nodes, [vi("x", [3, 8]), vi("x3", [2, 3, 8])],
                 [vi("y", [3, 5]), vi("z", [2, 3, 5])], inits)
    model, stats = check(proto, "fuse-matmul-add")
    assert ops(model) == Counter({"Gemm": 1, "MatMul": 1, "Add": 1})
    assert stats["matmul_add_to_gemm"] == 1


def test_matmul_add_refused_when_matmul_output_is_graph_output() -> None:
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["y"])]
    proto = make(nodes, [vi("x", [3, 8])], [vi("y", [3, 5]), vi("m", [3, 5])],
                 [init("w", rand(8, 5)), init("b", rand(5))])
    assert_unchanged(proto, "fuse-matmul-add")


# ------------------------------------------------------------------ fuse-pad


def pad_conv(pads: list[int], opset: int = 17, mode: str = "constant", value: float = 0.0,
             auto_pad: str | None = None, axes: list[int] | None = None) -> onnx.ModelProto:
    inits = [init("w", rand(4, 3, 3, 3, scale=0.3)), init("b", rand(4))]
    if opset < 11:
        pad = helper.make_node("Pad", ["x"], ["p"], mode=mode, pads=pads, value=value)
    else:
        inputs = ["x", "pads", "val"] + (["axes"] if axes else [])
        pad = helper.make_node("Pad", inputs, ["p"], mode=mode)
        inits += [init("pads", np.array(pads, np.int64)), init("val", np.array(value, np.float32))]
        if axes:
            inits.append(init("axes", np.array(axes, np.int64)))
    conv_kw = {"auto_pad": auto_pad} if auto_pad else {"pads": [1, 0, 1, 0]}
    conv = helper.make_node("Conv", ["p", "w", "b"], ["y"], kernel_shape=[3, 3], **conv_kw)
    out = helper.make_tensor_value_info("y", F, [1, 4, "h", "w"])
    return make([pad, conv], [vi("x", [1, 3, 8, 8])], [out], inits, opset)


@pytest.mark.parametrize("pads, opset, axes", [
    ([0, 0, 1, 2, 0, 0, 3, 0], 17, None),
    ([0, 0, 1, 1, 0, 0, 1, 1], 10, None),
    ([2, 1, 0, 1], 18, [2, 3]),
])
def test_fuse_pad_into_conv(pads, opset, axes) -> None:
    model, stats = check(pad_conv(pads, opset, axes=axes), "fuse-pad")
    assert ops(model) == Counter({"Conv": 1})
    assert stats["pads_fused"] == 1


@pytest.mark.parametrize("kw", [
    {"mode": "reflect"}, {"value": 1.0}, {"auto_pad": "SAME_UPPER"},
    {"pads": [0, 1, 1, 1, 0, 0, 1, 1]},  # pads the channel axis
])
def test_fuse_pad_refusals(kw: dict) -> None:
    pads = kw.pop("pads", [0, 0, 1, 1, 0, 0, 1, 1])
    if pads[1]:
        # a channel pad changes C: use a conv expecting 4 input channels
        proto = pad_conv(pads)
        proto.graph.initializer[0].CopyFrom(init("w", rand(4, 4, 3, 3, scale=0.3)))
    else:
        proto = pad_conv(pads, **kw)
    assert_unchanged(proto, "fuse-pad")


# ------------------------------------------------------------------ layout


def test_transpose_pairs() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 1, 2]),  # cancels
             helper.make_node("Relu", ["t2"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t3"], perm=[0, 2, 1, 3]),
             helper.make_node("Transpose", ["t3"], ["y"], perm=[3, 1, 2, 0])]   # merges
    proto = make(nodes, [vi("x", [1, 2, 3, 4])], [vi("y", [4, 3, 2, 1])])
    model, stats = check(proto, "fuse-transpose")
    assert ops(model) == Counter({"Relu": 1, "Transpose": 1})
    assert stats["transposes_fused"] == 2


def test_transpose_pair_with_shared_intermediate_kept() -> None:
    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[1, 0]),
             helper.make_node("Transpose", ["t1"], ["y"], perm=[1, 0]),
             helper.make_node("Relu", ["t1"], ["z"])]
    proto = make(nodes, [vi("x", [2, 3])], [vi("y", [2, 3]), vi("z", [3, 2])])
    assert_unchanged(proto, "fuse-transpose")


def test_identity_transpose_between_input_and_output_kept() -> None:
    proto = make([helper.make_node("Transpose", ["x"], ["y"], perm=[0, 1])],
                 [vi("x", [2, 3])], [vi("y", [2, 3])])
    assert_unchanged(proto, "fuse-transpose")


def test_reshape_pairs() -> None:
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["r1"]),
             helper.make_node("Reshape", ["r1", "s2"], ["y"]),
             helper.make_node("Flatten", ["x"], ["f"], axis=2),
             helper.make_node("Reshape", ["f", "s3"], ["z"])]
    inits = [init("s1", np.array([6, 4], np.int64)), init("s2", np.array([-1, 3, 2], np.int64)),
             init("s3", np.array([2, 12], np.int64))]
    proto = make(nodes, [vi("x", [2, 3, 4])], [vi("y", [4, 3, 2]), vi("z", [2, 12])], inits)
    model, stats = check(proto, "fuse-reshape")
    assert ops(model) == Counter({"Reshape": 2})
    assert stats["reshapes_fused"] == 2


def test_reshape_with_zero_copy_dim_kept() -> None:
    nodes = [helper.make_node("Reshape", ["x", "s1"], ["r1"]),
             helper.make_node("Reshape", ["r1", "s2"], ["y"])]
    inits = [init("s1", np.array([6, 4], np.int64)), init("s2", np.array([0, 2, 2], np.int64))]
    proto = make(nodes, [vi("x", [2, 3, 4])], [vi("y", [6, 2, 2])], inits)
    assert_unchanged(proto, "fuse-reshape")


# ------------------------------------------------------------------ horizontal


def test_horizontal_convs_merged() -> None:
    nodes = [helper.make_node("Conv", ["x", f"w{i}"] + (["b0"] if i == 0 else []), [f"y{i}"],
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1]) for i in range(3)]
    nodes.append(helper.make_node("Conv", ["x", "w3"], ["y3"], kernel_shape=[1, 1]))  # other k
    inits = [init(f"w{i}", rand(2 + i, 4, 3, 3, scale=0.3)) for i in range(3)]
    inits += [init("b0", rand(2)), init("w3", rand(5, 4, 1, 1))]
    outs = [vi(f"y{i}", [1, 2 + i, 6, 6]) for i in range(3)] + [vi("y3", [1, 5, 6, 6])]
    proto = make(nodes, [vi("x", [1, 4, 6, 6])], outs, inits)
    model, stats = check(proto, "fuse-horizontal")
    assert ops(model) == Counter({"Conv": 2, "Split": 1})
    assert stats["sibling_groups_fused"] == 1


def test_horizontal_grouped_or_shared_weight_convs_kept() -> None:
    nodes = [helper.make_node("Conv", ["x", f"w{i}"], [f"y{i}"], kernel_shape=[1, 1], group=2)
             for i in range(2)]
    inits = [init(f"w{i}", rand(4, 2, 1, 1)) for i in range(2)]
    outs = [vi(f"y{i}", [1, 4, 3, 3]) for i in range(2)]
    assert_unchanged(make(nodes, [vi("x", [1, 4, 3, 3])], outs, inits), "fuse-horizontal")
    nodes = [helper.make_node("MatMul", ["x", "w"], [f"y{i}"]) for i in range(2)]
    outs = [vi(f"y{i}", [3, 5]) for i in range(2)]
    proto = make(nodes, [vi("x", [3, 4])], outs, [init("w", rand(4, 5))])
    assert_unchanged(proto, "fuse-horizontal")


def qkv_model(with_bias: bool = True, out_is_graph_output: bool = False) -> onnx.ModelProto:
    nodes, inits = [], []
    for name in "qkv":
        mm_out = f"{name}_mm" if with_bias else f"{name}_p"
        nodes.append(helper.make_node("MatMul", ["x", f"w_{name}"], [mm_out]))
        inits.append(init(f"w_{name}", rand(16, 16, scale=0.25)))
        if with_bias:
            nodes.append(helper.make_node("Add", [mm_out, f"b_{name}"], [f"{name}_p"]))
            inits.append(init(f"b_{name}", rand(16)))
    nodes += [helper.make_node("Transpose", ["k_p"], ["kt"], perm=[0, 2, 1]),
              helper.make_node("MatMul", ["q_p", "kt"], ["s"]),
              helper.make_node("Softmax", ["s"], ["a"], axis=-1),
              helper.make_node("MatMul", ["a", "v_p"], ["y"])]
    outs = [vi("y", [2, 10, 16])] + ([vi("q_p", [2, 10, 16])] if out_is_graph_output else [])
    return make(nodes, [vi("x", [2, 10, 16])], outs, inits)


@pytest.mark.parametrize("with_bias, out_is_graph_output", [(True, False), (False, False),
                                                            (True, True)])
def test_horizontal_qkv(with_bias: bool, out_is_graph_output: bool) -> None:
    model, stats = check(qkv_model(with_bias, out_is_graph_output), "fuse-horizontal")
    counts = ops(model)
    assert counts["Split"] == 1 and counts["MatMul"] == 3  # 1 fused projection + 2 attention
    assert counts["Add"] == (1 if with_bias else 0)
    assert stats["sibling_groups_fused"] == 1


@pytest.mark.parametrize("trans_b", [0, 1])
def test_horizontal_gemms_merged(trans_b: int) -> None:
    nodes, inits = [], []
    for i, m in enumerate((3, 5, 4)):
        inputs = ["x", f"w{i}"] + ([f"c{i}"] if i != 1 else [])  # the middle one has no C
        nodes.append(helper.make_node("Gemm", inputs, [f"y{i}"], transB=trans_b, alpha=0.5,
                                      beta=2.0))
        inits.append(init(f"w{i}", rand(m, 6) if trans_b else rand(6, m)))
        if i != 1:
            inits.append(init(f"c{i}", rand(m) if i == 0 else rand(1, 1)))  # vector, scalar
    # a Gemm with other alpha is not merged with them
    nodes.append(helper.make_node("Gemm", ["x", "w9"], ["y9"], alpha=2.0))
    inits.append(init("w9", rand(6, 2)))
    outs = [vi(f"y{i}", [2, m]) for i, m in enumerate((3, 5, 4))] + [vi("y9", [2, 2])]
    model, stats = check(make(nodes, [vi("x", [2, 6])], outs, inits), "fuse-horizontal")
    assert ops(model) == Counter({"Gemm": 2, "Split": 1})
    assert stats["sibling_groups_fused"] == 1


# ------------------------------------------------------------------ patterns


def layernorm_model(opset: int = 17, square: str = "Pow", affine: bool = True,
                    axis: int = -1, d_output: bool = False,
                    gamma_shape: tuple[int, ...] = (16,)) -> onnx.ModelProto:
    def mean(inp, out):
        if opset >= 18:
            return helper.make_node("ReduceMean", [inp, "axes"], [out], keepdims=1)
        return helper.make_node("ReduceMean", [inp], [out], axes=[axis], keepdims=1)

    nodes = [mean("x", "mu"), helper.make_node("Sub", ["x", "mu"], ["d"])]
    if square == "Pow":
        nodes.append(helper.make_node("Pow", ["d", "two"], ["sq"]))
    else:
        nodes.append(helper.make_node("Mul", ["d", "d"], ["sq"]))
    nodes += [mean("sq", "var"), helper.make_node("Add", ["var", "eps"], ["ve"]),
              helper.make_node("Sqrt", ["ve"], ["sd"]),
              helper.make_node("Div", ["d", "sd"], ["n" if affine else "y"])]
    inits = [init("two", np.array(2.0, np.float32)), init("eps", np.array(1e-5, np.float32))]
    if opset >= 18:
        inits.append(init("axes", np.array([axis], np.int64)))
    if affine:
        nodes += [helper.make_node("Mul", ["n", "gamma"], ["m"]),
                  helper.make_node("Add", ["beta", "m"], ["y"])]
        inits += [init("gamma", rand(*gamma_shape)), init("beta", rand(1, 1, 16))]
    out_shape = [1] * (len(gamma_shape) - 3) + [2, 5, 16]
    outs = [vi("y", out_shape)] + ([vi("d", [2, 5, 16])] if d_output else [])
    return make(nodes, [vi("x", [2, 5, 16])], outs, inits, opset)


@pytest.mark.parametrize("opset, square, affine", [
    (17, "Pow", True), (18, "Mul", True), (17, "Pow", False),
])
def test_fuse_layernorm(opset: int, square: str, affine: bool) -> None:
    model, stats = check(layernorm_model(opset, square, affine), "fuse-layernorm", rtol=1e-4)
    assert ops(model) == Counter({"LayerNormalization": 1})
    assert stats["layernorm_fused"] == 1


@pytest.mark.parametrize("kw", [{"opset": 13}, {"axis": 1}, {"d_output": True},
                                {"gamma_shape": (1, 1, 1, 16)}])
def test_fuse_layernorm_refusals(kw: dict) -> None:
    assert_unchanged(layernorm_model(**kw), "fuse-layernorm")


def gelu_model(form: str, opset: int = 20, bracket: str = "x_first") -> onnx.ModelProto:
    inits = [init("one", np.array(1.0, np.float32)), init("half", np.array(0.5, np.float32))]
    if form == "erf":
        nodes = [helper.make_node("Div", ["x", "sqrt2"], ["h"]),
                 helper.make_node("Erf", ["h"], ["e"])]
        inits.append(init("sqrt2", np.array(np.sqrt(2.0), np.float32)))
    else:
        nodes = [helper.make_node("Mul", ["x", "x"], ["x2"]),
                 helper.make_node("Mul", ["x2", "x"], ["x3"]),
                 helper.make_node("Mul", ["c1", "x3"], ["cx3"]),
                 helper.make_node("Add", ["x", "cx3"], ["inner"]),
                 helper.make_node("Mul", ["inner", "c2"], ["scaled"]),
                 helper.make_node("Tanh", ["scaled"], ["e"])]
        inits += [init("c1", np.array(0.044715, np.float32)),
                  init("c2", np.array(np.sqrt(2 / np.pi), np.float32))]
    nodes.append(helper.make_node("Add", ["e", "one"], ["a"]))
    if bracket == "x_first":
        nodes += [helper.make_node("Mul", ["x", "a"], ["xa"]),
                  helper.make_node("Mul", ["xa", "half"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["x", "half"], ["xh"]),
                  helper.make_node("Mul", ["xh", "a"], ["y"])]
    nodes.append(helper.make_node("Relu", ["x"], ["z"]))  # x has another reader: fine
    return make(nodes, [vi("x", [3, 7])], [vi("y", [3, 7]), vi("z", [3, 7])], inits, opset)


@pytest.mark.parametrize("form, bracket", [("erf", "x_first"), ("erf", "half_first"),
                                           ("tanh", "x_first"), ("tanh", "half_first")])
def test_fuse_gelu(form: str, bracket: str) -> None:
    model, stats = check(gelu_model(form, 20, bracket), "fuse-gelu", rtol=1e-4)
    assert ops(model) == Counter({"Gelu": 1, "Relu": 1})
    gelu = next(n for n in model.graph if n.op_type == "Gelu")
    assert gelu.attributes["approximate"].value == ("none" if form == "erf" else "tanh")
    assert stats["gelu_fused"] == 1


def test_fuse_gelu_refused_below_opset_20() -> None:
    assert_unchanged(gelu_model("erf", 17), "fuse-gelu")


def test_fuse_gelu_refused_when_a_constant_raises_the_rank() -> None:
    proto = gelu_model("erf", 20)
    half = next(t for t in proto.graph.initializer if t.name == "half")
    half.CopyFrom(init("half", np.full((1, 1, 1), 0.5, np.float32)))
    proto.graph.output[0].CopyFrom(vi("y", [1, 3, 7]))
    assert_unchanged(proto, "fuse-gelu")


# ------------------------------------------------------------------ whole pipeline


def test_fuse_conv_bn_pad_affine_pipeline() -> None:
    """Pad -> Conv(no bias) -> BN -> Mul -> Relu, then Transpose pair: all folded by `fuse`."""
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"]),
             helper.make_node("Conv", ["p", "w"], ["c"], kernel_shape=[3, 3]),
             bn("c", "n", "bn"),
             helper.make_node("Mul", ["n", "k"], ["m"]),
             helper.make_node("Relu", ["m"], ["r"]),
             helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Transpose", ["t"], ["y"], perm=[0, 3, 1, 2])]
    inits = [init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)),
             init("w", rand(6, 3, 3, 3, scale=0.3)), init("k", rand(1, 6, 1, 1))]
    inits += bn_inits("bn", 6)
    proto = make(nodes, [vi("x", [1, 3, 8, 8])], [vi("y", [1, 6, 8, 8])], inits)
    model, stats = check(proto, "fuse")
    assert ops(model) == Counter({"Conv": 1, "Relu": 1})
    assert (stats["bn_folded"], stats["pads_fused"], stats["affine_folded"],
            stats["transposes_fused"]) == (1, 1, 1, 1)
    model, _ = check(proto, "cleanup,fuse")
    assert ops(model) == Counter({"Conv": 1, "Relu": 1})


# ------------------------------------------------------------------ real models


def zoo_feeds(name: str) -> dict[str, np.ndarray]:
    """Inputs that give meaningful outputs (`onnxforge.sample_inputs.zoo_feeds`): shipped
    samples, text-like images for the OCR models (random noise drives their outputs to
    ~0, where relative errors mean nothing), uniform values in the manifest's range
    otherwise."""
    from conftest import ZOO, zoo_manifest

    return zoo_feeds_of(name, zoo_manifest()["models"][name], ZOO)


# (model, ops that must be gone after cleanup,fuse)
ZOO_CASES = [
    ("resnet18", {"BatchNormalization"}),
    ("mobilenet_v2", {"BatchNormalization"}),
    ("mobilenet_v3_small", {"BatchNormalization"}),
    ("efficientnet_b0", {"BatchNormalization"}),
    ("squeezenet1_1", set()),
    ("minilm_l6", set()),
    ("ppocr_det", {"BatchNormalization"}),
    ("ppocr_rec", {"BatchNormalization"}),
    ("ppocr_cls", {"BatchNormalization"}),
    ("digits_cnn", {"BatchNormalization"}),
]


@pytest.mark.parametrize("name, gone", ZOO_CASES, ids=[c[0] for c in ZOO_CASES])
def test_zoo_model_cleanup_fuse(name: str, gone: set[str]) -> None:
    from conftest import zoo_input_shapes, zoo_path

    path = zoo_path(name)
    original = load_model(path)
    model = load_model(path)
    shapes = zoo_input_shapes(name)
    model, _ = PassManager("cleanup,fuse", PassContext(input_shapes=shapes)).run(model)
    feeds = zoo_feeds(name)
    ref, got = run(original, feeds), run(model, feeds)
    for a, b in zip(ref, got):
        assert a.shape == b.shape
        assert np.abs(a).max() > 1e-3  # the inputs drive the model to meaningful outputs
        rel = np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(a.astype(np.float64))
        assert rel <= 1e-4, (name, rel)
    before, after = ops(original), ops(model)
    assert not gone & set(after), after
    assert sum(after.values()) <= sum(before.values())
    if gone:
        assert sum(after.values()) < sum(before.values())


def test_fuse_alone_folds_every_batchnorm_of_resnet18() -> None:
    """`fuse` without cleanup (onnxsim also folds BN) must fold all 20 BN itself."""
    from conftest import zoo_path

    path = zoo_path("resnet18")
    original, model = load_model(path), load_model(path)
    model, steps = PassManager("fuse", PassContext()).run(model)
    assert steps[0].stats["bn_folded"] == ops(original)["BatchNormalization"] == 20
    assert ops(model)["BatchNormalization"] == 0
    feeds = zoo_feeds("resnet18")
    a, b = run(original, feeds)[0], run(model, feeds)[0]
    assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 1e-5


def test_minilm_qkv_projections_merged() -> None:
    from conftest import zoo_path

    path = zoo_path("minilm_l6")
    original, model = load_model(path), load_model(path)
    model, steps = PassManager("fuse", PassContext()).run(model)
    layers = 6
    assert steps[0].stats["sibling_groups_fused"] == layers
    assert ops(model)["MatMul"] == ops(original)["MatMul"] - 2 * layers
    feeds = zoo_feeds("minilm_l6")
    for a, b in zip(run(original, feeds), run(model, feeds)):
        assert np.linalg.norm(a - b) / np.linalg.norm(a) <= 1e-5


def test_cli_optimize_with_fusion_pipeline(tmp_path) -> None:
    """`onnxforge optimize -p "cleanup(onnxsim=false),fuse"` as a user runs it."""
    import json
    import subprocess
    import sys

    src, out, report = tmp_path / "convbn.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    proto = conv_bn(group=2, bias=False)
    onnx.save(proto, src)
    result = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", str(src), "-o", str(out), "-p",
         "cleanup(onnxsim=false),fuse", "--report", str(report), "--no-latency"],
        check=False, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    data = json.loads(report.read_text())
    assert [s["pass"] for s in data["steps"]] == ["cleanup(onnxsim=false)", "fuse"]
    assert data["steps"][1]["stats"]["bn_folded"] == 1
    assert data["error"]["max_rel_l2"] < 1e-5
    optimized = load_model(out)
    assert ops(optimized) == Counter({"Conv": 1})
    feeds = feeds_for(proto)
    np.testing.assert_allclose(run(optimized, feeds)[0], run(load_model(proto), feeds)[0],
                               rtol=1e-5, atol=1e-5)
