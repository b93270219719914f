"""One self-contained HTML page from an `optimize` or `compile` JSON report.

`onnxforge report R.json -o R.html`, or `--report R.html` on optimize/compile. The page
has no scripts and loads nothing: styles inline, plots as base64 PNG (html_plots.py,
matplotlib optional; without it the tables stay and the page says how to get plots).
Every string from the report is escaped: model, node and pass names are user input.
"""

from __future__ import annotations

import html
import json
import os
import shlex
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from . import safe_write
from .errors import InputSpecError
from .html_plots import BIT_COLORS, PLOT_HINT, Plotter
from .units import human

TOP_KERNELS = 15  # kernels drawn one by one in the time plot; the rest as one bar
STYLE = """
body{font-family:system-ui,-apple-system,"DejaVu Sans",sans-serif;margin:24px auto;
max-width:1180px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px}h2{font-size:18px;margin-top:28px;
border-bottom:1px solid #ddd;padding-bottom:4px}h3{font-size:15px;margin-top:20px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
pre{background:#f6f6f6;padding:8px;overflow-x:auto;white-space:pre-wrap}
.meta{color:#555;font-size:13px}.hint{background:#fff6d6;padding:6px 10px}
.lossy{color:#b23}.exact{color:#275}img.plot{max-width:100%;display:block;margin:8px 0}
details{margin:6px 0}summary{cursor:pointer;color:#444}
"""


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def load_report(path: str | os.PathLike) -> dict[str, Any]:
    """Read an optimize, compile, tune or bench JSON report; a clear error for anything
    else."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputSpecError(f"report {path}: cannot be read ({exc})") from exc
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputSpecError(f"report {path}: not JSON ({exc})") from exc
    if isinstance(data, list) and data and all(
            isinstance(r, dict) and "median_ms" in r for r in data):
        return {"kind": "bench", "rows": data}  # `bench --json` writes its rows
    if not isinstance(data, dict) or not (
            "steps" in data or "num_primfuncs" in data or data.get("kind") == "tune"):
        raise InputSpecError(f"report {path}: not an optimize (no 'steps'), compile (no "
                             "'num_primfuncs'), tune or bench report")
    return data


def write_html(path: str | os.PathLike, report: dict[str, Any], *,
               label: str = "report") -> Path:
    """Render `report` and write it atomically (never over a file the run reads)."""
    return safe_write.write_text(path, render_html(report), label=label)


def render_html(report: dict[str, Any], plots: bool = True) -> str:
    plotter = Plotter.make() if plots else None
    if "steps" in report:
        title, body = "onnxforge optimize report", _optimize_body(report, plotter)
    elif "num_primfuncs" in report:
        title, body = "onnxforge compile report", _compile_body(report, plotter)
    elif report.get("kind") == "tune":
        title, body = "onnxforge tune report", _tune_body(report, plotter)
    elif report.get("kind") == "bench":
        title, body = "onnxforge bench report", _bench_body(report, plotter)
    else:
        raise InputSpecError("not an optimize, compile, tune or bench report")
    hint = "" if plotter else f'<p class="hint">{esc(PLOT_HINT)}</p>'
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{esc(title)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{esc(title)}</h1>{hint}{body}</body></html>\n")


# ---------------------------------------------------------------------- table helpers


def fmt(value: Any) -> str:
    """A cell: numbers short, lists joined, None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return human(value) if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:.3e}" if value and (abs(value) < 1e-3 or abs(value) >= 1e5) \
            else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(fmt(v) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={fmt(v)}" for k, v in value.items())
    return str(value)


def table(header: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for value in row:
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            cells.append(f"<td{' class=n' if number else ''}>{esc(fmt(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{esc(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def stats_tables(stats: dict[str, Any], prefix: str = "") -> list[str]:
    """Every per-layer structure in a pass's stats as a table: dicts of dicts (one row per
    layer), dicts of scalars (name -> value), lists of dicts (one row per entry)."""
    out = []
    for key, value in stats.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            if all(all(_is_scalar(x) or isinstance(x, list) for x in v.values())
                   for v in value.values()):
                columns = list(dict.fromkeys(c for v in value.values() for c in v))
                rows = [[layer, *(v.get(c) for c in columns)] for layer, v in value.items()]
                out.append(table(["name", *columns], rows, name))
            else:
                out.extend(stats_tables(value, name + "."))
        elif isinstance(value, dict) and len(value) > 1 and \
                all(_is_scalar(v) for v in value.values()) and prefix + key != "budget":
            out.append(table(["name", key], value.items(), name))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(c for v in value for c in v))
            out.append(table(columns, [[v.get(c) for c in columns] for v in value], name))
    return out


# ---------------------------------------------------------------------- optimize


def reproduce_command(report: dict[str, Any]) -> str:
    parts = ["onnxforge", "optimize", report.get("input") or "MODEL.onnx",
             "-o", report.get("output") or "OUT.onnx", "-p", report.get("pipeline", "")]
    for name, dims in (report.get("input_shapes") or {}).items():
        parts += ["-s", f"{name}:{','.join(str(d) for d in dims)}"]
    return " ".join(shlex.quote(str(p)) for p in parts)


def _summary_rows(report: dict[str, Any]) -> list[list[Any]]:
    before, after = report.get("before") or {}, report.get("after") or {}
    rows = []
    for key, label in (("nodes", "nodes"), ("params", "parameters"),
                       ("weight_bytes", "weight bytes"), ("macs", "MACs")):
        b, a = before.get(key), after.get(key)
        ratio = f"{b / a:.2f}x smaller" if b and a and a < b else \
            (f"{a / b:.2f}x larger" if b and a and a > b else "same")
        rows.append([label, b, a, ratio if b is not None and a is not None else "-"])
    if report.get("output_bytes") is not None:
        rows.append(["output file bytes", None, report["output_bytes"], "-"])
    lat = report.get("latency")
    if lat:
        rows.append([f"ORT latency ms ({lat['threads']} thread(s), median, interleaved)",
                     round(lat["before_ms"], 4), round(lat["after_ms"], 4),
                     f"speedup x{lat['speedup']:.2f}"])
    return rows


def _final_error(report: dict[str, Any]) -> str:
    err = report.get("error")
    if not err:
        return f"<p>{esc(report.get('verification') or 'output error not measured')}</p>"
    rows = [[o.get("name"), o.get("max_abs"), o.get("rel_l2"), o.get("cosine"),
             None if o.get("top1") is None else f"{o['top1'] * 100:.2f}%"]
            for o in err.get("outputs") or []]
    text = table(["output", "max abs", "rel L2", "cosine", "top-1 agreement"], rows,
                 f"final model vs input on {err.get('samples')} batches")
    if err.get("reference_accuracy") is not None:
        text += (f"<p>accuracy {err['reference_accuracy'] * 100:.2f}% &rarr; "
                 f"{err['candidate_accuracy'] * 100:.2f}%</p>")
    return text


def _pass_latency(report: dict[str, Any]) -> list[float] | None:
    """ORT ms after each pass, when the run measured them (`--pass-latency`)."""
    lat = report.get("latency") or {}
    per_pass = lat.get("per_pass_ms")
    return per_pass if per_pass and len(per_pass) == len(report["steps"]) else None


def _waterfall(report: dict[str, Any], plotter: Plotter | None) -> str:
    steps = report["steps"]
    latency = _pass_latency(report)
    rows = []
    for i, s in enumerate(steps, 1):
        b, a, e = s["before"], s["after"], s.get("error") or {}
        rows.append([i, s["pass"], "exact" if s.get("exact") else "lossy", s.get("seconds"),
                     f"{b.get('nodes')}→{a.get('nodes')}", a.get("params"), a.get("macs"),
                     a.get("weight_bytes"),
                     round(latency[i - 1], 4) if latency else "-",
                     e.get("max_rel_l2"), e.get("min_cosine"),
                     e.get("accuracy_drop"), s.get("note") or ""])
    text = table(["#", "pass", "kind", "seconds", "nodes", "params after", "MACs after",
                  "weight bytes after", "ORT ms after", "rel L2 vs before the pass",
                  "min cosine", "accuracy drop", "note"], rows)
    text += ("<p class=meta>Errors are measured on calibration batches against the model "
             "before each pass. " + (
                 "ORT latency after each pass: every model timed in the same interleaved "
                 "rounds (median)." if latency else
                 "Latency is measured input vs final model (summary above); "
                 "<code>--pass-latency</code> times the model after each pass too.")
             + "</p>")
    if plotter and steps:
        first = steps[0]["before"]
        keys = [k for k in ("params", "macs", "weight_bytes") if first.get(k)
                and all(s["after"].get(k) is not None for s in steps)]
        series = {("weights" if k == "weight_bytes" else k):
                  [100.0] + [100.0 * s["after"][k] / first[k] for s in steps] for k in keys}
        lat = report.get("latency") or {}
        if latency and lat.get("before_ms"):
            series["latency"] = [100.0] + [100.0 * ms / lat["before_ms"] for ms in latency]
        errors = [(s.get("error") or {}).get("max_rel_l2") for s in steps]
        if series:
            text = plotter.waterfall(["input", *(s["pass"] for s in steps)], series,
                                     errors) + text
    return text


def _optimize_body(report: dict[str, Any], plotter: Plotter | None) -> str:
    parts = [(f"<p class=meta>{esc(report.get('input'))} &rarr; {esc(report.get('output'))}"
             f" &middot; {esc(report.get('seconds'))} s</p>"),
             "<h2>Reproduce</h2>",
             f"<pre>{esc(reproduce_command(report))}</pre>",
             ("<p class=meta>add the same --calib / --verify-data as the original run (the "
             "report does not record data paths).</p>"),
             "<h2>Summary</h2>",
             table(["", "input", "output", "change"], _summary_rows(report)),
             _final_error(report),
             "<h2>Per pass</h2>", _waterfall(report, plotter)]
    for i, step in enumerate(report["steps"], 1):
        parts.append(_step_section(i, step, plotter))
    return "".join(parts)


def _step_section(index: int, step: dict[str, Any], plotter: Plotter | None) -> str:
    stats = step.get("stats") or {}
    kind = "exact" if step.get("exact") else "lossy"
    head = (f"<h3>{index}. {esc(step['pass'])} <span class={kind}>({kind})</span></h3>")
    scalars = [[k, v] for k, v in stats.items() if _is_scalar(v)]
    parts = [head]
    if step.get("note"):
        parts.append(f"<p class=hint>{esc(step['note'])}</p>")
    if plotter:
        parts.extend(_step_plots(stats, plotter))
    parts.extend(stats_tables(stats))
    if scalars:
        parts.append(f"<details><summary>{len(scalars)} counters</summary>"
                     f"{table(['stat', 'value'], scalars)}</details>")
    return "".join(parts) if len(parts) > 1 else head + "<p class=meta>no statistics</p>"


def _step_plots(stats: dict[str, Any], plotter: Plotter) -> list[str]:
    """Per-layer figures for the lossy passes whose stats have them."""
    out = []
    layers = stats.get("layers")
    if isinstance(layers, dict) and layers and all("params_before" in v and "params_after"
                                                   in v for v in layers.values()):
        notes = ["rank " + ", ".join(f"{r}/{f}" for r, f in zip(v["rank"], v.get("full_rank")
                                                                  or v["rank"]))
                 + ("" if v.get("kept", True) else " (undone)") if "rank" in v else ""
                 for v in layers.values()]
        out.append(plotter.before_after(list(layers), [v["params_before"] for v in
                                                       layers.values()],
                                        [v["params_after"] for v in layers.values()],
                                        "parameters", "parameters per layer (rank kept)",
                                        notes))
    groups = stats.get("per_group")
    if isinstance(groups, dict) and groups:
        out.append(plotter.groups(list(groups), [100 * v.get("ratio", 0) for v in
                                                 groups.values()],
                                  [v.get("sensitivity") for v in groups.values()]))
    weights = stats.get("weight_error")
    if isinstance(weights, dict) and weights:
        out.append(plotter.per_layer(list(weights), [v.get("rel_l2", 0.0) for v in
                                                     weights.values()],
                                     "rel L2, dequantized vs float weight",
                                     "weight quantization error per tensor"))
    out.extend(_mixed_plots(stats, plotter))
    return out


def _mixed_plots(stats: dict[str, Any], plotter: Plotter) -> list[str]:
    """quantize(mode=mixed): bits per layer with each layer's error alone, budget curve."""
    out = []
    bits, sens = stats.get("bits_per_layer"), stats.get("sensitivity")
    if isinstance(bits, dict) and bits and isinstance(sens, dict):
        names = list(bits)
        errors = [(sens.get(n) or {}).get("rel_l2", 0.0) for n in names]
        used = sorted(set(bits.values()))
        out.append(plotter.per_layer(
            names, errors, "output rel L2 with this layer int8 alone",
            "quantization error per layer, colored by the bits chosen",
            colors=[BIT_COLORS.get(bits[n], "#333") for n in names],
            legend={f"{b} bit": BIT_COLORS.get(b, "#333") for b in used}))
    curve = stats.get("budget_curve")
    if isinstance(curve, list) and curve and "rel_l2" in curve[0]:
        if any(p.get("int4_layers") for p in curve):  # bits=4: int8 <- float, then 4 <- int8
            out.append(plotter.curve([p["step"] for p in curve], [p["rel_l2"] for p in curve],
                                     "curve step (layers to int8, then to 4 bits)",
                                     "output rel L2", "mixed-precision budget curve",
                                     chosen=stats.get("chosen_step")))
        else:
            out.append(plotter.curve([p["int8_layers"] for p in curve],
                                     [p["rel_l2"] for p in curve], "layers in int8 (least "
                                     "sensitive first)", "output rel L2", "mixed-precision "
                                     "budget curve", chosen=stats.get("layers_int8")))
    return out


# ---------------------------------------------------------------------- compile


def compile_command(report: dict[str, Any]) -> str:
    model = str(report.get("model") or "MODEL.onnx").split(" (after ")[0]
    parts = ["onnxforge", "compile", model, "-t", report.get("target") or "host"]
    for name, spec in (report.get("inputs") or {}).items():
        parts += ["-s", f"{name}:{','.join(str(d) for d in spec.get('shape', []))}"]
    exported = report.get("exported") or []
    if exported:
        parts += ["-o", exported[0]]
    return " ".join(shlex.quote(str(p)) for p in parts)


def _scheduling(report: dict[str, Any], plotter: Plotter | None) -> str:
    rows = [["functions", report.get("num_primfuncs")],
            ["scheduled from the tuning database", report.get("scheduled_by_database")],
            ["scheduled by default rules", report.get("scheduled_by_default")],
            ["default rules", report.get("default_rules")],
            ["unscheduled", report.get("unscheduled")]]
    configs = report.get("schedule_configs") or {}
    if configs:
        rows.append(["with a measured knob setting (schedule configs)", configs.get("applied")])
        rows.append(["schedule-config sources", configs.get("sources") or "none"])
    if report.get("default_kept_over_database"):
        rows.append(["default kept over a slower tuning record",
                     report["default_kept_over_database"]])
    parts = [table(["", ""], rows)]
    rules = report.get("schedule_rules") or {}
    if rules:
        parts.append(table(["rule", "kernels"], rules.items(), "kernels per schedule rule"))
    kernels = report.get("kernel_schedules") or {}
    if kernels:
        listing = table(["kernel", "scheduled by"], kernels.items(), "who scheduled each kernel")
        # long lists fold away (no script: <details>); the profile table repeats the rule
        parts.append(listing if len(kernels) <= TOP_KERNELS else
                     f"<details><summary>who scheduled each of the {len(kernels)} kernels"
                     f"</summary>{listing}</details>")
    if report.get("unscheduled_funcs"):
        parts.append(table(["unscheduled kernel"], [[f] for f in report["unscheduled_funcs"]]))
    if plotter and rules:
        parts.insert(0, plotter.horizontal(list(rules), list(rules.values()), "kernels",
                                           "kernels per schedule rule"))
    return "".join(parts)


def _integer_sparse(report: dict[str, Any]) -> str:
    integer, sparse = report.get("integer") or {}, report.get("sparse") or {}
    rows = [[f"{op} (integer kernel)", n] for op, n in (integer.get("integer_ops") or {}).items()]
    rows += [[f"{e.get('op')} stayed float: {e.get('reason')}", e.get("count")]
             for e in integer.get("float_ops") or []]
    rows += [[f"{kind} on a block-sparse (BSR) kernel", n]
             for kind, n in (sparse.get("sparse_kernels") or {}).items()]
    rows += [["ops on block-sparse (BSR) kernels", sparse.get("sparse_ops", 0)]]
    rows += [[f"stayed dense: {e.get('reason')}", e.get("count")]
             for e in sparse.get("dense_ops") or []]
    return table(["quantized / sparse ops", "count"], rows) + (
        "" if integer.get("integer_total") or integer.get("float_total") else
        "<p class=meta>no quantized conv/matmul in this model.</p>")


def _profile(report: dict[str, Any], plotter: Plotter | None) -> str:
    prof = report.get("profile")
    if not prof:
        return ("<p class=meta>no per-kernel timing in this report (onnxforge compile "
                "--profile adds it).</p>")
    kernels, runs = prof.get("kernels") or [], max(prof.get("runs") or 1, 1)
    rules = report.get("kernel_schedules") or {}
    text = table(["kernel", "scheduled by", "calls per run", "µs per run", "share"],
                 [[k["name"], rules.get(k["name"], "-"), k["calls"],
                   round(1e3 * k["total_ms"] / runs, 2), f"{k['share'] * 100:.1f}%"]
                  for k in kernels], f"kernels timed over {runs} runs")
    text += (f"<p class=meta>Each call timed on the host clock through the VM's instrument "
             f"hook (a few &micro;s of Python per call). One run: "
             f"{esc(prof.get('plain_median_ms'))} ms median without the hook, "
             f"{esc(prof.get('instrumented_ms'))} ms with it; VM builtins (allocation, "
             f"shape checks) {esc(prof.get('builtins_ms'))} ms.</p>")
    if plotter and kernels:
        top, rest = kernels[:TOP_KERNELS], kernels[TOP_KERNELS:]
        names = [k["name"] for k in top] + ([f"{len(rest)} other kernels"] if rest else [])
        values = [1e3 * k["total_ms"] / runs for k in top]
        values += [1e3 * sum(k["total_ms"] for k in rest) / runs] if rest else []
        text = plotter.horizontal(names, values, "µs per run", "time per kernel") + text
    return text


def _compile_body(report: dict[str, Any], plotter: Plotter | None) -> str:
    seconds = report.get("seconds") or {}
    parts = [(f"<p class=meta>{esc(report.get('model'))} &rarr; "
             f"{esc(', '.join(report.get('exported') or []) or 'not exported')} &middot; "
             f"target {esc(report.get('target'))} ({esc(report.get('target_key'))}) &middot; "
             f"{esc(report.get('compile_seconds'))} s</p>"),
             "<h2>Reproduce</h2>", f"<pre>{esc(compile_command(report))}</pre>",
             f"<p class=meta>TVM target: {esc(json.dumps(report.get('target_json')))}</p>",
             (f"<details><summary>TVM pass pipeline</summary><pre>"
             f"{esc(report.get('pipeline_text', ''))}</pre></details>"),
             "<h2>Who scheduled the kernels</h2>", _scheduling(report, plotter),
             "<h2>Integer and sparse kernels</h2>", _integer_sparse(report),
             "<h2>Time per kernel</h2>", _profile(report, plotter),
             "<h2>Compile time</h2>",
             table(["stage", "seconds"], [[k, v] for k, v in seconds.items()])]
    verification = report.get("verification")
    if verification:
        parts += ["<h2>Verification vs onnxruntime</h2>", table(
            ["output", "max abs", "rel L2", "cosine"],
            [[o.get("name"), o.get("max_abs"), o.get("rel_l2"), o.get("cosine")]
             for o in verification.get("outputs") or []],
            f"{verification.get('samples')} random inputs, tolerance "
            f"{verification.get('rtol')}")]
    if report.get("notes"):
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{esc(n)}</li>" for n in report["notes"]] \
            + ["</ul>"]
    return "".join(parts)


def _tune_body(report: dict[str, Any], plotter: Plotter | None) -> str:
    """`tune --report`: the schedule-config search's kernels and MetaSchedule's tasks, with
    each task's best-so-far over its trials."""
    parts = []
    if report.get("pipeline"):
        parts.append(f"<p class=meta>pass pipeline first: {esc(report['pipeline'])}</p>")
    configs = report.get("configs")
    if configs:
        parts += [f"<h2>Schedule configs ({esc(configs.get('target'))})</h2>", table(
            ["kernel", "rule", "settings timed", "default µs", "best µs", "config kept"],
            [[k.get("kernel"), k.get("rule"), k.get("settings"), k.get("default_us"),
              k.get("best_us"), k.get("config")] for k in configs.get("kernels") or []],
            f"{configs.get('improved', 0)} kernels improved, {configs.get('known', 0)} "
            f"already in the database; {configs.get('seconds', 0):.0f} s, stopped by "
            f"{configs.get('stopped_by')}")]
    ms = report.get("metaschedule")
    if ms:
        tasks = ms.get("tasks") or []
        parts += [f"<h2>MetaSchedule ({esc(ms.get('target'))})</h2>", table(
            ["task", "share of FLOPs", "status", "trials", "default µs", "best µs"],
            [[t["name"], f"{100 * (t.get('share') or 0):.1f}%", t.get("status"),
              t.get("trials"), t.get("default_us"), t.get("best_us")] for t in tasks],
            f"{ms.get('trials')} trials of {ms.get('max_trials')} in "
            f"{ms.get('seconds', 0):.0f} s, stopped by {ms.get('stopped_by')}; database "
            f"{ms.get('db_dir')}")]
        histories = {t["name"]: t["history"] for t in tasks if t.get("history")}
        if plotter and histories:
            parts.append(plotter.best_so_far(
                histories, {t["name"]: t.get("default_us") for t in tasks}))
        elif not histories:
            parts.append("<p class=meta>no task measured in this run (all cached, or "
                         "none tuned)</p>")
    if report.get("notes"):
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{esc(n)}</li>" for n in report["notes"]] \
            + ["</ul>"]
    return "".join(parts) or "<p>nothing was tuned</p>"


def _bench_body(report: dict[str, Any], plotter: Plotter | None) -> str:
    """`bench --report x.html`: the latency table and a bar per model and backend."""
    rows = report.get("rows") or []
    if not rows:
        return "<p>no measurements</p>"
    first = rows[0]
    caption = (f"{first.get('threads')} thread(s), median of {first.get('repeat')} runs in "
               "interleaved rounds, one process")
    text = table(["model", "backend", "median ms", "min ms", "stdev ms", "ratio", "vs"],
                 [[r.get("label"), r.get("backend"), r.get("median_ms"), r.get("min_ms"),
                   r.get("stdev_ms"), r.get("ratio"), r.get("baseline")] for r in rows],
                 caption)
    if plotter:
        text = plotter.per_layer([f"{r.get('label')} ({r.get('backend')})" for r in rows],
                                 [r.get("median_ms") or 0.0 for r in rows], "median ms",
                                 "latency per model and backend") + text
    return text
