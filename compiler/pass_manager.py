"""Run a pipeline of passes over a model, measuring and checking each step.

For every pass the manager records wall time, what changed (nodes, params, MACs
before/after, the pass's own stats) and its numeric effect on calibration
inputs. Exact passes (fusion, folding, cleanup) must keep outputs equal within
`rtol` (relative L2) of the model before the pass, else the run stops with a
VerificationError naming the pass; lossy passes get their error recorded.

Subgraphs: before each pass the manager counts the compute nodes (Conv, MatMul, Gemm,
LSTM, ...) inside If/Loop/Scan bodies. A pass that does not declare
`descends_into_subgraphs` leaves them as they are: the step's stats get a
`skipped_subgraphs` entry (count, node names, where, why) and a warning line is printed.
A pass that descends but skips some bodies itself fills `skipped_subgraphs` the same
way; it is printed too.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx_ir as ir
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from .calibration import CalibrationSource
from .errors import OnnxforgeError, PassFailedError, VerificationError
from .ir import load_model, save_model, validate_model
from .metrics import compute_metrics
from .passes.base import ForgePass, PassContext
from .pipeline import Pipeline
from .subgraphs import subgraph_compute, summarize_compute
from .verify import Comparison, compare_models

logger = logging.getLogger(__name__)


@dataclass
class StepReport:
    pass_text: str
    exact: bool
    seconds: float
    modified: bool
    before: dict[str, int]
    after: dict[str, int]
    stats: dict[str, Any] = field(default_factory=dict)
    error: Comparison | None = None  # against the model before this pass
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "pass": self.pass_text,
            "exact": self.exact,
            "seconds": round(self.seconds, 4),
            "modified": self.modified,
            "before": self.before,
            "after": self.after,
            "stats": self.stats,
            "error": self.error.to_dict() if self.error else None,
            "note": self.note,
        }


def _summary(model: ir.Model, input_shapes: dict[str, tuple[int, ...]],
             probe: dict | None = None) -> dict[str, int]:
    metrics = compute_metrics(model, input_shapes, probe=probe)
    summary = {"nodes": metrics.nodes, "params": metrics.params, "macs": metrics.macs,
               "weight_bytes": metrics.weight_bytes}  # the file-size waterfall (HTML report)
    inside = len(subgraph_compute(model))
    if inside:
        summary["subgraph_compute_nodes"] = inside
    return summary


def _skip_record(p: ForgePass, found: list[dict[str, str]], limit: int = 20) -> dict:
    return {"count": len(found), "nodes": [f["node"] for f in found[:limit]],
            "where": sorted({f["in"] for f in found})[:limit], "reason": p.subgraph_note}


class PassManager:
    """Runs passes in order on an `onnx_ir.Model` (in place) and reports each step."""

    def __init__(
        self,
        pipeline: Pipeline | str | list[ForgePass],
        context: PassContext | None = None,
        *,
        verify_source: CalibrationSource | None = None,
        verify_batches: int = 4,
        rtol: float = 1e-4,
        dump_dir: str | Path | None = None,
        print_after: set[str] | None = None,
        console: Console | None = None,
        progress: bool = False,
        keep_snapshots: bool = False,
    ):
        self.context = context or PassContext()
        # a copy of the model after each pass, to time them side by side afterwards
        self.keep_snapshots = keep_snapshots
        self.snapshots: list[ir.Model] = []
        if isinstance(pipeline, str):
            pipeline = Pipeline.parse(pipeline, self.context)
        elif isinstance(pipeline, list):
            pipeline = Pipeline(pipeline)
        for p in pipeline:
            p.context = self.context
        self.pipeline = pipeline
        self.verify_source = verify_source
        self.verify_batches = verify_batches
        self.rtol = rtol
        self.dump_dir = Path(dump_dir) if dump_dir else None
        self.print_after = print_after or set()
        self.console = console or Console(stderr=True)
        self.progress = progress

    def run(self, model: ir.Model) -> tuple[ir.Model, list[StepReport]]:
        steps: list[StepReport] = []
        shapes = self.context.input_shapes
        with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                      console=self.console, disable=not self.progress, transient=True) as bar:
            task = bar.add_task("passes", total=len(self.pipeline))
            for index, p in enumerate(self.pipeline):
                bar.update(task, description=f"pass {index + 1}/{len(self.pipeline)}: {p.name}")
                steps.append(self._run_one(index, p, model, shapes))
                bar.advance(task)
        return model, steps

    def _probe_batch(self, model: ir.Model) -> dict | None:
        """One input batch to size values inside subgraphs for MAC counts (None when the
        model has no subgraph or no data was given)."""
        source = self.verify_source or self.context.calibration
        if source is None or not subgraph_compute(model):
            return None
        try:
            return source.first()
        except OnnxforgeError:
            return None

    def _run_one(self, index: int, p: ForgePass, model: ir.Model,
                 shapes: dict[str, tuple[int, ...]]) -> StepReport:
        probe = self._probe_batch(model)
        before = _summary(model, shapes, probe)
        inside = subgraph_compute(model)
        reference = load_model(model, check=False) if self.verify_source is not None else None
        p.stats = {}
        start = time.perf_counter()
        try:
            result = p(model)
        except OnnxforgeError:
            raise
        except Exception as exc:
            raise PassFailedError(
                f"pass {p.describe()} failed: {type(exc).__name__}: {exc}") from exc
        seconds = time.perf_counter() - start
        model = result.model
        try:
            validate_model(model, f"after pass {p.name}")
        except OnnxforgeError as exc:
            raise PassFailedError(f"pass {p.describe()} left an invalid graph: {exc}") from exc
        if self.keep_snapshots:
            self.snapshots.append(load_model(model, check=False))
        step = StepReport(p.describe(), p.exact, seconds, bool(result.modified), before,
                          _summary(model, shapes, probe), dict(p.stats))
        if inside and not p.descends_into_subgraphs:
            step.stats["skipped_subgraphs"] = _skip_record(p, inside)
        self._warn_skipped(p, step, inside)
        self._print_notes(p, step)
        if reference is not None and result.modified:
            step.error = compare_models(reference, model, self.verify_source,
                                        limit=self.verify_batches, threads=self.context.threads)
            if p.exact and not step.error.within(self.rtol):
                raise VerificationError(
                    f"exact pass {p.describe()} changed the outputs: relative L2 error "
                    f"{step.error.max_rel_l2:.3g} > {self.rtol:g} (max abs "
                    f"{step.error.max_abs:.3g}). This is a bug in the pass; run without it or "
                    "report the model."
                )
        logger.info("%s: %.3fs, nodes %d -> %d", p.describe(), seconds, before["nodes"],
                    step.after["nodes"])
        if self.dump_dir is not None:
            save_model(model, self.dump_dir / f"{index:02d}_{p.name}.onnx")
        if p.name in self.print_after:
            self._print_model(p, model)
        return step

    def _warn_skipped(self, p: ForgePass, step: StepReport, inside: list[dict]) -> None:
        """A warning line (terminal, log, step note) for subgraph compute left untouched."""
        skipped = step.stats.get("skipped_subgraphs")
        if not skipped:
            return
        names = set(skipped.get("nodes", []))
        found = [f for f in inside if f["node"] in names] or inside
        what = summarize_compute(found) if found else f"{skipped.get('count')} node(s)"
        line = (f"{p.name} left compute inside If/Loop/Scan bodies untouched: {what}: "
                f"{skipped.get('reason', '')}")
        step.note = (step.note + "; " if step.note else "") + line
        logger.info(line)  # printed below; a logging WARNING would print it twice in the CLI
        self.console.print(f"[yellow]warning[/]: {line}", highlight=False)

    def _print_notes(self, p: ForgePass, step: StepReport) -> None:
        """A pass's `notes` stat (lines about choices it made, e.g. quantize's
        calibration=auto): into the step's note and onto the terminal."""
        for line in step.stats.get("notes", []):
            step.note = (step.note + "; " if step.note else "") + line
            logger.info(line)
            self.console.print(f"{p.name}: {line}", highlight=False)

    def _print_model(self, p: ForgePass, model: ir.Model) -> None:
        counts = compute_metrics(model, with_macs=False).op_counts
        ops = ", ".join(f"{op}×{n}" for op, n in sorted(counts.items(), key=lambda kv: -kv[1]))
        self.console.print(f"[bold]after {p.describe()}[/]: {sum(counts.values())} nodes: {ops}")
