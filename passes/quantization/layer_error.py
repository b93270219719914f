"""Per-layer output error of a quantized model: each rewritten layer's output against the
same value of the float model, on a few calibration batches.

The values are read wherever they are (main graph or If/Loop/Scan bodies, through
`onnxforge.activations`); a value inside an If branch that a batch did not take reads
empty and is skipped. The error at a layer includes what the layers before it already
changed (it is what that layer's consumers see), so a jump from one layer to the next
points at the layer that hurts.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ...activations import ActivationReader


def output_errors(reference: ir.Model, candidate: ir.Model, names: list[str], context: Any,
                  *, limit: int = 8) -> dict[str, float]:
    """Relative L2 error of each named value, candidate vs reference, over up to `limit`
    calibration batches (values never computed on them are left out)."""
    if not names or context is None or not getattr(context, "has_calibration", False):
        return {}
    ref_reader = ActivationReader(reference, names, threads=context.threads)
    cand_reader = ActivationReader(candidate, names, threads=context.threads)
    diff = dict.fromkeys(names, 0.0)
    norm = dict.fromkeys(names, 0.0)
    for batch in context.calibration_batches(limit):
        ref = ref_reader.read(batch, names)
        cand = cand_reader.read(batch, names)
        for name in names:
            a, b = np.asarray(ref[name], np.float64), np.asarray(cand[name], np.float64)
            if a.size == 0 or a.shape != b.shape:
                continue
            diff[name] += float(np.sum((a - b) ** 2))
            norm[name] += float(np.sum(a ** 2))
    return {name: round(float(np.sqrt(diff[name] / norm[name])), 6) for name in names
            if norm[name] > 0}
