"""`autocompress`: one budget in, the best model found out (issue 17).

Steps (each shown on the progress line, all but the last cached in `cache_dir`):
  1. the input model is measured: latency on the backend, size, MACs, quality
  2. the decision space (`space.discover`) and the proxy tables (`proxies.measure_tables`):
     one build per knob choice, its error on calibration data and its latency ratio
  3. rounds of: NSGA-II on the corrected proxies (`search.evolve`), then the few points of
     its front nearest the budget are built and measured for real (latency ratio
     side by side with the input model, size, MACs, error on the verify data), and the
     proxies' correction is refit on everything measured
  4. until the time budget, `max_candidates` new measurements, or a round with nothing
     new to measure; then the best measured candidate that meets the budget and the
     quality limits (least quality loss, then least resource) is built again, measured
     against the input model once more, and written; none: BudgetExceededError naming
     the closest point, and nothing is written unless `force`.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from ..api import _try_shapes, data_files_read
from ..calibration import open_calibration
from ..errors import BudgetExceededError, InputSpecError, OptionText
from ..ir import ModelSource, files_read, load_model, model_bytes, save_model
from ..metrics import compute_metrics
from ..passes.base import PassContext
from ..report import write_report
from ..safe_write import check_writes, reading
from .budget import Budget
from .build import BuildError, build
from .cache import Cache, cache_key
from .measure import (
    CalibErrors,
    LatencyBackend,
    Metric,
    OrtLatency,
    TvmLatency,
    measure_quality,
    resources,
    run_metric,
)
from .plots import plot_paths, write_plots
from .proxies import (
    Correction,
    OutOfTime,
    ProxyTables,
    measure_tables,
    prune_curve_errors,
)
from .remote import RpcTvmLatency
from .search import choose_picks, evolve_joint, pareto_indices
from .space import KINDS, Policy, Space, discover, sparse_support

logger = logging.getLogger(__name__)


@dataclass
class AutocompressResult:
    model: ir.Model | None  # the chosen model (None when nothing met the budget)
    report: dict[str, Any]
    output: Path | None = None
    met: bool = False
    warnings: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)


def policy_key(policy: Policy) -> str:
    return ",".join(map(str, policy))


class _Clock:
    def __init__(self, seconds: float | None):
        self.start = time.monotonic()
        self.seconds = seconds

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if self.seconds is None else self.seconds - self.elapsed


class _Display:
    """The progress line: phase, best so far, front size, candidates measured, time."""

    def __init__(self, console: Console | None, time_budget: float | None):
        self.progress = None
        if console is not None:
            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                     BarColumn(), TimeElapsedColumn(), console=console,
                                     transient=False)
            self.task = self.progress.add_task("autocompress", total=time_budget)
        self.phase, self.best, self.front, self.measured = "starting", "-", 0, 0
        self.clock: _Clock | None = None

    @contextmanager
    def running(self, clock: _Clock) -> Iterator[_Display]:
        self.clock = clock
        if self.progress is None:
            yield self
            return
        with self.progress:
            yield self

    def update(self, **changes: Any) -> None:
        for key, value in changes.items():
            setattr(self, key, value)
        logger.info("autocompress: %s", self.phase)
        if self.progress is not None:
            text = (f"{self.phase} | best {self.best} | front {self.front} | "
                    f"measured {self.measured}")
            self.progress.update(self.task, description=text,
                                 completed=self.clock.elapsed if self.clock else 0)


def autocompress(
    model: ModelSource,
    calibration: Any,
    output: str | os.PathLike | None = None,
    *,
    latency_ms: float | None = None,
    speedup: float | None = None,
    size_mb: float | None = None,
    macs: float | None = None,
    max_error: float | None = None,
    max_accuracy_drop: float | None = None,
    metric: Metric | None = None,
    verify_data: Any = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    backend: str = "ort",
    target: str = "host",
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    proxy_latency: str = "ort",
    threads: int = 1,
    time_budget: float | None = 300.0,
    max_candidates: int = 40,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    force: bool = False,
    report_path: str | os.PathLike | None = None,
    kinds: Sequence[str] = KINDS,
    calib_batches: int = 64,
    latency_backend: LatencyBackend | None = None,
    lowrank_guard: bool | None = None,
    console: Console | None = None,
) -> AutocompressResult:
    """Search prune ratios per group, low-rank ranks and int8/fp32 per layer for the model
    that meets one budget (`latency_ms`, `speedup`, `size_mb` or `macs`) with the least
    quality loss, and write it to `output` (see the module docstring for the steps).

    Quality: output rel L2 vs the input model on `verify_data` (default: the calibration
    data, said in the report's notes), limited by `max_error`; `max_accuracy_drop` limits
    the top-1 drop on labelled verify data, or with `metric` (a `metric(model_path) ->
    float`, higher is better) the drop `metric(input) - metric(candidate)`.
    `backend="ort"`: onnxruntime on this machine with `threads` threads, spinning off;
    `backend="tvm"`: each measured candidate compiled for `target` (a TVM preset that runs
    on this machine), verified against onnxruntime on the same model (a candidate that
    fails is dropped and reported, never chosen) and timed against the input model
    compiled the same way; its proxy tables' latencies come from onnxruntime and the
    search corrects them on the TVM measurements (`proxy_latency="backend"`: the proxy
    tables are timed on TVM too, one compile per table entry). With `rpc_tracker`
    ("host:port") and `rpc_key`, the TVM code is timed (and checked against onnxruntime)
    on the board registered with TVM's RPC tracker under that key (remote.py); the target
    then need not run here. `latency_backend` replaces
    either with any object with `.name` and `.time(models, inputs)` (tests).
    `time_budget` (seconds, None: unbounded) stops the search and returns the best model
    measured so far;
    `cache_dir` keeps proxies and measured candidates for a later run; `seed` makes the
    search deterministic. Past the budget: BudgetExceededError and nothing written, unless
    `force` (then the closest point is written).
    `lowrank_guard`: keep a decomposition only if ORT runs it faster (None: on for
    latency budgets on ORT). The input model is never modified.
    """
    budget = Budget.parse(latency_ms=latency_ms, speedup=speedup, size_mb=size_mb, macs=macs,
                          max_error=max_error, max_accuracy_drop=max_accuracy_drop)
    kinds = tuple(kinds)
    if not kinds or not set(kinds) <= set(KINDS):
        raise InputSpecError(f"autocompress: techniques {list(kinds)}: use some of "
                             f"{', '.join(KINDS)}")
    if latency_backend is None and backend not in ("ort", "tvm"):
        raise InputSpecError(f"autocompress --backend {backend}: use ort or tvm")
    if backend == "ort" and target != "host":
        raise InputSpecError(f"autocompress --target {target}: a TVM target; give it with "
                             "--backend tvm")
    if (rpc_tracker or rpc_key) and (backend != "tvm" or not (rpc_tracker and rpc_key)):
        raise InputSpecError(OptionText.of(
            ("rpc_tracker", "HOST:PORT"), " and ", ("rpc_key", "KEY"), " go together, with ",
            ("backend", "tvm"), " (a board registered with TVM's RPC tracker)"))
    if calibration is None:
        raise InputSpecError(OptionText.of("autocompress needs calibration data: ",
                                           ("calibration", "data.npz")))
    if time_budget is not None and not time_budget > 0:
        raise InputSpecError(f"--time-budget {time_budget}: must be > 0 seconds")
    if max_candidates < 1:
        raise InputSpecError(f"max_candidates={max_candidates}: must be >= 1")
    original = load_model(model)
    reads = (files_read(model, original) + data_files_read(calibration, "calibration data")
             + data_files_read(verify_data, "verification data"))
    writes = [("output", output), ("report", report_path)]
    if report_path is not None:
        writes += [(f"{name} plot", path) for name, path in plot_paths(report_path).items()]
    check_writes(writes, reads)
    shapes, problem = _try_shapes(original, input_shapes)
    if problem:
        raise InputSpecError(problem)
    lat = latency_backend or (
        RpcTvmLatency(target, rpc_tracker, rpc_key, threads, shapes) if rpc_tracker
        else TvmLatency(target, threads, shapes) if backend == "tvm"
        else OrtLatency(threads=threads))
    # TVM compiles for seconds per model: by default the per-knob tables are timed on
    # onnxruntime and the latency model is corrected on the candidates measured on TVM
    if proxy_latency not in ("ort", "backend"):
        raise InputSpecError(f"--proxy-latency {proxy_latency}: use ort or backend")
    proxy_lat = (OrtLatency(threads=threads) if isinstance(lat, (TvmLatency, RpcTvmLatency))
                 and proxy_latency == "ort" else lat)
    calib = open_calibration(calibration, original, shapes, seed=seed)
    notes: list[str] = []
    if verify_data is not None:
        verify = open_calibration(verify_data, original, shapes, seed=seed)
    else:
        verify = calib
        notes.append("no verify data given: the error is measured on the calibration data "
                     "the proxies were fit on (optimistic); give --verify-data, disjoint "
                     "from --calib, for an honest number")
    if max_accuracy_drop is not None and metric is None and verify.labels() is None:
        raise InputSpecError(OptionText.of(
            ("max_accuracy_drop", None), " needs labelled verify data (a 'labels' array in "
            "the .npz of ", ("verify_data", "test.npz"), ") or a metric callback"))
    guard = (lat.name == "ort" and budget.quantity == "latency_ratio"
             if lowrank_guard is None else lowrank_guard)
    context = PassContext(calibration=calib, input_shapes=shapes, threads=threads, seed=seed)
    inputs = calib.first()
    key = cache_key(model_bytes(original), calibration, verify_data,
                    {"backend": lat.name, "threads": threads,
                     # only when it differs, so that ORT caches keep their keys
                     **({"proxy_backend": proxy_lat.name} if proxy_lat is not lat else {}),
                     "shapes": shapes, "calib_batches": calib_batches, "guard": guard,
                     "metric": getattr(metric, "__qualname__", None)})
    cache = Cache(cache_dir, key)
    job = _Job(original, shapes, calib, verify, context, lat, inputs, budget, metric,
               calib_batches, guard, cache, seed)
    job.proxy_lat = proxy_lat
    job.sparse_table, why = sparse_support(lat.name, target)
    if why and "sparse" in kinds:
        notes.append(f"sparse: not in the space: {why}")
    clock = _Clock(time_budget)
    display = _Display(console, time_budget)
    with display.running(clock):
        job.run(kinds, clock, display, max_candidates)
    return job.finish(output, report_path, force, model, notes, reads, display)


class _Job:
    """One autocompress run's state: measurements, proxies, candidates."""

    def __init__(self, original, shapes, calib, verify, context, lat, inputs, budget,
                 metric, calib_batches, guard, cache, seed):
        self.original, self.shapes, self.calib, self.verify = original, shapes, calib, verify
        self.context, self.lat, self.inputs, self.budget = context, lat, inputs, budget
        self.metric, self.calib_batches, self.guard = metric, calib_batches, guard
        self.cache, self.seed = cache, seed
        self.proxy_lat = lat  # where the proxy tables' latencies are timed
        self.sparse_table: dict[str, dict[str, float]] | None = None  # None: no sparse knobs
        self.records: dict[str, dict[str, Any]] = {}
        self.space: Space | None = None
        self.tables: ProxyTables | None = None
        self.allowed: list[list[int]] = []
        self.correction = Correction()
        self.stats = {"rounds": 0, "built": 0, "measured_new": 0, "resumed": 0,
                      "proxy_seconds": 0.0, "search_seconds": 0.0, "stopped": "",
                      "proxies_complete": False}
        self.base: dict[str, float] = {}
        self.reference_metric: float | None = None
        self.calib_errors = CalibErrors(original, calib, limit=calib_batches,
                                        threads=context.threads)

    # ------------------------------------------------------------------ measuring

    def time_ratios(self, models: list[ir.Model]) -> list[float]:
        """Each model's latency ratio to the input model on the backend (NaN: the backend
        refused to time it, `self.lat.rejected` says why)."""
        times = self.lat.time([self.original, *models], self.inputs)
        return [t / times[0] for t in times[1:]]

    def proxy_ratios(self, models: list[ir.Model]) -> list[float]:
        times = self.proxy_lat.time([self.original, *models], self.inputs)
        return [t / times[0] for t in times[1:]]

    def proxy_build(self, policy: Policy) -> ir.Model:
        """A proxy table entry's model: prune without recovery (proxies.py says why)."""
        self.stats["built"] += 1
        with self.context.blas_threads():
            return build(self.original, self.space, policy, self.context,
                         lowrank_guard=self.guard, recover=False)[0]

    def prune_errors(self) -> dict[str, dict[str, float]]:
        started = time.monotonic()
        with self.context.blas_threads():
            errors = prune_curve_errors(self.original, self.space, self.context)
        self.stats["prune_probe_seconds"] = round(time.monotonic() - started, 2)
        return errors

    def calib_error(self, model: ir.Model) -> float:
        return self.calib_errors(model)

    def quality(self, model: ir.Model) -> dict[str, Any]:
        q = measure_quality(self.original, model, self.verify, threads=self.context.threads,
                            metric=self.metric)
        out = {"rel_l2": q.rel_l2, "accuracy": q.accuracy, "metric": q.metric,
               "accuracy_drop": None}
        if self.metric is not None:
            out["accuracy_drop"] = self.reference_metric - q.metric
        elif q.accuracy is not None:
            out["accuracy_drop"] = q.reference_accuracy - q.accuracy
        return out

    def measure(self, policy: Policy) -> dict[str, Any]:
        """Build `policy` and measure it for real (a failed build is recorded as such)."""
        started = time.perf_counter()
        record: dict[str, Any] = {"policy": list(policy)}
        if self.tables is not None:
            record["predicted"] = self.correction.predict(self.tables, self.space,
                                                          policy).to_dict()
        try:
            model, info = build(self.original, self.space, policy, self.context,
                                lowrank_guard=self.guard)
            self.stats["built"] += 1
        except BuildError as exc:
            record["failed"] = str(exc)
            return record
        ratio = self.time_ratios([model])[0]
        if math.isnan(ratio):
            why = getattr(self.lat, "rejected", {}).get(1, "the backend could not time it")
            record.update({"pipeline": info["pipeline"], "failed": f"rejected: {why}",
                           "rejected": why, **resources(model, self.shapes),
                           "seconds": round(time.perf_counter() - started, 3)})
            logger.warning("autocompress: candidate %s rejected: %s", info["pipeline"], why)
            return record
        record.update({"pipeline": info["pipeline"], "latency_ratio": ratio,
                       "latency_ms": ratio * self.base["latency_ms"],
                       **resources(model, self.shapes), **self.quality(model),
                       "calib_error": self.calib_error(model),
                       "seconds": round(time.perf_counter() - started, 3)})
        return record

    def _origin_record(self) -> dict[str, Any]:
        base_ms = statistics.median(self.lat.time([self.original, self.original], self.inputs))
        res = resources(self.original, self.shapes)
        self.base = {"latency_ms": base_ms, **res}
        if self.metric is not None:
            self.reference_metric = run_metric(self.metric, self.original)
        q = self.quality(self.original)
        return {"policy": None, "origin": True, "pipeline": "", "latency_ratio": 1.0,
                "latency_ms": base_ms, **res, **q, "calib_error": 0.0}

    # ------------------------------------------------------------------ phases

    def run(self, kinds, clock: _Clock, display: _Display, max_candidates: int) -> None:
        """`kinds` restricts the search, not the space: every knob is discovered and the
        cache (proxies, candidates) is shared between runs with different `kinds`; a run
        measures the proxies of its own kinds and uses the cached candidates that change
        only knobs of its kinds."""
        self.kinds = kinds
        display.update(phase="measuring the input model")
        self.origin = self._origin_record()
        display.update(phase="finding the decision space")
        self.space = discover(self.original, self.context, sparse=self.sparse_table)
        self.records[policy_key(self.space.origin)] = {**self.origin,
                                                        "policy": list(self.space.origin)}
        for k, rec in self.cache.candidates.items():
            policy = rec.get("policy") or []
            if len(policy) == len(self.space.knobs) and self._in_kinds(policy):
                self.records[k] = rec
                self.stats["resumed"] += 1
        display.update(measured=len(self.records))
        if not self._proxies(clock, display):
            self.stats["stopped"] = "time budget spent during the proxy tables"
            return
        started = time.monotonic()
        try:
            self._search(clock, display, max_candidates)
        finally:
            self.stats["search_seconds"] = round(time.monotonic() - started, 2)

    def _proxies(self, clock: _Clock, display: _Display) -> bool:
        cached = self.cache.proxies
        if cached and cached.get("space") == self.space.to_dict():
            self.tables = ProxyTables.from_dict(cached["tables"])
        else:
            self.tables = ProxyTables({"latency_ms": self.base["latency_ms"],
                                       "size_bytes": self.base["size_bytes"],
                                       "macs": self.base["macs"]})
        self.tables.base = {"latency_ms": self.base["latency_ms"],
                            "size_bytes": self.base["size_bytes"], "macs": self.base["macs"]}
        # measure_tables skips every entry the cache holds (a resumed run)
        def step(text: str) -> None:
            if clock.left() <= 0:
                raise OutOfTime
            display.update(phase=text)

        started = time.monotonic()
        complete = measure_tables(
            self.space, self.tables, self.proxy_build, self.calib_error,
            lambda m: resources(m, self.shapes), self.proxy_ratios, step, kinds=self.kinds,
            prune_errors=self.prune_errors,
            layer_macs=compute_metrics(self.original, self.shapes).node_macs,
            backend_ratios=self.time_ratios)  # sparse entries: see proxies.py
        self.stats["proxy_seconds"] = round(time.monotonic() - started, 2)
        self.stats["proxies_complete"] = complete
        self.cache.save_proxies({"space": self.space.to_dict(),
                                 "tables": self.tables.to_dict()})
        if not complete:
            return False
        self.allowed = [choices if knob.kind in self.kinds else [0] for knob, choices
                        in zip(self.space.knobs, self.tables.useful_choices(self.space))]
        return True

    def _in_kinds(self, policy: Sequence[int]) -> bool:
        return all(not c or k.kind in self.kinds for k, c in zip(self.space.knobs, policy))

    def _objectives(self, policy: Policy) -> tuple[float, float]:
        p = self.correction.predict(self.tables, self.space, policy)
        return (p.to_dict()[self.budget.quantity], p.error)

    def _search(self, clock: _Clock, display: _Display, max_candidates: int) -> None:
        limit = self.budget.limit(self.base)
        n = len(self.space.knobs)
        bits = [i for i, k in enumerate(self.space.knobs) if k.kind == "bits"]
        extremes = [tuple(1 if i in bits and 1 in self.allowed[i] else 0 for i in range(n))]
        for kind in ("prune", "rank"):
            extremes.append(tuple(max(self.allowed[i]) if self.space.knobs[i].kind == kind
                                  else 0 for i in range(n)))
        groups = {kind: [i for i, (knob, allowed) in enumerate(zip(self.space.knobs,
                                                                     self.allowed))
                         if knob.kind == kind and len(allowed) > 1]
                  for kind in self.kinds}
        while True:
            if clock.left() <= 0:
                self.stats["stopped"] = "time budget"
                return
            if self.stats["measured_new"] >= max_candidates:
                self.stats["stopped"] = f"max_candidates ({max_candidates})"
                return
            self.stats["rounds"] += 1
            self._refit()
            display.update(phase=f"round {self.stats['rounds']}: searching the proxies")
            start = [self.space.origin, *extremes,
                     *(tuple(r["policy"]) for r in self.records.values() if "failed" not in r)]
            own_fronts: dict[str, list[tuple[Policy, tuple[float, float]]]] = {}
            front = evolve_joint(self.allowed, groups, self._objectives, start=start,
                                 seed=self.seed + self.stats["rounds"], own_fronts=own_fronts)
            display.update(front=len(self._measured_front()))
            picks = self._picks(front, limit)
            if self.stats["rounds"] == 1:
                # what each technique searched alone would measure first: the joint search
                # measures it too, so no single technique gets ahead by its first round
                # (MiniLM: the joint's own first picks were all prune+rank+int8 mixes far
                # past the limit, and it never measured all-int8, int8 alone's best)
                for own in own_fronts.values():
                    picks += [p for p in self._picks(own, limit)[:1] if p not in picks]
            if not picks:
                self.stats["stopped"] = "converged: nothing new near the budget on the front"
                return
            for policy in picks:
                if clock.left() <= 0 or self.stats["measured_new"] >= max_candidates:
                    break
                display.update(phase=f"round {self.stats['rounds']}: measuring candidate "
                               f"{len(self.records)}")
                record = self.measure(policy)
                self.records[policy_key(policy)] = record
                self.cache.add_candidate(policy_key(policy), record)
                self.stats["measured_new"] += 1
                best = self.best()
                display.update(measured=len(self.records), front=len(self._measured_front()),
                               best=_short(best) if best else "none meets the budget yet")

    def _refit(self) -> None:
        records = [r for r in self.records.values()
                   if "failed" not in r and not r.get("origin")]
        self.correction = Correction.fit(self.tables, self.space, records,
                                         self.base["size_bytes"])

    def _picks(self, front: list[tuple[Policy, tuple[float, float]]], limit: float
               ) -> list[Policy]:
        """What to build next (`search.choose_picks`), from the proxy front's points not
        measured yet; once a candidate meets everything, pick 1 only takes points
        predicted to have less error than it (with 50 % slack for the proxies' error)."""
        # as built (a sparse layer's int8/rank choice dropped): two policies that build
        # the same model are one candidate
        built = {self.space.repair(p): o for p, o in front}
        fresh = [(p, o) for p, o in built.items() if policy_key(p) not in self.records]
        best = self.best()
        bound = float("inf") if best is None else 1.5 * (best.get("calib_error") or 0.0)
        return choose_picks(fresh, limit, self._error_limit(), bound)

    def _error_limit(self) -> float:
        """The quality limit in the proxies' unit (output rel L2 on calibration data):
        `max_error` when given; for an accuracy/metric limit, between the largest
        calibration error of a measured candidate within it and the smallest of one past
        it (unlimited until one past it has been measured)."""
        if self.budget.max_error is not None:
            return self.budget.max_error
        if self.budget.max_accuracy_drop is None:
            return float("inf")
        rows = [r for r in self.measured() if r.get("calib_error") is not None]
        bad = min((r["calib_error"] for r in rows if self.budget.quality_problems(r)),
                  default=float("inf"))
        good = max((r["calib_error"] for r in rows if not self.budget.quality_problems(r)
                    and r["calib_error"] < bad), default=0.0)
        return bad if bad == float("inf") else (good + bad) / 2

    # ------------------------------------------------------------------ choosing

    def measured(self) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if "failed" not in r]

    def meets(self, record: dict[str, Any]) -> bool:
        return (self.budget.resource_problem(record, self.base) is None
                and not self.budget.quality_problems(record))

    def best(self) -> dict[str, Any] | None:
        ok = [r for r in self.measured() if self.meets(r)]
        if not ok:
            return None
        q = self.budget.quantity
        return min(ok, key=lambda r: (*self.budget.quality_loss(r), r[q]))

    def closest(self) -> dict[str, Any] | None:
        """The candidate nearest to meeting everything: among those within the quality
        limits the one with the least resource; else the least quality loss."""
        rows = self.measured()
        if not rows:
            return None
        q = self.budget.quantity
        quality_ok = [r for r in rows if not self.budget.quality_problems(r)]
        if quality_ok:
            return min(quality_ok, key=lambda r: r[q])
        return min(rows, key=lambda r: (*self.budget.quality_loss(r), r[q]))

    def _measured_front(self, key: str | None = None) -> list[dict[str, Any]]:
        rows = self.measured()
        key = key or self.budget.quantity
        points = [(r[key], r["rel_l2"]) for r in rows]
        return [rows[i] for i in pareto_indices(points)]

    # ------------------------------------------------------------------ result

    def _final(self, record: dict[str, Any]) -> tuple[ir.Model, dict[str, Any]]:
        """The chosen policy built again and measured against the input model once more:
        three interleaved timings (median ratio), quality on the verify data."""
        policy = tuple(record["policy"])
        if policy == self.space.origin:
            model = load_model(self.original, check=False)
        else:
            model = build(self.original, self.space, policy, self.context,
                          lowrank_guard=self.guard)[0]
        timings = [self.lat.time([self.original, model], self.inputs) for _ in range(3)]
        if any(math.isnan(b) for _, b in timings):
            raise BudgetExceededError(
                f"autocompress: the chosen model, built again, was refused by the backend: "
                f"{getattr(self.lat, 'rejected', {}).get(1, '?')}; nothing was written")
        ratios = [b / a for a, b in timings]
        ratio = statistics.median(ratios)
        original_ms = statistics.median(a for a, _ in timings)
        final = {"latency_ratio": ratio, "latency_ms": statistics.median(b for _, b in timings),
                 "original_latency_ms": original_ms, "speedup": 1 / ratio,
                 **resources(model, self.shapes), **self.quality(model)}
        return model, final

    def finish(self, output, report_path, force, source, notes, reads,
               display: _Display) -> AutocompressResult:
        best = self.best()
        closest = None if best is not None else self.closest()
        chosen = best or (closest if force else None)
        warnings: list[str] = []
        model, final = None, None
        if chosen is not None:
            display_text = "measuring the chosen model again"
            logger.info("autocompress: %s", display_text)
            model, final = self._final(chosen)
            missed = self.budget.resource_problem(
                {**final, "latency_ratio": final["latency_ratio"]}, self.base)
            if self.budget.kind == "latency_ms" and final["latency_ms"] > self.budget.value:
                missed = f"latency {final['latency_ms']:.4g} ms > {self.budget.value:g} ms"
            problems = [p for p in [missed, *self.budget.quality_problems(final)] if p]
            if problems:
                warnings.append("the chosen model measured again: " + "; ".join(problems))
        met = best is not None and not warnings
        report = self._report(source, output, chosen, final, closest, notes, met, warnings)
        if not met and not force:
            point = closest or best
            where = (f"closest point (within the quality limits, the least "
                     f"{self.budget.quantity.replace('_', ' ')}): {_short(point)} "
                     f"({point.get('pipeline') or 'the input model'})"
                     if point else "no candidate was measured")
            raise BudgetExceededError(OptionText.of(
                f"autocompress: no measured candidate meets {self.budget.describe()}"
                + (f" ({warnings[0]})" if warnings else "") + f"; {where}. Nothing was "
                "written; loosen the budget, give more ", ("time_budget", None), ", or pass ",
                ("force", True), " to write the closest point."))
        result = AutocompressResult(model, report, met=met, warnings=warnings)
        if not met:
            warnings.append(f"budget not met ({self.budget.describe()}); written because "
                            "of --force")
        with reading(reads):
            if output is not None and model is not None:
                result.output = save_model(model, output)
                report["output_bytes"] = result.output.stat().st_size
            if report_path is not None:
                result.plots, why = write_plots(report, report_path)
                report["plots"] = [str(p) for p in result.plots] or why
                _write_report(report_path, report)
        return result

    def _backend_report(self) -> dict[str, Any]:
        lat = self.lat
        out = {"name": lat.name, "threads": getattr(lat, "threads", None),
               "proxy_backend": self.proxy_lat.name}
        if lat.name == "ort":
            out["note"] = ("onnxruntime, intra-op threads as given, spinning off; latency "
                           "ratios timed interleaved with the input model")
        elif isinstance(lat, (TvmLatency, RpcTvmLatency)):
            out.update({"target": lat.target, "compiled": lat.compiled,
                        "compile_seconds": round(lat.compile_seconds, 2),
                        "note": "each candidate compiled with TVM (default schedules, no "
                        "tuning), verified against onnxruntime on the same model, timed "
                        "interleaved with the input model compiled the same way " + (
                            f"on the board {lat.rpc_key!r} of the RPC tracker "
                            f"{lat.rpc_tracker} (its own timer and thread pool); "
                            if isinstance(lat, RpcTvmLatency) else
                            "(TVM thread pool at --threads); ") + (
                            "proxy tables timed on TVM too" if self.proxy_lat is lat else
                            "proxy tables' latencies from onnxruntime, corrected on the TVM "
                            "measurements")})
        else:
            out["note"] = "custom latency backend"
        return out

    def _report(self, source, output, chosen, final, closest, notes, met, warnings
                ) -> dict[str, Any]:
        q = self.budget.quantity
        rows = []
        fronts = {key: {id(r) for r in self._measured_front(key)}
                  for key in ("latency_ratio", "size_bytes")}
        for r in self.records.values():
            row = dict(r)
            row["chosen"] = r is chosen
            row["on_latency_front"] = id(r) in fronts["latency_ratio"]
            row["on_size_front"] = id(r) in fronts["size_bytes"]
            rows.append(row)
        quality_axis = "accuracy_drop" if self.budget.max_accuracy_drop is not None \
            else "rel_l2"
        return {
            "kind": "autocompress",
            "input": str(source) if isinstance(source, (str, os.PathLike)) else "<in-memory>",
            "output": str(output) if output is not None else None,
            "met": met,
            "backend": self._backend_report(),
            "rejected": [{"policy": r["policy"], "pipeline": r.get("pipeline"),
                          "why": r["rejected"]} for r in self.records.values()
                         if "rejected" in r],
            "budget": {"kind": self.budget.kind, "value": self.budget.value,
                       "quantity": q, "limit": self.budget.limit(self.base),
                       "max_error": self.budget.max_error,
                       "max_accuracy_drop": self.budget.max_accuracy_drop,
                       "text": self.budget.describe()},
            "quality_axis": quality_axis,
            "verify_data": getattr(self.verify, "description", "?"),
            "notes": notes + [f"search stopped: {n}" for n in [self.stats["stopped"]] if n],
            "warnings": warnings,
            "seed": self.seed,
            "cache_key": self.cache.key,
            "space": {**(self.space.to_dict() if self.space else {}),
                      "allowed_choices": self.allowed},
            "proxies": ({**self.tables.to_dict(), "correction": self.correction.to_dict()}
                        if self.tables else None),
            "search": dict(self.stats),
            "candidates": rows,
            "policy": self.space.table(tuple(chosen["policy"])) if chosen and self.space
            else None,
            "pipeline": chosen.get("pipeline") if chosen else None,
            "original": self.origin,
            "final": final,
            "closest": closest,
        }


def _write_report(path: str | os.PathLike, report: dict[str, Any]) -> None:
    """JSON, or for a .html path the autocompress page (page.py); both atomic."""
    if Path(path).suffix.lower() in (".html", ".htm"):
        import json

        from ..report import _json_default
        from ..safe_write import write_text
        from .page import render_page

        plain = json.loads(json.dumps(report, default=_json_default))
        write_text(path, render_page(plain), label="report")
    else:
        write_report(path, report)


def _short(record: dict[str, Any]) -> str:
    parts = [f"{1 / record['latency_ratio']:.2f}x" if record.get("latency_ratio") else "",
             f"{record['size_bytes'] / 1e6:.3g} MB" if record.get("size_bytes") else "",
             f"err {record['rel_l2']:.3g}" if record.get("rel_l2") is not None else ""]
    if record.get("accuracy_drop") is not None:
        parts.append(f"acc drop {record['accuracy_drop'] * 100:.2f} pt")
    return ", ".join(p for p in parts if p)
