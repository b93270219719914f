"""The figures of the HTML report (html_report.py), as embedded PNG `<img>` tags.

matplotlib is optional (`pip install onnxforge[plot]`): `Plotter.make()` returns None
without it and the page keeps its tables. Figures are built with `matplotlib.figure.Figure`
directly, so no pyplot state or GUI backend is touched.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from typing import Any

PLOT_HINT = ("Plots need matplotlib, which is not installed: pip install 'onnxforge[plot]' "
             "(or pip install matplotlib) and render the report again.")
# one palette for every figure: before / after / error
COLORS = {"params": "#4C72B0", "macs": "#DD8452", "weights": "#55A868", "error": "#C44E52",
          "before": "#B0B0B0", "after": "#4C72B0", "latency": "#8172B3"}
BIT_COLORS = {4: "#55A868", 8: "#4C72B0", 16: "#DD8452", 32: "#8C8C8C"}


class Plotter:
    """Makes figures and turns them into `<img src="data:image/png;base64,...">`."""

    def __init__(self, figure_class: Any) -> None:
        self._figure = figure_class

    @classmethod
    def make(cls) -> Plotter | None:
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return None
        return cls(Figure)

    def figure(self, width: float, height: float, columns: int = 1):
        fig = self._figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(1, columns)
        return fig, axes

    @staticmethod
    def img(fig: Any, alt: str) -> str:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        data = base64.b64encode(buf.getvalue()).decode("ascii")
        return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    # ------------------------------------------------------------------ optimize

    def waterfall(self, labels: Sequence[str], series: dict[str, list[float]],
                  errors: list[float | None]) -> str:
        """Left: params/MACs/weights after each pass as % of the input; right: the output
        error (rel L2 vs the model before the pass) each pass introduced."""
        fig, (left, right) = self.figure(11, 3.8, 2)
        xs = list(range(len(labels)))
        for name, values in series.items():
            left.plot(xs, values, marker="o", lw=2, color=COLORS[name], label=name)
        labels = [_short(label, 40) for label in labels]
        left.set_xticks(xs, labels, rotation=25, ha="right", fontsize=9)
        left.set_ylabel("% of the input model")
        left.set_ylim(0, max(105, max(max(v) for v in series.values()) * 1.05))
        left.grid(alpha=0.3)
        left.legend(fontsize=9)
        left.set_title("size, compute (and ORT latency) after each pass")
        steps = labels[1:]
        heights = [e or 0.0 for e in errors]
        bars = right.bar(range(len(steps)), heights, color=COLORS["error"])
        for bar, err in zip(bars, errors):
            right.annotate("exact" if err == 0 else "-" if err is None else f"{err:.2e}",
                           (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                           ha="center", va="bottom", fontsize=8)
        right.set_ylim(0, max(heights + [1e-9]) * 1.18)  # room for the value labels
        right.set_xticks(range(len(steps)), steps, rotation=25, ha="right", fontsize=9)
        right.set_ylabel("output rel L2 error")
        right.set_title("error each pass introduced")
        right.grid(alpha=0.3, axis="y")
        return self.img(fig, "per-pass waterfall")

    def best_so_far(self, tasks: dict[str, list[list[float]]],
                    defaults: dict[str, float | None]) -> str:
        """Tuning: each task's best measured time after each round of trials, as a share
        of its default schedule's time (1.0 = as fast as the default rules) when that was
        measured, else in µs."""
        fig, ax = self.figure(8, 3.8)
        relative = all(defaults.get(name) for name in tasks)
        for name, history in tasks.items():
            xs = [h[0] for h in history]
            ys = [h[1] / defaults[name] if relative else h[1] for h in history]
            ax.plot(xs, ys, marker="o", ms=3, lw=1.5, label=_short(name, 40))
        if relative:
            ax.axhline(1.0, color=COLORS["before"], ls="--", lw=1)
        ax.set_xlabel("trials of the task")
        ax.set_ylabel("best / default schedule" if relative else "best µs")
        ax.set_title("best-so-far per task")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
        return self.img(fig, "best-so-far per task")

    def before_after(self, names: Sequence[str], before: list[float], after: list[float],
                     ylabel: str, title: str, notes: Sequence[str] = ()) -> str:
        """Grouped bars per layer: a quantity before and after a pass."""
        fig, ax = self.figure(max(5.0, 0.9 * len(names) + 2), 3.4)
        xs = range(len(names))
        ax.bar([x - 0.2 for x in xs], before, 0.4, color=COLORS["before"], label="before")
        bars = ax.bar([x + 0.2 for x in xs], after, 0.4, color=COLORS["after"], label="after")
        for bar, note in zip(bars, notes):
            ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
        ax.set_xticks(list(xs), [_short(n) for n in names], rotation=25, ha="right", fontsize=9)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        return self.img(fig, title)

    def per_layer(self, names: Sequence[str], values: list[float], ylabel: str, title: str,
                  colors: Sequence[str] | None = None, legend: dict[str, str] | None = None,
                  log: bool = False) -> str:
        """One bar per layer (group, tensor), optionally colored by a category."""
        fig, ax = self.figure(max(5.0, 0.7 * len(names) + 2), 3.4)
        ax.bar(range(len(names)), values, color=list(colors) if colors else COLORS["params"])
        ax.set_xticks(range(len(names)), [_short(n) for n in names], rotation=25, ha="right",
                      fontsize=9)
        if log and any(v > 0 for v in values):
            ax.set_yscale("log")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
        if legend:
            from matplotlib.patches import Patch

            ax.legend(handles=[Patch(color=c, label=label) for label, c in legend.items()],
                      fontsize=9)
        return self.img(fig, title)

    def groups(self, names: Sequence[str], ratios: list[float],
               errors: list[float | None]) -> str:
        """Pruning: % of units removed per group, and the output error of each group's cut
        alone (the sensitivity probe), side by side."""
        fig, (left, right) = self.figure(max(8.0, 1.4 * len(names) + 3), 3.4, 2)
        labels = [_short(n) for n in names]
        left.bar(range(len(names)), ratios, color=COLORS["params"])
        left.set_ylabel("% of units removed")
        left.set_title("pruning ratio per group")
        right.bar(range(len(names)), [e or 0.0 for e in errors], color=COLORS["error"])
        right.set_ylabel("output rel L2, this cut alone")
        right.set_title("sensitivity per group")
        if any(e for e in errors):
            right.set_yscale("log")
        for ax in (left, right):
            ax.set_xticks(range(len(names)), labels, rotation=25, ha="right", fontsize=9)
            ax.grid(alpha=0.3, axis="y")
        return self.img(fig, "pruning ratio per group")

    def curve(self, xs: Sequence[float], ys: list[float], xlabel: str, ylabel: str,
              title: str, chosen: float | None = None) -> str:
        fig, ax = self.figure(5.5, 3.2)
        ax.plot(xs, ys, marker="o", color=COLORS["error"])
        if chosen is not None:
            ax.axvline(chosen, color="#555", ls="--", lw=1, label="chosen")
            ax.legend(fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        return self.img(fig, title)

    def horizontal(self, names: Sequence[str], values: list[float], xlabel: str,
                   title: str) -> str:
        """Horizontal bars (kernel times, compile stages): long names stay readable."""
        fig, ax = self.figure(8, max(2.2, 0.32 * len(names) + 1))
        ys = range(len(names))
        ax.barh(list(ys), values, color=COLORS["params"])
        ax.set_yticks(list(ys), [_short(n, 48) for n in names], fontsize=9)
        ax.invert_yaxis()
        ax.set_xlabel(xlabel)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="x")
        return self.img(fig, title)


def _short(name: str, limit: int = 28) -> str:
    """Long node names: keep the end, which is the part that differs."""
    name = str(name)
    name = name if len(name) <= limit else "…" + name[-(limit - 1):]
    return name.replace("$", r"\$")  # user text: never matplotlib mathtext
