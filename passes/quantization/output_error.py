"""The output error of candidate quantized models against a reference model on fixed
batches (relative L2 of each output, the worst one; a user `metric`; the top-1 accuracy
drop when labels are given; the top-1 disagreement on request) and whether it is within
the pass's error budgets. Used by mixed precision (mixed.py) and by calibration=auto
(auto_calibration.py)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...backends.ort import OrtArtifact
from ...errors import BudgetExceededError
from .core import QuantizeOptions


class OutputErrorEvaluator:
    """Error of candidate models against the float model on fixed batches."""

    def __init__(self, reference: ir.Model, batches: list[dict[str, np.ndarray]],
                 opts: QuantizeOptions, labels: np.ndarray | None, threads: int,
                 *, top1: bool = False):
        self.batches = batches
        self.opts = opts
        self.top1 = top1  # also measure `top1_disagreement`
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
        if self.top1:
            out["top1_disagreement"] = top1_disagreement(self.ref, cand)
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
        # max_error=0: no error budget (the size is the only one), with a metric too
        key = "metric" if o.metric is not None else "rel_l2"
        ok = err[key] <= o.max_error if o.max_error > 0 else True
        if o.max_accuracy_drop >= 0:
            if "accuracy_drop" not in err:
                raise BudgetExceededError("quantize(mode=mixed): max_accuracy_drop needs "
                                          "calibration data with labels")
            ok = ok and err["accuracy_drop"] <= o.max_accuracy_drop + 1e-12
        return ok


def top1_disagreement(ref: list[dict[str, np.ndarray]], cand: list[dict[str, np.ndarray]]
                      ) -> float:
    """The share of positions whose argmax over the last axis differs from the reference's
    (a classifier's top-1 per sample, a CTC recognizer's symbol per time step), the worst
    output; outputs with a last axis of 1 are left out (0.0 when none is left)."""
    worst = 0.0
    for name in ref[0]:
        if ref[0][name].ndim == 0 or ref[0][name].shape[-1] < 2:
            continue
        differ = sum(int(np.count_nonzero(r[name].argmax(-1) != c[name].argmax(-1)))
                     for r, c in zip(ref, cand))
        total = sum(r[name][..., 0].size for r in ref)
        worst = max(worst, differ / max(total, 1))
    return worst
