"""Read intermediate tensors of a model on calibration data, with onnxruntime.

Data-driven passes (pruning recovery, data-aware low-rank, quantization
calibration) need the values flowing along some edges. This exposes those edges
as extra graph outputs of a *copy* of the model and streams them batch by batch,
so memory stays bounded by what the caller keeps.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import onnx_ir as ir

from .backends.ort import OrtArtifact
from .ir import load_model


def with_outputs(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """A copy of `model` whose graph also outputs the named values."""
    copy = load_model(model, check=False)
    values = {v.name: v for node in copy.graph for v in node.outputs}
    values.update({v.name: v for v in copy.graph.inputs})
    existing = {v.name for v in copy.graph.outputs}
    for name in names:
        if name in existing:
            continue
        if name not in values:
            raise KeyError(f"no value named {name!r} in the model")
        copy.graph.outputs.append(values[name])
        existing.add(name)
    return copy


def iter_activations(
    model: ir.Model,
    names: list[str],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """For each input batch, the arrays of the named values (graph inputs allowed)."""
    probe = OrtArtifact(with_outputs(model, names), threads=threads, optimize=False)
    for batch in batches:
        result = probe.run(batch)
        out = {}
        for name in names:
            out[name] = batch[name] if name in batch else result[name]
        yield out
