"""The TVM commands of the `onnxforge` CLI: `targets`, `compile` and `tune`.

`compiler/cli.py` calls `register(app)`. Every command is a thin layer over
`onnxforge.api` and `onnxforge.backends.{targets,tvm}`; errors are onnxforge exceptions,
which the main CLI prints on one line (traceback with --debug).

Examples:
  onnxforge targets
  onnxforge compile model.onnx --target cortex-a72 -o model.so --verify
  onnxforge compile model.onnx --target host -o model.so --tuning-db tuning/ --tune-trials 64
  onnxforge tune model.onnx --target host --tuning-db tuning/ --trials 256 --seconds 1800
  onnxforge tune model.onnx --target host --tuning-db tuning/ --method configs
  onnxforge tune model.onnx --target cortex-a72 --tuning-db tuning/ --trials 256 \\
      --rpc-tracker 10.0.0.5:9190 --rpc-key rpi4
"""

from __future__ import annotations

import sys
import time
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .errors import BackendError, InputSpecError, VerificationError
from .tolerance import VERIFY_ATOL, VERIFY_RTOL

console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

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


class TuneMethod(str, Enum):
    """What `onnxforge tune` measures."""

    configs = "configs"  # the default rules' knob settings, per kernel (minutes)
    metaschedule = "metaschedule"  # MetaSchedule's search (hours for a real model)
    both = "both"  # configs first, then MetaSchedule has to beat them


def _shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    from .shapes import parse_input_shapes

    return parse_input_shapes(specs)


def optimize_before_compile(model: Path, pipeline: str | None,
                            shapes: dict[str, tuple[int, ...]], target: str) -> Any:
    """`api.prepare_for_compile` (validate, resolve the target, run the pipeline:
    `cleanup` by default when shapes are fixed), saying on the terminal what ran."""
    from .api import prepare_for_compile

    source, ran = prepare_for_compile(model, pipeline, shapes or None, target, err_console)
    _say_pipeline(ran, default=pipeline is None)
    return source


def _say_pipeline(ran: str, default: bool) -> None:
    if ran:
        err_console.print(f"pipeline {ran}"
                          + (" (the default before compiling; -p '' skips it)" if default
                             else ""))


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


def render_config_search(report: Any) -> Table:
    """One row per kernel measured by `search_configs` (the heuristic setting included)."""
    table = Table("kernel", "rule", "settings tried", "default (us)", "best (us)",
                  "chosen setting",
                  title=f"schedule configs {report.target_key}: {len(report.kernels)} kernel(s) "
                        f"measured in {report.seconds:.0f} s")
    for row in report.kernels:
        config = row["config"]
        chosen = "heuristic" if config is None else \
            "[green]" + ", ".join(f"{k}={v}" for k, v in config.items()) + "[/]"
        if row.get("note"):
            chosen += f" [yellow]({row['note']})[/]"
        table.add_row(row["kernel"], row["rule"], str(row["settings"]),
                      f"{row['default_us']:.1f}", f"{row['best_us']:.1f}", chosen)
    return table


def config_search_summary(report: Any) -> str:
    from .kernels.schedule_configs import CONFIG_FILE

    return (f"schedule configs {Path(report.db_dir) / CONFIG_FILE}: "
            f"{len(report.kernels)} kernel(s) measured, {report.improved} improved, "
            f"{report.known} already in the database, {report.seconds:.0f} s"
            + ("" if report.stopped_by == "all kernels done"
               else f" (stopped by {report.stopped_by})"))


def config_search_unavailable(target: str, rpc_tracker: str | None) -> str | None:
    """Why the schedule-config search cannot run for this target (None: it can)."""
    from .backends.targets import resolve_target, runs_on_this_machine, target_key

    if rpc_tracker:
        return ("the schedule-config search measures on this machine's CPU, not on an "
                "--rpc-tracker device (tune that device with --method metaschedule)")
    tvm_target = resolve_target(target)
    if tvm_target.kind.name != "llvm" or not runs_on_this_machine(tvm_target):
        return (f"the schedule-config search measures on this machine's CPU; "
                f"{target_key(tvm_target)} code does not run here (tune it on the device over "
                "RPC: --method metaschedule --rpc-tracker HOST:PORT --rpc-key KEY)")
    return None


def schedule_configs_note(info: dict) -> str:
    """`; N with a measured setting (from ...)` for compile's summary line ('' off CPU)."""
    found = info.get("schedule_configs")
    if not found or info.get("default_rules") != "onnxforge.kernels":
        return ""
    from .kernels.schedule_configs import SHIPPED_ROOT

    labels = []
    for source in found["sources"]:
        path = Path(source)
        labels.append(f"shipped {path.name}" if path.parent == SHIPPED_ROOT else source)
    origin = f"from {', '.join(labels)}" if labels else "no schedule-config database"
    return f"; {found['applied']} with a measured knob setting ({origin})"


def _seconds_left(budget: float | None, started: float) -> float | None:
    return None if budget is None else budget - (time.monotonic() - started)


def render_verification(result: Any) -> Table:
    """The table of `backends.tvm.verify_artifact`'s result."""
    from .backends.tvm import VERIFY_SAMPLES

    table = Table("output", "shape", "max abs", "relative", "rel L2", "same twice", "ok",
                  title=f"verify vs onnxruntime on {VERIFY_SAMPLES} random inputs: rel L2 or "
                        f"max abs <= {result.rtol:g} x max |ORT| (+{VERIFY_ATOL:g} float floor)")
    for err in result.comparison.outputs:
        same = err.name not in result.nondeterministic
        table.add_row(err.name, str(err.shape), f"{err.max_abs:.3e}", f"{err.rel:.3e}",
                      f"{err.rel_l2:.3e}", "yes" if same else "[red]NO[/]",
                      "[green]yes[/]" if same and err.within(result.rtol, VERIFY_ATOL)
                      else "[red]NO[/]")
    return table


def compile_summary(info: dict) -> str:
    """compile's one-line summary: time, functions and who scheduled them."""
    return (
        f"compiled for {info.get('target') or info['target_key']} in "
        f"{info['compile_seconds']:.1f} s: {info['num_primfuncs']} functions, "
        f"{info['scheduled_by_database']} from the tuning database, "
        f"{info['scheduled_by_default']} by default rules ({info['default_rules'] or '-'}), "
        f"{info['unscheduled']} unscheduled" + schedule_configs_note(info)
        + (f"; default schedule kept over a slower tuning record for "
           f"{len(info['default_kept_over_database'])}"
           if info.get("default_kept_over_database") else ""))


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
        verify: Annotated[bool | None, typer.Option(
            "--verify/--no-verify", help="Before writing, run the result against onnxruntime "
            "on 3 random inputs (the first twice: outputs must not change); past "
            f"{VERIFY_RTOL:g} relative error nothing is written and the exit code is 5. "
            "Default: on when the code can run here (this CPU, or AArch64 under qemu).")
        ] = None,
        # -p: onnxforge's pass pipeline before compiling, through onnxforge.api.optimize.
        pipeline: Annotated[str | None, typer.Option(
            "--pipeline", "-p", help="Run this onnxforge pass pipeline first, e.g. cleanup,fuse "
            "(default: cleanup when every input shape is fixed; -p '' runs none).")] = None,
        no_default_schedules: Annotated[bool, typer.Option(
            "--no-default-schedules", help="Leave functions outside the database unscheduled.")
        ] = False,
        no_shipped_db: Annotated[bool, typer.Option(
            "--no-shipped-db", help="Ignore the schedule configs shipped with onnxforge for "
            "the target's CPU class (onnxforge/kernels/tuning_db/).")] = False,
        report: Annotated[Path | None, typer.Option(
            "--report", "-r", help="Write the compile report as JSON here.")] = None,
    ) -> None:
        """Compile an ONNX model with TVM for a target and export the library.

        Examples:
          [bold]onnxforge compile model.onnx --target cortex-a72 -o model.so --verify[/]
          [bold]onnxforge compile model.onnx -t host -o m.so --tuning-db db/ --tune-trials 64[/]
        """
        from . import api

        if tune_trials and tuning_db is None:
            tuning_db = output.parent / "tuning_db"
            err_console.print(f"tuning database: {tuning_db}")
        try:
            result = api.compile(
                model, target, output, pipeline=pipeline, input_shapes=_shapes(input_shape),
                tuning_db=tuning_db, tune_trials=tune_trials, tune_seconds=tune_seconds,
                rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                default_schedules=not no_default_schedules, shipped_db=not no_shipped_db,
                verify=verify, report_path=report, console=err_console)
        except VerificationError as exc:  # show what was measured, then the error
            if getattr(exc, "report", None) is not None:
                console.print(compile_summary(exc.report), soft_wrap=True)
                console.print(render_verification(exc.verification))
            raise
        _say_pipeline(result.pipeline, default=pipeline is None)
        if result.tuning is not None:
            console.print(render_tuning(result.tuning))
        info = result.report
        console.print(compile_summary(info), soft_wrap=True)
        for note in info["notes"]:
            err_console.print(f"[yellow]note:[/] {note}")
        if result.verification is not None:
            console.print(render_verification(result.verification))
        console.print(f"wrote {', '.join(result.written)}")

    @app.command("tune")
    def tune_command(
        model: Annotated[Path, typer.Argument(help="ONNX model file.")],
        target: TargetOpt = "host",
        tuning_db: Annotated[Path, typer.Option(
            "--tuning-db", help="Tuning database folder (one subfolder per target).")
        ] = Path("tuning_db"),
        method: Annotated[TuneMethod, typer.Option(
            "--method", help="configs: time the default rules' knob settings per kernel "
            "(minutes, this machine's CPU only); metaschedule: MetaSchedule's search; both: "
            "configs first, then MetaSchedule has to beat them.")] = TuneMethod.both,
        trials: Annotated[int, typer.Option(
            "--trials", help="Total measured MetaSchedule trials.")] = 64,
        seconds: Annotated[float | None, typer.Option(
            "--seconds", help="Wall-clock budget in seconds for the whole command "
            "(MetaSchedule stops at whichever of trials and seconds ends first).")] = None,
        input_shape: InputShapeOpt = None,
        rpc_tracker: RpcTrackerOpt = None,
        rpc_key: RpcKeyOpt = None,
        retune: Annotated[bool, typer.Option(
            "--retune", help="Measure kernels and tune tasks the database already covers too."
        )] = False,
        pipeline: Annotated[str | None, typer.Option(
            "--pipeline", "-p", help="Run this onnxforge pass pipeline first (as compile does: "
            "default cleanup, -p '' none)."
        )] = None,
    ) -> None:
        """Tune a model into a persistent, per-target database: the default rules' knob
        settings (schedule configs) and/or MetaSchedule records.

        Examples:
          [bold]onnxforge tune model.onnx -t host --tuning-db db/ --trials 128 --seconds 900[/]
          [bold]onnxforge tune model.onnx -t host --tuning-db db/ --method configs[/]
        """
        from .backends.tvm.config_tuning import search_configs
        from .backends.tvm.tuning import tune

        started = time.monotonic()
        why_not = None if method == TuneMethod.metaschedule else \
            config_search_unavailable(target, rpc_tracker)
        if why_not and method == TuneMethod.configs:
            error = InputSpecError if rpc_tracker else BackendError
            raise error(f"--method configs: {why_not}")
        shapes = _shapes(input_shape)
        source = optimize_before_compile(model, pipeline, shapes, target)
        if why_not:
            err_console.print(f"[yellow]note:[/] schedule-config step skipped: {why_not}")
        elif method != TuneMethod.metaschedule:
            left = _seconds_left(seconds, started)
            with err_console.status("schedule configs: preparing the model") as status:
                def on_kernel(done: int, total: int, name: str) -> None:
                    status.update(f"schedule configs: {done}/{total} kernel(s), last {name}")

                found = search_configs(source, target, tuning_db, input_shapes=shapes or None,
                                       max_seconds=None if left is None else max(left, 1e-3),
                                       retune=retune, progress=on_kernel)
            if found.kernels:
                console.print(render_config_search(found))
            console.print(config_search_summary(found), soft_wrap=True)
        if method == TuneMethod.configs:
            return
        left = _seconds_left(seconds, started)
        if left is not None and left <= 0:
            err_console.print("[yellow]note:[/] MetaSchedule skipped: the --seconds budget went "
                              "on the schedule-config search")
            return
        result = tune(source, target, tuning_db, max_trials=trials, max_seconds=left,
                      input_shapes=shapes or None, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                      retune=retune, progress=True, console=err_console)
        console.print(render_tuning(result))
        console.print(f"database {result.db_dir}: {result.records_before} -> "
                      f"{result.records_after} records"
                      + (" (reused, nothing tuned)" if result.reused else ""))
        for error in result.errors[:5]:
            err_console.print(f"[yellow]warning:[/] {error}")
