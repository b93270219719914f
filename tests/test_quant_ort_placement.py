"""quantize(int8) places Q/DQ where onnxruntime gains from int8, read from the graph ORT runs.

In HardSwish / squeeze-excite nets (PP-OCR cls, MobileNetV3) a depthwise or 1x1-spatial
Conv fed by a float op (HardSwish has no int8 kernel in ORT) is kept float: ORT's int8
QLinearConv is not faster for it, and the Q before plus DQ after it (and NHWC transposes)
made PP-OCR cls 1.35x slower than fp32. Depthwise convs inside int8 chains (MobileNetV2,
Relu6 folded) stay int8. The tests check ORT's optimized graph, not timings.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import zoo_path
from onnx import TensorProto, helper, numpy_helper
from onnxforge.calibration import ArraySource, RandomSource
from onnxforge.ir import load_model
from onnxforge.ort_fusions import op_total, ort_optimized_ops
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.shapes import input_dtypes, resolve_input_shapes
from onnxforge.verify import compare_models


def _w(rng, shape, fan_in):
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _conv(nodes, inits, rng, name, x, cin, cout, k=1, group=1):
    inits += [numpy_helper.from_array(_w(rng, (cout, cin // group, k, k), cin // group * k * k),
                                      f"{name}.w"),
              numpy_helper.from_array((rng.standard_normal(cout) * 0.1).astype(np.float32),
                                      f"{name}.b")]
    nodes.append(helper.make_node("Conv", [x, f"{name}.w", f"{name}.b"], [name], name=name,
                                  pads=[k // 2] * 4, group=group))
    return name


def _model(nodes, inits, out, channels, opset=14, cin=8):
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, cin, 12, 12])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, channels, 12, 12])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def hardswish_se_block(seed: int = 0, cin: int = 80) -> onnx.ModelProto:
    """x -> Conv 1x1 (cin->32) -> HardSwish -> depthwise 3x3 -> HardSwish -> SE (GAP -> Conv
    1x1 32->8 -> Relu -> Conv 8->32 -> HardSigmoid -> Mul) -> Conv 1x1 (32->16)."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    a = _conv(nodes, inits, rng, "expand", "x", cin, 32)
    nodes.append(helper.make_node("HardSwish", [a], ["hs1"], name="hs1"))
    d = _conv(nodes, inits, rng, "depthwise", "hs1", 32, 32, k=3, group=32)
    nodes.append(helper.make_node("HardSwish", [d], ["hs2"], name="hs2"))
    nodes.append(helper.make_node("GlobalAveragePool", ["hs2"], ["gap"], name="gap"))
    s1 = _conv(nodes, inits, rng, "se_reduce", "gap", 32, 8)
    nodes.append(helper.make_node("Relu", [s1], ["se_relu"], name="se_relu"))
    s2 = _conv(nodes, inits, rng, "se_expand", "se_relu", 8, 32)
    nodes.append(helper.make_node("HardSigmoid", [s2], ["se_gate"], name="se_gate",
                                  alpha=1.0 / 6.0, beta=0.5))
    nodes.append(helper.make_node("Mul", ["hs2", "se_gate"], ["scaled"], name="se_mul"))
    _conv(nodes, inits, rng, "project", "scaled", 32, 16)
    return _model(nodes, inits, "project", 16, cin=cin)


def relu6_inverted_residual(seed: int = 0) -> onnx.ModelProto:
    """MobileNetV2 style: Conv 1x1 -> Relu6 -> depthwise 3x3 -> Relu6 -> Conv 1x1."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    lo = numpy_helper.from_array(np.array(0.0, np.float32), "lo")
    hi = numpy_helper.from_array(np.array(6.0, np.float32), "hi")
    inits += [lo, hi]
    a = _conv(nodes, inits, rng, "expand", "x", 8, 32)
    nodes.append(helper.make_node("Clip", [a, "lo", "hi"], ["r1"], name="relu6_1"))
    d = _conv(nodes, inits, rng, "depthwise", "r1", 32, 32, k=3, group=32)
    nodes.append(helper.make_node("Clip", [d, "lo", "hi"], ["r2"], name="relu6_2"))
    _conv(nodes, inits, rng, "project", "r2", 32, 16)
    return _model(nodes, inits, "project", 16)


def _quantize(proto, pipeline):
    model = load_model(proto)
    reference = load_model(model)
    shapes = resolve_input_shapes(model)
    source = RandomSource(shapes, input_dtypes(model), count=8, seed=1)
    ctx = PassContext(calibration=source, threads=1, max_calibration_batches=8)
    quantized, steps = PassManager(pipeline, ctx).run(model)
    held_out = RandomSource(shapes, input_dtypes(model), count=4, seed=99)
    err = compare_models(reference, quantized, held_out, limit=4).max_rel_l2
    return quantized, steps[-1].stats, err


def test_hardswish_block_keeps_cheap_convs_float_and_pointwise_int8():
    proto = hardswish_se_block()
    q, stats, err = _quantize(proto, "quantize(int8)")
    kept = {k for k, v in stats["kept_float"].items() if "cheap conv" in v}
    assert kept == {"depthwise", "se_reduce", "se_expand"}
    assert stats["compute_quantized"] == 2  # expand and project
    assert err < 0.05, err
    ort_new = ort_optimized_ops(q, level="all")
    assert op_total(ort_new, "QLinearConv") == 2
    # the kept convs run as float convs in ORT (with any activation it fuses into them)
    assert op_total(ort_new, "Conv") + op_total(ort_new, "FusedConv") == 3
    q_old, _, _ = _quantize(proto, "quantize(int8,keep_cheap_convs_float=false)")
    ort_old = ort_optimized_ops(q_old, level="all")
    assert op_total(ort_old, "QLinearConv") == 5
    boundary = ("QuantizeLinear", "DequantizeLinear", "Transpose")
    assert sum(op_total(ort_new, k) for k in boundary) < sum(op_total(ort_old, k)
                                                             for k in boundary)


@pytest.mark.parametrize("cin, expand_int8", [(80, True), (8, False)])
def test_pointwise_conv_feeding_hardswish_is_float_only_when_cheap(cin, expand_int8):
    # 1x1 conv -> HardSwish: int8 only pays with enough MACs per output element (cin here).
    q, stats, err = _quantize(hardswish_se_block(cin=cin), "quantize(int8)")
    assert ("expand" not in stats["kept_float"]) == expand_int8
    assert err < 0.05, err
    assert op_total(ort_optimized_ops(q, level="all"), "QLinearConv") == 1 + expand_int8


def test_depthwise_inside_int8_chain_stays_int8():
    q, stats, err = _quantize(relu6_inverted_residual(), "quantize(int8)")
    assert not any("cheap conv" in v for v in stats["kept_float"].values())
    assert stats["compute_quantized"] == 3
    assert err < 0.05, err
    ort = ort_optimized_ops(q, level="all")
    assert op_total(ort, "QLinearConv") == 3
    assert op_total(ort, "Conv") + op_total(ort, "FusedConv") == 0


def test_ppocr_cls_hardswish_net_keeps_depthwise_float_and_its_accuracy():
    pytest.importorskip("PIL")
    from onnxforge.backends.ort import OrtArtifact
    from onnxforge.sample_inputs import OCR_LINES, fonts, render_line

    path = zoo_path("ppocr_cls")
    font_paths = fonts()
    lines = [render_line(t, font_paths[i % len(font_paths)], 48, 192)
             for i, t in enumerate(OCR_LINES[:24])]
    lines = [x[:, :, ::-1, ::-1].copy() if i % 2 else x for i, x in enumerate(lines)]
    labels = [i % 2 for i in range(len(lines))]  # 1: upside down
    calib = [i for i in range(len(lines)) if (i // 2) % 2 == 0]  # disjoint lines
    held_out = [i for i in range(len(lines)) if (i // 2) % 2 == 1]
    model = load_model(path)
    name = model.graph.inputs[0].name
    reference = load_model(path)
    source = ArraySource({name: np.concatenate([lines[i] for i in calib])},
                         {name: (1, 3, 48, 192)}, input_dtypes(model))
    ctx = PassContext(calibration=source, input_shapes={name: (1, 3, 48, 192)}, threads=1)
    q, steps = PassManager("quantize(int8)", ctx).run(model)
    stats = steps[-1].stats
    kept = [k for k, v in stats["kept_float"].items() if "cheap conv" in v]
    assert len(kept) >= 11  # the depthwise convs between HardSwish ops, SE convs
    ort = ort_optimized_ops(q, level="all")
    assert op_total(ort, "QLinearConv") == stats["compute_by_op"]["Conv"] > 0
    fp32, int8 = OrtArtifact(reference, threads=1), OrtArtifact(q, threads=1)
    for i in held_out:
        a = next(iter(fp32.run({name: lines[i]}).values())).argmax()
        b = next(iter(int8.run({name: lines[i]}).values())).argmax()
        assert a == b == labels[i], (i, a, b)
