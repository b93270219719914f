"""The `onnxforge autocompress` command: a thin layer over `onnxforge.autocompress`.

Examples:
  onnxforge autocompress --example --speedup 2 --max-accuracy-drop 0.005 -o digits_ac.onnx
  onnxforge autocompress model.onnx --calib calib.npz --verify-data test.npz \\
      --latency-ms 5 --max-error 0.02 -o small.onnx --report ac.json --cache-dir .ac
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from .cli_flags import cli_text, example_or_model

console = Console(width=None if sys.stdout.isatty() else 140)
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 140)

BudgetOpt = Annotated[float | None, typer.Option()]


def register(app: typer.Typer) -> None:
    app.command("autocompress")(autocompress_command)


def autocompress_command(
    model: Annotated[Path | None, typer.Argument(help="ONNX model (omit with --example).")] = None,
    output: Annotated[Path, typer.Option(
        "--output", "-o", help="Where to write the chosen model.")] = Path("autocompressed.onnx"),
    calib: Annotated[str | None, typer.Option(
        "--calib", help="Calibration data (.npz, folder, images): proxies and the passes.")
    ] = None,
    verify_data: Annotated[str | None, typer.Option(
        "--verify-data", help="Data the error/accuracy is measured on, disjoint from --calib "
        "(default: --calib, said in the report). Labels in the .npz add accuracy.")] = None,
    latency_ms: Annotated[float | None, typer.Option(
        "--latency-ms", help="Budget: median latency on the backend at most this (ms).")] = None,
    speedup: Annotated[float | None, typer.Option(
        "--speedup", help="Budget: at least this speedup over the input model, measured side "
        "by side.")] = None,
    size_mb: Annotated[float | None, typer.Option(
        "--size-mb", help="Budget: model file at most this many MB (10^6 bytes).")] = None,
    macs: Annotated[float | None, typer.Option(
        "--macs", help="Budget: at most this many MACs per inference.")] = None,
    max_error: Annotated[float | None, typer.Option(
        "--max-error", help="Quality: output rel L2 error vs the input model at most this.")
    ] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option(
        "--max-accuracy-drop", help="Quality: top-1 accuracy drop at most this fraction "
        "(0.005 = 0.5 pt; needs labelled --verify-data).")] = None,
    backend: Annotated[str, typer.Option(
        "--backend", "-b", help="Where latency is measured: ort (onnxruntime) or tvm (each "
        "candidate compiled for --target, verified against onnxruntime, timed).")] = "ort",
    target: Annotated[str, typer.Option(
        "--target", help="TVM preset for --backend tvm (as `onnxforge compile -t`); it must "
        "run on this machine.")] = "host",
    rpc_tracker: Annotated[str | None, typer.Option(
        "--rpc-tracker", help="--backend tvm: time on a board registered with TVM's RPC "
        "tracker at HOST:PORT (with --rpc-key); the target need not run here.")] = None,
    rpc_key: Annotated[str | None, typer.Option(
        "--rpc-key", help="The board's key at --rpc-tracker.")] = None,
    proxy_latency: Annotated[str, typer.Option(
        "--proxy-latency", help="--backend tvm: time the per-knob proxy tables on ort "
        "(cheap; corrected on TVM measurements) or on the backend (one TVM compile "
        "each).")] = "ort",
    threads: Annotated[int, typer.Option(
        "--threads", "-t", min=1, help="onnxruntime intra-op threads.")] = 1,
    input_shape: Annotated[list[str] | None, typer.Option(
        "--input-shape", "-s", help="Concrete shape for an input with dynamic dims "
        "(repeatable).")] = None,
    time_budget: Annotated[float, typer.Option(
        "--time-budget", help="Seconds for the whole search; the best model measured by then "
        "is returned.")] = 300.0,
    max_candidates: Annotated[int, typer.Option(
        "--max-candidates", min=1, help="Most candidates built and measured for real.")] = 40,
    cache_dir: Annotated[Path | None, typer.Option(
        "--cache-dir", help="Keep proxies and measured candidates here; a rerun resumes.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Search seed (deterministic).")] = 0,
    techniques: Annotated[str, typer.Option(
        "--techniques", help="Comma-separated subset of prune,rank,bits,sparse (sparse: "
        "--backend tvm only, on a target with a measured sparse break-even).")
    ] = "prune,rank,bits,sparse",
    force: Annotated[bool, typer.Option(
        "--force", help="Write the closest point even if the budget is not met.")] = False,
    report: Annotated[Path | None, typer.Option(
        "--report", "-r", help="JSON report; the front plots are written next to it as "
        "<stem>.latency_front.png and <stem>.size_front.png.")] = None,
    example: Annotated[bool, typer.Option(
        "--example", help="The shipped digits CNN with its calibration and labelled test "
        "data.")] = False,
) -> None:
    """Search prune ratios per group, low-rank ranks and int8/fp32 per layer for the model
    that meets ONE budget (--latency-ms, --speedup, --size-mb or --macs) with the least
    error, on latency measured on the backend; write it, a report and the Pareto front.

    Nothing is written when no candidate meets the budget (exit 6), unless --force.

    Example: [bold]onnxforge autocompress --example --speedup 1.3 --max-accuracy-drop 0.005 \
-o digits_ac.onnx --report ac.json[/]
    """
    from .autocompress import autocompress
    from .shapes import parse_input_shapes

    shapes = parse_input_shapes(input_shape)
    model, shapes, calib, verify_data = example_or_model(model, example, shapes, calib,
                                                         verify_data, err_console)
    kinds = tuple(t.strip() for t in techniques.split(",") if t.strip())
    result = autocompress(
        model, calib, output, latency_ms=latency_ms, speedup=speedup, size_mb=size_mb,
        macs=macs, max_error=max_error, max_accuracy_drop=max_accuracy_drop,
        verify_data=verify_data, input_shapes=shapes or None, backend=backend,
        target=target, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
        proxy_latency=proxy_latency, threads=threads,
        time_budget=time_budget, max_candidates=max_candidates,
        cache_dir=cache_dir, seed=seed, force=force, report_path=report, kinds=kinds,
        console=err_console)
    render_result(result.report, console)
    for warning in result.warnings:
        err_console.print(f"[yellow]warning:[/] {cli_text(warning)}")
    written = f"wrote {result.output}" if result.output else "no model written"
    extra = [f"report {report}"] + [str(p) for p in result.plots] if report else []
    console.print(", ".join([written, *extra]))


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if kind == "ms":
        return f"{value:.4g} ms"
    if kind == "mb":
        return f"{value / 1e6:.4g} MB"
    if kind == "pct":
        return f"{value * 100:.2f} %"
    if kind == "x":
        return f"{value:.3g}x"
    return f"{value:.4g}"


def render_result(report: dict[str, Any], out: Console) -> None:
    """The input model vs the chosen one side by side, the policy, the search's numbers."""
    original, final = report["original"], report["final"] or {}
    table = Table("", "input model", "chosen model",
                  title=f"autocompress: {report['budget']['text']} "
                  f"({'met' if report['met'] else 'NOT met'})")
    rows = [("latency", "latency_ms", "ms"), ("size", "size_bytes", "mb"), ("MACs", "macs", ""),
            ("rel L2 error", "rel_l2", ""), ("accuracy", "accuracy", "pct")]
    for label, key, kind in rows:
        before = final.get("original_latency_ms") if key == "latency_ms" and final else None
        table.add_row(label, _fmt(before or original.get(key), kind), _fmt(final.get(key), kind))
    if final:
        table.add_row("speedup (side by side)", "1x", _fmt(final.get("speedup"), "x"))
    out.print(table)
    if report.get("policy"):
        policy = Table("kind", "layer / group", "choice", title="chosen policy (changed knobs)")
        changed = [r for r in report["policy"]
                   if r["choice"] not in ("keep", "full", "fp32", "dense")]
        for r in changed:
            policy.add_row(r["kind"], r["layer"], r["choice"])
        if changed:
            out.print(policy)
        out.print(f"{len(report['policy']) - len(changed)} other knob(s) unchanged; pipeline: "
                  f"{report.get('pipeline') or '(none: the input model)'}")
    search = report["search"]
    out.print(f"search: {len(report['candidates'])} candidate(s) measured "
              f"({search['resumed']} from the cache), {search['rounds']} round(s), "
              f"proxies {search['proxy_seconds']} s, stopped: {search['stopped'] or '-'}")
    for note in report["notes"]:
        out.print(f"note: {note}")
    for row in report.get("rejected") or []:
        out.print(f"rejected (never chosen): {row['pipeline'] or row['policy']}: "
                  f"{cli_text(row['why'])}", markup=False)
