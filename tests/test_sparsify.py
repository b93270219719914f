"""The `sparsify` pass: exact ratios per pattern, N:M on every group, kept layers, Wanda vs
magnitude, zeros kept by the refit, the metadata record, budgets and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import make_model
from conftest import DATA, zoo_path
from onnx import TensorProto, helper, numpy_helper
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import open_calibration
from onnxforge.errors import InputSpecError, PipelineError
from onnxforge.ir import load_model, save_model
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.passes.sparsity.metadata import SPARSITY_KEY, read_sparsity
from onnxforge.pipeline import Pipeline

# ---------------------------------------------------------------- a hand-built network

# name -> (op, weight shape, view shape [out, in]) of the model below
LAYERS = {
    "c1": ("Conv", (8, 4, 3, 3), (8, 36)),  # first conv: kept by default
    "c2": ("Conv", (16, 8, 3, 3), (16, 72)),
    "dw": ("Conv", (16, 1, 3, 3), (16, 9)),  # depthwise: kept by default
    "c3": ("Conv", (12, 16, 1, 1), (12, 16)),
    "g1": ("Gemm", (12, 20), (20, 12)),  # transB = 0: view is W.T
    "m1": ("MatMul", (20, 24), (24, 20)),
    "g2": ("Gemm", (10, 24), (10, 24)),  # last Gemm (classifier): kept by default
}


def network(seed: int = 0) -> onnx.ModelProto:
    """x[2,4,8,8] -> c1 -> Relu -> c2 -> Relu -> dw -> Relu -> c3 -> GAP -> Flatten -> g1 ->
    Relu -> m1 (+ bias Add) -> Relu -> g2 -> y[2,10]; weights N(0,1), never exactly 0."""
    rng = np.random.default_rng(seed)
    inits = []

    def init(name, shape, scale=1.0):
        arr = rng.standard_normal(shape).astype(np.float32) * scale
        arr[arr == 0] = 0.1
        inits.append(numpy_helper.from_array(arr, name))
        return name

    for name, (_, shape, _) in LAYERS.items():
        fan_in = int(np.prod(shape[1:])) if len(shape) == 4 else shape[0 if name != "g2" else 1]
        init(f"{name}.weight", shape, 1.0 / math.sqrt(fan_in))
    for name, n in (("c1", 8), ("c2", 16), ("dw", 16), ("c3", 12), ("g1", 20), ("m1", 24),
                    ("g2", 10)):
        init(f"{name}.bias", (n,), 0.1)
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "c1.weight", "c1.bias"], ["a1"], name="c1", **conv),
        helper.make_node("Relu", ["a1"], ["r1"]),
        helper.make_node("Conv", ["r1", "c2.weight", "c2.bias"], ["a2"], name="c2", **conv),
        helper.make_node("Relu", ["a2"], ["r2"]),
        helper.make_node("Conv", ["r2", "dw.weight", "dw.bias"], ["a3"], name="dw", group=16,
                         **conv),
        helper.make_node("Relu", ["a3"], ["r3"]),
        helper.make_node("Conv", ["r3", "c3.weight", "c3.bias"], ["a4"], name="c3",
                         kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["a4"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "g1.weight", "g1.bias"], ["a5"], name="g1"),
        helper.make_node("Relu", ["a5"], ["r5"]),
        helper.make_node("MatMul", ["r5", "m1.weight"], ["a6"], name="m1"),
        helper.make_node("Add", ["a6", "m1.bias"], ["a6b"], name="m1_bias"),
        helper.make_node("Relu", ["a6b"], ["r6"]),
        helper.make_node("Gemm", ["r6", "g2.weight", "g2.bias"], ["y"], name="g2", transB=1),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                            [2, 4, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 10])], inits)


def view(name: str, w: np.ndarray) -> np.ndarray:
    op = LAYERS[name][0]
    if op == "Conv":
        return w.reshape(w.shape[0], -1)
    return w if name == "g2" else w.T


def weights(model) -> dict[str, np.ndarray]:
    return {name: model.graph.initializers[f"{name}.weight"].const_value.numpy()
            for name in LAYERS}


def run(pipeline: str, model=None, calib=None, shapes=None):
    """(model after the pass, its stats, the step report)."""
    model = load_model(model if model is not None else network())
    ctx = PassContext(input_shapes=shapes or {})
    verify = None
    if calib is not None:
        ctx.calibration = open_calibration(calib, model, shapes)
        verify = ctx.calibration
    out, steps = PassManager(pipeline, ctx, verify_source=verify).run(model)
    return out, steps[0].stats, steps[0]


def calib_data(n=16, seed=1):
    return {"x": np.random.default_rng(seed).standard_normal((n, 4, 8, 8)).astype(np.float32)}


# ---------------------------------------------------------------- patterns and ratios


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.77])
def test_unstructured_zeros_exactly_floor_ratio_of_each_layer(ratio):
    out, stats, _ = run(f"sparsify({ratio},recover=false)")
    sparsified = {"c2", "c3", "g1", "m1"}
    assert set(stats["layers"]) == sparsified
    for name, w in weights(out).items():
        if name in sparsified:
            assert int(np.sum(w == 0)) == math.floor(ratio * w.size + 1e-9), name
    assert stats["zeros"] == sum(math.floor(ratio * math.prod(LAYERS[n][1]) + 1e-9)
                                 for n in sparsified)


def test_magnitude_zeros_the_smallest_weights_of_each_layer():
    original = weights(load_model(network()))
    out, _, _ = run("sparsify(0.5,recover=false)")
    for name, w in weights(out).items():
        if name not in ("c2", "c3", "g1", "m1"):
            continue
        a = np.abs(original[name])
        assert a[w == 0].max() <= a[w != 0].min(), name


@pytest.mark.parametrize("ratio", [0.5, 0.8])
def test_block_pattern_whole_blocks_and_exact_block_count(ratio):
    out, stats, _ = run(f"sparsify({ratio},pattern=block(2x4),recover=false,keep=none)")
    ws = weights(out)
    for name, (_, _, (rows, cols)) in LAYERS.items():
        v = view(name, ws[name])
        if rows % 2 or cols % 4:  # dw [16, 9]: 9 inputs are not whole 4-blocks
            assert "does not tile" in stats["skipped"][name]
            assert np.all(v != 0), name  # untouched
            continue
        blocks = v.reshape(rows // 2, 2, cols // 4, 4).transpose(0, 2, 1, 3).reshape(-1, 8)
        zero = np.all(blocks == 0, axis=1)
        assert np.all(zero | np.all(blocks != 0, axis=1)), f"{name}: a block is partly zero"
        assert zero.sum() == math.floor(ratio * len(blocks) + 1e-9), name
        assert stats["layers"][name]["sparsity"] == pytest.approx(zero.sum() / len(blocks))


@pytest.mark.parametrize("pattern, n, m", [("2:4", 2, 4), ("1:4", 1, 4), ("3:8", 3, 8)])
def test_n_m_holds_on_every_group(pattern, n, m):
    out, stats, _ = run(f"sparsify(pattern={pattern},recover=false,keep=none)")
    ws = weights(out)
    checked = 0
    for name, (_, _, (rows, cols)) in LAYERS.items():
        v = view(name, ws[name])
        if cols % m:
            assert "not a multiple" in stats["skipped"][name]
            assert np.all(v != 0)
            continue
        nonzero = np.count_nonzero(v.reshape(rows, cols // m, m), axis=-1)
        assert np.all(nonzero == n), f"{name}: groups with {set(nonzero.ravel())} nonzeros"
        assert stats["layers"][name]["sparsity"] == pytest.approx(1 - n / m)
        checked += 1
    assert checked >= 3


def test_global_scope_ranks_all_layers_together():
    out, stats, _ = run("sparsify(0.6,scope=global,recover=false)")
    ws = weights(out)
    names = ["c2", "c3", "g1", "m1"]
    total = sum(ws[n].size for n in names)
    assert sum(int(np.sum(ws[n] == 0)) for n in names) == math.floor(0.6 * total + 1e-9)
    # one threshold: every zero is below every kept weight, across layers
    original = weights(load_model(network()))
    zeros = np.concatenate([np.abs(original[n])[ws[n] == 0] for n in names])
    kept = np.concatenate([np.abs(original[n])[ws[n] != 0] for n in names])
    assert zeros.max() <= kept.min()
    assert len({stats["layers"][n]["sparsity"] for n in names}) > 1  # not uniform


# ---------------------------------------------------------------- kept layers and overrides


def test_default_keep_first_conv_classifier_depthwise_untouched():
    original = weights(load_model(network()))
    out, stats, _ = run("sparsify(0.5,recover=false)")
    ws = weights(out)
    for name in ("c1", "dw", "g2"):
        np.testing.assert_array_equal(ws[name], original[name])
    assert set(stats["kept"]) == {"c1", "dw", "g2"}
    assert "first conv" in stats["kept"]["c1"]
    assert "classifier" in stats["kept"]["g2"]
    assert "depthwise" in stats["kept"]["dw"]
    meta = read_sparsity(out)
    assert set(meta) == {"c2.weight", "c3.weight", "g1.weight", "m1.weight"}


def test_keep_none_patterns_and_overrides():
    _, stats, _ = run("sparsify(0.5,recover=false,keep=none)")
    assert set(stats["layers"]) == set(LAYERS) and not stats["kept"]
    _, stats, _ = run('sparsify(0.5,recover=false,keep="first;last;g*")')
    assert set(stats["kept"]) == {"c1", "g1", "g2"}
    # an override decides the layer, over keep; ratio 0 keeps one dense
    out, stats, _ = run('sparsify(0.5,recover=false,overrides="c1=0.25;m1=0")')
    assert stats["layers"]["c1"]["ratio"] == 0.25
    assert stats["kept"]["m1"] == "override ratio 0"
    ws = weights(out)
    assert int(np.sum(ws["c1"] == 0)) == math.floor(0.25 * ws["c1"].size)
    assert np.all(ws["m1"] != 0)


def test_shared_and_input_weights_are_skipped_with_a_reason():
    proto = network()
    node = next(n for n in proto.graph.node if n.name == "m1")
    proto.graph.node.append(helper.make_node("MatMul", ["r5", "m1.weight"], ["extra"],
                                             name="m1_twin"))
    proto.graph.output.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT, None))
    assert node.input[1] == "m1.weight"
    out, stats, _ = run("sparsify(0.5,recover=false)", proto)
    assert "shared" in stats["skipped"]["m1"] and "shared" in stats["skipped"]["m1_twin"]
    assert np.all(weights(out)["m1"] != 0)


def test_nothing_to_zero_leaves_the_model_unchanged():
    before = load_model(network())
    out, stats, step = run("sparsify(0,recover=false)")
    assert not step.modified and stats["sparsified"] == 0
    assert SPARSITY_KEY not in out.metadata_props
    for name, w in weights(out).items():
        np.testing.assert_array_equal(w, weights(before)[name])


# ---------------------------------------------------------------- criteria


def _two_feature_model():
    """y = x @ W, W [4, 2] (view [2, 4]); |W| grows with the input index."""
    w = np.array([[1.0, 1.1], [2.0, 2.1], [3.0, 3.1], [4.0, 4.1]], np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 4])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 2])],
                      [numpy_helper.from_array(w, "w")])


def test_wanda_weighs_magnitudes_by_the_input_feature_norms():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 4)).astype(np.float32) * np.array([100, 1, 2, 0.01], np.float32)
    calib = {"x": x}
    shapes = {"x": (8, 4)}
    mag, _, _ = run("sparsify(0.5,recover=false,keep=none)", _two_feature_model(), calib, shapes)
    wanda, stats, _ = run("sparsify(0.5,criterion=wanda,recover=false,keep=none)",
                          _two_feature_model(), calib, shapes)
    w_mag = mag.graph.initializers["w"].const_value.numpy()
    w_wanda = wanda.graph.initializers["w"].const_value.numpy()
    # magnitude zeros inputs 0 and 1 (smallest |w|); Wanda keeps input 0 (norm 100) and
    # zeros input 3 (norm 0.01): |w| * ||x|| ~ 100 / 2 / 6 / 0.04
    assert np.all(w_mag[:2] == 0) and np.all(w_mag[2:] != 0)
    assert np.all(w_wanda[[1, 3]] == 0) and np.all(w_wanda[[0, 2]] != 0)
    assert stats["criterion"] == "wanda"


def test_wanda_needs_calibration_data():
    with pytest.raises(InputSpecError, match="calibration"):
        run("sparsify(0.5,criterion=wanda)")


def test_recover_true_needs_calibration_data():
    with pytest.raises(InputSpecError, match="calibration"):
        run("sparsify(0.5,recover=true)")


# ---------------------------------------------------------------- recovery


def test_recover_keeps_the_zeros_and_lowers_the_error_on_the_network():
    calib, shapes = calib_data(32), {"x": (2, 4, 8, 8)}
    plain, _, plain_step = run("sparsify(0.6,recover=false)", calib=calib, shapes=shapes)
    refit, stats, refit_step = run("sparsify(0.6)", calib=calib, shapes=shapes)
    for name in ("c2", "c3", "g1", "m1"):
        a, b = weights(plain)[name], weights(refit)[name]
        np.testing.assert_array_equal(a == 0, b == 0)  # same mask, zeros still zero
        record = stats["layers"][name]
        if record["refit"]:
            assert not np.array_equal(a, b)
            assert record["rel_error"] < record["rel_error_masked"]
    assert stats["refit"] >= 3
    assert refit_step.error.max_rel_l2 < plain_step.error.max_rel_l2
    assert read_sparsity(refit)["c2.weight"]["sparsity"] == pytest.approx(0.6, abs=1e-3)


def _digits(pipeline: str, calib, shapes):
    model = load_model(DATA / "digits_cnn.onnx")
    ctx = PassContext(calibration=open_calibration(calib, model, shapes), input_shapes=shapes)
    out, steps = PassManager(pipeline, ctx).run(model)
    return out, steps[0].stats


def _digits_scores(model):
    test = np.load(DATA / "digits_test.npz")
    x, labels = test["input"].astype(np.float32), test["labels"]
    ref = OrtArtifact(load_model(DATA / "digits_cnn.onnx")).run({"input": x})["logits"]
    got = OrtArtifact(model).run({"input": x})["logits"]
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    return rel, float(np.mean(got.argmax(-1) == labels))


@pytest.mark.parametrize("pattern", ["unstructured", "block(1x8)", "2:4"])
def test_recover_on_digits_lowers_the_held_out_error(pattern, digits_model):
    calib = {"input": np.load(DATA / "digits_calib.npz")["input"]}
    shapes = {"input": (8, 1, 8, 8)}
    ratio = "" if pattern == "2:4" else "0.5,"
    plain, _ = _digits(f"sparsify({ratio}pattern={pattern},recover=false)", calib, shapes)
    refit, stats = _digits(f"sparsify({ratio}pattern={pattern})", calib, shapes)
    for name in ("1.0.weight", "3.0.weight", "6.weight"):
        a = plain.graph.initializers[name].const_value.numpy()
        b = refit.graph.initializers[name].const_value.numpy()
        np.testing.assert_array_equal(a == 0, b == 0)
    err_plain, acc_plain = _digits_scores(plain)
    err_refit, acc_refit = _digits_scores(refit)
    assert stats["refit"] >= 1
    assert err_refit < err_plain
    assert acc_refit >= acc_plain


def test_wanda_and_magnitude_both_run_on_digits(digits_model):
    calib = {"input": np.load(DATA / "digits_calib.npz")["input"]}
    shapes = {"input": (8, 1, 8, 8)}
    masks = {}
    for criterion in ("magnitude", "wanda"):
        out, stats = _digits(f"sparsify(0.5,criterion={criterion},recover=false)", calib, shapes)
        assert stats["sparsity"] == pytest.approx(0.5) and stats["sparsified"] == 3
        masks[criterion] = out.graph.initializers["3.0.weight"].const_value.numpy() == 0
        rel, acc = _digits_scores(out)
        assert np.isfinite(rel) and acc > 0.5
    assert not np.array_equal(masks["magnitude"], masks["wanda"])


def test_recover_on_minilm_layer0_lowers_the_held_out_error():
    path = zoo_path("minilm_l6")
    data = np.load(path.with_name("minilm_l6.inputs.npz"))
    names = ["input_ids", "attention_mask", "token_type_ids"]
    calib = {n: data[n][:8] for n in names}
    held = [{n: data[n][i:i + 1] for n in names} for i in range(8, 16)]
    shapes = {n: (1, 128) for n in names}
    model = load_model(path)
    ref = OrtArtifact(model)

    def error(pipeline):
        ctx = PassContext(calibration=open_calibration(calib, model, shapes), input_shapes=shapes)
        out, steps = PassManager(pipeline, ctx).run(load_model(model))
        got = OrtArtifact(out)
        a = np.concatenate([ref.run(b)["sentence_embedding"].ravel() for b in held])
        b = np.concatenate([got.run(b)["sentence_embedding"].ravel() for b in held])
        return float(np.linalg.norm(b - a) / np.linalg.norm(a)), steps[0].stats

    only_layer0 = 'overrides="*layer.0/*=0.5"'
    err_plain, st_plain = error(f"sparsify(0,{only_layer0},recover=false)")
    err_refit, st_refit = error(f"sparsify(0,{only_layer0})")
    assert st_plain["sparsified"] == st_refit["sparsified"] == 6
    assert st_refit["refit"] >= 1
    assert err_refit < err_plain


# ---------------------------------------------------------------- metadata


def test_metadata_json_matches_the_stored_zeros(tmp_path):
    out, stats, _ = run("sparsify(0.5,pattern=block(1x4),recover=false)")
    path = tmp_path / "sparse.onnx"
    save_model(out, path)
    proto = onnx.load(str(path))
    props = {p.key: p.value for p in proto.metadata_props}
    record = json.loads(props["onnxforge.sparsity"])
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    assert set(record) == {stats["layers"][k]["weight"] for k in stats["layers"]}
    for name, entry in record.items():
        assert set(entry) == {"pattern", "sparsity", "shape"}
        assert entry["pattern"] == "block(1x4)"
        assert entry["shape"] == list(inits[name].shape)
        assert entry["sparsity"] == np.sum(inits[name] == 0) / inits[name].size
    # a second run merges its entries into the record
    again, _, _ = run('sparsify(0.5,pattern=2:4,recover=false,keep=none,overrides="c2=0")',
                      load_model(path))
    merged = read_sparsity(again)
    assert merged["c2.weight"]["pattern"] == "block(1x4)"
    assert merged["g2.weight"]["pattern"] == "2:4"


# ---------------------------------------------------------------- options


def test_pipeline_text_round_trips():
    text = Pipeline.parse('sparsify(0.8,pattern=block(1x8),criterion=wanda,keep="first")').text
    assert text == 'sparsify(ratio=0.8,pattern="block(1x8)",criterion=wanda,keep=first)'
    assert Pipeline.parse(text).text == text


@pytest.mark.parametrize("text, message", [
    ("sparsify(pattern=block(0x8))", "block"),
    ("sparsify(pattern=4:4)", "N:M"),
    ("sparsify(pattern=diagonal)", "unstructured"),
    ("sparsify(0.7,pattern=2:4)", "fixes the sparsity"),
    ("sparsify(pattern=2:4,scope=global)", "global"),
    ('sparsify(pattern=2:4,overrides="c2=0.3")', "only be 0"),
    ('sparsify(overrides="c2")', "PATTERN=RATIO"),
    ("sparsify(ratio=1)", "out of range"),
    ("sparsify(criterion=l1)", "not one of"),
])
def test_bad_options_are_refused(text, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.parse(text)


# ---------------------------------------------------------------- command line


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxforge.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_cli_end_to_end_and_budget_refusal(tmp_path, digits_model):
    calib = DATA / "digits_calib.npz"
    out, report = tmp_path / "sparse.onnx", tmp_path / "r.json"
    refused = _cli("optimize", str(digits_model), "-o", str(out), "-p",
                   "sparsify(0.8,recover=false)", "--calib", str(calib), "--max-error", "1e-6",
                   "--input-shape", "input:8,1,8,8", "--no-latency")
    assert refused.returncode == 6, refused.stderr
    assert not out.exists()
    done = _cli("optimize", str(digits_model), "-o", str(out), "-p",
                "sparsify(pattern=2:4,criterion=wanda)", "--calib", str(calib),
                "--verify-data", str(DATA / "digits_test.npz"), "--report", str(report),
                "--input-shape", "input:8,1,8,8", "--no-latency")
    assert done.returncode == 0, done.stderr
    data = json.loads(report.read_text())
    step = data["steps"][-1]
    assert step["pass"] == "sparsify(pattern=2:4,criterion=wanda)" and not step["exact"]
    assert step["stats"]["sparsified"] == 3 and step["stats"]["refit"] >= 1
    assert step["error"]["max_rel_l2"] > 0  # lossy: its error is recorded
    assert data["error"]["candidate_accuracy"] >= data["error"]["reference_accuracy"] - 0.05
    written = load_model(out)
    record = read_sparsity(written)
    assert {e["pattern"] for e in record.values()} == {"2:4"}
    for name, entry in record.items():
        w = written.graph.initializers[name].const_value.numpy()
        assert entry["sparsity"] == np.sum(w == 0) / w.size
    forced = _cli("optimize", str(digits_model), "-o", str(tmp_path / "forced.onnx"), "-p",
                  "sparsify(0.8,recover=false)", "--calib", str(calib), "--max-error", "1e-6",
                  "--input-shape", "input:8,1,8,8", "--force", "--no-latency")
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "forced.onnx").exists()
    listing = _cli("passes")
    assert "sparsify" in listing.stdout and "criterion" in listing.stdout
