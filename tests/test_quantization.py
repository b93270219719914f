"""quantize: static INT8 QDQ, observers, repair, dynamic and fp16 modes.

Hand-built graphs cover the structural hard cases (conv+relu chains, a residual Add
whose input is shared, Concat, Gemm transB, 3-D MatMul, keep_float); every case
asserts the output error against the float model on held-out inputs AND the graph
structure, including the graph onnxruntime actually runs after its QDQ fusions.
Real models are compared with onnxruntime's own `quantize_static`.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import DATA, zoo_input_shapes, zoo_path
from onnx import TensorProto, helper, numpy_helper
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import ArraySource, RandomSource, open_calibration
from onnxforge.ir import constant_array, load_model, to_proto
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.passes.quantization.observers import (
    Histogram,
    TensorObserver,
    choose_range,
    kl_threshold,
)
from onnxforge.passes.quantization.repair import equalize_model
from onnxforge.sample_inputs import recognizer_lines
from onnxforge.shapes import input_dtypes
from onnxforge.verify import compare_models

RNG = np.random.default_rng(0)


# ---------------------------------------------------------------- helpers


def _init(name: str, arr: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name)


def _model(nodes, inputs, outputs, inits, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _conv(name, x, y, cin, cout, k=3, scale=None, relu=True, group=1, rng=None):
    rng = rng or RNG
    w = rng.standard_normal((cout, cin // group, k, k)).astype(np.float32)
    w *= (scale if scale is not None else np.sqrt(2.0 / (cin // group * k * k)))
    b = rng.standard_normal(cout).astype(np.float32) * 0.1
    nodes = [helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [f"{name}.out" if relu else y],
                              name=name, pads=[k // 2] * 4, group=group)]
    if relu:
        nodes.append(helper.make_node("Relu", [f"{name}.out"], [y], name=f"{name}.relu"))
    return nodes, [_init(f"{name}.w", w), _init(f"{name}.b", b)]


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def conv_chain(n_convs: int = 3, channels: int = 8, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    cin = 3
    for i in range(n_convs):
        last = i == n_convs - 1
        y = "y" if last else f"a{i}"
        ns, ins = _conv(f"conv{i}", x, y, cin, channels, relu=not last, rng=rng)
        nodes += ns
        inits += ins
        x, cin = y, channels
    return _model(nodes, [_vi("x", [1, 3, 16, 16])], [_vi("y", [1, channels, 16, 16])], inits)


def quantize(proto, pipeline: str, *, calib=None, shapes=None, batches: int = 16):
    model = load_model(proto)
    reference = load_model(model)
    source = calib or RandomSource(shapes or _shapes(model), input_dtypes(model), count=batches,
                                   seed=1)
    ctx = PassContext(calibration=source, input_shapes=shapes or {}, threads=1,
                      max_calibration_batches=batches)
    quantized, steps = PassManager(pipeline, ctx).run(model)
    return reference, quantized, steps[-1].stats


def _shapes(model):
    from onnxforge.shapes import resolve_input_shapes

    return resolve_input_shapes(model)


def held_out_error(reference, quantized, batches: int = 4) -> float:
    source = RandomSource(_shapes(reference), input_dtypes(reference), count=batches, seed=99)
    return compare_models(reference, quantized, source, limit=batches).max_rel_l2


def op_counts(model) -> Counter:
    return Counter(n.op_type for n in model.graph)


def ort_optimized_ops(model, tmp_path: Path) -> Counter:
    """Op types of the graph onnxruntime runs after its (QDQ-fusing) optimizations."""
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(to_proto(model).SerializeToString(), opts,
                         providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


def q_nodes_reading(model, value_name: str) -> list:
    return [n for n in model.graph
            if n.op_type == "QuantizeLinear" and n.inputs[0].name == value_name]


# ---------------------------------------------------------------- observers


def test_histogram_merging_keeps_every_count_and_matches_numpy():
    h = Histogram(max_bins=256)
    data = [RNG.standard_normal(5000) * s for s in (0.1, 1.0, 10.0, 3.0)]
    for d in data:
        h.add(d)
    allx = np.concatenate(data)
    assert h.counts.sum() == allx.size
    assert h.counts.size <= 257
    ref, _ = np.histogram(allx, bins=h.edges)
    # Bins are exact merges of finer zero-aligned bins: identical to numpy's counts.
    assert np.abs(ref - h.counts).sum() <= 2  # values exactly on an edge
    assert h.min == pytest.approx(allx.min()) and h.max == pytest.approx(allx.max())


def test_percentile_entropy_mse_clip_outliers_minmax_does_not():
    x = RNG.standard_normal(200_000).astype(np.float32)
    x[:20] = 60.0  # rare outliers
    obs = {m: TensorObserver(m) for m in ("minmax", "percentile", "entropy", "mse")}
    for chunk in np.array_split(x, 10):
        for o in obs.values():
            o.add(chunk)
    ranges = {m: choose_range(o, "s8", symmetric=True) for m, o in obs.items()}
    assert ranges["minmax"].hi == pytest.approx(60.0)
    assert ranges["percentile"].hi < 6.0
    assert ranges["entropy"].hi < 20.0
    p9999 = np.percentile(x, 99.99)
    assert abs(ranges["percentile"].hi - max(p9999, -np.percentile(x, 0.01))) < 0.1

    def mse(r):
        return float(np.mean((r.fake_quant(x) - x) ** 2))

    # MSE-optimal range is by construction no worse than min-max on this data.
    assert mse(ranges["mse"]) <= mse(ranges["minmax"]) * 1.01


def test_kl_threshold_keeps_full_range_for_uniform_data():
    hist = np.ones(1024)
    assert kl_threshold(hist, 128) >= 1000


def test_one_sided_range_puts_zero_point_at_grid_minimum():
    o = TensorObserver("minmax")
    o.add(np.abs(RNG.standard_normal(1000)))
    u8 = choose_range(o, "u8", symmetric=False, one_sided=True)
    s8 = choose_range(o, "s8", symmetric=True, one_sided=True)
    assert (u8.zero_point, u8.qmin) == (0, 0)
    assert (s8.zero_point, s8.qmin) == (-128, -128)


# ---------------------------------------------------------------- hand-built graphs


def test_conv_relu_chain_folds_relu_and_fuses_to_qlinearconv(tmp_path):
    ref, q, stats = quantize(conv_chain(3), "quantize(int8)")
    counts = op_counts(q)
    assert counts["Relu"] == 0 and stats["relu_folded"] == 2
    # one Q per quantized activation: input, conv0 out, conv1 out, conv2 out
    assert counts["QuantizeLinear"] == 4
    assert stats["bias_int32"] == 3
    err = held_out_error(ref, q)
    assert err < 0.03, err
    fused = ort_optimized_ops(q, tmp_path)
    assert fused["QLinearConv"] == 3 and fused["Conv"] == 0
    assert fused["DequantizeLinear"] <= 1 and fused["QuantizeLinear"] <= 1


def test_bias_is_int32_with_scale_input_times_weight(tmp_path):
    _, q, _ = quantize(conv_chain(1), "quantize(int8)")
    conv = next(n for n in q.graph if n.op_type == "Conv")
    x_dq, w_dq, b_dq = (v.producer() for v in conv.inputs)
    assert constant_array(b_dq.inputs[0]).dtype == np.int32
    s_in = constant_array(x_dq.inputs[1])
    s_w = constant_array(w_dq.inputs[1])
    assert constant_array(w_dq.inputs[0]).dtype == np.int8 and s_w.shape == (8,)  # per-channel
    np.testing.assert_allclose(constant_array(b_dq.inputs[1]), np.float32(s_in) * s_w, rtol=1e-6)
    assert int(np.abs(constant_array(w_dq.inputs[0])).max()) == 127  # symmetric, full range


def test_residual_add_shares_one_qdq_pair(tmp_path):
    # x -> conv1 -> relu -> a ; a -> conv2 -> b ; add(a, b) -> relu -> conv3 -> y
    n1, i1 = _conv("c1", "x", "a", 3, 8)
    n2, i2 = _conv("c2", "a", "b", 8, 8, relu=False)
    n3, i3 = _conv("c3", "s", "y", 8, 4, relu=False)
    nodes = n1 + n2 + [helper.make_node("Add", ["a", "b"], ["sum"], name="add"),
                       helper.make_node("Relu", ["sum"], ["s"], name="add_relu")] + n3
    proto = _model(nodes, [_vi("x", [1, 3, 12, 12])], [_vi("y", [1, 4, 12, 12])], i1 + i2 + i3)
    ref, q, stats = quantize(proto, "quantize(int8)")
    # `a` is consumed by conv2 and by the Add: a single Q/DQ pair (on c1's output, Relu folded).
    qs = q_nodes_reading(q, "c1.out")
    assert len(qs) == 1
    dq_out = next(iter(qs[0].outputs[0].consumers())).outputs[0]
    consumers = {n.op_type for n in dq_out.consumers()}
    assert consumers == {"Conv", "Add"}
    assert op_counts(q)["Relu"] == 0 and stats["relu_folded"] == 2
    assert held_out_error(ref, q) < 0.03
    fused = ort_optimized_ops(q, tmp_path)
    assert fused["QLinearAdd"] == 1 and fused["QLinearConv"] == 3 and fused["Add"] == 0


def test_concat_and_maxpool_share_scales_no_requantization(tmp_path):
    n1, i1 = _conv("c1", "x", "a", 3, 4)
    n2, i2 = _conv("c2", "x", "b", 3, 4)
    n3, i3 = _conv("c3", "p", "y", 8, 4, relu=False)
    nodes = n1 + n2 + [helper.make_node("Concat", ["a", "b"], ["cat"], axis=1, name="cat"),
                       helper.make_node("MaxPool", ["cat"], ["p"], kernel_shape=[2, 2],
                                        strides=[2, 2], name="pool")] + n3
    proto = _model(nodes, [_vi("x", [1, 3, 16, 16])], [_vi("y", [1, 4, 8, 8])], i1 + i2 + i3)
    ref, q, stats = quantize(proto, "quantize(int8)")
    assert stats["shared_scale_ops"] == 2
    # every Q of the concat inputs, the concat output and the pool output uses one scale
    scales = {q_node.inputs[0].name: float(constant_array(q_node.inputs[1]))
              for q_node in q.graph if q_node.op_type == "QuantizeLinear"}
    shared = {scales[k] for k in ("c1.out", "c2.out", "cat", "p")}
    assert len(shared) == 1
    assert held_out_error(ref, q) < 0.03
    fused = ort_optimized_ops(q, tmp_path)
    # only the graph input's Q and the graph output's DQ survive in onnxruntime's
    # graph: no Q/DQ pair between the ops
    assert fused["QuantizeLinear"] == 1 and fused["DequantizeLinear"] == 1
    assert fused["QLinearConv"] == 3


def _mlp(trans_b: int) -> onnx.ModelProto:
    w1 = RNG.standard_normal((32, 16)) * 0.3
    w2 = RNG.standard_normal((32, 10)) * 0.3
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], transB=trans_b, name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["y"], transB=0, name="fc2")]
    inits = [_init("w1", w1 if trans_b else w1.T), _init("b1", RNG.standard_normal(32) * 0.1),
             _init("w2", w2), _init("b2", RNG.standard_normal(10) * 0.1)]
    return _model(nodes, [_vi("x", [4, 16])], [_vi("y", [4, 10])], inits)


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transb_quantizes_per_output_channel(trans_b, tmp_path):
    ref, q, stats = quantize(_mlp(trans_b), "quantize(int8)")
    fc1_w_dq = next(n for n in q.graph
                    if n.op_type == "Gemm" and n.name == "fc1").inputs[1].producer()
    assert int(fc1_w_dq.attributes["axis"].value) == (0 if trans_b else 1)
    assert constant_array(fc1_w_dq.inputs[1]).shape == (32,)
    assert stats["bias_int32"] == 2
    assert held_out_error(ref, q) < 0.03
    fused = ort_optimized_ops(q, tmp_path)
    assert fused["QGemm"] == 2 and fused["Gemm"] == 0


def test_matmul_3d_and_attention_matmul(tmp_path):
    # x[2,8,16] @ W[16,32] + b -> relu -> (h @ h^T) attention-style -> @ W2
    w = RNG.standard_normal((16, 32)) * 0.25
    w2 = RNG.standard_normal((8, 8)) * 0.3
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h0"], name="proj"),
             helper.make_node("Add", ["h0", "b"], ["h1"], name="bias"),
             helper.make_node("Relu", ["h1"], ["h"], name="relu"),
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1], name="tr"),
             helper.make_node("MatMul", ["h", "ht"], ["att"], name="att"),
             helper.make_node("MatMul", ["att", "w2"], ["y"], name="out")]
    inits = [_init("w", w), _init("b", RNG.standard_normal(32) * 0.1), _init("w2", w2)]
    proto = _model(nodes, [_vi("x", [2, 8, 16])], [_vi("y", [2, 8, 8])], inits)
    ref, q, stats = quantize(proto, "quantize(int8)")
    # MatMul + bias Add became Gemm (bias kept in int32), the other two stay MatMul
    assert stats["matmul_add_to_gemm"] == 1
    assert stats["compute_by_op"] == {"Gemm": 1, "MatMul": 2}
    assert held_out_error(ref, q) < 0.05
    fused = ort_optimized_ops(q, tmp_path)
    assert fused["MatMul"] == 0 and fused["Gemm"] == 0 and fused["QGemm"] == 1
    assert fused["QLinearMatMul"] + fused["MatMulIntegerToFloat"] == 2


def test_keep_float_first_and_last(tmp_path):
    ref, q, stats = quantize(conv_chain(4), 'quantize(int8,keep_float="first,last")')
    assert set(stats["kept_float"]) == {"conv0", "conv3"}
    weights = {n.name: n.inputs[1].producer() for n in q.graph if n.op_type == "Conv"}
    assert weights["conv0"] is None and weights["conv3"] is None  # float initializers
    assert weights["conv1"].op_type == weights["conv2"].op_type == "DequantizeLinear"
    assert stats["compute_quantized"] == 2
    assert held_out_error(ref, q) < 0.02


def test_keep_float_unknown_name_is_a_clear_error():
    with pytest.raises(Exception, match="keep_float"):
        quantize(conv_chain(2), "quantize(int8,keep_float=nosuchnode)")


def test_s8_symmetric_activations(tmp_path):
    ref, q, _ = quantize(conv_chain(3), "quantize(int8,activations=s8)")
    zps = [constant_array(n.inputs[2]) for n in q.graph if n.op_type == "QuantizeLinear"]
    assert all(z.dtype == np.int8 for z in zps)
    # signed tensors symmetric (zp 0); post-Relu tensors use the whole grid (zp -128)
    assert {int(z) for z in zps} <= {0, -128} and int(zps[0]) == 0
    assert held_out_error(ref, q) < 0.03
    assert ort_optimized_ops(q, tmp_path)["QLinearConv"] == 3


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_calibration_methods_end_to_end(method):
    ref, q, _ = quantize(conv_chain(3), f"quantize(int8,calibration={method})")
    # entropy clips hardest (it trades outliers for resolution), hence the wider bound
    assert held_out_error(ref, q) < (0.06 if method == "entropy" else 0.04)


def test_bias_correction_removes_mean_shift():
    # Per-tensor weights over channels of very different magnitude + inputs with a
    # large mean: weight rounding shifts the output mean; bias correction removes it.
    cin, cout = 16, 8
    w = RNG.standard_normal((cout, cin, 1, 1)).astype(np.float32) * 0.02
    w[0] *= 100.0  # one large channel sets the per-tensor scale
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    proto = _model(nodes, [_vi("x", [1, cin, 8, 8])], [_vi("y", [1, cout, 8, 8])],
                   [_init("w", w), _init("b", np.zeros(cout))])
    x = (RNG.standard_normal((32, 1, cin, 8, 8)) + 3.0).astype(np.float32)
    model = load_model(proto)
    src = ArraySource({"x": x}, {"x": (1, cin, 8, 8)}, input_dtypes(model))
    errs = {}
    for bc in (False, True):
        ref, q, _ = quantize(
            proto, f"quantize(int8,per_channel=false,bias_correction={str(bc).lower()})",
            calib=src, batches=32)
        out_r = OrtArtifact(ref).run({"x": x[0]})["y"]
        out_q = OrtArtifact(q).run({"x": x[0]})["y"]
        errs[bc] = float(np.abs((out_q - out_r)[0, 1:].mean(axis=(1, 2))).mean())  # mean shift
    assert errs[True] < 0.5 * errs[False], errs


def test_cross_layer_equalization_is_exact_and_helps_per_tensor():
    n1, i1 = _conv("c1", "x", "a", 3, 8, k=1)
    n2, i2 = _conv("c2", "a", "y", 8, 8, k=1, relu=False)
    w1 = numpy_helper.to_array(i1[0]).copy()
    w1 *= np.logspace(-2, 1, 8, dtype=np.float32).reshape(-1, 1, 1, 1)  # unbalanced channels
    i1[0] = _init("c1.w", w1)
    proto = _model(n1 + n2, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 8, 8, 8])], i1 + i2)
    model = load_model(proto)
    before = load_model(model)
    assert equalize_model(model) == 1
    src = RandomSource({"x": (1, 3, 8, 8)}, input_dtypes(model), count=4, seed=5)
    assert compare_models(before, model, src, limit=4).max_rel_l2 < 1e-5  # exact in float
    errs = {}
    for eq in ("false", "true"):
        ref, q, _ = quantize(proto, f"quantize(int8,per_channel=false,equalize={eq})")
        errs[eq] = held_out_error(ref, q)
    assert errs["true"] < errs["false"], errs


def test_smoothquant_is_exact_in_float_and_reduces_error():
    k, n = 32, 16
    gamma = np.ones(k, dtype=np.float32)
    gamma[:2] = 40.0  # outlier activation channels, as in transformers
    w = RNG.standard_normal((k, n)).astype(np.float32) * 0.2
    nodes = [helper.make_node("LayerNormalization", ["x", "g", "beta"], ["ln"], axis=-1, name="ln"),
             helper.make_node("MatMul", ["ln", "w"], ["y"], name="fc")]
    proto = _model(nodes, [_vi("x", [1, 8, k])], [_vi("y", [1, 8, n])],
                   [_init("g", gamma), _init("beta", np.zeros(k)), _init("w", w)])
    errs = {}
    for alpha in ("0", "0.5"):
        ref, q, stats = quantize(proto, f"quantize(int8,smooth={alpha},bias_correction=false)")
        errs[alpha] = held_out_error(ref, q)
        if alpha != "0":
            assert stats["smoothed"] == 1
    assert errs["0.5"] < 0.7 * errs["0"], errs
    # the float rewrite alone is exact
    from onnxforge.passes.quantization.repair import smooth_model

    model = load_model(proto)
    before = load_model(model)
    src = RandomSource({"x": (1, 8, k)}, input_dtypes(model), count=4, seed=3)
    ctx = PassContext(calibration=src, threads=1)
    assert smooth_model(model, ctx, 0.5) == 1
    assert compare_models(before, model, src, limit=4).max_rel_l2 < 1e-5


def test_constant_node_weights_and_batchnorm_are_handled():
    # Weights in Constant nodes (as PP-OCR has) and an unfused BatchNormalization.
    w = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3
    nodes = [helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(w), name="wc"),
             helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["bn"], name="bn"),
             helper.make_node("Relu", ["bn"], ["y"], name="relu")]
    inits = [_init("s", RNG.uniform(0.5, 1.5, 4)), _init("bb", RNG.standard_normal(4) * 0.1),
             _init("m", RNG.standard_normal(4) * 0.1), _init("v", RNG.uniform(0.5, 1.5, 4))]
    proto = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])], inits)
    ref, q, stats = quantize(proto, "quantize(int8)")
    assert stats["bn_folded"] == 1 and stats["weights_quantized"] == 1
    counts = op_counts(q)
    assert counts["BatchNormalization"] == 0 and counts["Constant"] == 0
    assert held_out_error(ref, q) < 0.03


# ---------------------------------------------------------------- dynamic and fp16


def test_dynamic_mode_emits_integer_matmuls_onnxruntime_fuses(tmp_path):
    ref, q, stats = quantize(_mlp(1), "quantize(dynamic)")
    assert stats["dynamic_matmuls"] == 2
    counts = op_counts(q)
    assert (counts["DynamicQuantizeLinear"] == 2 and counts["MatMulInteger"] == 2
            and counts["Gemm"] == 0)
    assert held_out_error(ref, q) < 0.03
    fused = ort_optimized_ops(q, tmp_path)
    assert fused["DynamicQuantizeMatMul"] + fused["MatMulIntegerToFloat"] == 2


def test_fp16_mode_keeps_float32_interface():
    ref, q, stats = quantize(conv_chain(3), "quantize(fp16)")
    assert stats["fp16_constants"] == 6
    assert all(v.dtype.name == "FLOAT" for v in [*q.graph.inputs, *q.graph.outputs])
    assert [v.name for v in q.graph.outputs] == ["y"]
    halves = [v for v in q.graph.initializers.values() if v.const_value.dtype.name == "FLOAT16"]
    assert len(halves) == 6
    assert held_out_error(ref, q) < 2e-3
    assert stats["size_ratio"] > 1.9


# ---------------------------------------------------------------- real models


def _ort_quantize_static(path: Path, batches, out: Path, *, per_channel: bool) -> onnx.ModelProto:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader:
        def __init__(self):
            self.it = iter(batches)

        def get_next(self):
            return next(self.it, None)

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(path), str(pre))
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)
    return onnx.load(str(out))


def test_digits_accuracy_vs_float_and_onnxruntime_quantizer(digits_model, tmp_path):
    shapes = {"input": (8, 1, 8, 8)}
    model = load_model(digits_model)
    calib = open_calibration(DATA / "digits_calib.npz", model, shapes)
    test = open_calibration(DATA / "digits_test.npz", model, shapes)
    ref, q, stats = quantize(digits_model, "quantize(int8)", calib=calib, shapes=shapes, batches=25)
    ours = compare_models(ref, q, test, limit=None)
    assert stats["size_ratio"] > 3.5
    assert ours.accuracy_drop <= 0.003, ours.to_dict()
    batches = list(calib.batches(25))
    for per_channel in (False, True):
        ort_q = load_model(_ort_quantize_static(digits_model, batches,
                                                tmp_path / f"ort{per_channel}.onnx",
                                                per_channel=per_channel))
        theirs = compare_models(ref, ort_q, test, limit=None)
        assert ours.candidate_accuracy >= theirs.candidate_accuracy, (ours.to_dict(),
                                                                      theirs.to_dict())
    fused = ort_optimized_ops(q, tmp_path)
    assert fused["Conv"] == 0 and fused["Gemm"] == 0 and fused["QLinearConv"] == 3


def test_resnet_style_zoo_model_quantizes_fully(tmp_path):
    path = zoo_path("resnet18")
    shapes = zoo_input_shapes("resnet18") or {"input": (1, 3, 224, 224)}
    model = load_model(path)
    src = RandomSource(shapes, input_dtypes(model), count=4, seed=0)
    ref, q, stats = quantize(path, "quantize(int8)", calib=src, shapes=shapes, batches=4)
    assert stats["compute_by_op"] == {"Conv": 20, "Gemm": 1}
    assert stats["size_ratio"] > 3.9
    cmp = compare_models(ref, q, RandomSource(shapes, input_dtypes(model), count=2, seed=7),
                         limit=2)
    assert cmp.min_cosine > 0.99, cmp.to_dict()
    fused = ort_optimized_ops(q, tmp_path)
    assert fused["Conv"] == 0 and fused["QLinearConv"] == 20 and fused["QLinearAdd"] == 8


def test_minilm_cosine_on_real_sentences(tmp_path):
    path = zoo_path("minilm_l6")
    data = np.load(path.with_name("minilm_l6.inputs.npz"))
    model = load_model(path)
    names = [v.name for v in model.graph.inputs]
    shapes = {n: (1, data[n].shape[1]) for n in names}
    calib = ArraySource({n: data[n][:8] for n in names}, shapes, input_dtypes(model))
    held = ArraySource({n: data[n][8:] for n in names}, shapes, input_dtypes(model))
    ref, q, stats = quantize(path, "quantize(int8)", calib=calib, shapes=shapes, batches=8)
    cmp = compare_models(ref, q, held, limit=8)
    emb = next(o for o in cmp.outputs if o.name == "sentence_embedding")
    assert emb.cosine >= 0.995, cmp.to_dict()
    # 36 projections (MatMul + bias -> Gemm) + 12 attention MatMuls; word and position
    # embedding tables int8 (the 2-row token-type table is below the size threshold)
    assert stats["compute_by_op"] == {"Gemm": 36, "MatMul": 12}
    assert stats["embeddings_quantized"] == 2 and stats["smoothed"] >= 6
    assert stats["size_ratio"] > 3.9


# ---------------------------------------------------------------- CLI


def test_cli_optimize_quantizes_digits(tmp_path, digits_model):
    out = tmp_path / "q.onnx"
    report = tmp_path / "r.json"
    result = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", str(digits_model), "-o", str(out),
         "-p", "quantize(int8,calibration=percentile)", "--calib", str(DATA / "digits_calib.npz"),
         "--input-shape", "input:1,1,8,8", "--report", str(report)],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    q = onnx.load(str(out))
    assert Counter(n.op_type for n in q.graph.node)["QuantizeLinear"] >= 5
    x = np.load(DATA / "digits_test.npz")
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    pred = np.array([sess.run(None, {"input": x["input"][i:i + 1]})[0].argmax()
                     for i in range(100)])
    assert np.mean(pred == x["labels"][:100]) >= 0.95


# ---------------------------------------------------------------- float prepare rewrites


def _exact(proto, fn) -> float:
    model = load_model(proto)
    before = load_model(model)
    assert fn(model) >= 1
    src = RandomSource(_shapes(before), input_dtypes(before), count=3, seed=4)
    return compare_models(before, model, src, limit=3).max_rel_l2


def test_prepare_rewrites_are_exact_in_float():
    from onnxforge.passes.quantization.prepare import (
        fold_conv_bias_add,
        fuse_hardswish,
        matmul_add_to_gemm,
    )

    # Paddle-style conv bias: Conv -> Add(Reshape(const))
    n1, i1 = _conv("c", "x", "y0", 3, 4, relu=False)
    nodes = n1 + [helper.make_node("Reshape", ["bvec", "bshape"], ["b4"], name="rs"),
                  helper.make_node("Add", ["y0", "b4"], ["y"], name="add")]
    inits = i1 + [_init("bvec", RNG.standard_normal(4)),
                  numpy_helper.from_array(np.array([1, 4, 1, 1], dtype=np.int64), "bshape")]
    proto = _model(nodes, [_vi("x", [1, 3, 8, 8])], [_vi("y", [1, 4, 8, 8])], inits)
    assert _exact(proto, fold_conv_bias_add) < 1e-6
    # decomposed HardSwish, both orders of Mul / Div
    for order in ("div_first", "mul_first"):
        three, six = _init("three", np.array(3.0)), _init("six", np.array(6.0))
        zero = _init("zero", np.array(0.0))
        head = [helper.make_node("Add", ["x", "three"], ["a"], name="a"),
                helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="clip")]
        if order == "div_first":
            tail = [helper.make_node("Div", ["c", "six"], ["d"], name="d"),
                    helper.make_node("Mul", ["x", "d"], ["y"], name="m")]
        else:
            tail = [helper.make_node("Mul", ["x", "c"], ["m"], name="m"),
                    helper.make_node("Div", ["m", "six"], ["y"], name="d")]
        proto = _model(head + tail, [_vi("x", [2, 16])], [_vi("y", [2, 16])], [three, six, zero])
        assert _exact(proto, fuse_hardswish) < 1e-6
    # MatMul (3-D input) + bias -> Reshape, Gemm, Reshape
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "b"], ["y"], name="add")]
    proto = _model(nodes, [_vi("x", [2, 5, 8])], [_vi("y", [2, 5, 6])],
                   [_init("w", RNG.standard_normal((8, 6))), _init("b", RNG.standard_normal(6))])
    assert _exact(proto, matmul_add_to_gemm) < 1e-6


def test_old_opset_is_upgraded_for_per_channel_weights():
    proto = conv_chain(2)
    proto.opset_import[0].version = 12
    ref, q, stats = quantize(proto, "quantize(int8)")
    assert stats["opset_upgraded"] is True and q.opset_imports[""] >= 13
    w_dq = next(n for n in q.graph if n.op_type == "Conv").inputs[1].producer()
    assert constant_array(w_dq.inputs[1]).shape == (8,)
    assert held_out_error(ref, q) < 0.03


def test_ppocr_rec_on_rendered_text_lines(tmp_path):
    path = zoo_path("ppocr_rec")
    try:
        task = recognizer_lines(path)
    except FileNotFoundError as exc:  # DejaVu fonts absent
        pytest.skip(str(exc))
    model = load_model(path)
    name = model.graph.inputs[0].name
    shape = task.calib[0][name].shape
    calib = ArraySource({name: np.concatenate([b[name] for b in task.calib])}, {name: shape},
                        input_dtypes(model))
    ref, q, stats = quantize(path, "quantize(int8)", calib=calib, shapes={name: shape},
                             batches=len(task.calib))
    assert stats["opset_upgraded"] and stats["compute_by_op"]["Conv"] >= 30
    ref_art, q_art = OrtArtifact(ref), OrtArtifact(q)
    r = [ref_art.run(b) for b in task.evaluate]
    c = [q_art.run(b) for b in task.evaluate]
    metrics = task.metric(r, c)
    # character error rate within 0.5 points of float on held-out rendered lines
    assert metrics["cer"] <= metrics["cer_ref"] + 0.005, metrics
    fused = ort_optimized_ops(q, tmp_path)
    # every conv runs as QLinearConv in ORT except those the pass kept float, each with
    # its reason in the stats (keep_cheap_convs_float: ORT's int8 kernel is no faster)
    convs = {n.name for n in onnx.load(path).graph.node if n.op_type == "Conv"}
    kept = {name: why for name, why in stats["kept_float"].items() if name in convs}
    assert all(kept.values())
    assert fused["Conv"] + fused["FusedConv"] == len(kept), (fused, kept)
