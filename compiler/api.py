"""The public Python API; the CLI is a thin layer over these functions.

    import onnxforge
    result = onnxforge.optimize("model.onnx", "cleanup,fuse", output="out.onnx")
    print(result.report["steps"])
    built = onnxforge.api.compile("model.onnx", "host", "model.so")  # verified, then written
    tuned = onnxforge.api.tune("model.onnx", "host", "tuning_db/")  # then compile(tuning_db=)
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console

from .backends.ort import OrtArtifact
from .calibration import CalibrationSource, open_calibration
from .errors import (
    BackendError,
    BudgetExceededError,
    InputSpecError,
    OptionText,
    VerificationError,
)
from .ir import ModelSource, files_read, load_model, save_model
from .metrics import compute_metrics
from .pass_manager import PassManager, StepReport
from .passes.base import PassContext
from .report import write_json, write_report
from .safe_write import check_writes, reading
from .shapes import check_input_shapes, model_inputs, resolve_input_shapes
from .subgraphs import subgraph_compute
from .verify import Comparison, check_budget, compare_models

logger = logging.getLogger(__name__)

DATA_DIR = Path(__file__).parent / "data"
EXAMPLE_MODEL = DATA_DIR / "digits_cnn.onnx"
EXAMPLE_CALIBRATION = DATA_DIR / "digits_calib.npz"
EXAMPLE_TEST_DATA = DATA_DIR / "digits_test.npz"
EXAMPLE_INPUT_SHAPES = {"input": (1, 1, 8, 8)}
DEFAULT_PIPELINE = "cleanup,fuse"


@dataclass
class OptimizeResult:
    model: ir.Model
    steps: list[StepReport]
    report: dict[str, Any]
    output: Path | None = None
    error: Comparison | None = None
    warnings: list[str] = field(default_factory=list)


def _try_shapes(model: ir.Model, input_shapes) -> tuple[dict, str | None]:
    check_input_shapes(model, input_shapes)  # a wrong --input-shape is an error, not a note
    try:
        return resolve_input_shapes(model, input_shapes), None
    except InputSpecError as exc:  # the message itself: an OptionText keeps its options
        return dict(input_shapes or {}), exc.args[0]


def optimize(
    model: ModelSource,
    pipeline: str = DEFAULT_PIPELINE,
    *,
    output: str | os.PathLike | None = None,
    calibration: str | os.PathLike | dict | CalibrationSource | None = None,
    verify_data: str | os.PathLike | dict | CalibrationSource | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    max_error: float | None = None,
    max_accuracy_drop: float | None = None,
    force: bool = False,
    verify: bool = True,
    verify_batches: int = 64,
    rtol: float = 1e-4,
    threads: int = 1,
    measure_latency: bool = False,
    measure_pass_latency: bool = False,
    report_path: str | os.PathLike | None = None,
    dump_dir: str | os.PathLike | None = None,
    print_after: Sequence[str] = (),
    console: Console | None = None,
    progress: bool = False,
) -> OptimizeResult:
    """Run `pipeline` on `model`, verify it, and (if within budget) write `output`.

    - `calibration`: data for data-driven passes (`.npz`, folder, images, `random:N`).
    - `verify_data`: data to measure the final error on (default: the calibration
      data, else random inputs). With labels (`labels` in the .npz), accuracy is
      measured too.
    - `max_error` bounds the relative L2 output error of the result against the
      input model; `max_accuracy_drop` bounds the top-1 accuracy drop (needs
      labels). Past either, BudgetExceededError is raised and nothing is written,
      unless `force`.
    - `measure_latency`: ORT latency of the input and the result, side by side;
      with `measure_pass_latency` also of the model after each pass (all interleaved in
      one run: the report's `latency.per_pass_ms`).
    The input model is never modified; `output` is written atomically.
    """
    console = console or Console(stderr=True)
    check_budget("max_error", max_error)
    check_budget("max_accuracy_drop", max_accuracy_drop)
    original = load_model(model)
    # Nothing this run writes may be a file it reads (checked again at each write).
    reads = (files_read(model, original) + data_files_read(calibration, "calibration data")
             + data_files_read(verify_data, "verification data"))
    check_writes([("output", output), ("report", report_path)], reads)
    working = load_model(original, check=False)
    context, shapes, shape_problem = _pass_context(original, input_shapes, calibration, threads)
    context.force = force
    verify_source = _verify_source(original, shapes, shape_problem, verify_data,
                                   context.calibration) if verify else None

    manager = PassManager(pipeline, context, verify_source=verify_source, rtol=rtol,
                          dump_dir=dump_dir, print_after=set(print_after), console=console,
                          progress=progress,
                          keep_snapshots=measure_latency and measure_pass_latency)
    started = time.perf_counter()
    with reading(reads):  # --dump-dir writes inside
        working, steps = manager.run(working)
    seconds = time.perf_counter() - started

    # one batch sizes values inside If/Loop/Scan bodies (used only when a model has them)
    probe = verify_source.first() if verify_source is not None \
        and subgraph_compute(original) else None
    before = compute_metrics(original, shapes if not shape_problem else None, probe=probe)
    after = compute_metrics(working, shapes if not shape_problem else None, probe=probe)
    error = None if verify_source is None else \
        _measure_error(original, working, verify_source, verify_batches, threads)
    report = {
        "input": str(model) if isinstance(model, (str, os.PathLike)) else "<in-memory>",
        "output": str(output) if output else None,
        "pipeline": manager.pipeline.text,
        "seconds": round(seconds, 3),
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        **_change_report(before, after, steps, error, verified=verify_source is not None),
        "budget": {"max_error": max_error, "max_accuracy_drop": max_accuracy_drop,
                   "forced": force},
    }
    if measure_latency and not shape_problem:
        source = verify_source or open_calibration("random:1", original, shapes)
        report["latency"] = (pass_latency(original, manager.snapshots, source, threads=threads)
                             if manager.snapshots else
                             compare_latency(original, working, source, threads=threads))
    result = OptimizeResult(working, steps, report, error=error)
    _enforce_budget(result, max_error, max_accuracy_drop, force)
    with reading(reads):
        _write_result(result, output, report_path)
    return result


def _change_report(before: Any, after: Any, steps: list[StepReport], error: Comparison | None,
                   verified: bool) -> dict[str, Any]:
    """The report's entries on what the pipeline changed: metrics, steps, error."""
    return {
        "before": before.to_dict(),
        "after": after.to_dict(),
        "steps": [s.to_dict() for s in steps],
        "error": error.to_dict() if error else None,
        "verification": None if verified else "skipped (--no-verify)",
    }


def _write_result(result: OptimizeResult, output: str | os.PathLike | None,
                  report_path: str | os.PathLike | None) -> None:
    if output is not None:
        result.output = save_model(result.model, output)
        result.report["output_bytes"] = result.output.stat().st_size
    if report_path is not None:
        write_report(report_path, result.report)


def _pass_context(original: ir.Model, input_shapes: dict | None, calibration: Any,
                  threads: int) -> tuple[PassContext, dict, str | None]:
    """(the passes' context, the input shapes, why they are not all fixed (None: they
    are)); the calibration data is opened, which needs fixed shapes."""
    shapes, shape_problem = _try_shapes(original, input_shapes)
    context = PassContext(input_shapes=shapes, threads=threads)
    if calibration is not None:
        if shape_problem:
            raise InputSpecError(shape_problem)
        context.calibration = open_calibration(calibration, original, shapes)
    return context, shapes, shape_problem


def _measure_error(original: ir.Model, working: ir.Model, source: CalibrationSource,
                   batches: int, threads: int) -> Comparison:
    # A labelled set is measured whole: an accuracy on a slice would mislead.
    limit = None if source.labels() is not None else batches
    return compare_models(original, working, source, limit=limit, threads=threads)


def _verify_source(original: ir.Model, shapes: dict, shape_problem: str | None,
                   verify_data: Any, calibration: CalibrationSource | None) -> CalibrationSource:
    """What `optimize` verifies on: `verify_data`, else the calibration data, else random
    inputs."""
    if shape_problem:
        raise InputSpecError(OptionText.of(shape_problem, " (or pass ", ("verify", False),
                                           " to skip verification)"))
    if verify_data is not None:
        return open_calibration(verify_data, original, shapes)
    if calibration is not None:
        return calibration
    return open_calibration("random:4", original, shapes)


def data_files_read(source: Any, label: str = "data") -> list[tuple[str, Path]]:
    """(label, path) of the files a calibration/verification source reads: the file, or
    every file in the folder (none for `random:N`, arrays and in-memory sources)."""
    if not isinstance(source, (str, os.PathLike)) or str(source).startswith("random:"):
        return []
    path = Path(source)
    if path.is_dir():
        return [(label, p) for p in sorted(path.iterdir()) if p.is_file()]
    return [(label, path)]


def _enforce_budget(result: OptimizeResult, max_error: float | None,
                    max_accuracy_drop: float | None, force: bool) -> None:
    error = result.error
    problems = []
    if (max_error is not None or max_accuracy_drop is not None) and error is None:
        problems.append("the error budget cannot be checked without verification")
    if error is not None and max_error is not None and not (error.max_rel_l2 <= max_error):
        problems.append(OptionText.of(f"relative L2 error {error.max_rel_l2:.4g} exceeds ",
                                      ("max_error", None), f" {max_error:g}"))
    if error is not None and max_accuracy_drop is not None:
        drop = error.accuracy_drop
        if drop is None:
            problems.append(OptionText.of(("max_accuracy_drop", None),
                                          " needs labels in the verification data"))
        elif not (drop <= max_accuracy_drop):  # NaN counts as over budget
            problems.append(OptionText.of(
                f"accuracy drop {drop * 100:.2f} pt exceeds ", ("max_accuracy_drop", None),
                f" {max_accuracy_drop * 100:.2f} pt"))
    if not problems:
        return
    if force:
        result.warnings.extend(problems)
        result.report["budget"]["violations"] = problems
        return
    parts = [problems[0]]
    for problem in problems[1:]:
        parts += ["; ", problem]
    raise BudgetExceededError(OptionText.of(
        *parts, ". Nothing was written; loosen the budget, change the pipeline, or pass ",
        ("force", True), " to write anyway."))


def compare_latency(a: ir.Model, b: ir.Model, source: CalibrationSource, *, threads: int = 1,
                    warmup: int = 5, repeat: int = 30) -> dict[str, Any]:
    """Median ORT latency of two models on the same input, interleaved in one process."""
    timings = benchmark_artifacts(
        [OrtArtifact(a, threads=threads), OrtArtifact(b, threads=threads)],
        source.first(), warmup=warmup, repeat=repeat)
    before, after = (t["median_ms"] for t in timings)
    return {"threads": threads, "before_ms": before, "after_ms": after,
            "speedup": before / after if after else float("nan")}


def pass_latency(original: ir.Model, after_each: Sequence[ir.Model],
                 source: CalibrationSource, *, threads: int = 1, warmup: int = 5,
                 repeat: int = 30) -> dict[str, Any]:
    """`compare_latency`'s entries for the input and the last model, plus the median ORT
    latency after each pass (`per_pass_ms`), every model timed in the same interleaved
    rounds."""
    models = [original, *after_each]
    timings = benchmark_artifacts([OrtArtifact(m, threads=threads) for m in models],
                                  source.first(), warmup=warmup, repeat=repeat)
    ms = [t["median_ms"] for t in timings]
    return {"threads": threads, "before_ms": ms[0], "after_ms": ms[-1],
            "speedup": ms[0] / ms[-1] if ms[-1] else float("nan"), "per_pass_ms": ms[1:]}


def benchmark_artifacts(artifacts: Sequence[Any], inputs: dict, *, warmup: int = 5,
                        repeat: int = 30, rounds: int = 5) -> list[dict[str, Any]]:
    """Time several artifacts side by side: rounds alternate between them so that
    machine noise hits all of them alike; the median over all samples is reported."""
    samples: list[list[float]] = [[] for _ in artifacts]
    for art in artifacts:
        for _ in range(warmup):
            art.run(inputs)
    per_round = max(1, repeat // rounds)
    for _ in range(rounds):
        for i, art in enumerate(artifacts):
            timing = art.benchmark(inputs, warmup=0, repeat=per_round)
            samples[i].extend(timing.samples_ms)
    results = []
    for art, values in zip(artifacts, samples):
        results.append({
            "backend": art.backend,
            "median_ms": statistics.median(values),
            "min_ms": min(values),
            "stdev_ms": statistics.stdev(values) if len(values) > 1 else 0.0,
            "repeat": len(values),
        })
    return results


def benchmark_models(
    models: Sequence[ModelSource],
    *,
    backend: str = "ort",
    threads: int = 1,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    warmup: int = 5,
    repeat: int = 30,
    target: str = "host",
    report_path: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Latency of each model (and, for backend='tvm', ORT vs TVM) measured side by side.

    All models are timed in one process on the same random input (the first
    model's inputs; models must share input names and shapes), in interleaved
    rounds. Ratios are relative to the first model (ort), or to ORT on the same
    model (tvm). `report_path`: also write the rows there as JSON, or an HTML page for a
    .html path (never over a model).
    A TVM build is checked against ORT first (`backends.tvm.verify_artifact`) and a wrong
    one raises VerificationError instead of being timed.
    """
    loaded = [load_model(m) for m in models]
    reads = [r for src, m in zip(models, loaded) for r in files_read(src, m, "model")]
    check_writes([("report", report_path)], reads)
    shapes = resolve_input_shapes(loaded[0], input_shapes)
    inputs = open_calibration("random:1", loaded[0], shapes).first()
    labels, artifacts = [], []
    for src, model in zip(models, loaded):
        name = Path(src).name if isinstance(src, (str, os.PathLike)) else "<model>"
        got = {v.name for v in model_inputs(model)}
        if got != set(inputs):
            raise InputSpecError(f"{name}: inputs {sorted(got)} differ from {sorted(inputs)}; "
                                 "bench compares models with the same inputs")
        if backend in ("ort", "tvm"):
            labels.append(name)
            artifacts.append(OrtArtifact(model, threads=threads))
        if backend == "tvm":
            # imported lazily: TVM is optional
            from .backends.tvm import compile_model, verify_artifact

            artifact = compile_model(model, target, input_shapes=shapes)
            artifact.threads = threads  # TVM thread pool matched to ORT's intra-op threads
            # a wrong build is not timed: VerificationError (exit 5) instead of a number
            verify_artifact(artifact, model, threads=threads)
            labels.append(f"{name} (tvm {target})")
            artifacts.append(artifact)
        if backend not in ("ort", "tvm"):
            raise InputSpecError(f"unknown backend {backend!r}: use ort or tvm")
    timings = benchmark_artifacts(artifacts, inputs, warmup=warmup, repeat=repeat)
    for i, (label, row) in enumerate(zip(labels, timings)):
        # ort: every model against the first; tvm: each TVM build against ORT on that model.
        base = timings[0] if backend == "ort" else timings[i - i % 2]
        row["label"] = label
        row["threads"] = threads
        row["baseline"] = labels[timings.index(base)]
        row["ratio"] = row["median_ms"] / base["median_ms"] if base["median_ms"] else float("nan")
    if report_path is not None:
        with reading(reads):
            if Path(report_path).suffix.lower() in (".html", ".htm"):
                write_report(report_path, {"kind": "bench", "rows": timings})
            else:
                write_json(report_path, timings)
    return timings


def inspect_model(model: ModelSource, input_shapes: dict[str, tuple[int, ...]] | None = None
                  ) -> dict[str, Any]:
    """Structure and cost of a model: I/O, opset, params, weight bytes, MACs, op counts."""
    loaded = load_model(model)
    shapes, problem = _try_shapes(loaded, input_shapes)
    metrics = compute_metrics(loaded, shapes if not problem else None, with_macs=not problem)
    path = Path(model) if isinstance(model, (str, os.PathLike)) else None

    def describe(value: ir.Value) -> dict[str, Any]:
        shape = [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape else None
        return {"name": value.name, "dtype": value.dtype.name if value.dtype else "?",
                "shape": shape}

    top = sorted(metrics.node_macs.items(), key=lambda kv: -kv[1])[:10]
    return {
        "path": str(path) if path else "<in-memory>",
        "file_bytes": path.stat().st_size if path else 0,
        "opset": loaded.opset_imports.get("", None),
        "ir_version": loaded.ir_version,
        "producer": loaded.producer_name,
        "inputs": [describe(v) for v in model_inputs(loaded)],
        "outputs": [describe(v) for v in loaded.graph.outputs],
        "nodes": metrics.nodes,
        "params": metrics.params,
        "weight_bytes": metrics.weight_bytes,
        # None (unknown), not 0, when no MAC-counting node's shapes could be inferred
        "macs": None if problem or (metrics.unknown_mac_nodes and not metrics.node_macs)
        else metrics.macs,
        "macs_note": OptionText.of("MACs need concrete input shapes: ", problem) if problem else
        metrics.unknown_note(),
        "op_counts": metrics.op_counts,
        "top_nodes": top,
    }


def verify_models(reference: ModelSource, candidate: ModelSource, *,
                  data: Any = None, input_shapes=None, batches: int = 16,
                  threads: int = 1) -> Comparison:
    """Compare two models' outputs on the same inputs with onnxruntime."""
    ref = load_model(reference)
    cand = load_model(candidate)
    shapes = resolve_input_shapes(ref, input_shapes)
    source = open_calibration(data if data is not None else f"random:{batches}", ref, shapes)
    return compare_models(ref, cand, source, limit=batches, threads=threads)


# ---------------------------------------------------------------------------------------
# Compile for deployment: ONNX in, a checked TVM library out
# ---------------------------------------------------------------------------------------
# The recipe `onnxforge compile` runs: refuse outputs that are files the run reads; the
# pass pipeline (`cleanup` by default when every input shape is fixed, so TVM's importer
# gets constant shapes); optionally MetaSchedule tuning first; `backends.tvm.
# compile_model`; verification against onnxruntime (3 inputs, the first run twice), on by
# default whenever the code can run here, which raises and writes nothing on failure;
# the library and the JSON report written atomically.

DEFAULT_COMPILE_PIPELINE = "cleanup"


@dataclass
class CompileResult:
    artifact: Any  # backends.tvm.TVMArtifact
    report: dict[str, Any]
    written: list[str] = field(default_factory=list)
    verification: Any | None = None  # backends.tvm.Verification, when it ran
    tuning: Any | None = None  # backends.tvm.tuning.TuningReport, when tune_trials > 0
    pipeline: str = ""  # the pass pipeline that ran first ("" none)


def prepare_for_compile(model: ModelSource, pipeline: str | None,
                        input_shapes: Mapping[str, Sequence[int]] | None, target: Any,
                        console: Console | None = None) -> tuple[Any, str]:
    """(the model to compile, the pipeline that ran): the model is validated, the target
    resolved, then `pipeline` runs (None: `cleanup` when every input shape is fixed)."""
    from .backends.targets import resolve_target

    loaded = load_model(model)  # refuse what `optimize` refuses (newer IR/opset, ...)
    resolve_target(target)  # then an unknown target, before any pass runs
    shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()}
    if pipeline is None:
        try:
            resolve_input_shapes(loaded, shapes)
            pipeline = DEFAULT_COMPILE_PIPELINE
        except InputSpecError:  # dynamic dims: compile itself says which --input-shape
            pipeline = ""
    if not pipeline.strip():
        return model, ""
    # the model loaded above, not the file again (a copy is cheaper than a second read)
    result = optimize(loaded, pipeline, input_shapes=shapes or None, console=console)
    ran = str(result.report.get("pipeline", pipeline))
    if isinstance(model, (str, os.PathLike)):  # errors further on still name the file
        from .backends.tvm.importer import LABEL_KEY

        result.model.meta[LABEL_KEY] = f"{model} (after {ran})"
    return result.model, ran


def compile(
    model: ModelSource,
    target: Any = "host",
    output: str | os.PathLike | None = None,
    *,
    pipeline: str | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tuning_db: str | os.PathLike | None = None,
    tune_trials: int = 0,
    tune_seconds: float | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    default_schedules: bool = True,
    shipped_db: bool = True,
    verify: bool | None = None,
    report_path: str | os.PathLike | None = None,
    console: Console | None = None,
    profile: bool = False,
) -> CompileResult:
    """Compile `model` for `target` and write the library to `output` (a .so or .tar;
    None: nothing written), following the module's recipe. `verify=None` verifies when
    the code can run here, True demands it, False skips it. Raises VerificationError (with
    `.verification` and `.report` attached) and writes nothing when the check fails.
    `profile`: time each kernel here (report["profile"], backends/tvm/profile.py)."""
    reads = files_read(model)  # nothing written may be one of these (checked again later)
    check_writes([("output", output), ("report", report_path)], reads)
    if (tune_seconds or rpc_tracker) and not tune_trials:
        raise InputSpecError("tune_seconds / rpc_tracker need tune_trials > 0")
    if tune_trials and tuning_db is None:
        raise InputSpecError("tune_trials needs a tuning_db folder to tune into")
    source, ran = prepare_for_compile(model, pipeline, input_shapes, target, console)
    # imported once the model is known valid: an invalid model is refused without TVM
    from .backends.tvm import compile_model, verify_artifact
    from .backends.tvm.tuning import tune

    shapes = dict(input_shapes) if input_shapes else None
    tuning = None
    if tune_trials:
        tuning = tune(source, target, tuning_db, max_trials=tune_trials,
                      max_seconds=tune_seconds, input_shapes=shapes, rpc_tracker=rpc_tracker,
                      rpc_key=rpc_key, progress=console is not None, console=console)
    artifact = compile_model(source, target, input_shapes=shapes, tuning_db=tuning_db,
                             default_schedules=default_schedules, shipped_db=shipped_db)
    result = CompileResult(artifact, artifact.report, tuning=tuning, pipeline=ran)
    if verify is None:
        verify = artifact.can_run()
        if not verify:
            artifact.report["notes"].append(
                f"not verified against onnxruntime: {artifact.report['target_key']} code "
                "cannot run on this machine")
    if verify:  # before anything is written: a failed check leaves no library
        checked = verify_artifact(artifact, source, raise_on_failure=False)
        result.verification = checked
        artifact.report["verification"] = {
            **checked.comparison.to_dict(), "rtol": checked.rtol,
            "ort_qdq_spread": checked.ort_spread,
            "same_output_twice": not checked.nondeterministic}
        if not checked.ok:
            error = VerificationError(f"{artifact.report.get('model', '<model>')}: "
                                      f"{checked.problem()}; nothing was written")
            error.verification, error.report = checked, artifact.report
            raise error
    if profile:
        _profile(artifact)
    with reading(reads):
        if output is not None:
            written = artifact.export(Path(output))
            result.written = list(artifact.report.get("exported", [str(written)]))
        if report_path is not None:
            write_report(report_path, artifact.report)
    return result


def _profile(artifact: Any) -> None:
    """report["profile"]: time per kernel (in process only: not for code run under qemu)."""
    from .backends.tvm.profile import profile_kernels

    if artifact._runtime_device() is None:  # the VM the profiler instruments is local
        artifact.report["notes"].append("not profiled: the code cannot run in this process "
                                        "on this machine")
        return
    artifact.report["profile"] = profile_kernels(artifact)


# ---------------------------------------------------------------------------------------
# Tune for a target: measured schedules into a database that compile applies
# ---------------------------------------------------------------------------------------
# The recipe `onnxforge tune` runs: the model validated and cleaned up as for compile,
# then by `method` the schedule-config search (the default rules' knob settings, timed
# per kernel on this machine's CPU: minutes) and/or MetaSchedule's search (on a device
# elsewhere over RPC too: hours for a real model), both into `tuning_db/<target key>/`;
# `seconds` bounds the whole call.

TUNE_METHODS = ("configs", "metaschedule", "both")


@dataclass
class TuneResult:
    configs: Any | None = None  # backends.tvm.config_tuning.ConfigSearchReport, if it ran
    metaschedule: Any | None = None  # backends.tvm.tuning.TuningReport, if it ran
    pipeline: str = ""  # the pass pipeline that ran first ("" none)
    notes: list[str] = field(default_factory=list)  # steps skipped, and why

    def to_dict(self) -> dict[str, Any]:
        """The `tune --report` content (JSON, or the HTML page's input)."""
        return {"kind": "tune", "pipeline": self.pipeline, "notes": list(self.notes),
                "configs": self.configs.to_dict() if self.configs is not None else None,
                "metaschedule": (self.metaschedule.to_dict()
                                 if self.metaschedule is not None else None)}


def tune(
    model: ModelSource,
    target: Any = "host",
    tuning_db: str | os.PathLike = "tuning_db",
    *,
    method: str = "both",
    trials: int = 64,
    seconds: float | None = None,
    pipeline: str | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    retune: bool = False,
    console: Console | None = None,
    on_step: Callable[[str, Any], None] | None = None,
) -> TuneResult:
    """Tune `model` for `target` into the folder `tuning_db` (one subfolder per target),
    following the recipe above; `compile(..., tuning_db=...)` applies what was measured.

    `method`: "configs", "metaschedule", or "both": the configs first, then MetaSchedule
    has to beat them (where the configs cannot be measured here the step is skipped with
    a note). `trials`: MetaSchedule's measured candidates; `seconds`: the wall-clock
    budget of the whole call; `retune`: measure what the database already covers too.
    `console`: where progress is shown (None: nowhere). `on_step(step, value)` is called
    as each step ends: ("pipeline", the pipeline that ran), ("configs", the config
    search's report), ("metaschedule", MetaSchedule's report), ("note", a skipped step).
    """
    if method not in TUNE_METHODS:
        raise InputSpecError(f"unknown tuning method {method!r}: use one of "
                             f"{', '.join(TUNE_METHODS)}")
    started = time.monotonic()
    result = TuneResult()

    def step(name: str, value: Any) -> None:
        if name == "note":
            result.notes.append(value)
        if on_step is not None:
            on_step(name, value)

    why_not = None if method == "metaschedule" else \
        _config_search_unavailable(target, rpc_tracker)
    if why_not and method == "configs":
        error = InputSpecError if rpc_tracker else BackendError
        raise error(OptionText.of(("method", "configs"), ": ", why_not))
    shapes = {k: tuple(v) for k, v in (input_shapes or {}).items()} or None
    source, result.pipeline = prepare_for_compile(model, pipeline, shapes, target, console)
    step("pipeline", result.pipeline)
    if why_not:
        step("note", OptionText.of("schedule-config step skipped: ", why_not))
    elif method != "metaschedule":
        result.configs = _search_configs(source, target, tuning_db, shapes, retune,
                                         _seconds_left(seconds, started), console)
        step("configs", result.configs)
    if method == "configs":
        return result
    left = _seconds_left(seconds, started)
    if left is not None and left <= 0:
        step("note", OptionText.of("MetaSchedule skipped: the ", ("seconds", None),
                                   " budget went on the schedule-config search"))
        return result
    from .backends.tvm.tuning import tune as tune_metaschedule

    result.metaschedule = tune_metaschedule(
        source, target, tuning_db, max_trials=trials, max_seconds=left, input_shapes=shapes,
        rpc_tracker=rpc_tracker, rpc_key=rpc_key, retune=retune,
        progress=console is not None, console=console)
    step("metaschedule", result.metaschedule)
    return result


def _config_search_unavailable(target: Any, rpc_tracker: str | None) -> OptionText | None:
    """Why the schedule-config search cannot run for this target (None: it can)."""
    from .backends.targets import resolve_target, runs_on_this_machine, target_key

    if rpc_tracker:
        return OptionText.of(
            "the schedule-config search measures on this machine's CPU, not on an ",
            ("rpc_tracker", None), " device (tune that device with ",
            ("method", "metaschedule"), ")")
    tvm_target = resolve_target(target)
    if tvm_target.kind.name != "llvm" or not runs_on_this_machine(tvm_target):
        return OptionText.of(
            f"the schedule-config search measures on this machine's CPU; "
            f"{target_key(tvm_target)} code does not run here (tune it on the device over "
            "RPC: ", ("method", "metaschedule"), " ", ("rpc_tracker", "HOST:PORT"), " ",
            ("rpc_key", "KEY"), ")")
    return None


def _search_configs(source: Any, target: Any, tuning_db: str | os.PathLike,
                    shapes: Mapping[str, Sequence[int]] | None, retune: bool,
                    left: float | None, console: Console | None) -> Any:
    """The schedule-config search within the time left, its progress on `console`."""
    from .backends.tvm.config_tuning import search_configs

    options = {"input_shapes": shapes, "retune": retune,
               "max_seconds": None if left is None else max(left, 1e-3)}
    if console is None:
        return search_configs(source, target, tuning_db, **options)
    with console.status("schedule configs: preparing the model") as status:
        def on_kernel(done: int, total: int, name: str) -> None:
            status.update(f"schedule configs: {done}/{total} kernel(s), last {name}")

        return search_configs(source, target, tuning_db, progress=on_kernel, **options)


def _seconds_left(budget: float | None, started: float) -> float | None:
    return None if budget is None else budget - (time.monotonic() - started)
