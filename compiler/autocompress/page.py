"""The HTML page of an autocompress report (`--report x.html`): the input and the chosen
model side by side, the chosen per-layer policy, both fronts as embedded plots, and every
measured candidate. Built from the JSON report with html_report's table helpers."""

from __future__ import annotations

import base64
from typing import Any

from ..html_plots import PLOT_HINT
from ..html_report import STYLE, esc, table
from .plots import AXES, front_png


def render_page(report: dict[str, Any]) -> str:
    original, final = report["original"], report["final"] or {}
    keys = [("latency (ms)", "latency_ms"), ("size (bytes)", "size_bytes"), ("MACs", "macs"),
            ("rel L2 error", "rel_l2"), ("accuracy", "accuracy"),
            ("accuracy/metric drop", "accuracy_drop")]
    side = table(["", "input model", "chosen model"],
                 [[label, original.get(key), final.get(key)] for label, key in keys]
                 + [["speedup (side by side)", 1.0, final.get("speedup")]],
                 f"{report['budget']['text']}: {'met' if report['met'] else 'NOT met'}")
    policy = table(["kind", "layer / group", "choice"],
                   [[r["kind"], r["layer"], r["choice"]] for r in report.get("policy") or []],
                   "chosen per-layer policy")
    figures = []
    for axis in AXES:
        png = front_png(report, axis)
        if png is None:
            figures = [f'<p class="hint">{esc(PLOT_HINT)}</p>']
            break
        data = base64.b64encode(png).decode("ascii")
        figures.append(f'<img class="plot" alt="{axis} front" src="data:image/png;base64,'
                       f'{data}">')
    rows = [[c.get("pipeline") or "(input model)", c.get("latency_ratio"), c.get("size_bytes"),
             c.get("macs"), c.get("rel_l2"), c.get("accuracy_drop"),
             c.get("on_latency_front"), c.get("chosen"), c.get("failed")]
            for c in report["candidates"]]
    candidates = table(["pipeline", "latency ratio", "size", "MACs", "rel L2", "drop",
                        "latency front", "chosen", "failed"], rows, "measured candidates")
    notes = "".join(f"<li>{esc(n)}</li>" for n in report["notes"] + report["warnings"])
    title = "onnxforge autocompress report"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{title}</title><style>{STYLE}</style></head><body><h1>{title}</h1>"
            f"<p>{esc(report['input'])}, backend {esc(report['backend']['name'])}, verify "
            f"data {esc(report['verify_data'])}</p><ul>{notes}</ul>{side}{policy}"
            f"{''.join(figures)}{candidates}</body></html>\n")
