"""Mixed precision under a budget (`quantize(mode=mixed, max_error=0.01)`).

Algorithm:
  1. Prepare the float model as int8 quantization does (BatchNorm folding, Gemm
     alpha/beta), calibrate once for every quantizable layer (Conv, ConvTranspose,
     Gemm, MatMul) and keep a few calibration batches plus the float outputs on them.
  2. Sensitivity: for each layer, the error of the model with only that layer in
     int8 (everything else float).
  3. Budget curve: layers are switched to int8 in increasing sensitivity order; at
     each step the remaining layers are fp16 (weights stored as float16) or fp32, and
     the model's error and weight bytes are measured.
  4. Choice: the point with the most int8 layers whose error is within every error
     budget given; with `max_size_ratio` (weight bytes / fp32 weight bytes) the
     first point that reaches it, if it is within the error budgets.
  5. The chosen configuration is applied and its error measured once more; the pass
     refuses (raises `BudgetExceededError`, the budget error of the whole package)
     when even the all-float16 / float32 point misses the budget.

Budgets (any combination; all must hold):
  max_error          relative L2 error of the outputs vs float (default 0.01)
  max_accuracy_drop  top-1 accuracy drop (fraction) on the calibration labels
  metric             Python callback metric(ref_outputs, cand_outputs) -> error, with
                     the lists of output dicts of the evaluation batches; compared
                     against max_error instead of the relative L2 error
  max_size_ratio     weight bytes target as a fraction of the fp32 weight bytes

Per-layer precisions: int8 (QDQ, integer kernels in onnxruntime), fp16 (weights stored
in float16 behind a Cast: half the bytes; onnxruntime's CPU provider folds the Cast
at load and computes in fp32, true fp16 compute needs a GPU target), fp32.
int4 is skipped: onnxruntime runs 4-bit weights only as MatMulNBits (MatMul, blockwise),
which this pass does not emit yet.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from ...backends.ort import OrtArtifact
from ...errors import BudgetExceededError
from ...ir import constant_array, infer_shapes, load_model
from ..graph import remove_unused
from ..naming import NameAllocator
from .core import (
    Calibration,
    QuantizeOptions,
    apply_calibrated,
    bias_correction_inputs,
    calibrate,
    make_plan,
    weight_bytes,
)
from .prepare import (
    add_const,
    ensure_node_names,
    fold_into_weights,
    merge_for_int8,
    upgrade_opset,
)

logger = logging.getLogger(__name__)


def store_fp16_weights(model: ir.Model, names: set[str]) -> int:
    """Store the constant weight (input 1) of the named nodes as float16 + Cast."""
    graph = model.graph
    alloc = NameAllocator(graph)
    count = 0
    for n in list(graph):
        if n.name not in names or len(n.inputs) < 2:
            continue
        w = constant_array(n.inputs[1])
        if w is None or w.dtype != np.float32:
            continue
        half = add_const(graph, f"{n.inputs[1].name}_fp16", w.astype(np.float16), alloc)
        cast = alloc.make_node("Cast", [half], {"to": int(ir.DataType.FLOAT)},
                               name=f"{n.name}_weight_cast", output_names=[f"{n.name}_weight_fp32"])
        cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(n, cast)
        n.replace_input_with(1, cast.outputs[0])
        count += 1
    remove_unused(model)
    return count


class _Evaluator:
    """Error of candidate models against the float model on fixed batches."""

    def __init__(self, reference: ir.Model, batches: list[dict[str, np.ndarray]],
                 opts: QuantizeOptions, labels: np.ndarray | None, threads: int):
        self.batches = batches
        self.opts = opts
        self.threads = threads
        self.labels = labels
        self.ref = [OrtArtifact(reference, threads=threads).run(b) for b in batches]
        self.evaluations = 0

    def outputs(self, model: ir.Model) -> list[dict[str, np.ndarray]]:
        art = OrtArtifact(model, threads=self.threads)
        self.evaluations += 1
        return [art.run(b) for b in self.batches]

    def errors(self, model: ir.Model) -> dict[str, float]:
        cand = self.outputs(model)
        out: dict[str, float] = {}
        if self.opts.metric is not None:
            out["metric"] = float(self.opts.metric(self.ref, cand))
        worst = 0.0
        for name in self.ref[0]:
            num = sum(float(np.sum((r[name].astype(np.float64) - c[name]) ** 2))
                      for r, c in zip(self.ref, cand))
            den = sum(float(np.sum(r[name].astype(np.float64) ** 2)) for r in self.ref)
            worst = max(worst, float(np.sqrt(num / den)) if den else float(np.sqrt(num)))
        out["rel_l2"] = worst
        if self.labels is not None:
            first = next(iter(self.ref[0]))
            pr = np.concatenate([r[first].reshape(len(r[first]), -1).argmax(-1) for r in self.ref])
            pc = np.concatenate([c[first].reshape(len(c[first]), -1).argmax(-1) for c in cand])
            n = min(len(pr), len(self.labels))
            out["accuracy_drop"] = float(np.mean(pr[:n] == self.labels[:n])
                                         - np.mean(pc[:n] == self.labels[:n]))
        return out

    def within(self, err: dict[str, float]) -> bool:
        o = self.opts
        if o.metric is not None:
            ok = err["metric"] <= o.max_error
        else:
            ok = err["rel_l2"] <= o.max_error if o.max_error > 0 else True
        if o.max_accuracy_drop >= 0:
            if "accuracy_drop" not in err:
                raise BudgetExceededError("quantize(mode=mixed): max_accuracy_drop needs "
                                          "calibration data with labels")
            ok = ok and err["accuracy_drop"] <= o.max_accuracy_drop + 1e-12
        return ok


def quantize_mixed(model: ir.Model, opts: QuantizeOptions, context: Any) -> dict[str, Any]:
    """Choose int8 / fp16 / fp32 per layer under the budget and rewrite `model` in place."""
    start = time.perf_counter()
    stats = _prepare(model, opts)
    fp32 = load_model(model, check=False)
    int8_opts = replace(opts, mode="int8")
    full = make_plan(load_model(fp32, check=False), int8_opts)
    layers = [n.name for n in full.compute]
    if not layers:
        stats["bits_per_layer"] = {}
        return stats
    calib = calibrate(fp32, context, {t.data_name for t in full.tensors.values()},
                      method=opts.calibration, channel_inputs=bias_correction_inputs(full, opts),
                      limit=opts.calib_batches or None)
    evaluator = _evaluator(fp32, calib, opts, context)
    precisions = _Precisions(fp32, calib, int8_opts)
    # 2. sensitivity of each layer alone
    sensitivity = {name: evaluator.errors(precisions.build({name}, set())) for name in layers}
    key = "metric" if opts.metric is not None else "rel_l2"
    order = sorted(layers, key=lambda n: (sensitivity[n][key],
                                          sensitivity[n].get("accuracy_drop", 0.0)))
    # 3. budget curve, 4. choice
    curve, configs = _budget_curve(order, evaluator, precisions, opts.fp16_fallback,
                                   weight_bytes(fp32))
    chosen, size_met = _choose(curve, opts)
    int8, fp16 = configs[chosen["int8_layers"]]
    # 5. apply to the model itself and verify
    precisions.apply(model, int8, fp16)
    final = evaluator.errors(model)
    if not evaluator.within(final):
        raise BudgetExceededError(f"quantize(mode=mixed): the chosen configuration measured "
                                  f"{final}, over budget")
    bits = {n: 8 if n in int8 else (16 if n in fp16 else 32) for n in layers}
    stats.update({
        "bits_per_layer": bits,
        "layers_int8": sum(1 for b in bits.values() if b == 8),
        "layers_fp16": sum(1 for b in bits.values() if b == 16),
        "layers_fp32": sum(1 for b in bits.values() if b == 32),
        "sensitivity": {n: {k: round(v, 6) for k, v in sensitivity[n].items()} for n in order},
        "budget_curve": curve,
        "final_error": {k: round(v, 6) for k, v in final.items()},
        "budget": {"max_error": opts.max_error, "max_accuracy_drop": opts.max_accuracy_drop,
                   "max_size_ratio": opts.max_size_ratio, "metric": opts.metric is not None},
        "size_target_met": size_met,
        "int4": "skipped: onnxruntime runs int4 weights only as MatMulNBits, not emitted",
        "evaluations": evaluator.evaluations,
        "eval_batches": len(evaluator.batches),
        "seconds": round(time.perf_counter() - start, 2),
    })
    return stats


def _prepare(model: ir.Model, opts: QuantizeOptions) -> dict[str, Any]:
    """1. The float rewrites int8 quantization runs first (without its accuracy repair)."""
    if opts.per_channel and model.opset_imports.get("", 13) < 13:
        upgrade_opset(model, 13)
    infer_shapes(model)
    stats: dict[str, Any] = {**fold_into_weights(model), **merge_for_int8(model)}
    ensure_node_names(model.graph)
    return stats


def _evaluator(fp32: ir.Model, calib: Calibration, opts: QuantizeOptions,
               context: Any) -> _Evaluator:
    """An evaluator on the first calibration batches (at most 8, or `calib_batches`),
    with their labels when the calibration data has them."""
    eval_count = min(calib.batches, opts.calib_batches or 8)
    batches = list(context.calibration_batches(eval_count))
    labels = None
    if context.calibration is not None and hasattr(context.calibration, "labels"):
        labels = context.calibration.labels()
    return _Evaluator(fp32, batches, opts, labels, context.threads)


class _Precisions:
    """Builds the float model with a chosen precision per layer."""

    def __init__(self, fp32: ir.Model, calib: Calibration, int8_opts: QuantizeOptions):
        self.fp32, self.calib, self.int8_opts = fp32, calib, int8_opts

    def apply(self, target: ir.Model, int8: set[str], fp16: set[str]) -> ir.Model:
        """Quantize the `int8` layers and store the `fp16` ones in half precision, in place."""
        if int8:
            plan = make_plan(target, self.int8_opts, only=int8)
            apply_calibrated(target, plan, self.calib, self.int8_opts)
        if fp16:
            store_fp16_weights(target, fp16)
        return target

    def build(self, int8: set[str], fp16: set[str]) -> ir.Model:
        """A new copy of the float model with these precisions."""
        return self.apply(load_model(self.fp32, check=False), int8, fp16)


def _budget_curve(order: list[str], evaluator: _Evaluator, precisions: _Precisions,
                  rest_fp16: bool, fp32_bytes: int
                  ) -> tuple[list[dict[str, Any]], dict[int, tuple[set[str], set[str]]]]:
    """Error and weight bytes with the first k layers of `order` in int8 (the rest fp16
    when `rest_fp16`, else fp32), for every k (40 evenly spaced ones on deep models);
    and the (int8, fp16) layer sets of each point."""
    curve = []
    points = list(range(len(order) + 1))
    if len(points) > 41:  # bound the cost on very deep models: 40 evenly spaced points
        points = sorted({round(i * len(order) / 40) for i in range(41)})
    configs = {}
    for k in points:
        int8 = set(order[:k])
        fp16 = set(order[k:]) if rest_fp16 else set()
        cand = precisions.build(int8, fp16)
        err = evaluator.errors(cand)
        size = weight_bytes(cand)
        curve.append({"int8_layers": k, **{e: round(v, 6) for e, v in err.items()},
                      "weight_bytes": size, "size_ratio": round(size / fp32_bytes, 4),
                      "within_budget": evaluator.within(err)})
        configs[k] = (int8, fp16)
    return curve, configs


def _choose(curve: list[dict[str, Any]], opts: QuantizeOptions
            ) -> tuple[dict[str, Any], bool | None]:
    """The point of the curve to apply, and whether the size target was met (None
    without one): the most int8 layers within the error budgets, or with
    `max_size_ratio` the fewest that reach it."""
    ok_points = [p for p in curve if p["within_budget"]]
    if not ok_points:
        raise BudgetExceededError(
            f"quantize(mode=mixed): no configuration meets the budget (max_error={opts.max_error}, "
            f"max_accuracy_drop={opts.max_accuracy_drop}); the least lossy point has error "
            f"{curve[0]}. Raise the budget or use mode=fp16."
        )
    chosen = max(ok_points, key=lambda p: p["int8_layers"])
    size_met = None
    if opts.max_size_ratio > 0:
        small = [p for p in ok_points if p["size_ratio"] <= opts.max_size_ratio]
        size_met = bool(small)
        if small:
            chosen = min(small, key=lambda p: p["int8_layers"])
    return chosen, size_met
