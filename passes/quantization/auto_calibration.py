"""`calibration=auto`: choose the activation range method by measuring it on calibration
data the ranges were not computed from.

The calibration batches (the first `calib_batches`, or the context's limit) are split in
two folds by position: batches 0, 2, 4, ... calibrate, batches 1, 3, 5, ... are held out.
One streaming pass over the first fold fills observers that keep a histogram; each
candidate method (minmax, percentile, entropy, mse) reads its ranges from the same
observers. The model quantized with each candidate's ranges (the caller builds it: the
same plan, weights and bias correction, only the activation ranges differ) is run on the
held-out fold, and its output error against the model before activation quantization is
measured: relative L2 of each output, the worst output; with `auto_error=top1` the share
of positions whose argmax over the last axis changes (a classifier's top-1, a CTC
recognizer's symbol per time step), ties broken by relative L2; the pass's `metric`
callback when one is given. The method with the smallest held-out error is chosen; the
caller then calibrates on all batches with it. Remaining ties go to the earlier
candidate in the list (minmax first).

The choice is per model, not per tensor: a per-tensor choice needs one held-out
evaluation per tensor and method (hundreds of ORT sessions on a 50-layer net) or an
error attribution per tensor that the output error does not give.

What the choice costs: one more calibration pass over half the batches, and per candidate
one QDQ rewrite of a copy of the model and one ORT session over the held-out half.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from ...errors import InputSpecError
from .core import Calibration, QuantizeOptions, calibrate
from .output_error import OutputErrorEvaluator

CANDIDATES = ("minmax", "percentile", "entropy", "mse")
# observers built with a histogram method keep the histogram every candidate reads
_HISTOGRAM_METHOD = "mse"
ERROR_NAMES = {"rel_l2": "relative L2 of the outputs (worst)",
               "top1_disagreement": "share of argmax (last axis) changes (worst output)",
               "metric": "metric"}


class FoldContext:
    """The pass context with its calibration stream reduced to one fold: of the first
    `total` batches, those at positions `fold`, `fold + 2`, ... Everything else is the
    wrapped context's."""

    def __init__(self, context: Any, fold: int, total: int):
        self._context, self._fold, self._total = context, fold, total

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    @property
    def max_calibration_batches(self) -> int:
        return len(range(self._fold, self._total, 2))

    def calibration_batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        taken = 0
        for i, batch in enumerate(self._context.calibration_batches(self._total)):
            if i % 2 == self._fold and (limit is None or taken < limit):
                taken += 1
                yield batch


def total_batches(context: Any, opts: QuantizeOptions) -> int:
    """How many calibration batches the pass reads (what the folds split)."""
    return opts.calib_batches or context.max_calibration_batches


def choose_calibration(context: Any, opts: QuantizeOptions, reference: ir.Model,
                       names: Iterable[str], channel_inputs: dict[str, int],
                       build: Callable[[QuantizeOptions, Calibration], ir.Model],
                       ) -> tuple[str, dict[str, Any]]:
    """The candidate method with the smallest held-out output error, and the report entry
    (`calibration_auto`). `build(opts_with_method, fold_calibration)` returns a quantized
    copy of `reference` with that calibration's ranges."""
    start = time.perf_counter()
    total = total_batches(context, opts)
    held_out = list(FoldContext(context, 1, total).calibration_batches())
    if not held_out:
        raise InputSpecError(
            "quantize: calibration=auto holds every second calibration batch out to compare "
            "the methods and needs at least 2 batches; the calibration data gave 1 (give more "
            "samples, or choose calibration=minmax|percentile|entropy|mse)")
    fold = FoldContext(context, 0, total)
    calib = calibrate(reference, fold, names, method=_HISTOGRAM_METHOD,
                      channel_inputs=channel_inputs, limit=fold.max_calibration_batches)
    top1 = opts.metric is None and opts.auto_error == "top1"
    evaluator = OutputErrorEvaluator(reference, held_out, opts, None, context.threads,
                                     top1=top1)
    key = "metric" if opts.metric is not None else "top1_disagreement" if top1 else "rel_l2"
    errors: dict[str, float] = {}
    rel_l2: dict[str, float] = {}
    for method in CANDIDATES:
        for obs in calib.observers.values():
            obs.method = method
        measured = evaluator.errors(build(replace(opts, calibration=method), calib))
        errors[method], rel_l2[method] = measured[key], measured["rel_l2"]
    chosen = min(CANDIDATES, key=lambda m: (errors[m], rel_l2[m], CANDIDATES.index(m)))
    report = {"chosen": chosen, "held_out_error": {m: round(e, 6) for m, e in errors.items()},
              "error": ERROR_NAMES[key],
              "calibrate_batches": calib.batches, "held_out_batches": len(held_out),
              "seconds": round(time.perf_counter() - start, 2)}
    if key != "rel_l2":
        report["held_out_rel_l2"] = {m: round(e, 6) for m, e in rel_l2.items()}
    return chosen, report


def describe_choice(report: dict[str, Any]) -> str:
    """One terminal line: the chosen method and every candidate's held-out error."""
    errs = ", ".join(f"{m} {e:.4g}" for m, e in report["held_out_error"].items())
    total = report["calibrate_batches"] + report["held_out_batches"]
    return (f"calibration=auto chose {report['chosen']} (output error on the "
            f"{report['held_out_batches']} held-out of {total} calibration batches, ranges "
            f"from the others: {errs})")
