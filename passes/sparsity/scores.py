"""Importance of each weight of a layer's 2-D view: magnitude or Wanda.

- `magnitude`: |w|.
- `wanda` (Sun et al., 2023, "pruning by weights and activations"): |w_ij| * ||x_j||, with
  x_j the j-th input feature of the layer over the calibration data, read on the
  original model with `onnxforge.activations`. ||x_j|| is taken as a root mean square
  (a norm divided by the square root of the row count: the same ranking within a layer,
  and comparable across layers for `scope=global`). For a Conv the feature (c, kh, kw)
  gets its input channel c's RMS over batch and positions; a Gemm's feature is an input
  column; a MatMul's the last axis of its input, over every other axis (without the
  padding tokens of a batch that has an integer `attention_mask` input).
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

from ...activations import ActivationReader
from ..graph import attr
from ..pruning.recover import _token_mask
from .layers import SparseLayer


def _feature_rows(layer: SparseLayer, x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The input as rows of features: [rows, channels] for a Conv, [rows, K] otherwise."""
    x = np.asarray(x, dtype=np.float64)
    if layer.op == "Conv":
        return np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    if layer.op == "Gemm":
        return x.T if int(attr(layer.node, "transA", 0)) else x.reshape(-1, x.shape[-1])
    rows = x.reshape(-1, x.shape[-1])
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape and mask.any():
        rows = rows[mask.reshape(-1)]
    return rows


def _to_columns(layer: SparseLayer, rms: np.ndarray) -> np.ndarray:
    """Per-feature RMS laid out like the view's columns: [1, inputs], or [outputs, inputs]
    for a grouped conv (row o reads the channels of its own group)."""
    if layer.op != "Conv":
        return rms[None, :]
    w = layer.array
    taps = int(np.prod(w.shape[2:]))
    group = layer.group
    per_group = rms.reshape(group, -1)  # [group, channels per group]
    cols = np.repeat(per_group, taps, axis=1)  # (c, kh, kw) order: each channel taps times
    return np.repeat(cols, w.shape[0] // group, axis=0) if group > 1 else cols


def input_rms(model: ir.Model, layers: list[SparseLayer],
              batches: Iterable[dict[str, np.ndarray]], threads: int | None = None
              ) -> dict[str, np.ndarray]:
    """Layer key -> RMS of each input feature over the calibration batches, shaped to
    broadcast against the layer's view."""
    names = sorted({layer.node.inputs[0].name for layer in layers})
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    reader = ActivationReader(model, names, threads=threads)
    for batch in batches:
        acts, mask = reader.read(batch, names), _token_mask(batch)
        for layer in layers:
            rows = _feature_rows(layer, acts[layer.node.inputs[0].name], mask)
            sums[layer.key] = sums.get(layer.key, 0.0) + np.sum(rows * rows, axis=0)
            counts[layer.key] = counts.get(layer.key, 0) + len(rows)
    return {layer.key: _to_columns(layer, np.sqrt(sums[layer.key] / max(counts[layer.key], 1)))
            for layer in layers if layer.key in sums}


def weight_scores(layer: SparseLayer, criterion: str, rms: dict[str, np.ndarray]) -> np.ndarray:
    """Scores of the layer's view elements (higher = more important)."""
    magnitude = np.abs(layer.view())
    if criterion == "magnitude":
        return magnitude
    return magnitude * rms[layer.key]
