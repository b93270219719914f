"""Real measurements of a built candidate: latency on the backend (side by side with the
input model), file size, MACs, and its quality against the input model.

Latency backends share one call, `time(models, inputs) -> [median ms]`, with every model
timed in the same interleaved rounds, so a ratio to the input model (always models[0])
is what one run measures and what the search uses; absolute milliseconds drift with the
machine's load. `OrtLatency` is onnxruntime on this machine (threads as given, spinning
off); `TvmLatency` compiles each model for a TVM target, checks the compiled code against
onnxruntime on the same model, and times the compiled code; tests may pass any object
with the same `name` and `time`.

A backend may refuse a model it cannot time honestly: its latency is then NaN and
`rejected[i]` (the index in the last `time` call) says why; the search drops it.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnx_ir as ir

from ..calibration import CalibrationSource
from ..errors import BackendError, InputSpecError
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
        from ..backends.ort import OrtArtifact

        artifacts = [OrtArtifact(m, threads=self.threads) for m in models]
        return _interleaved_medians(artifacts, inputs, self.warmup, self.repeat, self.seconds,
                                    self.max_repeat)


def _interleaved_medians(artifacts: Sequence[Any], inputs: dict[str, np.ndarray], warmup: int,
                         repeat: int, seconds: float, max_repeat: int) -> list[float]:
    """Median ms of each artifact, timed in 10 interleaved rounds (api.benchmark_artifacts);
    runs per artifact: at least `repeat`, more for fast ones (about `seconds` of samples),
    at most `max_repeat`."""
    from ..api import benchmark_artifacts

    probe = artifacts[0].benchmark(inputs, warmup=warmup, repeat=5)
    each_ms = max(min(probe.samples_ms), 1e-3)
    repeat = int(min(max(repeat, seconds * 1000 / each_ms), max_repeat))
    rows = benchmark_artifacts(artifacts, inputs, warmup=warmup, repeat=repeat, rounds=10)
    return [r["median_ms"] for r in rows]


def timing_problem(target: str) -> str | None:
    """Why TVM code for `target` cannot be timed in this process (None: it can). AArch64
    code runs here only under qemu, an emulator whose timings say nothing about a board."""
    import tvm

    from ..backends.targets import (
        UnknownTargetError,
        is_gpu_target,
        resolve_target,
        runs_on_this_machine,
        target_arch,
    )

    try:
        resolved = resolve_target(target)
    except UnknownTargetError as exc:
        raise InputSpecError(f"--target {target}: {exc}") from exc
    if runs_on_this_machine(resolved):
        return None
    where = ("a board registered with TVM's RPC tracker (--rpc-tracker HOST:PORT --rpc-key "
             "KEY), or search with --target host")
    if resolved.kind.name == "llvm":
        arch = target_arch(resolved)
        if arch == "aarch64":
            return (f"--target {target}: AArch64 code runs on this machine only under qemu, "
                    "whose timings are an emulator's, not the board's; measuring it needs "
                    + where)
        return f"--target {target}: {arch} code cannot run on this machine; it needs " + where
    if is_gpu_target(resolved):
        device = getattr(tvm, resolved.kind.name, None)
        try:
            present = device is not None and device(0).exist
        except Exception:  # noqa: BLE001 - a runtime without that device API
            present = False
        if present and target_arch(resolved) == target_arch(resolve_target("host")):
            return None
        return f"--target {target}: no {resolved.kind.name} device on this machine; it needs " \
            + where
    return f"--target {target}: cannot run here; it needs " + where


@dataclass
class TvmLatency:
    """TVM: each model compiled for `target` (backends.tvm.compile_model: default
    schedules plus the shipped configs, no tuning), its compiled code checked against
    onnxruntime on that same model (backends.tvm.verify_artifact, the check `onnxforge
    compile` runs), then every model's compiled code timed in the same interleaved rounds
    (TVM's thread pool at `threads`). A model that fails to compile or to verify is not
    timed: NaN, and `rejected[i]` says why. Compiled models are kept by content hash
    (the input model and the last `keep` others), so timing one again does not rebuild."""

    target: str = "host"
    threads: int = 1
    input_shapes: dict[str, tuple[int, ...]] | None = None
    warmup: int = 5
    repeat: int = 30
    seconds: float = 0.1
    max_repeat: int = 3000
    keep: int = 8
    rejected: dict[int, str] = field(default_factory=dict)
    compile_seconds: float = 0.0
    compiled: int = 0

    def __post_init__(self) -> None:
        problem = timing_problem(self.target)
        if problem:
            raise InputSpecError(problem)
        self._artifacts: dict[str, Any] = {}  # content hash -> artifact | why it failed
        self._pinned: str | None = None

    @property
    def name(self) -> str:
        return f"tvm:{self.target}"

    def _compile(self, model: ir.Model) -> Any:
        """The verified artifact of `model`, or a str saying why there is none."""
        import time

        from ..backends.tvm import compile_model, verify_artifact

        key = hashlib.sha256(model_bytes(model)).hexdigest()
        if key in self._artifacts:
            self._artifacts[key] = self._artifacts.pop(key)  # most recently used last
            return self._artifacts[key]
        started = time.perf_counter()
        try:
            artifact = compile_model(model, self.target, input_shapes=self.input_shapes,
                                     threads=self.threads)
            check = verify_artifact(artifact, model, threads=self.threads,
                                    raise_on_failure=False)
            found = artifact if check.ok else f"compiled code failed verification: " \
                f"{check.problem()}"
        except Exception as exc:  # noqa: BLE001 - any compile failure rejects the candidate
            found = f"TVM could not compile it: {type(exc).__name__}: {exc}"
        self.compile_seconds += time.perf_counter() - started
        self.compiled += 1
        self._artifacts[key] = found
        if self._pinned is None:
            self._pinned = key  # the first model compiled: the input model
        others = [k for k in self._artifacts if k != self._pinned]
        for old in others[:max(0, len(others) - self.keep)]:
            del self._artifacts[old]
        return found

    def time(self, models: Sequence[ir.Model], inputs: dict[str, np.ndarray]) -> list[float]:
        found = [self._compile(m) for m in models]
        self.rejected = {i: f for i, f in enumerate(found) if isinstance(f, str)}
        if 0 in self.rejected:
            raise BackendError(f"autocompress --backend tvm --target {self.target}: the input "
                               f"model: {self.rejected[0]}")
        ok = [i for i, f in enumerate(found) if not isinstance(f, str)]
        medians = _interleaved_medians([found[i] for i in ok], inputs, self.warmup,
                                       self.repeat, self.seconds, self.max_repeat)
        out = [math.nan] * len(models)
        for i, ms in zip(ok, medians):
            out[i] = ms
        return out


class CalibErrors:
    """`errors(model)`: the output rel L2 of `model` vs the input model on the first `limit`
    batches of `source` (`compare_models(...).max_rel_l2`, the same numbers), with the
    input model's outputs computed once: a proxy table measures a hundred or more
    models, and running the input model again for each doubled the cost."""

    def __init__(self, original: ir.Model, source: CalibrationSource, *, limit: int | None,
                 threads: int | None):
        self.original, self.source, self.limit, self.threads = original, source, limit, threads
        self._reference: list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] | None = None
        self._names: list[str] = []

    def __call__(self, model: ir.Model) -> float:
        from ..backends.ort import OrtArtifact
        from ..verify import OutputComparer

        if self._reference is None:
            ref = OrtArtifact(self.original, threads=self.threads)
            self._names = list(ref.output_names)
            self._reference = [(b, ref.run(b)) for b in self.source.batches(self.limit)]
        cand = OrtArtifact(model, threads=self.threads)
        if len(cand.output_names) != len(self._names) or not self._reference:
            # let compare_models say what is wrong, in its words
            return float(compare_models(self.original, model, self.source, limit=self.limit,
                                        threads=self.threads).max_rel_l2)
        rename = dict(zip(cand.output_names, self._names))
        comparer = OutputComparer()
        for batch, ref_out in self._reference:
            comparer.add(ref_out, {rename[k]: v for k, v in cand.run(batch).items()})
        return float(comparer.result().max_rel_l2)


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
    """The size in bytes of `model` written as the output would be (save_model; its bytes
    can differ from the in-memory serialization, e.g. value_info) and its MACs."""
    metrics = compute_metrics(model, shapes)
    with tempfile.TemporaryDirectory(prefix="onnxforge-autocompress-") as folder:
        save_model(model, Path(folder) / "candidate.onnx")
        size = sum(f.stat().st_size for f in Path(folder).iterdir())  # + external data
    return {"size_bytes": float(size), "macs": float(metrics.macs)}
