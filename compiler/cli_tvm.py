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
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .cli_flags import cli_text
from .errors import VerificationError
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


def render_verification(result: Any) -> Table:
    """The table of `backends.tvm.verify_artifact`'s result."""
    from .backends.tvm import VERIFY_SAMPLES

    title = (f"verify vs onnxruntime on {VERIFY_SAMPLES} random inputs: rel L2 or max abs "
             f"<= {result.rtol:.3g} x max |ORT| (+{VERIFY_ATOL:g} float floor)")
    if result.ort_spread is not None:
        title += (f"; quantized model: onnxruntime's integer and float QDQ runs differ by "
                  f"rel L2 {result.ort_spread:.2e} (the tolerance rule is in the README)")
    table = Table("output", "shape", "max abs", "relative", "rel L2", "same twice", "ok",
                  title=title)
    for err in result.comparison.outputs:
        same = err.name not in result.nondeterministic
        table.add_row(err.name, str(err.shape), f"{err.max_abs:.3e}", f"{err.rel:.3e}",
                      f"{err.rel_l2:.3e}", "yes" if same else "[red]NO[/]",
                      "[green]yes[/]" if same and err.within(result.rtol, VERIFY_ATOL)
                      else "[red]NO[/]")
    return table


def integer_summary(info: dict) -> str | None:
    """How many quantized conv/matmul run as integer kernels, which stayed float and why."""
    integer = info.get("integer") or {}
    if not integer.get("integer_total") and not integer.get("float_total"):
        return None
    ops = ", ".join(f"{n} {op}" for op, n in sorted(integer["integer_ops"].items())) or "none"
    line = f"int8: {integer['integer_total']} quantized ops run as integer kernels ({ops})"
    for entry in integer["float_ops"]:
        line += f"; {entry['count']} {entry['op']} stayed float: {entry['reason']}"
    if integer.get("layout"):  # NHWC, or NCHW with the reason (backends.tvm.layout)
        line += f"; layout {integer['layout']}"
    if integer.get("lookup_tables"):  # backends.tvm.lookup_tables
        line += f"; {integer['lookup_tables']} activations as 256-entry tables"
    return line


def sparse_summary(info: dict) -> str | None:
    """How many block-sparse matmuls/convs use BSR kernels, and why the others stayed dense."""
    sparse = info.get("sparse") or {}
    if not sparse.get("sparse_ops") and not sparse.get("dense_ops"):
        return None
    kinds = ", ".join(f"{kind} {n}" for kind, n in (sparse.get("sparse_kernels") or {}).items())
    line = f"sparse: {sparse['sparse_ops']} ops use BSR kernels" + (f" ({kinds})" if kinds else "")
    for entry in sparse["dense_ops"]:
        line += f"; {entry['count']} stayed dense: {entry['reason']}"
    return line


def compile_summary(info: dict) -> str:
    """compile's summary: time, functions and who scheduled them (+ int8 and sparse lines)."""
    extra = "".join(f"\n{line}" for line in (integer_summary(info), sparse_summary(info))
                    if line)
    return (
        f"compiled for {info.get('target') or info['target_key']} in "
        f"{info['compile_seconds']:.1f} s: {info['num_primfuncs']} functions, "
        f"{info['scheduled_by_database']} from the tuning database, "
        f"{info['scheduled_by_default']} by default rules ({info['default_rules'] or '-'}), "
        f"{info['unscheduled']} unscheduled" + schedule_configs_note(info)
        + (f"; default schedule kept over a slower tuning record for "
           f"{len(info['default_kept_over_database'])}"
           if info.get("default_kept_over_database") else "")
        + extra)


def register(app: typer.Typer) -> None:
    """Add `targets`, `compile` and `tune` to the main `onnxforge` app."""
    app.command()(targets)
    app.command("compile")(compile_command)
    app.command("tune")(tune_command)


def targets() -> None:
    """List the compilation target presets and their TVM JSON targets."""
    from .backends.targets import host_features

    console.print(render_targets())
    console.print(f"host CPU features: {', '.join(host_features()) or '-'}")


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
        "--report", "-r", help="Write the compile report here: JSON, or an HTML page for "
        "a .html path.")] = None,
    profile: Annotated[bool, typer.Option(
        "--profile", help="Time each kernel over 20 runs on random inputs (this machine's "
        "CPU) and add it to the report.")] = False,
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
            verify=verify, report_path=report, console=err_console, profile=profile)
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
    report: Annotated[Path | None, typer.Option(
        "--report", "-r", help="Write the tuning report here: JSON, or an HTML page (each "
        "task's best-so-far over its trials) for a .html path.")] = None,
) -> None:
    """Tune a model into a persistent, per-target database: the default rules' knob
    settings (schedule configs) and/or MetaSchedule records.

    Examples:
      [bold]onnxforge tune model.onnx -t host --tuning-db db/ --trials 128 --seconds 900[/]
      [bold]onnxforge tune model.onnx -t host --tuning-db db/ --method configs[/]
    """
    from . import api
    from .ir import files_read
    from .report import write_report
    from .safe_write import check_writes, reading

    reads = files_read(model)
    check_writes([("--report", report)] if report else [], reads)
    result = api.tune(model, target, tuning_db, method=method.value, trials=trials,
                      seconds=seconds, pipeline=pipeline,
                      input_shapes=_shapes(input_shape) or None, rpc_tracker=rpc_tracker,
                      rpc_key=rpc_key, retune=retune, console=err_console,
                      on_step=lambda step, value: _say_tune_step(step, value, pipeline is None))
    if report is not None:
        with reading(reads):
            written = write_report(report, result.to_dict())
        err_console.print(f"wrote report {written}")


def _say_tune_step(step: str, value: Any, default_pipeline: bool) -> None:
    """What `tune` prints as each step of `api.tune` ends."""
    if step == "pipeline":
        _say_pipeline(value, default=default_pipeline)
    elif step == "note":
        err_console.print(f"[yellow]note:[/] {cli_text(value)}")
    elif step == "configs":
        if value.kernels:
            console.print(render_config_search(value))
        console.print(config_search_summary(value), soft_wrap=True)
    elif step == "metaschedule":
        console.print(render_tuning(value))
        console.print(f"database {value.db_dir}: {value.records_before} -> "
                      f"{value.records_after} records"
                      + (" (reused, nothing tuned)" if value.reused else ""))
        for error in value.errors[:5]:
            err_console.print(f"[yellow]warning:[/] {error}")
