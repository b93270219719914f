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
from .errors import BackendError
from .ir import load_model
from .subgraphs import expose_values


def with_outputs(model: ir.Model, names: Iterable[str]) -> ir.Model:
    """A copy of `model` whose graph also outputs the named values (values inside
    If/Loop/Scan bodies are lifted out under new names: see `exposed_outputs`)."""
    return exposed_outputs(model, names)[0]


def exposed_outputs(model: ir.Model, names: Iterable[str]) -> tuple[ir.Model, dict[str, str]]:
    """(copy of `model` outputting the named values, name -> graph output carrying it).
    A value inside an If branch reads as an empty array when its branch was not taken;
    one inside a Loop/Scan body reads stacked over the iterations."""
    copy = load_model(model, check=False)
    return copy, expose_values(copy, names)


class ActivationReader:
    """One onnxruntime session on a copy of `model` that also outputs `names`.

    `read` computes any of those values (or of the model's outputs) on a batch; graph
    inputs come from the batch itself. The session runs unoptimized, so every named
    value exists as it is in the model.
    """

    def __init__(self, model: ir.Model, names: Iterable[str], *, threads: int | None = None):
        exposed, self.carried = exposed_outputs(model, names)
        self.artifact = OrtArtifact(exposed, threads=threads, optimize=False)

    def read(self, batch: dict[str, np.ndarray], names: Iterable[str]) -> dict[str, np.ndarray]:
        names = list(names)
        computed = [name for name in names if name not in batch]
        feed = {name: batch[name] for name in self.artifact.input_names}
        try:
            outputs = [self.carried.get(name, name) for name in computed]
            values = self.artifact.session.run(outputs, feed) if computed else []
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime failed to run the model: {exc}") from exc
        result = dict(zip(computed, values))
        return {name: batch[name] if name in batch else result[name] for name in names}


def iter_activations(
    model: ir.Model,
    names: list[str],
    batches: Iterable[dict[str, np.ndarray]],
    *,
    threads: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
    """For each input batch, the arrays of the named values (graph inputs allowed)."""
    reader = ActivationReader(model, names, threads=threads)
    for batch in batches:
        yield reader.read(batch, names)


def probe_shapes(model: ir.Model, names: list[str], batch: dict[str, np.ndarray], *,
                 threads: int | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of the named tensor values on one batch, by running the model (for shapes
    that shape inference cannot settle: after Reshape of computed targets, Expand/Where
    masks, shape arithmetic data propagation does not follow)."""
    values = ActivationReader(model, names, threads=threads).read(batch, names)
    return {name: tuple(int(d) for d in arr.shape) for name, arr in values.items()
            if isinstance(arr, np.ndarray)}
