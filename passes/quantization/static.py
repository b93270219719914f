"""`quantize(int8)`: static post-training INT8 QDQ quantization, step by step.

`quantize_int8` rewrites the model in place:
  1. exact float rewrites (prepare.py): opset raised to 13/14 for per-channel axes,
     BatchNorm folding, conv-bias Adds folded into Conv, Gemm alpha/beta normalized;
  2. accuracy repair before calibration (repair.py): cross-layer equalization
     (`equalize=true`), SmoothQuant (`smooth=0.5`; auto when a LayerNorm feeds
     MatMul/Gemm layers);
  3. MatMul + bias Add -> Gemm (the bias stays int32), decomposed HardSwish/HardSigmoid
     fused (prepare.py);
  4. plan, calibrate, ranges and the QDQ rewrite (core.py), with bias correction
     (repair.py, on by default) and, with `rounding=gptq`, GPTQ-rounded weights
     (rounding.py);
  5. embedding tables as int8 rows (`embeddings=true`, core.py);
  6. the same QDQ rules inside every If / Loop / Scan body (bodies.py), then LSTM
     layers as DynamicQuantizeLSTM (GRU weight-only with `recurrent=all`, recurrent.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir import infer_shapes, load_model
from . import repair
from .auto_calibration import choose_calibration, describe_choice
from .bodies import has_bodies_or_recurrent, quantize_bodies_and_recurrent
from .core import (
    Calibration,
    QuantizeOptions,
    apply_calibrated,
    bias_correction_inputs,
    calibrate,
    make_plan,
    quantize_embeddings,
)
from .prepare import fold_into_weights, merge_for_int8, upgrade_opset
from .rounding import choose_weights


def quantize_int8(model: ir.Model, opts: QuantizeOptions, context: Any,
                  stats: dict[str, Any], *, only: set[str] | None = None,
                  calibration: Calibration | None = None) -> Calibration:
    """Static INT8 QDQ quantization of `model` in place; returns the calibration used."""
    if opts.per_channel and model.opset_imports.get("", 13) < 13:
        # 14 rather than 13: HardSwish exists from opset 14 (see fuse_hardswish)
        stats["opset_upgraded"] = upgrade_opset(model, 14) or upgrade_opset(model, 13)
    # the float model, for per-layer errors inside bodies and of LSTM/GRU (only then)
    reference = load_model(model, check=False) if has_bodies_or_recurrent(model) else None
    infer_shapes(model)
    stats.update(fold_into_weights(model))
    if opts.equalize:
        stats["equalized_pairs"] = repair.equalize_model(model)
    repair.smooth_as_configured(model, opts, context, stats)
    stats.update(merge_for_int8(model))
    plan = make_plan(model, opts, only)
    rounded = choose_weights(model, plan.compute, opts, context, stats)
    names = {t.data_name for t in plan.tensors.values()}
    if opts.calibration == "auto":
        opts = _auto_calibration(model, opts, context, stats, names, only, rounded,
                                 bias_correction_inputs(plan, opts), calibration is None)
    if calibration is None:
        calibration = calibrate(model, context, names, method=opts.calibration,
                                channel_inputs=bias_correction_inputs(plan, opts),
                                limit=opts.calib_batches or None)
    applied, shifts = apply_calibrated(model, plan, calibration, opts, rounded=rounded)
    if opts.embeddings:
        stats["embeddings_quantized"] = quantize_embeddings(
            model, set(plan.skipped) & _keep_names(opts))
    stats.update(quantize_bodies_and_recurrent(model, opts, context, reference))
    stats.update({
        "compute_quantized": len(plan.compute),
        "compute_by_op": _count_ops(plan.compute),
        "int8_elementwise": len(plan.int8_ops),
        "shared_scale_ops": len(plan.shared),
        "relu_folded": len(plan.folded),
        "qdq_pairs": applied["qdq_pairs"],
        "weights_quantized": applied["weights_quantized"],
        "bias_int32": applied["bias_int32"],
        "bias_corrected": len(shifts),
        "calibration_batches": calibration.batches,
        "calibration_seconds": round(calibration.seconds, 3),
        "kept_float": {k: v for k, v in plan.skipped.items()},
        "weight_error": _weight_errors(applied.get("records", [])),
    })
    return calibration


def _auto_calibration(model: ir.Model, opts: QuantizeOptions, context: Any,
                      stats: dict[str, Any], names: set[str], only: set[str] | None,
                      rounded: dict, channel_inputs: dict[str, int],
                      measure: bool) -> QuantizeOptions:
    """calibration=auto (auto_calibration.py): the options with the method chosen on
    held-out calibration batches (the report's `calibration_auto`). `rounded` (GPTQ
    weights by node name) does not depend on the ranges: every candidate shares it."""
    if not names or not measure:  # nothing to calibrate, or the caller's calibration
        stats["calibration_auto"] = {"chosen": "minmax", "note": "no activation to calibrate"
                                     if not names else "calibration given by the caller"}
        return replace(opts, calibration="minmax")

    def build(cand_opts: QuantizeOptions, calib: Calibration) -> ir.Model:
        cand = load_model(model, check=False)
        apply_calibrated(cand, make_plan(cand, cand_opts, only), calib, cand_opts,
                         rounded=rounded)
        return cand

    chosen, report = choose_calibration(context, opts, model, names, channel_inputs, build)
    stats["calibration_auto"] = report
    stats["calibration_chosen"] = chosen
    stats.setdefault("notes", []).append(describe_choice(report))
    return replace(opts, calibration=chosen)


def _weight_errors(records: list) -> dict[str, dict[str, Any]]:
    """Per quantized layer: its weight's rounding error, rel L2 of dequantized vs float
    (the HTML report's per-tensor table)."""
    out = {}
    for rec in records:
        w = np.asarray(rec.w, dtype=np.float64)
        norm = float(np.linalg.norm(w))
        err = float(np.linalg.norm(w - np.asarray(rec.w_deq, dtype=np.float64)))
        weight = rec.node.inputs[1]
        out[rec.node.name] = {"op": rec.node.op_type, "weight": None if weight is None else
                              weight.name.removesuffix("_dequantized"),
                              "elements": int(w.size), "per_channel": rec.axis is not None,
                              "rel_l2": round(err / norm, 6) if norm else 0.0}
    return out


def _keep_names(opts: QuantizeOptions) -> set[str]:
    return {t.strip() for t in opts.keep_float.split(",") if t.strip() not in ("", "first", "last")}


def _count_ops(nodes: list[ir.Node]) -> dict[str, int]:
    out: dict[str, int] = {}
    for n in nodes:
        out[n.op_type] = out.get(n.op_type, 0) + 1
    return out
