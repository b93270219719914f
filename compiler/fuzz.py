"""Differential fuzzing: seeded random graphs checked against onnxruntime.

For graph `index` of `seed` (`onnxforge.random_graphs.generate_graph`):

1. The graph must pass `onnx.checker` (full check) and run in onnxruntime (graph
   optimizations off: the reference) on every input set, with finite outputs of the
   shapes the generator tracked. Graphs that fail are *discarded* and redrawn (counted
   by reason, never failures).
2. Stage `pipeline`: the `cleanup,fuse` pipeline (`PassManager`) rewrites the graph,
   and onnxruntime runs the result on the same inputs.
3. Stage `compile`: `onnxforge.backends.tvm.compile_model(model, "host")` with its
   defaults (default CPU schedules, the shipped schedule-config database) compiles the
   original graph; `artifact.run` runs every input set, and the first one a second time,
   which must give bit-identical outputs (a difference means uninitialised memory).
4. Stage `int8` (opt-in): `cleanup,fuse,quantize(int8)` calibrated on random data, then
   the QDQ model compiled for the target (integer kernels, NHWC where every conv is
   integer) and checked against onnxruntime on the same QDQ file with compile's own
   QDQ tolerance (`run_int8_stage`).
5. Stages `prune`, `lowrank`, `sparse` (opt-in, `lossy`): each lossy pass on the graph
   after `cleanup,fuse`, with oracles for each (the pruned model equals the original
   with the removed channels masked, a full-rank decomposition equals the original, the
   sparsified weights are the original's with whole blocks zeroed), the reported error
   against the measured one, and the result compiled for the host (dense, and for
   `sparse` with the sparse kernels forced on) against onnxruntime on the same file
   (`onnxforge.fuzz_lossy`).

Outputs are compared with `onnxforge.verify`'s metrics, accumulated over the input sets
(3 by default: N(0,1) twice and N(0,9) once): equal means relative L2 <= rtol or every
element within rtol of the output's largest magnitude (rtol 1e-4).

Each stage ends in one status:
  correct  outputs equal on every input set (and deterministic);
  refused  a clear onnxforge error about the model: UnsupportedOpError, InputSpecError,
           ModelLoadError, InvalidModelError, or another OnnxforgeError raised on its own
           (not wrapping a foreign exception);
  wrong    outputs differ, an output is missing or mis-shaped, or runs differ;
  crash    any other exception (including an OnnxforgeError that wraps one, e.g. a
           BackendError around a TVM InternalError), the worker process dying, or the
           graph running past the per-graph timeout.
A graph's status is its worst stage's: wrong > crash > refused > correct.

The stages run in a worker process (spawned, restarted after a death or a timeout), one
graph at a time, so a segfault or a compile that never ends costs one graph.
`shrink_graph` reduces a failing graph (outputs moved to earlier values, nodes bypassed)
while it still fails the same way (timeouts are not shrunk: each check would cost the
timeout). `tools/fuzz_graphs.py` is the command line.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Self

import numpy as np
import onnx
from onnx import helper, shape_inference

from . import safe_write
from .errors import one_line
from .fuzz_lossy import LOSSY_STAGES, lossy_options, run_lossy_stage
from .fuzz_stages import (  # noqa: F401 - the stage API, re-exported
    ATOL,
    DEFAULT_PIPELINE,
    QUANTIZE_PIPELINE,
    REFUSAL_NAMES,
    RTOL,
    StageResult,
    classify_exception,
    compare,
    ort_outputs,
    ort_session,
    run_compile_stage,
    run_int8_stage,
    run_pipeline_stage,
)
from .random_graphs import RandomGraph, describe_model, generate_graph, random_inputs
from .worker import SpawnedWorker, WorkerGone, serve

logger = logging.getLogger(__name__)

STATUSES = ("correct", "refused", "wrong", "crash")
SEVERITY = {"correct": 0, "skipped": 0, "refused": 1, "crash": 2, "wrong": 3}
STAGES = ("pipeline", "compile", "int8", *LOSSY_STAGES)
MAX_ATTEMPTS = 12


# ---------------------------------------------------------------------- results


@dataclass
class GraphResult:
    name: str
    seed: int
    index: int
    attempt: int
    families: list[str]
    description: str
    status: str
    stages: dict[str, StageResult] = field(default_factory=dict)
    path: str | None = None
    shrunk_path: str | None = None
    shrunk_description: str | None = None
    seconds: float = 0.0

    @property
    def failing_stage(self) -> str:
        worst = max(self.stages.items(), key=lambda kv: SEVERITY.get(kv[1].status, 0),
                    default=("", None))
        return worst[0]

    def line(self) -> str:
        """One line: file, status, stage and numbers, op chain."""
        parts = [f"{self.name}.onnx", self.status]
        for stage, r in self.stages.items():
            if r.status in ("wrong", "crash", "refused"):
                nums = ""
                if r.rel is not None:
                    nums = f" rel {r.rel:.2e} relL2 {r.rel_l2:.2e}"
                parts.append(f"[{stage} {r.status}{nums}: {r.detail}]")
        parts.append(self.description)
        if self.shrunk_description:
            parts.append(f"shrunk to {Path(self.shrunk_path or '').name}: "
                         f"{self.shrunk_description}")
        return " ".join(parts)


@dataclass
class FuzzSummary:
    seed: int
    count: int
    stages: list[str]
    results: list[GraphResult] = field(default_factory=list)
    discarded: Counter = field(default_factory=Counter)
    seconds: float = 0.0
    worker_restarts: int = 0
    stopped_early: bool = False  # the time budget ran out before `count` graphs

    def counts(self) -> dict[str, int]:
        c = Counter(r.status for r in self.results)
        return {"graphs": len(self.results), **{s: c[s] for s in STATUSES}}

    def stage_counts(self, stage: str) -> dict[str, int]:
        c = Counter(r.stages[stage].status for r in self.results if stage in r.stages)
        return {s: c[s] for s in STATUSES}

    @property
    def failures(self) -> list[GraphResult]:
        return [r for r in self.results if r.status in ("wrong", "crash")]

    def to_json(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "count": self.count, "stages": self.stages,
            "seconds": round(self.seconds, 1),
            "seconds_per_graph": round(self.seconds / max(1, len(self.results)), 3),
            "counts": self.counts(),
            "stage_counts": {s: self.stage_counts(s) for s in self.stages},
            "discarded": dict(self.discarded), "worker_restarts": self.worker_restarts,
            "stopped_early": self.stopped_early,
            "results": [asdict(r) for r in self.results],
        }


# ---------------------------------------------------------------------- reference


def reference_problem(model: onnx.ModelProto, input_sets: list[dict[str, np.ndarray]]
                      ) -> tuple[str, list[dict[str, np.ndarray]]]:
    """('', ORT outputs) for a usable graph, else (reason it is discarded, [])."""
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # noqa: BLE001 - several checker error types
        return f"invalid: {one_line(str(exc), 120)}", []
    try:
        references = ort_outputs(model, input_sets)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", str(exc))
        return f"ORT rejects: {one_line(text, 100)}", []
    declared = {o.name: tuple(d.dim_value for d in o.type.tensor_type.shape.dim)
                for o in model.graph.output}
    for outputs in references:
        for name, array in outputs.items():
            if not np.all(np.isfinite(array)):
                return "non-finite ORT output", []
            if declared.get(name) and tuple(array.shape) != declared[name]:
                return "ORT output shape differs from ONNX shape inference", []
    return "", references


@dataclass
class FuzzCase:
    graph: RandomGraph
    inputs: list[dict[str, np.ndarray]]
    references: list[dict[str, np.ndarray]]


def valid_case(seed: int, index: int, families: Sequence[str] | None = None,
               input_sets: int = 3, discarded: Counter | None = None) -> FuzzCase | None:
    """The first attempt of graph `index` that onnxruntime runs cleanly (None: none in
    MAX_ATTEMPTS); every rejected attempt is counted in `discarded` by reason."""
    for attempt in range(MAX_ATTEMPTS):
        graph = generate_graph(seed, index, families, attempt)
        inputs = random_inputs(graph.model, seed * 1_000_003 + index * 101 + attempt,
                               input_sets)
        reason, references = reference_problem(graph.model, inputs)
        if not reason:
            return FuzzCase(graph, inputs, references)
        if discarded is not None:
            discarded[reason.split(":")[0] if reason.startswith("invalid") else reason] += 1
        logger.debug("%s attempt %d discarded: %s", graph.name, attempt, reason)
    return None


# ---------------------------------------------------------------------- comparing


def check_task(task: dict[str, Any], report: Callable[[str, Any], None] = lambda *a: None
               ) -> dict[str, dict[str, Any]]:
    """Run the task's stages (in the worker); `report("stage", name)` before each one and
    `report("done", (name, result))` after it."""
    model = onnx.load_from_string(task["model"])
    out: dict[str, dict[str, Any]] = {}
    for stage in task["stages"]:
        report("stage", stage)
        if stage == "pipeline":
            r = run_pipeline_stage(model, task["inputs"], task["references"],
                                   task.get("pipeline", DEFAULT_PIPELINE), task["rtol"])
        elif stage == "compile":
            r = run_compile_stage(model, task["inputs"], task["references"],
                                  task.get("target", "host"), task["rtol"])
        elif stage == "int8":
            r = run_int8_stage(model, task["inputs"], task.get("target", "host"))
        elif stage in LOSSY_STAGES:
            r = run_lossy_stage(stage, model, task["inputs"], task.get("target", "host"),
                                task["rtol"], task.get("lossy_options", {}).get(stage))
        else:
            raise ValueError(f"unknown stage {stage!r}")
        out[stage] = asdict(r)
        report("done", (stage, out[stage]))
    return out


# ---------------------------------------------------------------------- worker


def _worker_main(conn, threads: int, preload_tvm: bool) -> None:
    """Worker: silence native output, import once, then check tasks until EOF/None."""
    os.environ["TVM_NUM_THREADS"] = str(threads)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    warnings.simplefilter("ignore")
    for name in ("onnxforge", "onnx_ir", "tvm", "onnxsim"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    import onnxforge.pass_manager  # pay the imports before the first timeout

    if preload_tvm:
        import onnxforge.backends.tvm  # noqa: F401

    def handle(task: dict) -> tuple[str, dict]:
        try:
            result = check_task(task, lambda kind, payload: conn.send((kind, payload)))
        except Exception as exc:  # noqa: BLE001 - a tool-level error, reported as a crash
            result = {"worker": asdict(StageResult("crash", one_line(
                f"{type(exc).__name__}: {exc}")))}
        return ("result", result)

    serve(conn, handle)


class FuzzWorker:
    """One spawned worker process checking graphs one at a time; a death or a timeout
    kills it, the graph gets a crash, and the next graph starts a fresh worker."""

    def __init__(self, timeout: float = 60.0, threads: int = 1, preload_tvm: bool = True,
                 start_timeout: float = 300.0):
        self.timeout = timeout
        self.process = SpawnedWorker(_worker_main, (threads, preload_tvm),
                                     name="onnxforge-fuzz-worker", start_timeout=start_timeout)

    @property
    def restarts(self) -> int:
        return self.process.restarts

    def close(self) -> None:
        self.process.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check(self, task: dict[str, Any]) -> dict[str, StageResult]:
        """Stage results; a worker death or a timeout is a crash of the running stage."""
        start = time.perf_counter()
        deadline = start + self.timeout
        stage = task["stages"][0]  # until the worker reports that a stage began
        done: dict[str, StageResult] = {}
        self.process.send(task)
        while True:
            try:
                kind, payload = self.process.receive(deadline)
            except WorkerGone as gone:
                why = (f"timeout: still running after {self.timeout:.0f} s"
                       if str(gone) == "timeout" else f"worker died: {gone}")
                break
            if kind == "stage":
                stage = payload
            elif kind == "done":
                done[payload[0]] = StageResult(**payload[1])
            elif kind == "result":
                return {k: StageResult(**v) for k, v in payload.items()}
        elapsed = time.perf_counter() - start
        results: dict[str, StageResult] = {}
        for s in dict.fromkeys([*task["stages"], stage]):
            if s in done:
                results[s] = done[s]
            elif s == stage:
                results[s] = StageResult("crash", why, seconds=elapsed)
            else:
                results[s] = StageResult("skipped", f"not run: the {stage} stage crashed")
        return results


def make_task(model: onnx.ModelProto, inputs, references, stages: Sequence[str],
              rtol: float = RTOL, pipeline: str = DEFAULT_PIPELINE, target: str = "host"
              ) -> dict[str, Any]:
    return {"model": model.SerializeToString(), "inputs": inputs, "references": references,
            "stages": list(stages), "rtol": rtol, "pipeline": pipeline, "target": target}


def overall_status(stages: dict[str, StageResult]) -> str:
    worst = max((r.status for r in stages.values()), key=lambda s: SEVERITY.get(s, 0),
                default="correct")
    return "correct" if worst == "skipped" else worst


# ---------------------------------------------------------------------- shrinking


def _shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    inferred = shape_inference.infer_shapes(model, data_prop=True)
    shapes = {}
    for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            shapes[v.name] = tuple(d.dim_value for d in t.shape.dim)
    return shapes


def _rebuild(model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str],
             shapes: dict[str, tuple[int, ...]]) -> onnx.ModelProto | None:
    """`model` with `nodes` (dead ones dropped) and `outputs`; None if not a graph."""
    graph_inputs = {i.name for i in model.graph.input}
    if any(o not in shapes for o in outputs) or any(o in graph_inputs for o in outputs):
        return None
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    kept.reverse()
    if not kept:
        return None
    used = {i for n in kept for i in n.input}
    graph = helper.make_graph(
        kept, model.graph.name,
        [i for i in model.graph.input if i.name in used],
        [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, list(shapes[o]))
         for o in dict.fromkeys(outputs)],
        [t for t in model.graph.initializer if t.name in used])
    if not graph.input:
        return None
    new = helper.make_model(graph, opset_imports=list(model.opset_import),
                            ir_version=model.ir_version, producer_name=model.producer_name)
    try:
        onnx.checker.check_model(new, full_check=True)
    except Exception:  # noqa: BLE001
        return None
    return new


def _output_candidates(model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str],
                       shapes: dict[str, tuple[int, ...]]) -> Iterator[onnx.ModelProto | None]:
    """An earlier value as the only output."""
    for node in nodes:
        for value in node.output:
            if [value] != outputs:
                yield _rebuild(model, nodes, [value], shapes)


def _bypass_candidates(model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str],
                       shapes: dict[str, tuple[int, ...]]) -> Iterator[onnx.ModelProto | None]:
    """A node bypassed: its consumers (and the outputs) read its same-shaped input instead."""
    for i, node in enumerate(nodes):
        if len(node.output) != 1 or node.output[0] not in shapes:
            continue
        out = node.output[0]
        for source in dict.fromkeys(x for x in node.input if x):
            if shapes.get(source) != shapes[out] or \
                    source in {t.name for t in model.graph.initializer}:
                continue
            rewired = []
            for other in nodes[:i] + nodes[i + 1:]:
                copy = onnx.NodeProto()
                copy.CopyFrom(other)
                for k, name in enumerate(copy.input):
                    if name == out:
                        copy.input[k] = source
                rewired.append(copy)
            yield _rebuild(model, rewired, [source if o == out else o for o in outputs], shapes)


def _graph_input_candidates(
        model: onnx.ModelProto, nodes: list[onnx.NodeProto], outputs: list[str],
        shapes: dict[str, tuple[int, ...]]) -> Iterator[onnx.ModelProto | None]:
    """A node reads the graph input instead of a same-shaped intermediate (drops a prefix)."""
    graph_inputs = [i.name for i in model.graph.input]
    for i, node in enumerate(nodes):
        for k, name in enumerate(node.input):
            source = next((g for g in graph_inputs if g != name and shapes.get(g) ==
                           shapes.get(name)), None)
            if source is None or name in graph_inputs:
                continue
            copy = onnx.NodeProto()
            copy.CopyFrom(node)
            copy.input[k] = source
            yield _rebuild(model, nodes[:i] + [copy] + nodes[i + 1:], outputs, shapes)


def shrink_candidates(model: onnx.ModelProto) -> list[onnx.ModelProto]:
    """Smaller variants of `model`, fewest nodes first: an earlier value as the only
    output; a node bypassed (its consumers read its same-shaped input instead); a node
    reading the same-shaped graph input instead of an intermediate value."""
    shapes = _shapes(model)
    nodes = list(model.graph.node)
    outputs = [o.name for o in model.graph.output]
    found: dict[bytes, onnx.ModelProto] = {}
    for make in (_output_candidates, _bypass_candidates, _graph_input_candidates):
        for candidate in make(model, nodes, outputs, shapes):
            if candidate is not None and len(candidate.graph.node) < len(nodes) or (
                    candidate is not None and len(candidate.graph.output) < len(outputs)):
                found.setdefault(candidate.SerializeToString(), candidate)
    return sorted(found.values(), key=lambda m: (len(m.graph.node), len(m.graph.output)))


def shrink_graph(model: onnx.ModelProto, still_fails: Callable[[onnx.ModelProto], bool],
                 max_checks: int = 60) -> tuple[onnx.ModelProto, int]:
    """Greedy reduction: take the smallest candidate that still fails, repeat.
    Returns the smallest failing model and the number of checks spent."""
    checks = 0
    current = model
    improved = True
    while improved and checks < max_checks:
        improved = False
        for candidate in shrink_candidates(current):
            if checks >= max_checks:
                break
            checks += 1
            if still_fails(candidate):
                current, improved = candidate, True
                break
    return current, checks


def failure_key(stages: dict[str, StageResult]) -> tuple[str, str]:
    """(stage, status) of the worst stage: what a shrunk graph must keep failing with."""
    stage = max(stages, key=lambda s: SEVERITY.get(stages[s].status, 0))
    return stage, stages[stage].status


def shrink_failure(result: GraphResult, case: FuzzCase, worker: FuzzWorker,
                   rtol: float = RTOL, max_checks: int = 60) -> onnx.ModelProto:
    """The smallest variant of a failing graph that fails the same stage the same way."""
    want_stage, want_status = failure_key(result.stages)
    want_crash_text = _error_kind(result.stages[want_stage].detail)

    def still_fails(candidate: onnx.ModelProto) -> bool:
        reason, references = reference_problem(candidate, case.inputs)
        if reason:
            return False
        task = make_task(candidate, case.inputs, references, [want_stage], rtol)
        if want_stage in LOSSY_STAGES:  # the failing graph's pass options, not the candidate's
            task["lossy_options"] = {want_stage: lossy_options(result.stages[want_stage].detail)}
        got = worker.check(task)
        r = got.get(want_stage)
        if r is None or r.status != want_status:
            return False
        return want_status != "crash" or _error_kind(r.detail) == want_crash_text

    smallest, checks = shrink_graph(case.graph.model, still_fails, max_checks)
    logger.info("%s shrunk from %d to %d nodes in %d checks", result.name,
                len(case.graph.model.graph.node), len(smallest.graph.node), checks)
    return smallest


def _error_kind(detail: str) -> str:
    """The exception type(s) at the front of a crash detail ('timeout', 'worker died')."""
    head = detail.split(":")[0]
    return re.sub(r"\d+", "N", head)


# ---------------------------------------------------------------------- running


def run_fuzz(seed: int = 0, count: int = 100, *, families: Sequence[str] | None = None,
             compile: bool = True, int8: bool = False, lossy: bool = False,
             pipeline: str = DEFAULT_PIPELINE, timeout: float = 60.0,
             out_dir: str | os.PathLike | None = None, shrink: bool = False,
             shrink_checks: int = 60, rtol: float = RTOL, start: int = 0,
             progress: Callable[[GraphResult, FuzzSummary], None] | None = None,
             worker: FuzzWorker | None = None, time_budget: float | None = None
             ) -> FuzzSummary:
    """Check graphs `start .. start+count-1` of `seed`; failing ones go to `out_dir` as
    `<seed>-<index>.onnx` (and `.min.onnx` when shrunk), listed in `summary.txt`.
    `time_budget` (seconds) stops the run early; `summary.stopped_early` says so.
    `lossy` adds the prune, lowrank and sparse stages (`onnxforge.fuzz_lossy`)."""
    stages = ["pipeline"] + (["compile"] if compile else []) + (["int8"] if int8 else []) \
        + (list(LOSSY_STAGES) if lossy else [])
    summary = FuzzSummary(seed, count, stages)
    out = Path(out_dir) if out_dir is not None else None
    own_worker = worker is None
    worker = worker or FuzzWorker(timeout=timeout, preload_tvm=compile or int8 or lossy)
    began = time.perf_counter()
    try:
        for index in range(start, start + count):
            t0 = time.perf_counter()
            if time_budget is not None and t0 - began > time_budget:
                summary.stopped_early = True
                break
            case = valid_case(seed, index, families, discarded=summary.discarded)
            if case is None:
                summary.discarded["no valid attempt"] += 1
                continue
            graph = case.graph
            task = make_task(graph.model, case.inputs, case.references, stages, rtol, pipeline)
            stage_results = worker.check(task)
            result = GraphResult(graph.name, seed, index, graph.attempt, graph.families,
                                 graph.describe(), overall_status(stage_results),
                                 stage_results)
            if result.status in ("wrong", "crash") and out is not None:
                path = out / f"{graph.name}.onnx"
                safe_write.write_bytes(path, graph.model.SerializeToString())
                result.path = str(path)
                if shrink and not result.stages[failure_key(stage_results)[0]].detail \
                        .startswith("timeout"):
                    small = shrink_failure(result, case, worker, rtol, shrink_checks)
                    if len(small.graph.node) < len(graph.model.graph.node):
                        small_path = out / f"{graph.name}.min.onnx"
                        safe_write.write_bytes(small_path, small.SerializeToString())
                        result.shrunk_path = str(small_path)
                        result.shrunk_description = describe_model(small)
            result.seconds = time.perf_counter() - t0
            summary.results.append(result)
            if result.path is not None:
                write_failure_list(summary, out / "summary.txt")
            if progress is not None:
                progress(result, summary)
    finally:
        summary.seconds = time.perf_counter() - began
        summary.worker_restarts = worker.restarts
        if own_worker:
            worker.close()
    return summary


def write_failure_list(summary: FuzzSummary, path: Path) -> None:
    """One line per failing graph (file, status, stage, numbers, ops)."""
    lines = [r.line() for r in summary.failures]
    safe_write.write_bytes(path, ("\n".join(lines) + "\n").encode())


# ---------------------------------------------------------------------- reporting


def failure_classes(summary: FuzzSummary) -> list[tuple[tuple[str, str, str], list[GraphResult]]]:
    """Failures grouped by (stage, status, kind): the error type for crashes; for wrong
    results the shrunk graph's op chain (else 'nondeterministic' or 'values')."""
    groups: dict[tuple[str, str, str], list[GraphResult]] = {}
    for r in summary.failures:
        stage, status = failure_key(r.stages)
        detail = r.stages[stage].detail
        if status == "crash":
            kind = one_line(re.sub(r"\d+", "N", detail), 90)
        elif r.shrunk_description:
            kind = r.shrunk_description.split("nodes: ")[-1]
        else:
            kind = "nondeterministic" if detail.startswith("nondeterministic") else "values"
        groups.setdefault((stage, status, kind), []).append(r)
    return sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))


def report_renderables(summary: FuzzSummary) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    counts = summary.counts()
    per_graph = summary.seconds / max(1, counts["graphs"])
    head = Table(title=f"Differential fuzzing, seed {summary.seed}: stages "
                       f"{', '.join(summary.stages)} vs onnxruntime")
    for column in ("graphs", "correct", "refused", "wrong", "crash", "discarded",
                   "s / graph"):
        head.add_column(column, justify="right")
    head.add_row(str(counts["graphs"]), str(counts["correct"]), str(counts["refused"]),
                 Text(str(counts["wrong"]), style="bold red" if counts["wrong"] else ""),
                 Text(str(counts["crash"]), style="bold red" if counts["crash"] else ""),
                 str(sum(summary.discarded.values())), f"{per_graph:.2f}")
    out: list[Any] = [head]
    stages = Table(title="By stage")
    for column in ("stage", *STATUSES, "median s"):
        stages.add_column(column, justify="right")
    for stage in summary.stages:
        c = summary.stage_counts(stage)
        secs = sorted(r.stages[stage].seconds for r in summary.results if stage in r.stages)
        stages.add_row(stage, *(str(c[s]) for s in STATUSES),
                       f"{secs[len(secs) // 2]:.2f}" if secs else "")
    out.append(stages)
    if summary.discarded:
        out.append(Text("discarded (regenerated; not failures): " + ", ".join(
            f"{k} {n}" for k, n in summary.discarded.most_common())))
    refused = Counter(one_line(re.sub(r"\d+", "N", r.stages[s].detail), 100)
                      for r in summary.results for s in r.stages
                      if r.stages[s].status == "refused")
    if refused:
        out.append(Text("refusals: " + "; ".join(f"{n}x {k}" for k, n in refused.most_common(8))))
    sparse = [r.stages["sparse"].extra for r in summary.results if "sparse" in r.stages]
    if sparse:
        kinds: Counter = Counter()
        for extra in sparse:
            kinds.update(extra.get("sparse_kernels", {}))
        used = sum(1 for extra in sparse if extra.get("sparse_ops"))
        out.append(Text(f"sparse kernels forced on: {used} of {len(sparse)} graphs ran "
                        f"{sum(kinds.values())} ops on them ("
                        + ", ".join(f"{k} {n}" for k, n in sorted(kinds.items())) + ")"))
    classes = failure_classes(summary)
    if classes:
        table = Table(title=f"Failure classes ({len(summary.failures)} failing graphs)",
                      title_style="bold red")
        for column in ("stage", "status", "kind", "graphs", "example"):
            table.add_column(column, overflow="fold")
        for (stage, status, kind), results in classes:
            example = results[0]
            table.add_row(stage, status, kind, str(len(results)),
                          Path(example.shrunk_path or example.path or example.name).name)
        out.append(table)
        failing = Table(title="Failing graphs")
        for column in ("graph", "status", "stage", "rel", "detail", "ops"):
            failing.add_column(column, overflow="fold")
        for r in summary.failures:
            stage, _ = failure_key(r.stages)
            s = r.stages[stage]
            failing.add_row(r.name, r.status, stage, "" if s.rel is None else f"{s.rel:.1e}",
                            s.detail[:160], r.description.split("nodes: ")[-1][:160])
        out.append(failing)
    return out


def print_report(summary: FuzzSummary, console=None) -> None:
    from rich.console import Console

    console = console or Console(width=None if sys.stdout.isatty() else 160)
    for item in report_renderables(summary):
        console.print(item)
