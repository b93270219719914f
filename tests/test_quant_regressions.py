"""Regressions from issue 19 (pretrained OCR models on a first run).

1. Names invented by quantize (`<x>_quantized`, `<x>_dequantized`, `<x>_scale`, ...)
   collided with names already in the model: `ValueError: Output '..._dequantized' is
   redeclared`. On PP-OCRv4 rec, a constant shared by two int8 Add/Mul ops got two
   DequantizeLinear nodes with one output name; a model may also simply hold a tensor
   named like a quantize output. Every invented name now comes from
   `onnxforge.passes.naming.NameAllocator`.
2. `cleanup` on an int8 QDQ model changed its outputs (relative L2 8e-4 on PP-OCR rec):
   see the cleanup tests at the end of this file.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import make_model
from conftest import zoo_input_shapes, zoo_path
from onnx import TensorProto, helper, numpy_helper
from onnxforge.calibration import RandomSource
from onnxforge.ir import load_model, to_proto
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.passes.naming import NameAllocator, collect_names
from onnxforge.shapes import input_dtypes, resolve_input_shapes
from onnxforge.verify import compare_models

# ---------------------------------------------------------------- helpers


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    m = make_model(nodes, inputs, outputs, inits, opset)
    onnx.checker.check_model(m)
    return m


def _f32(name: str, arr) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _run(proto_or_model, pipeline: str, shapes=None, batches: int = 8):
    model = load_model(proto_or_model)
    shapes = shapes or resolve_input_shapes(model)
    source = RandomSource(shapes, input_dtypes(model), count=batches, seed=1)
    ctx = PassContext(calibration=source, input_shapes=shapes, threads=1,
                      max_calibration_batches=batches)
    out, steps = PassManager(pipeline, ctx).run(model)
    return out, steps


def _error(reference, model, shapes=None, batches: int = 4) -> float:
    reference = load_model(reference)
    shapes = shapes or resolve_input_shapes(reference)
    source = RandomSource(shapes, input_dtypes(reference), count=batches, seed=99)
    return compare_models(reference, model, source, limit=batches).max_rel_l2


def _assert_unique_names(model: ir.Model) -> list[str]:
    """Every value is assigned once (what ONNX requires) and the model round-trips."""
    proto = to_proto(model)
    onnx.checker.check_model(proto)
    assigned = [o for n in proto.graph.node for o in n.output if o]
    assigned += [i.name for i in proto.graph.initializer]
    assigned += [i.name for i in proto.graph.input]
    dup = [k for k, c in Counter(assigned).items() if c > 1]
    assert not dup, f"names assigned twice: {dup[:5]}"
    ir.from_proto(proto)  # the exact call that raised "redeclared" in issue 19
    return assigned


def colliding_model() -> onnx.ModelProto:
    """A graph already holding the names quantize would invent for its tensors:
    `w_dequantized` and `x_dequantized` are activations, `w_quantized` is a float
    weight, `x_quantized` a Conv output, `qscale` an initializer; and the constant `k`
    is shared by two int8 element-wise ops (the PP-OCR rec case)."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["w_dequantized"], name="conv0", pads=[1] * 4),
        helper.make_node("Relu", ["w_dequantized"], ["x_dequantized"], name="x_DequantizeLinear"),
        helper.make_node("Conv", ["x_dequantized", "w_quantized", "qscale"], ["x_quantized"],
                         name="conv1", pads=[1] * 4),
        helper.make_node("Sigmoid", ["x_quantized"], ["s"], name="sigmoid"),
        helper.make_node("Add", ["s", "k"], ["a"], name="add"),
        helper.make_node("Mul", ["a", "k"], ["y"], name="mul"),
    ]
    inits = [
        _f32("w", rng.standard_normal((8, 3, 3, 3)) * 0.3),
        _f32("b", rng.standard_normal(8) * 0.1),
        _f32("w_quantized", rng.standard_normal((8, 8, 3, 3)) * 0.15),
        _f32("qscale", rng.standard_normal(8) * 0.1),
        _f32("k", np.full((1, 8, 1, 1), 0.5)),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 8])], inits)


def neutral_names(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`colliding_model` with names quantize never invents."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    ren = {"w_dequantized": "c0", "x_dequantized": "r0", "w_quantized": "w1",
           "x_quantized": "c1", "qscale": "b1"}
    for n in proto.graph.node:
        n.input[:] = [ren.get(i, i) for i in n.input]
        n.output[:] = [ren.get(o, o) for o in n.output]
    for t in proto.graph.initializer:
        t.name = ren.get(t.name, t.name)
    return proto


# ---------------------------------------------------------------- the allocator


def test_name_allocator_avoids_every_kind_of_existing_name():
    proto = colliding_model()
    # a subgraph value: names are unique across scopes too
    then = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["inner_value"])], "then", [],
        [helper.make_tensor_value_info("inner_value", TensorProto.FLOAT, None)])
    proto.graph.node.append(helper.make_node("If", ["cond"], ["if_out"], name="if_node",
                                             then_branch=then, else_branch=then))
    graph = ir.from_proto(proto).graph
    values, nodes = collect_names(graph)
    assert {"x", "y", "w", "w_quantized", "x_dequantized", "inner_value", "cond"} <= values
    assert {"conv0", "x_DequantizeLinear", "if_node"} <= nodes
    names = NameAllocator(graph)
    assert names.value("x_dequantized") == "x_dequantized_1"
    assert names.value("x_dequantized") == "x_dequantized_2"  # reserved once handed out
    assert names.value("inner_value") == "inner_value_1"
    assert names.value("cond") == "cond_1"                    # a graph input
    assert names.value("w_quantized") == "w_quantized_1"      # an initializer
    assert names.value("fresh") == "fresh"
    assert names.node("conv0") == "conv0_1"
    assert names.node("x_dequantized") == "x_dequantized"     # separate namespaces
    node = names.make_node("Relu", [graph.inputs[0]], name="x_DequantizeLinear")
    assert node.name == "x_DequantizeLinear_1"
    assert node.outputs[0].name == "x_DequantizeLinear_1_out"
    init = names.initializer("qscale", np.array(0.5, np.float32))
    assert init.name == "qscale_1" and init.const_value.shape.dims == ()
    assert graph.initializers["qscale_1"] is init


# ---------------------------------------------------------------- quantize collisions


@pytest.mark.parametrize("pipeline", [
    "quantize(int8)",
    "cleanup,quantize(int8)",
    "cleanup,fuse,quantize(int8,calibration=entropy)",
    "quantize(int8,activations=s8,per_channel=false)",
])
def test_quantize_with_names_it_would_invent_already_taken(pipeline):
    proto = colliding_model()
    model, _ = _run(proto, pipeline)
    names = _assert_unique_names(model)
    ops = Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] >= 2 and ops["DequantizeLinear"] >= 4
    # the shared constant `k` feeds two int8 ops: two DQ outputs, two distinct names
    k_dq = [n.outputs[0].name for n in model.graph
            if n.op_type == "DequantizeLinear" and n.name.startswith("k_")]
    assert len(k_dq) == 2 and len(set(k_dq)) == 2
    # the pre-existing names are still there, untouched, and new ones got suffixes
    assert {"x", "y", "w_dequantized", "x_quantized"} <= set(names)
    q_x = [n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "x"]
    assert len(q_x) == 1
    dq_x = q_x[0].outputs[0].consumers()[0]
    assert dq_x.op_type == "DequantizeLinear"
    assert q_x[0].outputs[0].name == "x_quantized_1" and dq_x.outputs[0].name == "x_dequantized_1"
    assert [v.name for v in model.graph.outputs] == ["y"]
    # names change nothing numerically: same error as the model with neutral names
    neutral, _ = _run(neutral_names(proto), pipeline)
    err = _error(proto, model)
    assert err == pytest.approx(_error(neutral_names(proto), neutral), rel=1e-5, abs=1e-7)
    if "entropy" not in pipeline:  # (entropy clips this tiny random-data model hard)
        assert err < 0.05, err


def test_quantize_twice_reuses_no_name():
    """Quantizing an already quantized model: every `_quantized`/`_dequantized` exists."""
    proto = colliding_model()
    once, _ = _run(proto, "quantize(int8)")
    twice, _ = _run(to_proto(once), "quantize(int8)")
    _assert_unique_names(twice)
    assert _error(proto, twice) < 0.05


@pytest.mark.parametrize("pipeline", ["quantize(mode=dynamic)", "quantize(mode=fp16)"])
def test_dynamic_and_fp16_modes_with_taken_names(pipeline):
    rng = np.random.default_rng(1)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm_W_quantized"], name="mm"),
        helper.make_node("Relu", ["mm_W_quantized"], ["W_fp16"], name="mm_rescale"),
        helper.make_node("MatMul", ["W_fp16", "W2"], ["y"], name="mm2"),
    ]
    inits = [_f32("W", rng.standard_normal((16, 16)) * 0.2),
             _f32("W2", rng.standard_normal((16, 4)))]
    proto = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])], inits)
    model, _ = _run(proto, pipeline)
    _assert_unique_names(model)
    assert _error(proto, model) < 0.05


def test_ppocr_rec_cleanup_quantize_int8():
    """The issue's command on the real recognizer (zoo): it crashed with
    `Output 'p2o.helper.constant.169_dequantized' is redeclared`."""
    path = zoo_path("ppocr_rec")
    shapes = zoo_input_shapes("ppocr_rec")
    model, _ = _run(path, "cleanup,quantize(int8)", shapes=shapes, batches=2)
    _assert_unique_names(model)
    ops = Counter(n.op_type for n in model.graph)
    assert ops["QuantizeLinear"] > 50 and ops["DequantizeLinear"] > 100
    # p2o.helper.constant.169 is read by two int8 ops: two DQs with distinct names
    dq = [n.outputs[0].name for n in model.graph if n.op_type == "DequantizeLinear"
          and n.inputs[0].name.startswith("p2o.helper.constant.169_quantized")]
    assert len(dq) == len(set(dq)) >= 2
    out = to_proto(model).graph.output[0]
    assert out.name == "softmax_11.tmp_0"
    # A CTC recognizer quantized on random inputs: per-frame class distributions stay close.
    err = _error(path, model, shapes=shapes, batches=2)
    assert err < 0.6, err


# ---------------------------------------------------------------- cleanup on QDQ models


def _ort(model, feeds, *, optimized: bool = True) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 1
    if not optimized:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(to_proto(load_model(model)).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _cleanup_verified(model, shapes, pipeline: str = "cleanup"):
    """cleanup under the pass manager's exact check (stops past rel L2 1e-4)."""
    model = load_model(model)
    source = RandomSource(shapes, input_dtypes(model), count=4, seed=3)
    ctx = PassContext(input_shapes=shapes, threads=1)
    out, steps = PassManager(pipeline, ctx, verify_source=source).run(model)
    return out, steps[0]


def _weight_dqs(model) -> list:
    """DequantizeLinear nodes whose quantized input is a constant (weights, biases)."""
    from onnxforge.ir import constant_array

    return [n for n in model.graph if n.op_type == "DequantizeLinear"
            and constant_array(n.inputs[0]) is not None]


def qdq_conv_model(opset: int = 21) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv(DQ(int8 W, per-channel), DQ(int32 bias)) -> Q -> DQ -> y,
    the form quantize and onnxruntime's quantize_static write; opset >= 19 is where
    onnx.reference can evaluate DequantizeLinear, i.e. where cleanup used to fold it."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (8, 3, 3, 3)).astype(np.int8)
    w_scale = (rng.random(8) * 0.01 + 0.002).astype(np.float32)
    x_scale, y_scale = np.float32(1 / 255), np.float32(0.02)
    bias = rng.integers(-2000, 2000, 8).astype(np.int32)
    inits = [
        numpy_helper.from_array(np.array(x_scale), "x_scale"),
        numpy_helper.from_array(np.array(0, np.uint8), "x_zp"),
        numpy_helper.from_array(w, "w_q"),
        numpy_helper.from_array(w_scale, "w_scale"),
        numpy_helper.from_array(np.zeros(8, np.int8), "w_zp"),
        numpy_helper.from_array(bias, "b_q"),
        numpy_helper.from_array((x_scale * w_scale).astype(np.float32), "b_scale"),
        numpy_helper.from_array(np.zeros(8, np.int32), "b_zp"),
        numpy_helper.from_array(np.array(y_scale), "y_scale"),
        numpy_helper.from_array(np.array(128, np.uint8), "y_zp"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["xq"], name="qx"),
        helper.make_node("DequantizeLinear", ["xq", "x_scale", "x_zp"], ["xd"], name="dqx"),
        helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["wd"], name="dqw",
                         axis=0),
        helper.make_node("DequantizeLinear", ["b_q", "b_scale", "b_zp"], ["bd"], name="dqb",
                         axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv", pads=[1] * 4),
        helper.make_node("QuantizeLinear", ["c", "y_scale", "y_zp"], ["cq"], name="qc"),
        helper.make_node("DequantizeLinear", ["cq", "y_scale", "y_zp"], ["y"], name="dqc"),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 16, 16])],
                  inits, opset=opset)


@pytest.mark.parametrize("opset", [13, 21])
@pytest.mark.parametrize("pipeline", ["cleanup", "cleanup(onnxsim=false)"])
def test_cleanup_keeps_qdq_units_of_a_hand_built_model(opset, pipeline):
    proto = qdq_conv_model(opset)
    out, step = _cleanup_verified(proto, {"x": (1, 3, 16, 16)}, pipeline)
    ops = Counter(n.op_type for n in out.graph)
    assert ops["QuantizeLinear"] == 2 and ops["DequantizeLinear"] == 4 and ops["Conv"] == 1
    weights = {n.name: n.inputs[0].const_value.numpy() for n in _weight_dqs(out)}
    assert len(weights) == 2
    assert sorted(str(a.dtype) for a in weights.values()) == ["int32", "int8"]
    # bit-identical with onnxruntime's int8 fusion (QLinearConv) on and off
    feeds = {"x": np.random.default_rng(1).random((1, 3, 16, 16), dtype=np.float32)}
    for optimized in (True, False):
        np.testing.assert_array_equal(_ort(out, feeds, optimized=optimized)[0],
                                      _ort(proto, feeds, optimized=optimized)[0])
    assert step.error is None or step.error.max_rel_l2 == 0.0


def test_cleanup_on_quantized_ppocr_rec_is_exact():
    """Issue 19: `-p cleanup` on the int8 QDQ recognizer stopped with "exact pass
    cleanup changed the outputs". At opset >= 19 cleanup folded every weight's
    DequantizeLinear into a float weight: onnxruntime then ran those Conv/MatMul in
    float instead of int8 (rel L2 0.155 vs the int8 model) and the file grew."""
    from onnx import version_converter

    path = zoo_path("ppocr_rec")
    shapes = zoo_input_shapes("ppocr_rec")
    quantized, _ = _run(path, "cleanup,quantize(int8)", shapes=shapes, batches=2)
    proto = version_converter.convert_version(to_proto(quantized), 21)
    before = load_model(proto)
    n_weight_dq = len(_weight_dqs(before))
    assert n_weight_dq > 50
    out, step = _cleanup_verified(proto, shapes)  # raised VerificationError before the fix
    assert step.error is not None and step.error.max_rel_l2 < 1e-5, step.error
    assert len(_weight_dqs(out)) >= n_weight_dq - 2  # (CSE may merge identical ones)
    ops_before = Counter(n.op_type for n in before.graph)
    ops_after = Counter(n.op_type for n in out.graph)
    assert ops_after["QuantizeLinear"] == ops_before["QuantizeLinear"]
    int8_bytes = sum(v.const_value.nbytes for v in out.graph.initializers.values()
                     if v.const_value is not None and v.const_value.dtype == ir.DataType.INT8)
    assert int8_bytes > 2_000_000  # the 2.7 M weights stayed int8


def test_pad_with_axes_is_expanded_so_onnxruntime_runs_the_qdq_model():
    """Fuzzer find: Conv > Pad(axes=[2, 3], edge) > Conv quantized ran in onnxruntime
    only without its layout transformer (level ALL failed: "Gather ... indices element
    out of data bounds"). quantize now writes the Pad with pads for every axis."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4, 3, 3)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.array([1, 2, 1, 0], np.int64), "pads"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes"),
             numpy_helper.from_array(rng.standard_normal((8, 8, 2, 2)).astype(np.float32), "w2")]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[3, 3]),
             helper.make_node("Pad", ["c1", "pads", "", "axes"], ["p"], mode="edge"),
             helper.make_node("Conv", ["p", "w2"], ["y"], kernel_shape=[2, 2])]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 9, 11])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8, 10])],
                   inits, opset=18)
    shapes = {"x": (1, 4, 9, 11)}
    context = PassContext(calibration=RandomSource(shapes, {"x": np.dtype(np.float32)}),
                          input_shapes=shapes)
    working, _ = PassManager("quantize(int8)", context).run(load_model(model))
    quantized = to_proto(working)
    pads = [n for n in quantized.graph.node if n.op_type == "Pad"]
    assert len(pads) == 1 and len(pads[0].input) <= 3  # no axes input
    full = numpy_helper.to_array(next(t for t in quantized.graph.initializer
                                      if t.name == pads[0].input[1]))
    assert full.tolist() == [0, 0, 1, 2, 0, 0, 1, 0]
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(quantized.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    x = rng.standard_normal((1, 4, 9, 11)).astype(np.float32)
    got = session.run(None, {"x": x})[0]
    reference = ort.InferenceSession(model.SerializeToString(),
                                     providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert np.linalg.norm(got - reference) / np.linalg.norm(reference) < 0.05
