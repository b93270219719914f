"""Benchmark: onnxruntime vs TVM (default schedules) vs TVM (tuned database), per model.

    python tools/bench_tvm.py                               # digits + every zoo model present
    python tools/bench_tvm.py --models resnet18 mobilenet_v2 --threads 2
    python tools/bench_tvm.py --models digits --tuning-db tuning/ \\
        --tune-trials 64 --tune-seconds 600
    python tools/bench_tvm.py --json bench_tvm.json
    python tools/bench_tvm.py --check-targets cortex-a72 cuda-sm80 opencl-mali   # + ARM/GPU

Each model first goes through onnxforge's exact pipeline (`--pipeline`, default
cleanup,fuse: folds shape subgraphs TVM cannot import and BatchNorm, which TVM does not
fold); ORT and TVM then run that same graph, and TVM's outputs are checked against ORT
on the original model. `--check-targets` also compiles each model for other targets:
AArch64 code runs under qemu-aarch64 against ORT, GPU targets must emit kernels.

All latencies of one model are measured in one process, interleaved in rounds (so machine
noise hits every backend alike), median of `--repeat` runs after warm-up. ORT runs with
intra_op_num_threads = the TVM thread count and spinning off
(session.intra_op.allow_spinning=0, session.inter_op.allow_spinning=0); TVM's thread pool
is set to the same count. Ratios are TVM / ORT (below 1: TVM is faster).

The "tuned" column needs a database: give --tuning-db (tasks already tuned are reused, no
trials spent) and --tune-trials N (with --tune-seconds S per model) to tune what is missing.
Outputs are checked against ORT on the same input (max relative error, vs max |ORT|).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ZOO = REPO / ".zoo"
DIGITS = REPO / "compiler" / "data" / "digits_cnn.onnx"
ZOO_ORDER = ["resnet18", "mobilenet_v2", "squeezenet1_1", "efficientnet_b0",
             "mobilenet_v3_small", "minilm_l6", "ppocr_det", "ppocr_rec", "ppocr_cls"]


def model_list(names: list[str] | None) -> list[tuple[str, Path, dict]]:
    manifest = {}
    if (ZOO / "manifest.json").is_file():
        manifest = json.loads((ZOO / "manifest.json").read_text()).get("models", {})
    wanted = names or ["digits", *ZOO_ORDER]
    models = []
    for name in wanted:
        if name == "digits":
            if DIGITS.is_file():
                models.append(("digits", DIGITS, {"input": (1, 1, 8, 8)}))
            continue
        path = Path(name) if name.endswith(".onnx") else ZOO / f"{name}.onnx"
        if not path.is_file():
            print(f"skip {name}: {path} absent (python tools/build_zoo.py)", file=sys.stderr)
            continue
        entry = manifest.get(path.stem, {})
        shapes = {i["name"]: tuple(i["shape"]) for i in entry.get("inputs", [])}
        models.append((path.stem, path, shapes))
    return models


def sample_inputs(name: str, artifact) -> dict[str, np.ndarray]:
    from onnxforge.backends.tvm import random_inputs

    sample = ZOO / f"{name}.inputs.npz"
    if sample.is_file():
        data = np.load(sample)
        inputs = {}
        for spec in artifact.inputs:
            if spec.name in data.files:
                array = data[spec.name]
                if array.shape != spec.shape and array.ndim == len(spec.shape):
                    array = array[: spec.shape[0]]
                if array.shape == spec.shape:
                    inputs[spec.name] = array.astype(spec.dtype)
        if len(inputs) == len(artifact.inputs):
            return inputs
    return random_inputs(artifact.inputs, seed=0)


def optimized(name: str, path: Path, shapes: dict, pipeline: str | None):
    """The model after onnxforge's (exact) pipeline; both ORT and TVM run this graph."""
    from onnxforge import api
    from onnxforge.ir import load_model

    if not pipeline or pipeline == "none":
        return load_model(path), 0.0
    sample = ZOO / f"{name}.inputs.npz"
    start = time.perf_counter()
    result = api.optimize(path, pipeline, input_shapes=shapes or None,
                          calibration=str(sample) if sample.is_file() else None)
    return result.model, time.perf_counter() - start


def check_targets(name: str, model, original: Path, shapes: dict, inputs: dict,
                  targets: list[str]) -> dict:
    """Compile for other targets: AArch64 runs under qemu vs ORT, GPUs must emit kernels."""
    from onnxforge.backends.targets import resolve_target, target_arch
    from onnxforge.backends.tvm import compare_to_ort, compile_model

    results = {}
    for target in targets:
        start = time.perf_counter()
        try:
            art = compile_model(model, target, input_shapes=shapes or None)
            entry = {"compile_s": round(time.perf_counter() - start, 1)}
            tvm_target = resolve_target(target)
            if tvm_target.kind.name == "llvm" and target_arch(tvm_target) == "aarch64":
                start = time.perf_counter()
                errors = compare_to_ort(art, original, inputs)
                entry["qemu_s"] = round(time.perf_counter() - start, 1)
                entry["max_rel_err"] = max(e.rel for e in errors)
                entry["ok"] = all(e.within(1e-4) for e in errors)
            else:
                source = art.device_source()
                entry["kernels"] = len(re.findall(r"__global__\s+void|__kernel\s+void", source))
                entry["ok"] = entry["kernels"] > 0
        except Exception as exc:  # noqa: BLE001 - reported in the table
            entry = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        results[target] = entry
        print(f"   {target}: {entry}", file=sys.stderr, flush=True)
    return results


def bench_model(name: str, path: Path, shapes: dict, args) -> dict:
    from onnxforge.api import benchmark_artifacts
    from onnxforge.backends.ort import OrtArtifact
    from onnxforge.backends.tvm import compare_to_ort, compile_model

    row: dict = {"model": name, "threads": args.threads, "target": args.target,
                 "pipeline": args.pipeline}
    model, seconds = optimized(name, path, shapes, args.pipeline)
    row["pipeline_s"] = round(seconds, 1)
    start = time.perf_counter()
    default = compile_model(model, args.target, input_shapes=shapes or None, threads=args.threads)
    row["compile_s"] = round(time.perf_counter() - start, 1)
    row["tvm_compile_s"] = default.report["compile_seconds"]
    row["functions"] = default.report["num_primfuncs"]
    artifacts = [OrtArtifact(model, threads=args.threads), default]
    labels = ["ort", "tvm_default"]
    if args.naive:
        artifacts.append(compile_model(model, args.target, input_shapes=shapes or None,
                                       threads=args.threads, default_schedules=False))
        labels.append("tvm_naive")
    if args.tuning_db:
        if args.tune_trials:
            from onnxforge.backends.tvm.tuning import tune

            report = tune(model, args.target, args.tuning_db, max_trials=args.tune_trials,
                          max_seconds=args.tune_seconds, input_shapes=shapes or None,
                          progress=not args.quiet)
            row["tune_trials"] = report.trials
            row["tune_s"] = report.seconds
            row["tune_stopped_by"] = report.stopped_by
            row["tune_reused"] = report.reused
        start = time.perf_counter()
        tuned = compile_model(model, args.target, input_shapes=shapes or None,
                              tuning_db=args.tuning_db, threads=args.threads)
        row["compile_db_s"] = round(time.perf_counter() - start, 1)
        row["from_db"] = tuned.report["scheduled_by_database"]
        artifacts.append(tuned)
        labels.append("tvm_tuned")

    inputs = sample_inputs(name, default)
    errors = {}
    within = True
    for label, art in zip(labels[1:], artifacts[1:]):
        # against ORT on the *original* model: catches pipeline and compiler errors alike
        compared = compare_to_ort(art, path, inputs, threads=args.threads)
        errors[label] = max(e.rel for e in compared)
        within = within and all(e.within(1e-4) for e in compared)
    row["within_1e-4"] = within
    row["max_rel_err"] = {k: float(f"{v:.3e}") for k, v in errors.items()}
    if args.check_targets:
        row["targets"] = check_targets(name, model, path, shapes, inputs, args.check_targets)
    timings = benchmark_artifacts(artifacts, inputs, warmup=args.warmup, repeat=args.repeat)
    for label, timing in zip(labels, timings):
        row[f"{label}_ms"] = round(timing["median_ms"], 3)
    for label in labels[1:]:
        row[f"{label}_ratio"] = round(row[f"{label}_ms"] / row["ort_ms"], 2)
    return row


def render(rows: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    columns = ["model", "ORT ms", "TVM default ms", "ratio"]
    if args.naive:
        columns += ["TVM naive ms", "ratio"]
    if args.tuning_db:
        columns += ["TVM tuned ms", "ratio", "from DB", "tuning"]
    columns += ["compile s", "max rel err"]
    table = Table(*columns, title=f"ORT vs TVM on {args.target}, {args.threads} thread(s), "
                  f"median of {args.repeat} interleaved runs (ratio = TVM / ORT)")
    for row in rows:
        cells = [row["model"], f"{row['ort_ms']:.3f}", f"{row['tvm_default_ms']:.3f}",
                 f"{row['tvm_default_ratio']:.2f}x"]
        if args.naive:
            cells += [f"{row['tvm_naive_ms']:.3f}", f"{row['tvm_naive_ratio']:.2f}x"]
        if args.tuning_db:
            tuning = "-"
            if "tune_trials" in row:
                tuning = ("reused DB" if row["tune_reused"] else
                          f"{row['tune_trials']} trials, {row['tune_s']:.0f} s")
            cells += [f"{row['tvm_tuned_ms']:.3f}", f"{row['tvm_tuned_ratio']:.2f}x",
                      f"{row['from_db']}/{row['functions']}", tuning]
        compile_text = f"{row['compile_s']:.1f}"
        if "compile_db_s" in row:
            compile_text += f" / {row['compile_db_s']:.1f} (DB)"
        cells += [compile_text, ", ".join(f"{v:.1e}" for v in row["max_rel_err"].values())
                  + ("" if row["within_1e-4"] else " [red]FAIL[/]")]
        table.add_row(*cells)
    console = Console(width=200)
    console.print(table)
    if args.check_targets:
        other = Table("model", *args.check_targets, title="other targets: compile s; AArch64 "
                      "run under qemu vs ORT (max rel err), GPU kernels in the source")
        for row in rows:
            cells = [row["model"]]
            for target in args.check_targets:
                entry = row["targets"][target]
                if "error" in entry:
                    cells.append(f"[red]{entry['error'][:60]}[/]")
                elif "kernels" in entry:
                    cells.append(f"{entry['compile_s']:.1f} s, {entry['kernels']} kernels")
                else:
                    mark = "ok" if entry["ok"] else "[red]FAIL[/]"
                    cells.append(f"{entry['compile_s']:.1f} s, qemu {entry['qemu_s']:.0f} s, "
                                 f"{entry['max_rel_err']:.1e} {mark}")
            other.add_row(*cells)
        console.print(other)


def main(argv: list[str] | None = None) -> int:
    from onnxforge.backends.targets import physical_cores

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="digits, zoo names or .onnx paths")
    parser.add_argument("--target", default="host", help="a target that runs here (default host)")
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--tuning-db", type=Path, help="tuning database folder")
    parser.add_argument("--tune-trials", type=int, default=0, help="tune missing tasks first")
    parser.add_argument("--tune-seconds", type=float, help="tuning budget per model, seconds")
    parser.add_argument("--naive", action="store_true", help="also time unscheduled TVM code")
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--json", type=Path, help="write the rows as JSON too")
    parser.add_argument("--quiet", action="store_true", help="no tuning progress bar")
    parser.add_argument("--pipeline", default="cleanup,fuse",
                        help="onnxforge pipeline before both backends ('none' to skip)")
    parser.add_argument("--check-targets", nargs="*", default=[],
                        help="also compile for these (e.g. cortex-a72 cuda-sm80 opencl-mali)")
    args = parser.parse_args(argv)

    rows = []
    for name, path, shapes in model_list(args.models):
        print(f"== {name}", file=sys.stderr, flush=True)
        try:
            rows.append(bench_model(name, path, shapes, args))
        except Exception as exc:  # noqa: BLE001 - one model failing must not hide the rest
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
        if args.json:
            args.json.write_text(json.dumps(rows, indent=1))
    good = [r for r in rows if "error" not in r]
    if good:
        render(good, args)
    for row in rows:
        if "error" in row:
            print(f"{row['model']}: {row['error']}")
    return 0 if len(good) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
