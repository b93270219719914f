"""If / Loop bodies: metrics, observation, quantization inside bodies, skip warnings, and
recurrent (LSTM / GRU) quantization, on hand-built graphs and the Silero VAD."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as h
from onnx import numpy_helper as nh
from onnxforge.activations import ActivationReader
from onnxforge.calibration import ArraySource
from onnxforge.ir import load_model, model_bytes
from onnxforge.metrics import compute_metrics
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.passes.quantization.recurrent import quantize_recurrent

RNG = np.random.default_rng(0)
ZOO = Path(__file__).resolve().parents[1] / ".zoo"


def _const(name: str, arr: np.ndarray) -> onnx.NodeProto:
    return h.make_node("Constant", [], [name], value=nh.from_array(arr, name))


def _if_of(then: onnx.GraphProto, other: onnx.GraphProto) -> onnx.ModelProto:
    """y = If(flag) then `then` else `other`, over an input x [1, 3, 8, 8]."""
    graph = h.make_graph(
        [h.make_node("If", ["flag"], ["y"], then_branch=then, else_branch=other)], "g",
        [h.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8]),
         h.make_tensor_value_info("flag", TensorProto.BOOL, [])],
        [h.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def if_model() -> onnx.ModelProto:
    """y = If(flag) then Relu(Conv(x, W1)) else Conv(x, W2) * 2 (x from the outer scope)."""
    w1 = RNG.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float32)
    w2 = RNG.normal(0, 0.3, (8, 3, 1, 1)).astype(np.float32)
    then = h.make_graph(
        [_const("W1", w1), h.make_node("Conv", ["x", "W1"], ["c1"], pads=[1, 1, 1, 1]),
         h.make_node("Relu", ["c1"], ["t_out"])],
        "then", [], [h.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    other = h.make_graph(
        [_const("W2", w2), h.make_node("Conv", ["x", "W2"], ["c2"]),
         _const("two", np.array(2.0, np.float32)), h.make_node("Mul", ["c2", "two"], ["e_out"])],
        "else", [], [h.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    return _if_of(then, other)


def loop_model(trips: int = 3) -> onnx.ModelProto:
    """A Loop of `trips` iterations: h = tanh(h @ W) on a carried [1, 16] state."""
    w = RNG.normal(0, 0.3, (16, 16)).astype(np.float32)
    body = h.make_graph(
        [h.make_node("MatMul", ["h_in", "W"], ["mm"]), h.make_node("Tanh", ["mm"], ["h_out"]),
         h.make_node("Identity", ["cond_in"], ["cond_out"])],
        "body",
        [h.make_tensor_value_info("i", TensorProto.INT64, []),
         h.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         h.make_tensor_value_info("h_in", TensorProto.FLOAT, [1, 16])],
        [h.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         h.make_tensor_value_info("h_out", TensorProto.FLOAT, [1, 16])])
    graph = h.make_graph(
        [h.make_node("Loop", ["M", "", "h0"], ["h_final"], body=body)], "g",
        [h.make_tensor_value_info("h0", TensorProto.FLOAT, [1, 16])],
        [h.make_tensor_value_info("h_final", TensorProto.FLOAT, [1, 16])],
        [nh.from_array(np.array(trips, np.int64), "M"), nh.from_array(w, "W")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def recurrent_model(op: str, gates: int, seq: int = 12, size: int = 32,
                    hidden: int = 64) -> onnx.ModelProto:
    w = RNG.normal(0, 0.15, (1, gates * hidden, size)).astype(np.float32)
    r = RNG.normal(0, 0.15, (1, gates * hidden, hidden)).astype(np.float32)
    b = RNG.normal(0, 0.1, (1, 2 * gates * hidden)).astype(np.float32)
    node = h.make_node(op, ["X", "W", "R", "B"], ["Y", "Y_h"], hidden_size=hidden, name=op)
    graph = h.make_graph(
        [node], "g", [h.make_tensor_value_info("X", TensorProto.FLOAT, [seq, 1, size])],
        [h.make_tensor_value_info("Y", TensorProto.FLOAT, None),
         h.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)],
        [nh.from_array(w, "W"), nh.from_array(r, "R"), nh.from_array(b, "B")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def _run(model_or_bytes, feeds: dict) -> list[np.ndarray]:
    data = model_or_bytes if isinstance(model_or_bytes, bytes) else \
        model_or_bytes.SerializeToString()
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _if_source(n: int = 8, flag: bool = True) -> ArraySource:
    arrays = {"x": RNG.normal(0, 1, (n, 1, 3, 8, 8)).astype(np.float32),
              "flag": np.full(n, flag)}
    return ArraySource(arrays, {"x": (1, 3, 8, 8), "flag": ()},
                       {"x": np.dtype(np.float32), "flag": np.dtype(bool)})


def test_metrics_count_if_as_max_and_loop_times_trip_count():
    m = compute_metrics(load_model(if_model()), {"x": (1, 3, 8, 8)})
    then_macs, else_macs = 8 * 64 * 27, 8 * 64 * 3
    assert m.macs == max(then_macs, else_macs)
    loop = compute_metrics(load_model(loop_model(3)), {"h0": (1, 16)})
    assert loop.macs == 3 * 16 * 16


def test_values_inside_branches_are_readable():
    proto = if_model()
    reader = ActivationReader(load_model(proto), ["c1", "c2"])
    x = RNG.normal(0, 1, (1, 3, 8, 8)).astype(np.float32)
    taken = reader.read({"x": x, "flag": np.array(True)}, ["c1", "c2"])
    assert taken["c1"].shape == (1, 8, 8, 8) and taken["c2"].size == 0
    ref = _run(proto, {"x": x, "flag": np.array(True)})[0]
    np.testing.assert_allclose(np.maximum(taken["c1"], 0), ref, rtol=1e-5, atol=1e-6)


def test_quantize_int8_descends_into_the_taken_if_branch():
    source = _if_source()
    ctx = PassContext(calibration=source, input_shapes={"x": (1, 3, 8, 8)})
    model = load_model(if_model())
    model, steps = PassManager("quantize(int8)", ctx, verify_source=source).run(model)
    stats = steps[0].stats
    assert stats["subgraphs"]["compute_quantized"] == 1  # the then-branch Conv
    assert "branch never taken" in next(iter(stats["subgraphs"]["kept_float"].values()))
    assert "skipped_subgraphs" not in stats
    if_node = onnx.load_from_string(model_bytes(model)).graph.node[-1]
    then = next(a.g for a in if_node.attribute if a.name == "then_branch")
    ops = [n.op_type for n in then.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    assert steps[0].error.max_rel_l2 < 0.05


def test_pass_that_does_not_descend_warns_and_records(capsys):
    from rich.console import Console

    ctx = PassContext(calibration=_if_source(), input_shapes={"x": (1, 3, 8, 8)})
    console = Console(stderr=True, width=200)
    _, steps = PassManager("quantize(fp16)", ctx, console=console).run(load_model(if_model()))
    skipped = steps[0].stats["skipped_subgraphs"]
    assert skipped["count"] == 2 and len(skipped["nodes"]) == 2
    assert "only mode=int8" in skipped["reason"]
    err = capsys.readouterr().err
    assert "warning" in err and "Conv×2" in err


@pytest.mark.parametrize("op,gates,policy,new_op", [
    ("LSTM", 4, "lstm", "DynamicQuantizeLSTM"),
    ("GRU", 3, "all", "DequantizeLinear"),
])
def test_recurrent_layers_get_int8_weights(op, gates, policy, new_op):
    proto = recurrent_model(op, gates)
    model = load_model(proto)
    report = quantize_recurrent(model, policy)
    data = model_bytes(model)
    assert new_op in {n.op_type for n in onnx.load_from_string(data).graph.node}
    assert len(data) < 0.4 * len(proto.SerializeToString())
    x = RNG.normal(0, 1, (12, 1, 32)).astype(np.float32)
    ref, got = _run(proto, {"X": x})[0], _run(data, {"X": x})[0]
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 0.05, report
    assert max(report["layers"][op]["weight_rel_err"].values()) < 0.02


def test_gru_stays_float_by_default_with_reason():
    model = load_model(recurrent_model("GRU", 3))
    report = quantize_recurrent(model)
    assert report["weight_only_int8"] == 0 and "slower" in report["kept_float"]["GRU"]


@pytest.mark.skipif(not (ZOO / "silero_vad.onnx").exists(), reason="zoo not built")
def test_silero_vad_lstm_int8_keeps_decisions():
    from onnxforge import speech
    from onnxforge.api import optimize

    shapes = {"input": (1, 576), "state": (2, 1, 128), "sr": ()}
    result = optimize(ZOO / "silero_vad.onnx", "quantize(int8,ops=LSTM)",
                      calibration=str(ZOO / "silero_vad.inputs.npz"), input_shapes=shapes,
                      verify_batches=4)
    stats = result.steps[0].stats
    assert stats["recurrent"]["lstm_int8"] == 4
    assert result.report["before"]["macs"] > 0  # counted inside the If branches
    wave, _ = speech.synth_audio(6.0, seed=2)  # evaluation clip: not the calibration seed
    ref, _ = speech.stream(speech.ort_step(str(ZOO / "silero_vad.onnx")), wave)
    got, _ = speech.stream(speech.ort_step(model_bytes(result.model)), wave)
    agree = speech.decision_agreement(ref, got)
    assert agree["agreement"] >= 0.98 and agree["max_prob_diff"] < 0.1, agree
    manifest = json.loads((ZOO / "manifest.json").read_text())
    assert len(model_bytes(result.model)) < manifest["models"]["silero_vad"]["bytes"]


def if_bn_model() -> onnx.ModelProto:
    """If(flag) then BatchNorm(Conv(x)) else Identity(x)-like Conv: for fold-bn in a body."""
    w = RNG.normal(0, 0.3, (4, 3, 3, 3)).astype(np.float32)
    scale, bias = RNG.uniform(0.5, 1.5, 4).astype(np.float32), RNG.normal(0, .1, 4).astype(
        np.float32)
    mean, var = RNG.normal(0, .1, 4).astype(np.float32), RNG.uniform(.5, 1.5, 4).astype(
        np.float32)
    then = h.make_graph(
        [_const("Wb", w), _const("s", scale), _const("b", bias), _const("m", mean),
         _const("v", var), h.make_node("Conv", ["x", "Wb"], ["cb"], pads=[1, 1, 1, 1]),
         h.make_node("BatchNormalization", ["cb", "s", "b", "m", "v"], ["t_out"])],
        "then", [], [h.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    other = h.make_graph(
        [_const("We", w), h.make_node("Conv", ["x", "We"], ["e_out"], pads=[1, 1, 1, 1])],
        "else", [], [h.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    return _if_of(then, other)


def test_fold_bn_rewrites_inside_an_if_branch_exactly():
    source = _if_source()
    ctx = PassContext(calibration=source, input_shapes={"x": (1, 3, 8, 8)})
    model, steps = PassManager("fold-bn", ctx, verify_source=source).run(
        load_model(if_bn_model()))
    assert steps[0].modified and "skipped_subgraphs" not in steps[0].stats
    ops = {n.op_type for n in ir.traversal.RecursiveGraphIterator(model.graph)}
    assert "BatchNormalization" not in ops
    assert steps[0].error.max_rel_l2 < 1e-5  # exact (the manager also checks it)


@pytest.mark.parametrize("pipeline", ["prune(ratio=0.5)", "lowrank(energy=0.5)",
                                      "sparsify(ratio=0.5)", "cleanup(onnxsim=false)"])
def test_passes_that_stay_in_the_main_graph_report_the_bodies(pipeline, capsys):
    ctx = PassContext(calibration=_if_source(), input_shapes={"x": (1, 3, 8, 8)})
    for proto in (if_model(), loop_model()):
        shapes = {"x": (1, 3, 8, 8)} if proto.graph.input[0].name == "x" else {"h0": (1, 16)}
        ctx.input_shapes = shapes
        _, steps = PassManager(pipeline, ctx).run(load_model(proto))
        skipped = steps[0].stats["skipped_subgraphs"]
        assert skipped["count"] >= 1 and skipped["reason"]
        assert len(skipped["nodes"]) == skipped["count"]
    assert "left compute inside If/Loop/Scan bodies untouched" in capsys.readouterr().err


def test_budget_refuses_a_vad_quantization_past_max_error():
    from onnxforge.api import optimize
    from onnxforge.errors import BudgetExceededError

    if not (ZOO / "silero_vad.onnx").exists():
        pytest.skip("zoo not built")
    shapes = {"input": (1, 576), "state": (2, 1, 128), "sr": ()}
    with pytest.raises(BudgetExceededError):
        optimize(ZOO / "silero_vad.onnx", "quantize(int8)", max_error=0.01,
                 calibration=str(ZOO / "silero_vad.inputs.npz"), input_shapes=shapes,
                 verify_batches=8)


def test_quantize_int8_descends_into_a_loop_body():
    arrays = {"h0": RNG.normal(0, 1, (8, 1, 16)).astype(np.float32)}
    source = ArraySource(arrays, {"h0": (1, 16)}, {"h0": np.dtype(np.float32)})
    ctx = PassContext(calibration=source, input_shapes={"h0": (1, 16)})
    proto = loop_model(3)
    model, steps = PassManager("quantize(int8)", ctx, verify_source=source).run(
        load_model(proto))
    stats = steps[0].stats
    assert stats["subgraphs"]["compute_quantized"] == 1
    assert stats["size_ratio"] > 2  # the float W the body read is gone
    body = next(a.g for a in onnx.load_from_string(model_bytes(model)).graph.node[-1].attribute
                if a.name == "body")
    assert "QuantizeLinear" in {n.op_type for n in body.node}
    layer = next(iter(stats["subgraphs"]["layer_rel_l2"].values()))
    assert 0 < layer < 0.05 and steps[0].error.max_rel_l2 < 0.05


@pytest.mark.skipif(not (ZOO / "silero_vad.onnx").exists(), reason="zoo not built")
def test_cleanup_on_silero_vad_is_exact_and_loadable():
    """With pinned input shapes onnxsim left an If branch statically inconsistent and
    onnxruntime refused the model; cleanup now simplifies without pinning them."""
    from onnxforge.api import optimize

    shapes = {"input": (1, 576), "state": (2, 1, 128), "sr": ()}
    result = optimize(ZOO / "silero_vad.onnx", "cleanup", input_shapes=shapes,
                      calibration=str(ZOO / "silero_vad.inputs.npz"), verify_batches=4)
    step = result.steps[0]
    assert step.error.max_rel_l2 < 1e-5 and step.after["nodes"] < step.before["nodes"]
    assert step.stats["onnxsim"].startswith("applied")


def scan_model(steps: int = 5) -> onnx.ModelProto:
    """Scan over `steps` rows: s += x_t @ W, y_t = Relu(x_t @ W)."""
    w = RNG.normal(0, 0.3, (16, 16)).astype(np.float32)
    body = h.make_graph(
        [h.make_node("MatMul", ["x_t", "W"], ["mm"]), h.make_node("Add", ["s_in", "mm"], ["s_out"]),
         h.make_node("Relu", ["mm"], ["y_t"])], "body",
        [h.make_tensor_value_info("s_in", TensorProto.FLOAT, [1, 16]),
         h.make_tensor_value_info("x_t", TensorProto.FLOAT, [1, 16])],
        [h.make_tensor_value_info("s_out", TensorProto.FLOAT, [1, 16]),
         h.make_tensor_value_info("y_t", TensorProto.FLOAT, [1, 16])])
    graph = h.make_graph(
        [h.make_node("Scan", ["s0", "xs"], ["s_final", "ys"], body=body, num_scan_inputs=1)],
        "g", [h.make_tensor_value_info("s0", TensorProto.FLOAT, [1, 16]),
              h.make_tensor_value_info("xs", TensorProto.FLOAT, [steps, 1, 16])],
        [h.make_tensor_value_info("s_final", TensorProto.FLOAT, [1, 16]),
         h.make_tensor_value_info("ys", TensorProto.FLOAT, [steps, 1, 16])],
        [nh.from_array(w, "W")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def test_scan_body_macs_and_quantization():
    shapes = {"s0": (1, 16), "xs": (5, 1, 16)}
    assert compute_metrics(load_model(scan_model()), shapes).macs == 5 * 16 * 16
    arrays = {"s0": RNG.normal(0, 1, (8, 1, 16)).astype(np.float32),
              "xs": RNG.normal(0, 1, (8, 5, 1, 16)).astype(np.float32)}
    source = ArraySource(arrays, shapes, {k: np.dtype(np.float32) for k in shapes})
    ctx = PassContext(calibration=source, input_shapes=shapes)
    _, steps = PassManager("quantize(int8)", ctx, verify_source=source).run(
        load_model(scan_model()))
    assert steps[0].stats["subgraphs"]["compute_quantized"] == 1
    assert steps[0].error.max_rel_l2 < 0.05 and steps[0].stats["size_ratio"] > 2
