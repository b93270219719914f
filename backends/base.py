"""The protocol every backend follows: compile a model once, then run, time and export it.

    artifact = backend.compile(model, target)
    outputs = artifact.run({"input": x})          # dict name -> np.ndarray
    timing = artifact.benchmark(inputs, warmup=5, repeat=30)
    artifact.export("out.so")

onnxruntime is both the reference executor and the baseline every speed claim
is measured against; TVM follows the same protocol.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


@dataclass
class Timing:
    """Latency of repeated runs after warm-up, in milliseconds."""

    median_ms: float
    mean_ms: float
    min_ms: float
    max_ms: float
    stdev_ms: float
    repeat: int
    warmup: int
    samples_ms: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("samples_ms")
        return data


def time_callable(fn: Callable[[], object], *, warmup: int = 5, repeat: int = 30) -> Timing:
    """Median-of-N wall time of `fn()` after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(
        median_ms=statistics.median(samples),
        mean_ms=statistics.fmean(samples),
        min_ms=min(samples),
        max_ms=max(samples),
        stdev_ms=statistics.stdev(samples) if len(samples) > 1 else 0.0,
        repeat=repeat,
        warmup=warmup,
        samples_ms=samples,
    )


class Artifact(Protocol):
    """A compiled model that can run, be timed and be exported."""

    backend: str
    input_names: list[str]
    output_names: list[str]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def benchmark(
        self, inputs: Mapping[str, np.ndarray], *, warmup: int = 5, repeat: int = 30
    ) -> Timing: ...

    def export(self, path: str | Path) -> Path: ...


class Backend(Protocol):
    name: str

    def compile(self, model: Any, target: Any = None, **options: Any) -> Artifact: ...
