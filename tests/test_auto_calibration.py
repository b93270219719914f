"""quantize(calibration=auto): the activation range method chosen on held-out calibration
batches (passes/quantization/auto_calibration.py).

A two-layer MLP whose hidden unit 0 sees one outlier row per batch (value ~200 against a
bulk of ~1): when that unit barely reaches the output, clipping the outlier (entropy) is
right and minmax wastes the int8 grid on it; when it carries the output, clipping is
wrong. auto must tell the two apart, its recorded held-out errors must be what an
independent run on the same folds measures, and the model it writes must be the one
the chosen method writes.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import ArraySource
from onnxforge.errors import InputSpecError
from onnxforge.ir import load_model
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from rich.console import Console

D, H, ROWS = 32, 64, 16


def outlier_mlp(outlier_weight: float, seed: int = 0):
    """x (16, 32) -> MatMul -> Relu -> MatMul -> y (16, 8); input feature 0 drives hidden
    unit 0 alone, whose output weights are all `outlier_weight`."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((D, H)) / np.sqrt(D)).astype(np.float32)
    w1[0, :], w1[:, 0] = 0.0, 0.0
    w1[0, 0] = 1.0
    w2 = (rng.standard_normal((H, 8)) / np.sqrt(H)).astype(np.float32)
    w2[0, :] = outlier_weight
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="fc1"),
             helper.make_node("Relu", ["m1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(
        nodes, "outlier_mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [ROWS, D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [ROWS, 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def samples(batches: int, seed: int) -> np.ndarray:
    """`batches` * 16 rows; the first row of every batch has feature 0 at 200."""
    x = np.random.default_rng(seed).standard_normal((batches * ROWS, D)).astype(np.float32)
    x[:, 0] = np.abs(x[:, 0]) * 0.5
    x[::ROWS, 0] = 200.0
    return x


def source(x: np.ndarray) -> ArraySource:
    return ArraySource({"x": x}, {"x": (ROWS, D)}, {"x": np.dtype(np.float32)})


def run_quantize(proto, calibration: str, x: np.ndarray, pipeline: str | None = None,
                 console: Console | None = None):
    batches = len(x) // ROWS
    ctx = PassContext(calibration=source(x), threads=1, max_calibration_batches=batches)
    text = pipeline or f"quantize(int8,calibration={calibration})"
    model, steps = PassManager(text, ctx, console=console).run(load_model(proto))
    return model, steps[-1]


def rel_l2(proto, model, x: np.ndarray) -> float:
    ref, cand = OrtArtifact(load_model(proto), threads=1), OrtArtifact(model, threads=1)
    num = den = 0.0
    for i in range(0, len(x), ROWS):
        r = ref.run({"x": x[i:i + ROWS]})["y"].astype(np.float64)
        c = cand.run({"x": x[i:i + ROWS]})["y"]
        num += float(np.sum((r - c) ** 2))
        den += float(np.sum(r ** 2))
    return float(np.sqrt(num / den))


def folds(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Batches 0, 2, 4, ... and 1, 3, 5, ... of `x` (what auto calibrates / holds out)."""
    b = x.reshape(-1, ROWS, D)
    return b[0::2].reshape(-1, D), b[1::2].reshape(-1, D)


def test_auto_does_not_pick_minmax_when_outliers_waste_the_grid():
    proto, x = outlier_mlp(1e-3), samples(16, seed=1)
    model, step = run_quantize(proto, "auto", x)
    auto = step.stats["calibration_auto"]
    errors = auto["held_out_error"]
    assert auto["chosen"] != "minmax"
    assert errors[auto["chosen"]] == min(errors.values())
    assert errors[auto["chosen"]] < 0.5 * errors["minmax"], errors
    assert (auto["calibrate_batches"], auto["held_out_batches"]) == (8, 8)
    # on data neither fold saw, the chosen model is better than minmax's too
    fresh = samples(8, seed=7)
    minmax_model, _ = run_quantize(proto, "minmax", x)
    assert rel_l2(proto, model, fresh) < 0.5 * rel_l2(proto, minmax_model, fresh)


def test_auto_keeps_the_outliers_when_they_carry_the_output():
    proto, x = outlier_mlp(1.0), samples(16, seed=1)
    _, step = run_quantize(proto, "auto", x)
    auto = step.stats["calibration_auto"]
    errors = auto["held_out_error"]
    assert auto["chosen"] != "entropy"  # entropy clips the outlier row away
    assert errors[auto["chosen"]] < 0.1 * errors["entropy"], errors


@pytest.mark.parametrize("outlier_weight", [1e-3, 1.0])
def test_recorded_fold_errors_match_an_independent_run(outlier_weight):
    """Each method's recorded held-out error is what quantizing with that method on the
    calibrating fold alone and measuring on the held-out fold gives; the written model is
    the chosen method's on all batches."""
    proto, x = outlier_mlp(outlier_weight), samples(16, seed=1)
    model, step = run_quantize(proto, "auto", x)
    auto = step.stats["calibration_auto"]
    calib_fold, held_out = folds(x)
    for method, recorded in auto["held_out_error"].items():
        alone, _ = run_quantize(proto, method, calib_fold)
        assert rel_l2(proto, alone, held_out) == pytest.approx(recorded, rel=1e-3, abs=1e-6)
    chosen, _ = run_quantize(proto, auto["chosen"], x)
    probe = samples(2, seed=3)
    out_auto = OrtArtifact(model, threads=1).run({"x": probe[:ROWS]})["y"]
    out_chosen = OrtArtifact(chosen, threads=1).run({"x": probe[:ROWS]})["y"]
    np.testing.assert_array_equal(out_auto, out_chosen)
    assert step.stats["calibration_chosen"] == auto["chosen"]


def test_choice_is_printed_on_the_terminal():
    out = io.StringIO()
    _, step = run_quantize(outlier_mlp(1e-3), "auto", samples(16, seed=1),
                           console=Console(file=out, width=300))
    chosen = step.stats["calibration_auto"]["chosen"]
    text = out.getvalue()
    assert f"calibration=auto chose {chosen}" in text and "minmax" in text
    assert f"calibration=auto chose {chosen}" in step.note


def test_mixed_mode_chooses_on_its_most_compressed_configuration():
    proto, x = outlier_mlp(1e-3), samples(16, seed=1)
    model, step = run_quantize(proto, "auto", x, pipeline=(
        "quantize(mixed,max_error=0,calibration=auto)"))
    auto = step.stats["calibration_auto"]
    assert auto["chosen"] != "minmax"
    assert auto["held_out_error"][auto["chosen"]] < 0.5 * auto["held_out_error"]["minmax"]
    assert auto["measured_on"] == "every layer in int8"
    assert step.stats["layers_int8"] == 2
    assert rel_l2(proto, model, samples(4, seed=7)) < 0.5 * auto["held_out_error"]["minmax"]


def test_mixed_4bit_matmuls_have_no_static_activation_ranges_to_choose():
    """With bits=4 both MatMuls become MatMulNBits, which quantizes its input at run time:
    every method measures the same, and the tie goes to minmax."""
    _, step = run_quantize(outlier_mlp(1e-3), "auto", samples(16, seed=1), pipeline=(
        "quantize(mixed,bits=4,max_error=0,block=16,calibration=auto)"))
    auto = step.stats["calibration_auto"]
    assert auto["measured_on"].startswith("every layer in 4 bits")
    assert step.stats["layers_int4"] == 2
    assert len(set(auto["held_out_error"].values())) == 1
    assert auto["chosen"] == "minmax"


def test_one_calibration_batch_is_refused_with_the_reason():
    with pytest.raises(InputSpecError, match="calibration=auto .* at least 2 batches"):
        run_quantize(outlier_mlp(1e-3), "auto", samples(1, seed=1))


def top1_changes(proto, model, x: np.ndarray) -> float:
    ref, cand = OrtArtifact(load_model(proto), threads=1), OrtArtifact(model, threads=1)
    changed = [ref.run({"x": x[i:i + ROWS]})["y"].argmax(-1)
               != cand.run({"x": x[i:i + ROWS]})["y"].argmax(-1) for i in range(0, len(x), ROWS)]
    return float(np.mean(changed))


def test_auto_error_top1_records_argmax_changes_and_chooses_the_fewest():
    proto, x = outlier_mlp(1e-3), samples(16, seed=1)
    _, step = run_quantize(proto, "auto", x, pipeline=(
        "quantize(int8,calibration=auto,auto_error=top1)"))
    auto = step.stats["calibration_auto"]
    assert auto["error"].startswith("share of argmax")
    calib_fold, held_out = folds(x)
    changes = {}
    for method in auto["held_out_error"]:
        alone, _ = run_quantize(proto, method, calib_fold)
        changes[method] = top1_changes(proto, alone, held_out)
        assert auto["held_out_error"][method] == pytest.approx(changes[method], abs=1e-9)
        assert auto["held_out_rel_l2"][method] == pytest.approx(
            rel_l2(proto, alone, held_out), rel=1e-3, abs=1e-6)
    fewest = min(changes.values())
    assert changes[auto["chosen"]] == fewest
    tied = [m for m in changes if changes[m] == fewest]
    assert auto["chosen"] == min(tied, key=lambda m: auto["held_out_rel_l2"][m])
    assert changes["minmax"] > fewest  # the outlier costs minmax argmax changes too


def test_auto_uses_the_metric_callback_and_max_error_0_is_no_budget_with_it():
    """A metric callback (Python API) decides the choice; in mode=mixed with max_error=0
    the size stays the only budget with a metric too (it refused every point before)."""
    from onnxforge.passes.quantization.core import QuantizeOptions
    from onnxforge.passes.quantization.quantize import QuantizePass

    def worst_abs(ref, cand):
        return max(float(np.abs(r["y"] - c["y"]).max()) for r, c in zip(ref, cand))

    x = samples(16, seed=1)
    ctx = PassContext(calibration=source(x), threads=1, max_calibration_batches=16)
    opts = QuantizeOptions(mode="mixed", max_error=0.0, calibration="auto", metric=worst_abs)
    _, steps = PassManager([QuantizePass(opts)], ctx).run(load_model(outlier_mlp(1e-3)))
    auto = steps[-1].stats["calibration_auto"]
    assert auto["error"] == "metric"
    errors = auto["held_out_error"]
    assert errors[auto["chosen"]] == min(errors.values()) < errors["minmax"]
    assert set(auto["held_out_rel_l2"]) == set(errors)
    assert steps[-1].stats["layers_int8"] == 2
