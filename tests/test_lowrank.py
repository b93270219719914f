"""Tests of the `lowrank` pass: hand-built hard cases and real models.

Hand-built: Gemm (transA/transB/alpha/beta/C, old opsets), MatMul on 3-D input with a
bias Add, convs with stride/asymmetric pads/dilation (Tucker-2, spatial, 1×1),
grouped/depthwise convs (refused), weights in Constant nodes, shared weights. At
full rank the outputs must equal the original's; at lower rank the graph must
compute exactly the numpy truncation. Real data: the digits CNN (accuracy, data-aware
vs weight-only) and, when the zoo is built, resnet18 / MiniLM / PP-OCR rec.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from conftest import DATA, zoo_input_shapes, zoo_path
from onnx import TensorProto, helper, numpy_helper
from onnxforge.activations import iter_activations
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import open_calibration
from onnxforge.errors import PipelineError
from onnxforge.ir import load_model, to_proto
from onnxforge.metrics import compute_metrics
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.passes.lowrank.linalg import (
    MomentStats,
    evbmf_rank,
    spatial_factorize,
    svd_factorize,
    tucker2_factorize,
)
from onnxforge.passes.lowrank.lowrank import LowRankPass
from onnxforge.pipeline import Pipeline

FULL = "lowrank(rank=full,margin=-10,guard=false,round_to=1)"


def _model(nodes, inputs, outputs, inits, opset=17) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs,
                              [numpy_helper.from_array(np.asarray(v, np.float32), k)
                               for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def _io(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _run(model, feed):
    return OrtArtifact(load_model(model)).run(feed)


def _apply(proto, pipeline, shapes, calib=None):
    model = load_model(proto)
    source = open_calibration(calib, model, shapes) if calib is not None else None
    ctx = PassContext(calibration=source, input_shapes=shapes)
    out, steps = PassManager(pipeline, ctx).run(model)
    onnx.checker.check_model(to_proto(out))
    return out, steps[0].stats


def _max_rel(a, b):
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(a)) + 1e-12))


# ---------------------------------------------------------------- hand-built graphs


@pytest.mark.parametrize("trans_a,trans_b,opset,with_c", [
    (0, 1, 17, True), (1, 0, 17, True), (0, 1, 17, False), (1, 1, 9, False),
])
def test_gemm_full_rank_exact(trans_a, trans_b, opset, with_c):
    rng = np.random.default_rng(1)
    m, k, n = 5, 40, 24
    w = rng.standard_normal((n, k) if trans_b else (k, n))
    a_shape = [k, m] if trans_a else [m, k]
    inputs = ["a", "w", "c"] if with_c or opset < 11 else ["a", "w"]
    inits = {"w": w}
    if len(inputs) == 3:
        inits["c"] = rng.standard_normal(n)
    proto = _model([helper.make_node("Gemm", inputs, ["y"], name="g", transA=trans_a,
                                      transB=trans_b, alpha=0.7, beta=1.5)],
                   [_io("a", a_shape)], [_io("y", [m, n])], inits, opset)
    feed = {"a": rng.standard_normal(a_shape).astype(np.float32)}
    out, stats = _apply(proto, FULL, {"a": tuple(a_shape)})
    assert [n.op_type for n in out.graph] == ["Gemm", "Gemm"]
    assert stats["layers"]["g"]["rank"] == [min(n, k)]
    np.testing.assert_allclose(OrtArtifact(out).run(feed)["y"], _run(proto, feed)["y"],
                               atol=1e-4, rtol=1e-4)


def test_gemm_truncation_matches_numpy_svd():
    """At rank r the rewritten graph computes X·W_rᵀ + b with W_r the truncated SVD."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((64, 96)).astype(np.float32)
    b = rng.standard_normal(64).astype(np.float32)
    proto = _model([helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g", transB=1)],
                   [_io("x", [8, 96])], [_io("y", [8, 64])], {"w": w, "b": b})
    out, stats = _apply(proto, "lowrank(rank=16,guard=false)", {"x": (8, 96)})
    x = rng.standard_normal((8, 96)).astype(np.float32)
    u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
    w16 = (u[:, :16] * s[:16]) @ vt[:16]
    np.testing.assert_allclose(OrtArtifact(out).run({"x": x})["y"], x @ w16.T + b,
                               atol=1e-3, rtol=1e-3)
    rec = stats["layers"]["g"]
    assert rec["params_after"] == 16 * (64 + 96) < rec["params_before"] == 64 * 96
    kept = float(np.sum(s[:16] ** 2) / np.sum(s**2))
    assert abs(rec["weight_energy_kept"] - kept) < 1e-4
    assert compute_metrics(out).params < compute_metrics(load_model(proto)).params


def _matmul_3d(rng, k=64, n=48, seq=10):
    w = rng.standard_normal((k, n)) / np.sqrt(k)
    bias = rng.standard_normal(n)
    return _model(
        [helper.make_node("MatMul", ["x", "w"], ["mm"], name="mm"),
         helper.make_node("Add", ["mm", "bias"], ["y"], name="add")],
        [_io("x", [2, seq, k])], [_io("y", [2, seq, n])], {"w": w, "bias": bias})


def test_matmul_3d_with_bias_full_rank_exact():
    rng = np.random.default_rng(3)
    proto = _matmul_3d(rng)
    feed = {"x": rng.standard_normal((2, 10, 64)).astype(np.float32)}
    out, stats = _apply(proto, FULL, {"x": (2, 10, 64)})
    assert [n.op_type for n in out.graph] == ["MatMul", "MatMul", "Add"]
    assert stats["layers"]["mm"]["macs_before"] == 2 * 10 * 64 * 48
    np.testing.assert_allclose(OrtArtifact(out).run(feed)["y"], _run(proto, feed)["y"],
                               atol=1e-4, rtol=1e-4)


def test_matmul_data_aware_beats_weight_only_and_corrects_bias():
    """Correlated, non-centred inputs: data-aware SVD (with bias correction in the Add)
    gives a smaller output error than plain SVD at the same rank, on held-out data."""
    rng = np.random.default_rng(4)
    k, n = 64, 48
    proto = _matmul_3d(rng, k, n)
    mix = rng.standard_normal((k, k)) * np.linspace(0.05, 2.0, k)
    def sample(count):
        return (rng.standard_normal((count, 2, 10, k)) @ mix + 0.5).astype(np.float32)
    calib = {"x": sample(16)}
    test = sample(8)
    ref = np.concatenate([_run(proto, {"x": t})["y"] for t in test])
    errors = {}
    for aware in (False, True):
        out, stats = _apply(proto, f"lowrank(rank=12,guard=false,data_aware={aware})",
                            {"x": (2, 10, k)}, calib)
        assert stats["layers"]["mm"]["bias_corrected"] is aware
        art = OrtArtifact(out)
        got = np.concatenate([art.run({"x": t})["y"] for t in test])
        errors[aware] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    assert errors[True] < errors[False]


@pytest.mark.parametrize("method,kernel,strides,pads,dilations", [
    ("tucker2", 3, [2, 2], [1, 0, 2, 1], [2, 2]),
    ("tucker2", 5, [1, 2], [2, 2, 2, 2], [1, 1]),
    ("spatial", 3, [2, 1], [1, 0, 2, 1], [2, 1]),
    ("spatial", 3, [1, 1], [1, 1, 1, 1], [1, 1]),
    ("tucker2", 1, [2, 2], [0, 0, 0, 0], [1, 1]),
])
def test_conv_full_rank_exact(method, kernel, strides, pads, dilations):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((24, 16, kernel, kernel))
    proto = _model([helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv",
                                     kernel_shape=[kernel, kernel], strides=strides, pads=pads,
                                     dilations=dilations)],
                   [_io("x", [1, 16, 15, 13])], [_io("y", ["n", "c", "h", "w"])],
                   {"w": w, "b": rng.standard_normal(24)})
    feed = {"x": rng.standard_normal((1, 16, 15, 13)).astype(np.float32)}
    out, stats = _apply(proto, FULL.replace(")", f",method={method})"), {"x": (1, 16, 15, 13)})
    rec = stats["layers"]["conv"]
    expected = "svd" if kernel == 1 else method
    assert rec["method"] == expected
    assert len(out.graph) == (2 if expected != "tucker2" else 1)
    np.testing.assert_allclose(OrtArtifact(out).run(feed)["y"], _run(proto, feed)["y"],
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["tucker2", "spatial"])
def test_conv_truncated_matches_numpy_reconstruction(method):
    """The emitted conv chain computes the conv with the reconstructed (truncated) weight."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((32, 32, 3, 3)).astype(np.float32)
    conv = {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 0, 0],
            "dilations": [1, 1]}
    proto = _model([helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **conv)],
                   [_io("x", [1, 32, 12, 12])], [_io("y", ["n", "c", "h", "w"])], {"w": w})
    out, stats = _apply(proto, f"lowrank(rank=8,method={method},guard=false)",
                        {"x": (1, 32, 12, 12)})
    plan = (tucker2_factorize(w) if method == "tucker2" else spatial_factorize(w))
    approx = plan.reconstruct(8, 8) if method == "tucker2" else plan.reconstruct(8)
    ref_proto = _model([helper.make_node("Conv", ["x", "w"], ["y"], **conv)],
                       [_io("x", [1, 32, 12, 12])], [_io("y", ["n", "c", "h", "w"])], {"w": approx})
    feed = {"x": rng.standard_normal((1, 32, 12, 12)).astype(np.float32)}
    np.testing.assert_allclose(OrtArtifact(out).run(feed)["y"], _run(ref_proto, feed)["y"],
                               atol=2e-4, rtol=1e-3)
    rec = stats["layers"]["conv"]
    assert rec["params_after"] < rec["params_before"] and rec["macs_after"] < rec["macs_before"]


def test_grouped_depthwise_shared_and_constant_node_weights():
    rng = np.random.default_rng(7)
    w_group = rng.standard_normal((16, 8, 3, 3))
    w_dw = rng.standard_normal((16, 1, 3, 3))
    w_shared = rng.standard_normal((16, 16))
    w_const = rng.standard_normal((16, 16, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "wg"], ["g"], name="grouped", group=2, pads=[1] * 4),
        helper.make_node("Conv", ["g", "wd"], ["d"], name="depthwise", group=16, pads=[1] * 4),
        helper.make_node("Constant", [], ["wc"], name="wc_node",
                         value=numpy_helper.from_array(w_const)),
        helper.make_node("Conv", ["d", "wc"], ["c"], name="const_weight", pads=[1] * 4),
        helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["t", "ws"], ["m1"], name="shared1"),
        helper.make_node("MatMul", ["m1", "ws"], ["y"], name="shared2"),
    ]
    proto = _model(nodes, [_io("x", [1, 16, 6, 6])], [_io("y", [1, 6, 6, 16])],
                   {"wg": w_group, "wd": w_dw, "ws": w_shared})
    feed = {"x": rng.standard_normal((1, 16, 6, 6)).astype(np.float32)}
    out, stats = _apply(proto, FULL, {"x": (1, 16, 6, 6)})
    assert "grouped conv (group=2)" in stats["skipped"]["grouped"]
    assert "group=16" in stats["skipped"]["depthwise"]
    assert "shared by 2" in stats["skipped"]["shared1"]
    assert list(stats["layers"]) == ["const_weight"]
    assert not any(n.op_type == "Constant" for n in out.graph)  # old weight removed
    np.testing.assert_allclose(OrtArtifact(out).run(feed)["y"], _run(proto, feed)["y"],
                               atol=1e-3, rtol=1e-4)


def test_margin_refuses_layers_without_saving():
    rng = np.random.default_rng(8)
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [_io("x", [4, 32])], [_io("y", [4, 32])], {"w": rng.standard_normal((32, 32))})
    out, stats = _apply(proto, "lowrank(energy=0.99,guard=false)", {"x": (4, 32)})
    assert stats["decomposed"] == 0 and "no saving" in stats["skipped"]["mm"]
    assert [n.op_type for n in out.graph] == ["MatMul"]


def test_energy_and_vbmf_rank_selection():
    rng = np.random.default_rng(9)
    u, _ = np.linalg.qr(rng.standard_normal((96, 96)))
    v, _ = np.linalg.qr(rng.standard_normal((128, 128)))
    s = np.concatenate([np.linspace(20, 5, 12), np.full(84, 0.01)])
    w = (u * s) @ v[:, :96].T  # exact spectrum s
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [_io("x", [4, 128])], [_io("y", [4, 96])], {"w": w.T})
    for energy in (0.5, 0.9):
        _, stats = _apply(proto, f"lowrank({energy},guard=false,round_to=1)", {"x": (4, 128)})
        cumulative = np.cumsum(s**2) / np.sum(s**2)
        expected = int(np.argmax(cumulative >= energy)) + 1
        assert stats["layers"]["mm"]["rank"] == [expected]
        assert stats["layers"]["mm"]["energy_kept"][0] >= energy
    _, stats = _apply(proto, "lowrank(energy=0.9,guard=false)", {"x": (4, 128)})
    assert stats["layers"]["mm"]["rank"][0] % 8 == 0
    # EVBMF on a noisy rank-12 matrix finds 12; through the pass with round_to=8 -> 16.
    noisy = (u[:, :12] * np.linspace(20, 5, 12)) @ v[:, :12].T + 0.05 * rng.standard_normal(
        (96, 128))
    assert evbmf_rank(np.linalg.svd(noisy, compute_uv=False), noisy.shape) == 12
    proto = _model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                   [_io("x", [4, 128])], [_io("y", [4, 96])], {"w": noisy.T})
    _, stats = _apply(proto, "lowrank(rank=vbmf,guard=false)", {"x": (4, 128)})
    assert stats["layers"]["mm"]["rank"] == [16]


def test_whitened_svd_and_tucker_are_exact_at_full_rank():
    rng = np.random.default_rng(10)
    w = rng.standard_normal((24, 40))
    stats = MomentStats(40)
    stats.add(rng.standard_normal((500, 40)) @ rng.standard_normal((40, 40)))
    plan = svd_factorize(w, stats.matrix(True))
    np.testing.assert_allclose(plan.reconstruct(24), w, atol=1e-9)
    wc = rng.standard_normal((12, 8, 3, 3))
    cin, cout = np.cov(rng.standard_normal((8, 300))), np.cov(rng.standard_normal((12, 300)))
    np.testing.assert_allclose(tucker2_factorize(wc, cin, cout).reconstruct(8, 12), wc,
                               atol=1e-9)


def test_options_are_checked_and_positional_energy():
    assert Pipeline.parse("lowrank(0.9)").passes[0].options.energy == 0.9
    for bad in ("lowrank(energy=1.5)", "lowrank(macs=0.5,energy=0.9)", "lowrank(rank=abc)",
                "lowrank(ops=conv+foo)", "lowrank(method=cp)"):
        with pytest.raises(PipelineError):
            Pipeline.parse(bad).passes[0]._check_options()
    assert isinstance(Pipeline.parse("lowrank").passes[0], LowRankPass)


def test_guard_records_measured_latency():
    """Guard on: every decomposed layer carries both timings, and is kept iff it was faster."""
    rng = np.random.default_rng(11)
    nodes, inits = [], {}
    names = ["x", "h1", "h2", "y"]
    sizes = [(512, 512), (512, 512), (512, 16)]
    for i, (k, n) in enumerate(sizes):
        inits[f"w{i}"] = rng.standard_normal((k, n)) / np.sqrt(k)
        nodes.append(helper.make_node("MatMul", [names[i], f"w{i}"], [names[i + 1]], name=f"mm{i}"))
    proto = _model(nodes, [_io("x", [64, 512])], [_io("y", [64, 16])], inits)
    _, stats = _apply(proto, "lowrank(rank=32,guard=true)", {"x": (64, 512)})
    for key in ("mm0", "mm1"):
        rec = stats["layers"][key]
        assert rec["latency_ms_before"] > 0 and rec["latency_ms_after"] > 0
        faster = rec["latency_ms_after"] <= 0.97 * rec["latency_ms_before"]
        assert rec["kept"] == faster
        assert (key in stats["skipped"]) != faster
    assert "no saving" in stats["skipped"]["mm2"]


# ---------------------------------------------------------------- digits (real data)


def _logits(model, x):
    return OrtArtifact(model).run({"input": x})["logits"]


def _digits_run(model, pipeline):
    calib = dict(np.load(DATA / "digits_calib.npz"))
    shapes = {"input": (40, 1, 8, 8)}
    source = open_calibration({"input": calib["input"]}, model, shapes)
    ctx = PassContext(calibration=source, input_shapes=shapes)
    p = Pipeline.parse(pipeline, ctx).passes[0]
    out, _ = PassManager([p], ctx).run(load_model(model))
    return out, p


# What each digits layer's data-aware objective measures: the output after its BatchNorm.
DIGITS_LAYER_OUTPUTS = {"/0/0.0/Conv": "/0/0.1/BatchNormalization_output_0",
                        "/1/1.0/Conv": "/1/1.1/BatchNormalization_output_0",
                        "/3/3.0/Conv": "/3/3.1/BatchNormalization_output_0",
                        "/6/Gemm": "/6/Gemm_output_0", "/8/Gemm": "logits"}


def test_digits_data_aware_not_worse_and_accuracy(digits_model):
    """2× and 4× fewer params in the decomposable layers (`params=0.5/0.75`), both modes.

    Calibration split in, labelled test split out. With ranks chosen per mode,
    data-aware must not be worse end to end, and 2× keeps the accuracy. At the
    weight-only ranks, the data-aware factors must give a smaller error at the outputs
    of the decomposed layers (what they minimise) on the test split.
    """
    model = load_model(digits_model)
    test = dict(np.load(DATA / "digits_test.npz"))
    ref = _logits(model, test["input"])
    ref_acc = float(np.mean(ref.argmax(1) == test["labels"]))

    def score(out):
        got = _logits(out, test["input"])
        return (float(np.mean(got.argmax(1) == test["labels"])),
                float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))

    def layer_errors(out, keys):
        names = [DIGITS_LAYER_OUTPUTS[k] for k in keys]
        want = next(iter_activations(model, names, [{"input": test["input"]}]))
        got = next(iter_activations(out, names, [{"input": test["input"]}]))
        return np.array([np.linalg.norm(got[n] - want[n]) / np.linalg.norm(want[n])
                         for n in names])

    results = {}
    for budget in (0.5, 0.75):
        for aware in (False, True):
            out, p = _digits_run(model, f"lowrank(params={budget},round_to=1,guard=false,"
                                        f"data_aware={aware})")
            assert p.stats["budget_removed"] >= budget
            assert p.stats["params_before"] / p.stats["params_after"] >= 1 / (1 - budget)
            results[budget, aware] = score(out)
            if not aware:  # the same ranks, data-aware factors
                ranks = {k: tuple(v["rank"]) for k, v in p.stats["layers"].items()}
                out_eq, p_eq = _digits_run_with_ranks(model, ranks)
                assert {k: v["rank"] for k, v in p_eq.stats["layers"].items()} == {
                    k: list(r) for k, r in ranks.items()}
                assert np.all(layer_errors(out_eq, ranks) < layer_errors(out, ranks))
    for budget in (0.5, 0.75):
        acc_w, err_w = results[budget, False]
        acc_d, err_d = results[budget, True]
        assert err_d <= err_w
        assert acc_d >= acc_w
    assert results[0.5, True][0] >= ref_acc - 0.01
    assert results[0.75, True][0] > 0.5  # 5× chance; weight-only falls further


def _digits_run_with_ranks(model, ranks):
    calib = dict(np.load(DATA / "digits_calib.npz"))
    shapes = {"input": (40, 1, 8, 8)}
    source = open_calibration({"input": calib["input"]}, model, shapes)
    ctx = PassContext(calibration=source, input_shapes=shapes)
    p = Pipeline.parse("lowrank(rank=full,round_to=1,guard=false,data_aware=true)", ctx).passes[0]
    p.rank_overrides = ranks
    out, _ = PassManager([p], ctx).run(load_model(model))
    return out, p


def test_cli_optimize_digits_with_lowrank(tmp_path):
    out, report = tmp_path / "digits_lr.onnx", tmp_path / "r.json"
    result = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", "--example", "-o", str(out),
         "-p", "lowrank(params=0.5,round_to=1,guard=false)", "--report", str(report),
         "--no-latency", "--force"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    step = data["steps"][-1]
    assert step["pass"].startswith("lowrank") and step["stats"]["decomposed"] >= 1
    assert step["stats"]["data_aware"] is True  # --example brings calibration data
    assert data["error"]["candidate_accuracy"] >= data["error"]["reference_accuracy"] - 0.05
    assert compute_metrics(load_model(out)).params < compute_metrics(
        load_model(DATA / "digits_cnn.onnx")).params


# ---------------------------------------------------------------- zoo models


def _zoo_run(name, pipeline, calib="random:2"):
    path = zoo_path(name)
    shapes = zoo_input_shapes(name)
    model = load_model(path)
    source = open_calibration(calib, model, shapes)
    ctx = PassContext(calibration=source, input_shapes=shapes)
    out, steps = PassManager(pipeline, ctx, verify_source=source, verify_batches=2).run(model)
    onnx.checker.check_model(to_proto(out))
    return steps[0]


def test_resnet18_macs_budget():
    step = _zoo_run("resnet18", "lowrank(macs=0.5,guard=false,calib_batches=1)",
                         calib="random:1")
    assert step.stats["budget_removed"] >= 0.5
    assert step.after["macs"] < step.before["macs"]
    decomposed = step.stats["macs_before"] - step.stats["macs_after"]
    assert step.before["macs"] - step.after["macs"] == decomposed
    assert np.isfinite(step.error.max_rel_l2) and step.error.min_cosine > 0


def test_ppocr_rec_energy_constant_node_weights():
    """PP-OCRv4 rec keeps its weights in Constant nodes; depthwise convs are refused."""
    step = _zoo_run("ppocr_rec", "lowrank(energy=0.95,guard=false,calib_batches=2)")
    stats = step.stats
    assert stats["decomposed"] >= 10
    assert any("grouped conv" in r for r in stats["skipped"].values())
    assert step.after["params"] < step.before["params"]
    assert step.error.min_cosine > 0.5


def test_minilm_all_weight_matmuls():
    path = zoo_path("minilm_l6")
    data = dict(np.load(path.with_name("minilm_l6.inputs.npz")))
    step = _zoo_run("minilm_l6",
                         "lowrank(rank=0.5,ops=matmul,guard=false,margin=-1,data_aware=false)",
                         calib={k: data[k] for k in ("input_ids", "attention_mask",
                                                     "token_type_ids")})
    model = load_model(path)
    weight_matmuls = [n.name for n in model.graph if n.op_type == "MatMul"
                      and n.inputs[1].const_value is not None]
    assert len(weight_matmuls) == 36  # 6 layers × (Q, K, V, O, FFN in, FFN out)
    assert sorted(step.stats["layers"]) == sorted(weight_matmuls)
    assert all("no constant weight" in step.stats["skipped"][n.name] for n in model.graph
               if n.op_type == "MatMul" and n.name not in weight_matmuls)
    assert np.isfinite(step.error.max_rel_l2)


def test_efficientnet_b0_macs_budget_refuses_depthwise():
    step = _zoo_run("efficientnet_b0", "lowrank(macs=0.5,guard=false,calib_batches=1)",
                    calib="random:1")
    stats = step.stats
    assert stats["budget_removed"] >= 0.5
    assert sum("grouped conv" in r for r in stats["skipped"].values()) == 16  # depthwise
    assert step.after["macs"] < step.before["macs"] and step.after["params"] < step.before[
        "params"]
    assert np.isfinite(step.error.max_rel_l2)


# ---------------------------------------------------------------- sensitivity allocation


def _loud_and_quiet_branches(dim: int = 48, seed: int = 0) -> onnx.ModelProto:
    """out = 10 * (x @ Wa) + 0.1 * (x @ Wb): both weights have the same decaying spectrum,
    so lost energy cannot tell them apart; the model output is 100x more sensitive to Wa."""
    rng = np.random.default_rng(seed)
    s = 0.9 ** np.arange(dim)

    def weight():
        u, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        v, _ = np.linalg.qr(rng.standard_normal((dim, dim)))
        return (u * s) @ v.T

    nodes = [helper.make_node("MatMul", ["x", "wa"], ["ya"], name="loud"),
             helper.make_node("Mul", ["ya", "ten"], ["za"]),
             helper.make_node("MatMul", ["x", "wb"], ["yb"], name="quiet"),
             helper.make_node("Mul", ["yb", "tenth"], ["zb"]),
             helper.make_node("Add", ["za", "zb"], ["out"])]
    return _model(nodes, [_io("x", [4, dim])], [_io("out", [4, dim])],
                  {"wa": weight(), "wb": weight(), "ten": np.float32(10.0),
                   "tenth": np.float32(0.1)})


def test_sensitivity_allocation_spends_the_budget_on_the_insensitive_layer():
    proto = _loud_and_quiet_branches()
    base = load_model(proto)
    shapes = {"x": (4, 48)}
    calib = open_calibration("random:8", base, shapes, seed=1)
    held_out = open_calibration("random:4", base, shapes, seed=7)
    ranks, errors = {}, {}
    for how in ("energy", "sensitivity"):
        model = load_model(base)
        p = LowRankPass(context=PassContext(calibration=calib, input_shapes=shapes),
                        params=0.5, guard=False, round_to=1, allocate=how)
        p(model)
        assert p.stats["budget_removed"] >= 0.5
        ranks[how] = {k: v["rank"] for k, v in p.stats["layers"].items()}
        ref_art, art = OrtArtifact(base), OrtArtifact(model)
        err = [np.linalg.norm(art.run(b)["out"] - ref_art.run(b)["out"])
               / np.linalg.norm(ref_art.run(b)["out"]) for b in held_out.batches(4)]
        errors[how] = float(np.mean(err))
    loud = [k for k in ranks["sensitivity"] if "loud" in k]
    quiet = [k for k in ranks["sensitivity"] if "quiet" in k]
    # the quiet layer is cut deeper (or alone); the loud one keeps more rank
    loud_rank = ranks["sensitivity"][loud[0]][0] if loud else 48
    assert quiet and ranks["sensitivity"][quiet[0]][0] < loud_rank, ranks
    print("lowrank loud/quiet:", ranks, errors)
    assert errors["sensitivity"] < 0.5 * errors["energy"], (errors, ranks)


def test_digits_sensitivity_allocation_runs_and_keeps_accuracy(digits_model):
    base = load_model(digits_model)
    shapes = {"input": (40, 1, 8, 8)}
    calib = open_calibration(str(DATA / "digits_calib.npz"), base, shapes)
    model = load_model(base)
    p = LowRankPass(context=PassContext(calibration=calib, input_shapes=shapes),
                    params=0.5, guard=False, allocate="sensitivity")
    p(model)
    assert p.stats["budget_removed"] >= 0.5 and p.stats["sensitivity"]
    test = dict(np.load(DATA / "digits_test.npz"))
    accuracy = float(np.mean(_logits(model, test["input"]).argmax(1) == test["labels"]))
    assert accuracy > 0.95  # measured 0.994 (the energy allocation makes the same picks)
