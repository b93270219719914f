"""PNG plots of an autocompress report: every measured candidate, the measured Pareto front,
the input model and the chosen one, for latency vs error and size vs error.

matplotlib is optional (`pip install onnxforge[plot]`); without it `write_plots` writes
nothing and returns why. Built on `matplotlib.figure.Figure` (no pyplot state).
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

from ..html_plots import COLORS, PLOT_HINT
from ..safe_write import write_bytes
from .search import pareto_indices

AXES = {"latency": ("latency_ratio", "latency (x input model, measured side by side)"),
        "size": ("size_bytes", "model size (MB)")}


def plot_paths(report_path: str | os.PathLike) -> dict[str, Path]:
    """Where the plots of a report go: `<stem>.latency_front.png`, `<stem>.size_front.png`."""
    path = Path(report_path)
    return {name: path.with_name(f"{path.stem}.{name}_front.png") for name in AXES}


def front_png(report: dict[str, Any], axis: str, title: str = "") -> bytes | None:
    """One plot as PNG bytes (None without matplotlib)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    key, label = AXES[axis]
    error_key = "accuracy_drop" if report.get("quality_axis") == "accuracy_drop" else "rel_l2"
    rows = [c for c in report["candidates"] if c.get(key) is not None
            and c.get(error_key) is not None]
    scale = 1e-6 if key == "size_bytes" else 1.0
    xs = [c[key] * scale for c in rows]
    ys = [c[error_key] * (100 if error_key == "accuracy_drop" else 1) for c in rows]
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.subplots()
    ax.scatter(xs, ys, s=18, color=COLORS["before"], label="measured candidates")
    front = pareto_indices(list(zip(xs, ys)))
    ax.plot([xs[i] for i in front], [ys[i] for i in front], "-o", color=COLORS["after"],
            ms=5, label="measured front")
    for c, x, y in zip(rows, xs, ys):
        if c.get("origin"):
            ax.scatter([x], [y], marker="s", s=60, color="black", label="input model", zorder=3)
        if c.get("chosen"):
            ax.scatter([x], [y], marker="*", s=180, color=COLORS["error"], label="chosen",
                       zorder=4)
    limit = report.get("budget", {}).get("limit")
    if limit is not None and report["budget"]["quantity"] == key:
        ax.axvline(limit * scale, ls="--", color=COLORS["latency"], label="budget")
    ax.set_xlabel(label)
    ax.set_ylabel("accuracy drop (pt)" if error_key == "accuracy_drop"
                  else "output rel L2 error vs input model")
    if error_key == "rel_l2" and ys and min(ys) >= 0 and max(ys) > 0:
        ax.set_yscale("symlog", linthresh=max(min([y for y in ys if y > 0]), 1e-4))
    ax.set_title(title or f"autocompress: {axis} vs error", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def write_plots(report: dict[str, Any], report_path: str | os.PathLike
                ) -> tuple[list[Path], str | None]:
    """(the PNG files written next to the report, why none were written or None)."""
    written = []
    for axis, path in plot_paths(report_path).items():
        data = front_png(report, axis, f"{Path(str(report.get('input', ''))).name}: "
                         f"{axis} vs error")
        if data is None:
            return written, PLOT_HINT
        write_bytes(path, data, label="plot")
        written.append(path)
    return written, None
