"""quantize(mode=mixed, bits=4): 4, 8 or float bits per layer under a size / error budget.

Hand-built models with two layers of the same size, one whose weights round well to
4 bits (Gaussian) and one whose blocks each hold a large weight on a near-silent input
channel (4-bit steps too coarse for the rest): under a size target that allows one
4-bit layer the allocation must put the insensitive one at 4 bits and keep the
sensitive one at 8, for MatMul (MatMulNBits) and Conv (packed 4-bit codes run by
QLinearConv) alike. A size target no configuration reaches within the error budget is
refused (exit code 6, nothing written) unless --force. Real model: the digits CNN under
a size target keeps its held-out accuracy.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import DATA
from onnx import TensorProto, helper, numpy_helper
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import ArraySource, open_calibration
from onnxforge.errors import BudgetExceededError
from onnxforge.ir import load_model
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.shapes import input_dtypes
from onnxforge.verify import compare_models

K = 64


def _every_32nd(shape: tuple[int, ...], axis: int) -> tuple[slice, ...]:
    idx = [slice(None)] * len(shape)
    idx[axis] = slice(0, None, 32)
    return tuple(idx)


def _two_layers(kind: str, sensitive_first: bool) -> onnx.ModelProto:
    """x -> layer "a" -> Relu -> layer "b" -> y, both K x K. Every 32nd channel of x and
    of a's output is nearly zero (the data source and a's weight make it so); the
    sensitive layer has 20x larger weights on those input channels: they hardly change
    its output but set the scale of every 4-bit block (the other weights then round to
    a step of ~1.5 sigma), while int8's 127 levels per channel still resolve them."""
    rng = np.random.default_rng(3)
    if kind == "matmul":
        shape, k_axis = (K, K), 0
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, K])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [16, K])
    else:  # 1x1 Conv: weight [Cout, Cin, 1, 1], input channels on axis 1
        shape, k_axis = (K, K, 1, 1), 1
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, K, 4, 4])
        y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, K, 4, 4])
    plain = rng.standard_normal(shape)
    outliers = rng.standard_normal(shape)
    outliers[_every_32nd(shape, k_axis)] *= 20.0
    wa, wb = (outliers, plain) if sensitive_first else (plain, outliers)
    wa[_every_32nd(shape, 1 - k_axis)] *= 0.01  # a's every 32nd output channel ~ 0
    inits = [numpy_helper.from_array((w / np.sqrt(K)).astype(np.float32), name)
             for w, name in ((wa, "wa"), (wb, "wb"))]
    op = "MatMul" if kind == "matmul" else "Conv"
    nodes = [helper.make_node(op, ["x", "wa"], ["ha"], name="a"),
             helper.make_node("Relu", ["ha"], ["ra"], name="relu"),
             helper.make_node(op, ["ra", "wb"], ["y"], name="b")]
    m = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _source(model, seed: int, count: int = 64) -> ArraySource:
    name = model.graph.inputs[0].name
    shape = tuple(model.graph.inputs[0].shape.numpy())
    x = np.random.default_rng(seed).standard_normal((count * shape[0], *shape[1:]))
    x[:, ::32] *= 0.01  # every 32nd input channel ~ 0 (see _two_layers)
    return ArraySource({name: x.astype(np.float32)}, {name: shape}, input_dtypes(model))


def _mixed(proto, pipeline: str, batches: int = 8):
    model = load_model(proto)
    reference = load_model(model)
    source = _source(model, seed=0)
    ctx = PassContext(calibration=source, input_shapes={model.graph.inputs[0].name: tuple(
        model.graph.inputs[0].shape.numpy())}, threads=1, max_calibration_batches=batches)
    out, steps = PassManager(pipeline, ctx).run(model)
    return reference, out, steps[-1].stats


@pytest.mark.parametrize("kind", ["matmul", "conv"])
@pytest.mark.parametrize("sensitive_first", [True, False])
def test_size_target_puts_the_insensitive_layer_at_4_bits(kind, sensitive_first):
    sensitive, insensitive = ("a", "b") if sensitive_first else ("b", "a")
    # max_error=0: the size is the only budget; the target lies between all-int8 and one
    # 4-bit layer (asserted on the curve below; convs carry int32 biases and scales)
    target = 0.23 if kind == "matmul" else 0.28
    ref, q, stats = _mixed(_two_layers(kind, sensitive_first),
                           f"quantize(mixed,bits=4,max_error=0,max_size_ratio={target})")
    for p in stats["budget_curve"]:
        print(p)
    print(stats["sensitivity_int4"])
    assert stats["size_target_met"] is True
    assert stats["bits_per_layer"] == {sensitive: 8, insensitive: 4}
    # the measured 4-bit sensitivities that ordered them
    s4 = stats["sensitivity_int4"]
    assert s4[sensitive]["rel_l2"] > 2 * s4[insensitive]["rel_l2"]
    # all-int8, then one 4-bit layer: the curve stops at the first point within budget
    curve = stats["budget_curve"]
    assert [p["int4_layers"] for p in curve] == [0, 1]
    assert curve[1]["size_ratio"] <= target < curve[0]["size_ratio"]
    # what onnxruntime runs: the insensitive layer in 4 bits, the sensitive one in int8
    ops = {n.name: n.op_type for n in q.graph}
    if kind == "matmul":
        assert sum(n.op_type == "MatMulNBits" for n in q.graph) == 1
        assert ops[sensitive] == "MatMul" and insensitive not in ops
    else:
        assert stats["layers_int4"] == 1
        # its codes come out of the shared 4-bit unpack chain (one Reshape per weight)
        assert any(n.op_type == "Reshape" and n.name == f"{insensitive}_int4_unpack"
                   for n in q.graph)
        assert sum(n.op_type == "BitShift" for n in q.graph) == 1
        assert not any(n.name.startswith(f"{sensitive}_int4") for n in q.graph)
    # on held-out inputs: better than both layers in 4 bits (mode=int4)
    held = _source(load_model(ref), seed=1, count=8)
    int4 = "quantize(int4)" if kind == "matmul" else "quantize(int4,convs=int4)"
    _, both_4bit, _ = _mixed(_two_layers(kind, sensitive_first), int4)
    chosen = compare_models(ref, q, held, limit=None).max_rel_l2
    uniform = compare_models(ref, both_4bit, held, limit=None).max_rel_l2
    print(f"held-out rel L2: mixed {chosen:.4f}, all 4-bit {uniform:.4f}")
    assert chosen < uniform
    out = OrtArtifact(q, threads=1).run(held.first())
    assert np.isfinite(out["y"]).all()


def test_error_budget_keeps_the_sensitive_layer_at_8_bits():
    # no size target: the most compressed point within max_error, measured on the curve
    probe = _mixed(_two_layers("matmul", True), "quantize(mixed,bits=4,max_error=0)")[2]
    # without any budget: the whole curve, fp16/int8 points, then 1 and 2 layers in 4 bits
    assert [p["int4_layers"] for p in probe["budget_curve"]][-3:] == [0, 1, 2]
    assert probe["bits_per_layer"] == {"a": 4, "b": 4}
    one_4bit = probe["budget_curve"][-2]["rel_l2"]
    both = probe["budget_curve"][-1]["rel_l2"]
    assert one_4bit < both
    budget = (one_4bit + both) / 2
    _ref, _q, stats = _mixed(_two_layers("matmul", True),
                             f"quantize(mixed,bits=4,max_error={budget})")
    assert stats["bits_per_layer"] == {"a": 8, "b": 4}
    assert stats["final_error"]["rel_l2"] <= budget
    assert stats["size_target_met"] is None


def test_unreachable_size_target_is_refused():
    with pytest.raises(BudgetExceededError, match="max_size_ratio=0.05 is not reached"):
        _mixed(_two_layers("matmul", True), "quantize(mixed,bits=4,max_error=0,"
                                             "max_size_ratio=0.05)")
    # reachable in size, but not within the error budget: also refused, naming both
    curve = _mixed(_two_layers("matmul", True), "quantize(mixed,bits=4,max_error=0)")[2][
        "budget_curve"]
    one, both = curve[-2], curve[-1]  # one layer / both layers in 4 bits
    budget = (one["rel_l2"] + both["rel_l2"]) / 2
    target = (one["size_ratio"] + both["size_ratio"]) / 2
    with pytest.raises(BudgetExceededError, match="smallest point within it has size ratio "
                       f"{one['size_ratio']}; the first point that small has error"):
        _mixed(_two_layers("matmul", True), f"quantize(mixed,bits=4,max_error={budget},"
                                             f"max_size_ratio={target})")
    # bits=8 cannot go below int8's size: the message says so
    with pytest.raises(BudgetExceededError, match="try bits=4"):
        _mixed(_two_layers("matmul", True), "quantize(mixed,max_error=0,max_size_ratio=0.2)")


def test_unreachable_size_target_exits_6_and_writes_nothing(tmp_path):
    proto = _two_layers("matmul", True)
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).standard_normal((64, K)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", str(src), "-o", str(out),
         "-p", "quantize(mixed,bits=4,max_error=0,max_size_ratio=0.05)", "--calib", str(calib),
         "--input-shape", f"x:16,{K}", "--no-latency"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == BudgetExceededError.exit_code == 6, result.stderr
    assert "is not reached" in result.stderr and not out.exists()
    # --force writes the smallest point within the error budget (here: all 4-bit) and says so
    forced = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", str(src), "-o", str(out),
         "-p", "quantize(mixed,bits=4,max_error=0,max_size_ratio=0.05)", "--calib", str(calib),
         "--input-shape", f"x:16,{K}", "--no-latency", "--force"],
        capture_output=True, text=True, timeout=300, check=False)
    assert forced.returncode == 0, forced.stderr
    assert "written anyway (--force)" in forced.stderr and out.exists()
    written = onnx.load(str(out))
    assert sum(n.op_type == "MatMulNBits" for n in written.graph.node) == 2


def test_bits_is_an_option_of_mode_mixed_only_and_gptq_needs_bits_4():
    from onnxforge.errors import OnnxforgeError

    with pytest.raises(OnnxforgeError, match="bits=4 chooses the lowest precision"):
        _mixed(_two_layers("matmul", True), "quantize(int8,bits=4)")
    with pytest.raises(OnnxforgeError, match="rounding=gptq in mode=mixed .* needs bits=4"):
        _mixed(_two_layers("matmul", True), "quantize(mixed,rounding=gptq)")


def test_digits_under_a_size_target_keeps_held_out_accuracy(digits_model):
    shapes = {"input": (8, 1, 8, 8)}
    model = load_model(digits_model)
    reference = load_model(model)
    ctx = PassContext(calibration=open_calibration(DATA / "digits_calib.npz", model, shapes),
                      input_shapes=shapes, threads=1, max_calibration_batches=25)
    q, steps = PassManager("quantize(mixed,bits=4,max_error=0,max_size_ratio=0.2,"
                           "rounding=gptq)", ctx).run(model)
    stats = steps[-1].stats
    assert stats["size_target_met"] is True and stats["layers_int4"] >= 1
    assert stats["weight_bytes_after"] <= 0.2 * stats["weight_bytes_before"]
    assert stats["int4_gptq_layers"] >= 1
    held = compare_models(reference, q, open_calibration(DATA / "digits_test.npz", model, shapes),
                          limit=None)
    print("digits mixed 4/8 at 0.2:", stats["bits_per_layer"], held.accuracy_drop)
    assert held.accuracy_drop <= 0.01  # at most 1 pt on the 360 held-out digits
