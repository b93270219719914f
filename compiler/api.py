"""The public Python API; the CLI is a thin layer over these functions.

    import onnxforge
    result = onnxforge.optimize("model.onnx", "cleanup,fuse", output="out.onnx")
    print(result.report["steps"])
    built = onnxforge.api.compile("model.onnx", "host", "model.so")  # verified, then written
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console

from .backends.ort import OrtArtifact
from .calibration import CalibrationSource, open_calibration
from .errors import BudgetExceededError, InputSpecError, VerificationError
from .ir import ModelSource, files_read, load_model, save_model
from .metrics import compute_metrics
from .pass_manager import PassManager, StepReport
from .passes.base import PassContext
from .report import write_json
from .safe_write import check_writes, reading
from .shapes import check_input_shapes, model_inputs, resolve_input_shapes
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
    except InputSpecError as exc:
        return dict(input_shapes or {}), str(exc)


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
    shapes, shape_problem = _try_shapes(original, input_shapes)
    context = PassContext(input_shapes=shapes, threads=threads)
    if calibration is not None:
        if shape_problem:
            raise InputSpecError(shape_problem)
        context.calibration = open_calibration(calibration, original, shapes)
    verify_source = None
    if verify:
        if shape_problem:
            raise InputSpecError(f"{shape_problem} (or pass --no-verify to skip verification)")
        if verify_data is not None:
            verify_source = open_calibration(verify_data, original, shapes)
        elif context.calibration is not None:
            verify_source = context.calibration
        else:
            verify_source = open_calibration("random:4", original, shapes)

    manager = PassManager(pipeline, context, verify_source=verify_source, rtol=rtol,
                          dump_dir=dump_dir, print_after=set(print_after), console=console,
                          progress=progress)
    started = time.perf_counter()
    with reading(reads):  # --dump-dir writes inside
        working, steps = manager.run(working)
    seconds = time.perf_counter() - started

    before = compute_metrics(original, shapes if not shape_problem else None)
    after = compute_metrics(working, shapes if not shape_problem else None)
    error = None
    if verify_source is not None:
        # A labelled set is measured whole: an accuracy on a slice would mislead.
        limit = None if verify_source.labels() is not None else verify_batches
        error = compare_models(original, working, verify_source, limit=limit, threads=threads)
    report: dict[str, Any] = {
        "input": str(model) if isinstance(model, (str, os.PathLike)) else "<in-memory>",
        "output": str(output) if output else None,
        "pipeline": manager.pipeline.text,
        "seconds": round(seconds, 3),
        "input_shapes": {k: list(v) for k, v in shapes.items()},
        "before": before.to_dict(),
        "after": after.to_dict(),
        "steps": [s.to_dict() for s in steps],
        "error": error.to_dict() if error else None,
        "verification": None if verify_source is not None else "skipped (--no-verify)",
        "budget": {"max_error": max_error, "max_accuracy_drop": max_accuracy_drop,
                   "forced": force},
    }
    if measure_latency and not shape_problem:
        report["latency"] = compare_latency(original, working, verify_source or
                                            open_calibration("random:1", original, shapes),
                                            threads=threads)
    result = OptimizeResult(working, steps, report, error=error)
    _enforce_budget(result, max_error, max_accuracy_drop, force)
    with reading(reads):
        if output is not None:
            result.output = save_model(working, output)
            report["output_bytes"] = result.output.stat().st_size
        if report_path is not None:
            write_json(report_path, report)
    return result


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
        problems.append(f"relative L2 error {error.max_rel_l2:.4g} exceeds --max-error {max_error:g}")
    if error is not None and max_accuracy_drop is not None:
        drop = error.accuracy_drop
        if drop is None:
            problems.append("--max-accuracy-drop needs labels in the verification data")
        elif not (drop <= max_accuracy_drop):  # NaN counts as over budget
            problems.append(f"accuracy drop {drop * 100:.2f} pt exceeds --max-accuracy-drop "
                            f"{max_accuracy_drop * 100:.2f} pt")
    if not problems:
        return
    if force:
        result.warnings.extend(problems)
        result.report["budget"]["violations"] = problems
        return
    raise BudgetExceededError(
        "; ".join(problems) + ". Nothing was written; loosen the budget, change the pipeline, "
        "or pass --force to write anyway."
    )


def compare_latency(a: ir.Model, b: ir.Model, source: CalibrationSource, *, threads: int = 1,
                    warmup: int = 5, repeat: int = 30) -> dict[str, Any]:
    """Median ORT latency of two models on the same input, interleaved in one process."""
    timings = benchmark_artifacts([OrtArtifact(a, threads=threads), OrtArtifact(b, threads=threads)],
                                  source.first(), warmup=warmup, repeat=repeat)
    before, after = (t["median_ms"] for t in timings)
    return {"threads": threads, "before_ms": before, "after_ms": after,
            "speedup": before / after if after else float("nan")}


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
    model (tvm). `report_path`: also write the rows there as JSON (never over a model).
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
        "macs_note": f"MACs need concrete input shapes: {problem}" if problem else
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
) -> CompileResult:
    """Compile `model` for `target` and write the library to `output` (a .so or .tar;
    None: nothing written), following the module's recipe. `verify=None` verifies when
    the code can run here, True demands it, False skips it. Raises VerificationError (with
    `.verification` and `.report` attached) and writes nothing when the check fails."""
    from .backends.tvm import compile_model, verify_artifact
    from .backends.tvm.tuning import tune

    reads = files_read(model)  # nothing written may be one of these (checked again later)
    check_writes([("output", output), ("report", report_path)], reads)
    if (tune_seconds or rpc_tracker) and not tune_trials:
        raise InputSpecError("tune_seconds / rpc_tracker need tune_trials > 0")
    if tune_trials and tuning_db is None:
        raise InputSpecError("tune_trials needs a tuning_db folder to tune into")
    source, ran = prepare_for_compile(model, pipeline, input_shapes, target, console)
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
            "same_output_twice": not checked.nondeterministic}
        if not checked.ok:
            error = VerificationError(f"{artifact.report.get('model', '<model>')}: "
                                      f"{checked.problem()}; nothing was written")
            error.verification, error.report = checked, artifact.report
            raise error
    with reading(reads):
        if output is not None:
            written = artifact.export(Path(output))
            result.written = list(artifact.report.get("exported", [str(written)]))
        if report_path is not None:
            write_json(report_path, artifact.report)
    return result
