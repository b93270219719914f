"""The TVM commands of the `onnxforge` CLI: `targets`, `compile` and `tune`.

`compiler/cli.py` calls `register(app)`. Every command is a thin layer over
`onnxforge.backends.{targets,tvm,tuning}`; errors are onnxforge exceptions, which the
main CLI prints on one line (traceback with --debug).

Examples:
  onnxforge targets
  onnxforge compile model.onnx --target cortex-a72 -o model.so --verify
  onnxforge compile model.onnx --target host -o model.so --tuning-db tuning/ --tune-trials 64
  onnxforge tune model.onnx --target host --tuning-db tuning/ --trials 256 --seconds 1800
  onnxforge tune model.onnx --target cortex-a72 --tuning-db tuning/ --trials 256 \\
      --rpc-tracker 10.0.0.5:9190 --rpc-key rpi4
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import InputSpecError, VerificationError

console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

VERIFY_RTOL = 1e-4

TargetOpt = Annotated[str, typer.Option(
    "--target", "-t", help="Target preset (see `onnxforge targets`) or a TVM JSON target dict.")]
InputShapeOpt = Annotated[list[str] | None, typer.Option(
    "--input-shape", "-s", help="Concrete shape for an input with dynamic dims, e.g. "
    "input:1,3,224,224 (repeatable).")]
TuningDbOpt = Annotated[Path | None, typer.Option(
    "--tuning-db", help="Tuning database folder (one subfolder per target).")]
RpcTrackerOpt = Annotated[str | None, typer.Option(
    "--rpc-tracker", help="TVM RPC tracker HOST:PORT: measure on the device registered there.")]
RpcKeyOpt = Annotated[str | None, typer.Option(
    "--rpc-key", help="Device key in the RPC tracker (with --rpc-tracker).")]


def _shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    from .shapes import parse_input_shapes

    return parse_input_shapes(specs)


def optimize_before_compile(model: Path, pipeline: str | None,
                            shapes: dict[str, tuple[int, ...]]) -> Any:
    """`-p PIPELINE`: run onnxforge's pass pipeline first (via `onnxforge.api.optimize`).

    Returns the model to compile: the path itself without a pipeline, else the optimized
    in-memory onnx_ir model (already verified by the pipeline's own checks).
    """
    if not pipeline:
        return model
    from . import api

    result = api.optimize(model, pipeline, input_shapes=shapes or None, console=err_console)
    steps = result.report.get("steps", [])
    err_console.print(f"pipeline {result.report.get('pipeline', pipeline)}: {len(steps)} step(s)")
    return result.model


def render_targets() -> Table:
    from .backends.targets import list_targets

    table = Table("name", "kind", "family", "description", "TVM target (JSON)",
                  title="onnxforge targets")
    for preset in list_targets():
        aliases = f" ({', '.join(preset.aliases)})" if preset.aliases else ""
        if preset.unavailable:
            config = f"[yellow]unavailable:[/] {preset.unavailable}"
        else:
            import json

            config = json.dumps(preset.target_dict())
        table.add_row(preset.name + aliases, preset.kind, preset.family, preset.description,
                      config)
    return table


def render_tuning(report: Any) -> Table:
    table = Table("task", "FLOP share", "weight", "status", "trials", "best tuned (us)",
                  "default schedule (us)",
                  title=f"tuning {report.target_key}: {report.trials} trials in "
                        f"{report.seconds:.0f} s, stopped by {report.stopped_by}")
    for task in report.tasks:
        table.add_row(task.name, f"{task.share * 100:.1f}%", str(task.weight), task.status,
                      str(task.trials), "-" if task.best_us is None else f"{task.best_us:.1f}",
                      "-" if task.default_us is None else f"{task.default_us:.1f}")
    return table


def run_verification(artifact: Any, model: Any, *, rtol: float = VERIFY_RTOL,
                     seed: int = 0) -> list[Any]:
    """Artifact vs onnxruntime on seeded random inputs; raises VerificationError past rtol."""
    from .backends.tvm import VERIFY_ATOL, compare_to_ort, random_inputs

    inputs = random_inputs(artifact.inputs, seed=seed)
    errors = compare_to_ort(artifact, model, inputs)
    table = Table("output", "shape", "max abs", "relative", "rel L2", "ok",
                  title=f"verify vs onnxruntime: max abs <= {rtol:g} x max |ORT| "
                        f"(+{VERIFY_ATOL:g} float floor)")
    for err in errors:
        table.add_row(err.name, str(err.shape), f"{err.max_abs:.3e}", f"{err.rel:.3e}",
                      f"{err.rel_l2:.3e}", "[green]yes[/]" if err.within(rtol) else "[red]NO[/]")
    console.print(table)
    bad = [e for e in errors if not e.within(rtol)]
    if bad:
        worst = max(bad, key=lambda e: e.rel)
        raise VerificationError(
            f"TVM output {worst.name!r} differs from onnxruntime: max abs {worst.max_abs:.3e}, "
            f"relative {worst.rel:.3e} > {rtol:g}"
        )
    return errors


def register(app: typer.Typer) -> None:
    """Add `targets`, `compile` and `tune` to the main `onnxforge` app."""

    @app.command()
    def targets() -> None:
        """List the compilation target presets and their TVM JSON targets."""
        from .backends.targets import host_features

        console.print(render_targets())
        console.print(f"host CPU features: {', '.join(host_features()) or '-'}")

    @app.command("compile")
    def compile_command(
        model: Annotated[Path, typer.Argument(help="ONNX model file.")],
        target: TargetOpt = "host",
        output: Annotated[Path, typer.Option(
            "--output", "-o", help="Library to write: .so (or .tar of objects).")] = Path("model.so"),
        input_shape: InputShapeOpt = None,
        tuning_db: TuningDbOpt = None,
        tune_trials: Annotated[int, typer.Option(
            "--tune-trials", help="Tune first with this many MetaSchedule trials "
            "(tasks already in the database are not tuned again).")] = 0,
        tune_seconds: Annotated[float | None, typer.Option(
            "--tune-seconds", help="Wall-clock budget for tuning, in seconds.")] = None,
        rpc_tracker: RpcTrackerOpt = None,
        rpc_key: RpcKeyOpt = None,
        verify: Annotated[bool, typer.Option(
            "--verify", help="Run the result against onnxruntime on random inputs; exit "
            f"non-zero past {VERIFY_RTOL:g} relative error (AArch64 runs under qemu).")] = False,
        # -p: onnxforge's pass pipeline before compiling, through onnxforge.api.optimize.
        pipeline: Annotated[str | None, typer.Option(
            "--pipeline", "-p", help="Run this onnxforge pass pipeline first, e.g. cleanup,fuse "
            "(an already optimized model needs none).")] = None,
        no_default_schedules: Annotated[bool, typer.Option(
            "--no-default-schedules", help="Leave functions outside the database unscheduled.")
        ] = False,
        report: Annotated[Path | None, typer.Option(
            "--report", "-r", help="Write the compile report as JSON here.")] = None,
    ) -> None:
        """Compile an ONNX model with TVM for a target and export the library.

        Examples:
          [bold]onnxforge compile model.onnx --target cortex-a72 -o model.so --verify[/]
          [bold]onnxforge compile model.onnx -t host -o m.so --tuning-db db/ --tune-trials 64[/]
        """
        from .backends.tuning import tune
        from .backends.tvm import compile_model
        from .report import write_json

        shapes = _shapes(input_shape)
        if tune_trials and tuning_db is None:
            tuning_db = output.parent / "tuning_db"
            err_console.print(f"tuning database: {tuning_db}")
        if (tune_seconds or rpc_tracker) and not tune_trials:
            raise InputSpecError("--tune-seconds / --rpc-tracker need --tune-trials N")
        source = optimize_before_compile(model, pipeline, shapes)
        if tune_trials:
            tuned = tune(source, target, tuning_db, max_trials=tune_trials,
                         max_seconds=tune_seconds, input_shapes=shapes or None,
                         rpc_tracker=rpc_tracker, rpc_key=rpc_key, progress=True,
                         console=err_console)
            console.print(render_tuning(tuned))
        artifact = compile_model(source, target, input_shapes=shapes or None,
                                 tuning_db=tuning_db, default_schedules=not no_default_schedules)
        written = artifact.export(output)
        info = artifact.report
        console.print(
            f"compiled for {info.get('target') or info['target_key']} in "
            f"{info['compile_seconds']:.1f} s: {info['num_primfuncs']} functions, "
            f"{info['scheduled_by_database']} from the tuning database, "
            f"{info['scheduled_by_default']} by default rules ({info['default_rules'] or '-'}), "
            f"{info['unscheduled']} unscheduled"
            + (f"; default schedule kept over a slower tuning record for "
               f"{len(info['default_kept_over_database'])}"
               if info.get("default_kept_over_database") else ""))
        for note in info["notes"]:
            err_console.print(f"[yellow]note:[/] {note}")
        console.print(f"wrote {', '.join(info.get('exported', [str(written)]))}")
        if verify:
            run_verification(artifact, source)
        if report:
            write_json(report, info)

    @app.command("tune")
    def tune_command(
        model: Annotated[Path, typer.Argument(help="ONNX model file.")],
        target: TargetOpt = "host",
        tuning_db: Annotated[Path, typer.Option(
            "--tuning-db", help="Tuning database folder (one subfolder per target).")
        ] = Path("tuning_db"),
        trials: Annotated[int, typer.Option("--trials", help="Total measured trials.")] = 64,
        seconds: Annotated[float | None, typer.Option(
            "--seconds", help="Wall-clock budget in seconds (whichever ends first).")] = None,
        input_shape: InputShapeOpt = None,
        rpc_tracker: RpcTrackerOpt = None,
        rpc_key: RpcKeyOpt = None,
        retune: Annotated[bool, typer.Option(
            "--retune", help="Tune tasks the database already covers too.")] = False,
        pipeline: Annotated[str | None, typer.Option(
            "--pipeline", "-p", help="Run this onnxforge pass pipeline first (as compile does)."
        )] = None,
    ) -> None:
        """Tune a model with MetaSchedule into a persistent, per-target database.

        Example: [bold]onnxforge tune model.onnx -t host --tuning-db db/ --trials 128 --seconds 900[/]
        """
        from .backends.tuning import tune

        shapes = _shapes(input_shape)
        source = optimize_before_compile(model, pipeline, shapes)
        result = tune(source, target, tuning_db, max_trials=trials, max_seconds=seconds,
                      input_shapes=shapes or None, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                      retune=retune, progress=True, console=err_console)
        console.print(render_tuning(result))
        console.print(f"database {result.db_dir}: {result.records_before} -> "
                      f"{result.records_after} records"
                      + (" (reused, nothing tuned)" if result.reused else ""))
        for error in result.errors[:5]:
            err_console.print(f"[yellow]warning:[/] {error}")
