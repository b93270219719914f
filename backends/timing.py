"""How every backend is timed: median-of-N wall time after warm-up (`time_callable`).

    timing = time_callable(lambda: session.run(None, feed), warmup=5, repeat=30)
    timing.median_ms

onnxruntime (`ort.OrtArtifact`) is both the reference executor and the baseline every
speed claim is measured against; `tvm.TVMArtifact.benchmark` is timed the same way.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


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
