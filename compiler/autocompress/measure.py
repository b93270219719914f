"""Real measurements of a built candidate: latency on the backend (side by side with the
input model), file size, MACs, and its quality against the input model.

Latency backends share one call, `time(models, inputs) -> [median ms]`, with every model
timed in the same interleaved rounds, so a ratio to the input model (always models[0])
is what one run measures and what the search uses; absolute milliseconds drift with the
machine's load. `OrtLatency` is onnxruntime on this machine (threads as given, spinning
off); tests may pass any object with the same `name` and `time`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from ..calibration import CalibrationSource
from ..ir import model_bytes, save_model
from ..metrics import compute_metrics
from ..verify import compare_models


class LatencyBackend(Protocol):
    name: str

    def time(self, models: Sequence[ir.Model], inputs: dict[str, np.ndarray]) -> list[float]:
        """Median latency in ms of each model on `inputs`, interleaved."""
        ...


@dataclass
class OrtLatency:
    """onnxruntime on this machine: `threads` intra-op threads, spinning off
    (backends.ort.session_options), models timed in 10 interleaved rounds (api.
    benchmark_artifacts). Runs per model: at least `repeat`, more for fast models so that
    each gets about `seconds` of samples (a 0.02 ms model timed 30 times moves by 30 %
    between two measurements on a loaded machine), at most `max_repeat`."""

    threads: int = 1
    warmup: int = 5
    repeat: int = 30
    seconds: float = 0.1
    max_repeat: int = 3000
    name: str = "ort"

    def time(self, models: Sequence[ir.Model], inputs: dict[str, np.ndarray]) -> list[float]:
        from ..api import benchmark_artifacts
        from ..backends.ort import OrtArtifact

        artifacts = [OrtArtifact(m, threads=self.threads) for m in models]
        probe = artifacts[0].benchmark(inputs, warmup=self.warmup, repeat=5)
        each_ms = max(min(probe.samples_ms), 1e-3)
        repeat = int(min(max(self.repeat, self.seconds * 1000 / each_ms), self.max_repeat))
        rows = benchmark_artifacts(artifacts, inputs, warmup=self.warmup, repeat=repeat,
                                   rounds=10)
        return [r["median_ms"] for r in rows]


Metric = Callable[[str], float]


@dataclass
class Quality:
    """How a candidate's outputs compare with the input model's on the verify data."""

    rel_l2: float
    accuracy: float | None = None  # top-1 on labelled verify data
    reference_accuracy: float | None = None
    metric: float | None = None  # the user's metric(model_path) (higher is better)

    def to_dict(self) -> dict[str, Any]:
        return {"rel_l2": self.rel_l2, "accuracy": self.accuracy,
                "reference_accuracy": self.reference_accuracy, "metric": self.metric}


def measure_quality(original: ir.Model, candidate: ir.Model, source: CalibrationSource,
                    *, threads: int, metric: Metric | None = None,
                    limit: int | None = 64) -> Quality:
    """Output rel L2 of `candidate` vs `original` on `source` (all of it when labelled: an
    accuracy on a slice would mislead), its accuracy, and `metric` on a saved copy."""
    labelled = source.labels() is not None
    cmp = compare_models(original, candidate, source, limit=None if labelled else limit,
                         threads=threads)
    value = None if metric is None else run_metric(metric, candidate)
    return Quality(float(cmp.max_rel_l2), cmp.candidate_accuracy, cmp.reference_accuracy, value)


def run_metric(metric: Metric, model: ir.Model) -> float:
    """`metric(path)` on `model` saved to a temporary file (removed after)."""
    with tempfile.TemporaryDirectory(prefix="onnxforge-autocompress-") as folder:
        path = save_model(model, Path(folder) / "candidate.onnx")
        return float(metric(os.fspath(path)))


def resources(model: ir.Model, shapes: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """The serialized size in bytes and the MACs of `model`."""
    metrics = compute_metrics(model, shapes)
    return {"size_bytes": float(len(model_bytes(model))), "macs": float(metrics.macs)}
