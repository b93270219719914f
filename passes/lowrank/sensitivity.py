"""Measured output sensitivity per layer, for `lowrank(macs=F | params=F, allocate=sensitivity)`.

The global budget spreads ranks by the energy each layer loses (its own share of
Σs², whitened in data-aware mode). Equal lost energy does not cost the model
equally: an early conv of a recognizer or an attention projection can matter
far more than a late FFN. Here each layer is truncated on its own at three
probe ranks (about 2 %, 10 % and 30 % of its energy lost) and the model's output
error on a few calibration batches is measured; each candidate's error in the
allocation is then read off that measured curve (piecewise linear in the lost
energy, extended beyond the deepest probe with its mean slope).

Cheap by construction: one onnxruntime session on a copy whose decomposable
weights are overridable graph inputs; a probe feeds the reconstructed weight
(same shape as the original), so nothing is rebuilt. Cost: 3 x layers runs on
`sens_batches` batches. The probe uses the plain reconstruction (no bias
correction), so it slightly overstates data-aware errors, equally for all layers.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ...backends.ort import session_options
from ...ir import add_initializer, load_model, model_bytes
from .graph import Layer
from .linalg import energy_kept
from .rank import Choice

logger = logging.getLogger(__name__)

PROBE_LOSSES = (0.02, 0.10, 0.30)  # energy lost at the probe ranks


def onnx_weight(layer: Layer, canonical: np.ndarray) -> np.ndarray:
    """The layer's ONNX weight for a canonical-layout weight (inverse of `inspect_node`)."""
    if layer.op == "MatMul":
        return canonical.T.astype(np.float32)
    if layer.op == "Gemm":
        from ..graph import attr

        alpha = float(attr(layer.node, "alpha", 1.0))
        w = canonical / alpha
        return (w if int(attr(layer.node, "transB", 0)) else w.T).astype(np.float32)
    return canonical.reshape(layer.weight.shape).astype(np.float32)


class LayerProbe:
    """Model output error with one layer's weight replaced, on fixed calibration batches."""

    def __init__(self, model: ir.Model, layers: list[Layer],
                 batches: list[dict[str, np.ndarray]], threads: int | None):
        probe = load_model(model, check=False)
        by_name = {n.name: n for n in probe.graph}
        self.inputs: dict[str, str] = {}
        for layer in layers:
            node = by_name.get(layer.node.name)
            if node is None or not layer.node.name:
                continue
            value = add_initializer(probe.graph, f"sens::{layer.key}::w",
                                    onnx_weight(layer, layer.weight))
            probe.graph.inputs.append(value)
            node.replace_input_with(1, value)
            self.inputs[layer.key] = value.name
        self.session = ort.InferenceSession(model_bytes(probe), session_options(threads),
                                            providers=["CPUExecutionProvider"])
        names = {i.name for i in self.session.get_inputs()}
        self.batches = [{k: v for k, v in b.items() if k in names} for b in batches]
        self.reference = [self.session.run(None, b) for b in self.batches]

    def error(self, key: str, weight: np.ndarray) -> float:
        """Mean over outputs of sum ||y - y_ref||^2 / sum ||y_ref||^2 over the batches."""
        feeds = {self.inputs[key]: weight}
        num = den = None
        for batch, ref in zip(self.batches, self.reference):
            got = self.session.run(None, {**batch, **feeds})
            d = np.array([float(np.sum((g.astype(np.float64) - r) ** 2))
                          for g, r in zip(got, ref)])
            e = np.array([float(np.sum(r.astype(np.float64) ** 2)) for r in ref])
            num = d if num is None else num + d
            den = e if den is None else den + e
        ok = den > 0
        return float(np.mean(num[ok] / den[ok])) if ok.any() else 0.0


def probe_ranks(spectra: list[np.ndarray], grids: list[list[int]]) -> list[tuple[int, ...]]:
    """Rank tuples losing about each of `PROBE_LOSSES` of the energy in every mode."""
    out = []
    for target in PROBE_LOSSES:
        ranks = []
        for s, grid in zip(spectra, grids):
            fitting = [r for r in grid if 1.0 - energy_kept(s, r) <= target]
            ranks.append(min(fitting) if fitting else grid[-1])
        if tuple(ranks) not in out:
            out.append(tuple(ranks))
    return out


class ErrorCurve:
    """Measured output error vs lost energy of one layer: piecewise linear through the
    origin and the probe points, extended beyond the last one with its mean slope."""

    def __init__(self, losses: list[float], errors: list[float]):
        order = np.argsort(losses)
        self.x = np.concatenate([[0.0], np.asarray(losses, float)[order]])
        self.y = np.maximum.accumulate(np.concatenate([[0.0], np.asarray(errors,
                                                                          float)[order]]))

    @property
    def usable(self) -> bool:
        return bool(self.x[-1] > 0)

    def __call__(self, lost: float) -> float:
        if lost <= self.x[-1]:
            return float(np.interp(lost, self.x, self.y))
        return float(self.y[-1] * lost / self.x[-1])


def weighted(choices: list[Choice], curve: ErrorCurve | None, fallback: float) -> list[Choice]:
    """Candidates with the measured output error in place of the lost energy."""
    if curve is None:
        return [Choice(c.ranks, c.cost, c.error * fallback) for c in choices]
    return [Choice(c.ranks, c.cost, curve(c.error)) for c in choices]
