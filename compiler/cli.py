"""The `onnxforge` command: a thin layer over `onnxforge.api`.

Examples:
  onnxforge inspect model.onnx
  onnxforge optimize model.onnx -o out.onnx -p "cleanup,fuse" --report report.json
  onnxforge optimize --example -o digits_opt.onnx          # the shipped digits model
  onnxforge bench model.onnx out.onnx --threads 2
  onnxforge report report.json -o report.html            # one HTML page with plots
  onnxforge passes
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from .cli_flags import cli_text, example_or_model
from .errors import BackendError, OnnxforgeError, PipelineError

app = typer.Typer(
    name="onnxforge",
    help="Optimize ONNX models for deployment: fuse, prune, decompose, quantize, compile with TVM.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
# Pipes and CI logs get wide tables instead of rich's 80-column default.
console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)
_state = {"debug": False}

InputShapeOpt = Annotated[
    list[str] | None,
    typer.Option("--input-shape", "-s", help="Concrete shape for an input with dynamic dims, "
                 "e.g. input:1,3,224,224 (repeatable)."),
]
ThreadsOpt = Annotated[int, typer.Option("--threads", "-t", min=1,
                                          help="Intra-op threads for onnxruntime (>= 1).")]


def _budget(value: float | None) -> float | None:
    """--max-error / --max-accuracy-drop / --rtol: a finite number >= 0 (NaN passes no check)."""
    if value is not None and not 0 <= value < float("inf"):
        raise typer.BadParameter(f"{value} is not a finite number >= 0")
    return value


def _version(value: bool) -> None:
    if value:
        console.print(f"onnxforge {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each pass.")] = False,
    version: Annotated[bool | None, typer.Option("--version", callback=_version,
                                                    is_eager=True)] = None,
) -> None:
    _state["debug"] = debug
    level = logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


def _shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    from .shapes import parse_input_shapes

    return parse_input_shapes(specs)


@app.command()
def inspect(
    model: Annotated[Path, typer.Argument(help="ONNX model file.")],
    input_shape: InputShapeOpt = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Show a model's inputs, outputs, parameters, MACs/FLOPs and operators.

    Example: [bold]onnxforge inspect model.onnx --input-shape input:1,3,224,224[/]
    """
    from .api import inspect_model
    from .report import _json_default, render_inspect

    info = inspect_model(model, _shapes(input_shape))
    if info.get("macs_note"):
        info["macs_note"] = cli_text(info["macs_note"])
    if json_out:
        import json

        console.print_json(json.dumps(info, default=_json_default))
    else:
        render_inspect(info, console)


@app.command()
def optimize(
    model: Annotated[Path | None, typer.Argument(help="ONNX model (omit with --example).")] = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Where to write the optimized model.")] = Path("optimized.onnx"),
    pipeline: Annotated[str | None, typer.Option(
        "--pipeline", "-p",
        help="Pass pipeline, e.g. \"cleanup,fuse,prune(macs=0.3)\". "
             "Default: cleanup,fuse.")] = None,
    calib: Annotated[str | None, typer.Option(
        "--calib",
        help="Calibration data: data.npz, a folder of .npy or images, or random:N.")] = None,
    verify_data: Annotated[str | None, typer.Option(
        "--verify-data",
        help="Data to measure the final error on (default: --calib, else random). "
             "Labels in the .npz add accuracy.")] = None,
    input_shape: InputShapeOpt = None,
    max_error: Annotated[float | None, typer.Option(
        "--max-error", callback=_budget,
        help="Refuse to write if the output's relative L2 error exceeds this.")] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(
        "--max-accuracy-drop", callback=_budget,
        help="Refuse to write if top-1 accuracy drops more than this (fraction, e.g. 0.003).",
    )] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Write even past the error budget.")] = False,
    no_verify: Annotated[bool, typer.Option(
        "--no-verify", help="Skip running the models to check outputs.")] = False,
    report: Annotated[Path | None, typer.Option(
        "--report", "-r",
        help="Write the report here: JSON, or an HTML page with plots for a .html path.")
    ] = None,
    dump_dir: Annotated[Path | None, typer.Option(
        "--dump-dir", help="Save the model after each pass here.")] = None,
    print_after: Annotated[list[str] | None, typer.Option(
        "--print-after",
        help="Print the graph's op summary after this pass (repeatable).")] = None,
    latency: Annotated[bool, typer.Option(
        "--latency/--no-latency",
        help="Measure ORT latency before/after side by side.")] = True,
    pass_latency: Annotated[bool, typer.Option(
        "--pass-latency",
        help="Also time the model after each pass (interleaved with the input and result; "
             "one ORT session per pass).")] = False,
    threads: ThreadsOpt = 1,
    example: Annotated[bool, typer.Option(
        "--example",
        help="Use the shipped digits CNN, its calibration and labelled test data.")] = False,
) -> None:
    """Run a pass pipeline on a model, verify it, and write the result atomically.

    Examples:
      [bold]onnxforge optimize --example -o digits_opt.onnx[/]
      [bold]onnxforge optimize model.onnx -o out.onnx -p "cleanup,fuse" --report r.json[/]
      [bold]onnxforge optimize model.onnx -o q.onnx -p "quantize(int8)" --calib data.npz \
--max-error 0.02[/]
    """
    from . import api
    from .report import render_steps

    shapes = _shapes(input_shape)
    model, shapes, calib, verify_data = example_or_model(model, example, shapes, calib,
                                                         verify_data, err_console)
    if pipeline is not None and not pipeline.strip():
        raise PipelineError("-p/--pipeline is empty: give passes, e.g. -p cleanup,fuse "
                            "(omit -p for the default pipeline)")
    result = api.optimize(
        model, pipeline or api.DEFAULT_PIPELINE, output=output, calibration=calib,
        verify_data=verify_data, input_shapes=shapes, max_error=max_error,
        max_accuracy_drop=max_accuracy_drop, force=force, verify=not no_verify,
        threads=threads, measure_latency=latency and not no_verify,
        measure_pass_latency=pass_latency, report_path=report,
        dump_dir=dump_dir, print_after=print_after or (), console=err_console, progress=True,
    )
    render_steps(result.report, console)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning (forced):[/] {cli_text(warning)}")
    console.print(f"wrote {result.output} ({result.report['output_bytes'] / 1024:.1f} KiB)"
                  + (f", report {report}" if report else ""))


@app.command()
def bench(
    models: Annotated[list[Path], typer.Argument(
        help="One or more ONNX models with the same inputs.")],
    backend: Annotated[str, typer.Option(
        "--backend", "-b", help="ort, or tvm (ORT vs TVM side by side).")] = "ort",
    target: Annotated[str, typer.Option(
        "--target", help="TVM target preset (with --backend tvm).")] = "host",
    threads: ThreadsOpt = 1,
    input_shape: InputShapeOpt = None,
    repeat: Annotated[int, typer.Option("--repeat", min=1, help="Timed runs per model.")] = 50,
    warmup: Annotated[int, typer.Option(
        "--warmup", min=0, help="Untimed runs per model first.")] = 5,
    json_out: Annotated[Path | None, typer.Option(
        "--json", "--report",
        help="Also write the table: JSON, or an HTML page with a plot for a .html path.")
    ] = None,
) -> None:
    """Measure latencies side by side in one process (interleaved rounds, median).

    Example: [bold]onnxforge bench model.onnx optimized.onnx --threads 2[/]
    """
    from .api import benchmark_models
    from .report import render_bench

    rows = benchmark_models(models, backend=backend, threads=threads,
                            input_shapes=_shapes(input_shape), warmup=warmup, repeat=repeat,
                            target=target, report_path=json_out)
    render_bench(rows, console, f"latency, {threads} thread(s), median of {rows[0]['repeat']} "
                 "interleaved runs")


@app.command()
def verify(
    reference: Annotated[Path, typer.Argument(help="Reference model.")],
    candidate: Annotated[Path, typer.Argument(help="Model to compare against it.")],
    data: Annotated[str | None, typer.Option(
        "--data", help="Inputs: .npz, folder, images or random:N.")] = None,
    input_shape: InputShapeOpt = None,
    batches: Annotated[int, typer.Option("--batches", min=1, help="Batches to compare.")] = 16,
    rtol: Annotated[float | None, typer.Option(
        "--rtol", callback=_budget,
        help="Exit non-zero if relative L2 error exceeds this.")] = None,
    threads: ThreadsOpt = 1,
) -> None:
    """Compare two models' outputs on the same inputs (max abs, rel L2, cosine, top-1)."""
    from .api import verify_models

    result = verify_models(reference, candidate, data=data, input_shapes=_shapes(input_shape),
                           batches=batches, threads=threads)
    table = Table("output", "max abs", "rel L2", "cosine", "top-1 agree",
                  title=f"{candidate} vs {reference} ({result.samples} batches)")
    for o in result.outputs:
        table.add_row(o.name, f"{o.max_abs:.3e}", f"{o.rel_l2:.3e}", f"{o.cosine:.6f}",
                      "-" if o.top1 is None else f"{o.top1 * 100:.2f}%")
    console.print(table)
    if result.reference_accuracy is not None:
        console.print(f"accuracy: {result.reference_accuracy * 100:.2f}% → "
                      f"{result.candidate_accuracy * 100:.2f}%")
    if rtol is not None and not (result.max_rel_l2 <= rtol):  # NaN fails too
        err_console.print(f"[red]error:[/] relative L2 error {result.max_rel_l2:.3e} > {rtol:g}")
        raise typer.Exit(5)


@app.command()
def passes() -> None:
    """List the available passes, whether each is exact, and their options."""
    from .passes.base import load_builtin_passes, option_specs

    table = Table("pass", "kind", "what it does", "options (type = default)")
    for name, cls in sorted(load_builtin_passes().items()):
        opts = "\n".join(f"{n}: {t} = {d!r}" for n, t, d in option_specs(cls))
        table.add_row(name, "exact" if cls.exact else "lossy", cls.summary, opts or "-")
    console.print(table)
    console.print('Pipeline syntax: [bold]cleanup,fuse,prune(macs=0.3,criterion=l2)[/]')


@app.command("report")
def report_page(
    report: Annotated[Path, typer.Argument(help="JSON report of optimize or compile.")],
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="HTML page to write (default: the report's name, .html).")
    ] = None,
) -> None:
    """Render a JSON report as one self-contained HTML page: per-pass waterfall, per-layer
    tables and plots (plots need `pip install onnxforge\\[plot]`).

    Example: [bold]onnxforge report r.json -o r.html[/]
    """
    from .html_report import load_report, write_html
    from .safe_write import reading

    output = output or report.with_suffix(".html")
    data = load_report(report)
    # never over the report itself nor a model it names
    reads = [("the report", report)] + [(f"the {key} model", data[key]) for key in
                                        ("input", "output") if isinstance(data.get(key), str)]
    with reading(reads):
        write_html(output, data)
    console.print(f"wrote {output}")


def _register_autocompress(app: typer.Typer) -> None:
    from .cli_autocompress import register

    register(app)


def _register_optional_commands() -> None:
    try:
        from .cli_tvm import register
    except ImportError:
        return
    register(app)


_register_optional_commands()
_register_autocompress(app)


def main() -> None:
    """Console-script entry point: one-line errors and exit codes unless --debug."""
    try:
        # Standalone mode: click (vendored by typer) prints usage errors with the usage
        # line and exits 2, and typer.Exit(code) becomes that exit status.
        app(standalone_mode=True)
    except OnnxforgeError as exc:
        if _state["debug"]:
            raise
        err_console.print(f"[red]error:[/] {cli_text(exc)}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err_console.print("aborted")
        sys.exit(130)
    except Exception as exc:  # unexpected: still one line unless --debug
        if _state["debug"]:
            raise
        if isinstance(exc, ImportError) and (exc.name or "").split(".")[0] in ("tvm", "tvm_ffi"):
            err_console.print("[red]error:[/] this command needs `pip install onnxforge\\[tvm]` "
                              f"(TVM is not importable: {exc})", highlight=False, soft_wrap=True)
            sys.exit(BackendError.exit_code)
        err_console.print(f"[red]internal error:[/] {type(exc).__name__}: {exc} "
                          "(rerun with --debug for the traceback)", highlight=False)
        sys.exit(70)


if __name__ == "__main__":
    main()
