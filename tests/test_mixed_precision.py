"""quantize(mode=mixed): per-layer int8 / fp16 / fp32 under an error, accuracy or size budget."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from conftest import DATA
from onnxforge.calibration import ArraySource, open_calibration
from onnxforge.errors import BudgetExceededError
from onnxforge.ir import load_model
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.shapes import input_dtypes
from onnxforge.verify import compare_models

SHAPES = {"input": (8, 1, 8, 8)}


def _run(digits_model, pipeline: str, source=None):
    model = load_model(digits_model)
    reference = load_model(model)
    source = source or open_calibration(DATA / "digits_calib.npz", model, SHAPES)
    ctx = PassContext(calibration=source, input_shapes=SHAPES, threads=1,
                      max_calibration_batches=25)
    quantized, steps = PassManager(pipeline, ctx).run(model)
    return reference, quantized, steps[-1].stats, source


def _held_out(digits_model):
    model = load_model(digits_model)
    return open_calibration(DATA / "digits_test.npz", model, SHAPES)


def test_mixed_meets_max_error_and_reports_budget_curve(digits_model):
    budget = 0.005
    ref, q, stats, calib = _run(digits_model, f"quantize(mixed,max_error={budget})")
    bits = stats["bits_per_layer"]
    assert len(bits) == 5 and set(bits.values()) <= {8, 16, 32}
    assert 0 < stats["layers_int8"] < 5  # the budget is between all-fp16 and all-int8
    # the pass's own measurement, and an independent one on the same evaluation batches
    assert stats["final_error"]["rel_l2"] <= budget
    assert compare_models(ref, q, calib, limit=stats["eval_batches"]).max_rel_l2 <= budget + 1e-6
    # held-out digits: the accuracy is preserved
    held = compare_models(ref, q, _held_out(digits_model), limit=None)
    assert held.accuracy_drop <= 0.003
    curve = stats["budget_curve"]
    assert [p["int8_layers"] for p in curve] == list(range(6))
    assert curve[-1]["weight_bytes"] < curve[0]["weight_bytes"]
    # layers are switched in sensitivity order: the int8 ones are the least sensitive
    order = list(stats["sensitivity"])
    assert {n for n, b in bits.items() if b == 8} == set(order[: stats["layers_int8"]])
    chosen = max(p["int8_layers"] for p in curve if p["within_budget"])
    assert chosen == stats["layers_int8"]


def test_mixed_loose_budget_is_all_int8_and_tight_budget_refuses_or_stays_float(digits_model):
    _, _, loose, _ = _run(digits_model, "quantize(mixed,max_error=1.0)")
    assert loose["layers_int8"] == 5
    # nothing meets 1e-7 when the float layers are stored in fp16 ...
    with pytest.raises(BudgetExceededError, match="no configuration meets the budget"):
        _run(digits_model, "quantize(mixed,max_error=1e-7)")
    # ... but all-fp32 does when fp16 fallback is off
    _ref, _q, stats, _calib = _run(digits_model,
                                   "quantize(mixed,max_error=1e-7,fp16_fallback=false)")
    assert stats["layers_fp32"] == 5 and stats["final_error"]["rel_l2"] <= 1e-7


def test_mixed_over_budget_exits_with_the_budget_code(digits_model, tmp_path):
    out = tmp_path / "q.onnx"
    result = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "optimize", str(digits_model), "-o", str(out),
         "-p", "quantize(mixed,max_error=1e-7)", "--calib", str(DATA / "digits_calib.npz"),
         "--input-shape", "input:8,1,8,8", "--no-latency"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == BudgetExceededError.exit_code == 6
    assert "no configuration meets the budget" in result.stderr and not out.exists()


def test_mixed_accuracy_drop_budget_uses_labels(digits_model):
    model = load_model(digits_model)
    data = np.load(DATA / "digits_test.npz")
    source = ArraySource({"input": data["input"][:200]}, SHAPES, input_dtypes(model),
                         labels=data["labels"][:200])
    ref, q, stats, _ = _run(digits_model, "quantize(mixed,max_error=0,max_accuracy_drop=0)", source)
    assert stats["final_error"]["accuracy_drop"] <= 0.0
    assert stats["layers_int8"] >= 1
    check = compare_models(ref, q, source, limit=stats["eval_batches"])
    assert check.accuracy_drop <= 0.0


def test_mixed_metric_callback(digits_model):
    from onnxforge.passes.quantization.quantize import QuantizePass

    calls = []

    def worst_cosine_error(reference, candidate):
        calls.append(1)
        errs = []
        for r, c in zip(reference, candidate):
            a, b = r["logits"].ravel(), c["logits"].ravel()
            errs.append(1.0 - float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        return max(errs)

    model = load_model(digits_model)
    ctx = PassContext(calibration=open_calibration(DATA / "digits_calib.npz", model, SHAPES),
                      input_shapes=SHAPES, threads=1, max_calibration_batches=25)
    p = QuantizePass(context=ctx, mode="mixed", max_error=2e-5, metric=worst_cosine_error)
    _, steps = PassManager([p], ctx).run(model)
    stats = steps[0].stats
    assert calls and stats["budget"]["metric"] is True
    assert stats["final_error"]["metric"] <= 2e-5
    assert all(p["within_budget"] == (p["metric"] <= 2e-5) for p in stats["budget_curve"])


def test_mixed_size_target(digits_model):
    _ref, _q, stats, _ = _run(digits_model, "quantize(mixed,max_error=1.0,max_size_ratio=0.45)")
    assert stats["size_target_met"] is True
    chosen = next(p for p in stats["budget_curve"] if p["int8_layers"] == stats["layers_int8"])
    assert chosen["size_ratio"] <= 0.45
    # the smallest number of int8 layers that reaches the target
    assert all(p["size_ratio"] > 0.45 for p in stats["budget_curve"]
               if p["int8_layers"] < stats["layers_int8"])
