"""Schedule-config search: the fast tuner (minutes) in front of MetaSchedule (hours).

    from onnxforge.backends.tvm.config_tuning import search_configs
    report = search_configs("model.onnx", "host", "tuning/")
    art = compile_model("model.onnx", "host", tuning_db="tuning/")   # applies it

Each fused kernel of the model whose default CPU rule has knobs (register tile,
row width) gets every setting compiled and timed on this machine
(``onnxforge.kernels.config_search``); the fastest one, when it beats the heuristic by
3 % and gives the same output, is written to ``<work_dir>/<target-key>/
schedule_configs.json``, beside MetaSchedule's files. Kernels already in that file are
not measured again (``retune`` measures them anew). ``tools/build_tuning_db.py`` runs
this over the zoo to produce the database shipped with onnxforge.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BackendError, OptionText
from ..targets import canonical_json, resolve_target, runs_on_this_machine, target_key


@dataclass
class ConfigSearchReport:
    target: str
    target_key: str
    db_dir: str
    kernels: list[dict] = field(default_factory=list)  # one row per kernel measured now
    known: int = 0  # kernels the database already had
    seconds: float = 0.0
    stopped_by: str = "all kernels done"

    @property
    def improved(self) -> int:
        return sum(1 for k in self.kernels if k["config"] is not None)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "improved": self.improved}


def cpu_description() -> str:
    """The CPU model name (for a database's provenance)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def search_configs(
    model: Any,
    target: Any,
    work_dir: str | os.PathLike,
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    max_seconds: float | None = None,
    retune: bool = False,
    progress: Callable[[int, int, str], None] | None = None,
) -> ConfigSearchReport:
    """Measure the default rules' knob settings for `model`'s kernels into `work_dir`.

    Args:
        target: a CPU target whose code runs on this machine ("host", a JSON dict ...).
        max_seconds: stop before the next kernel once this much time has gone.
        retune: measure kernels the database already has again.
        progress: called as (kernels done, kernels to do, kernel name).
    """
    from ...kernels.config_search import search_module
    from ...kernels.schedule_configs import load_configs, target_class
    from .database import db_lock, resolve_tuning_db, save_configs
    from .pipeline import prepare_module

    started = time.monotonic()
    tvm_target = resolve_target(target)
    if tvm_target.kind.name != "llvm" or not runs_on_this_machine(tvm_target):
        raise BackendError(OptionText.of(
            f"schedule configs are measured on this machine's CPU; {target_key(tvm_target)} "
            "code does not run here (tune it with MetaSchedule over RPC: ",
            ("method", "metaschedule"), ")"))
    db_dir = resolve_tuning_db(Path(work_dir).resolve(), tvm_target)
    report = ConfigSearchReport(
        target=target if isinstance(target, str) else canonical_json(tvm_target),
        target_key=target_key(tvm_target), db_dir=str(db_dir))
    prepared = prepare_module(model, tvm_target, input_shapes=input_shapes)
    deadline = time.time() + max_seconds - (time.monotonic() - started) if max_seconds else None
    with db_lock(db_dir):
        entries = load_configs(db_dir)
        report.known = len(entries)

        def on_kernel(result, name: str, done: int, total: int) -> None:
            if result is not None:
                entries[result.key] = result.entry(Path(prepared.label).name)
                report.kernels.append({
                    "kernel": name, "rule": result.rule, "settings": len(result.trials),
                    "default_us": round(result.default_us, 2),
                    "best_us": round(result.best_us, 2), "config": result.best_config,
                    "note": result.note})
            if progress is not None:
                progress(done, total, name)

        outcome = search_module(prepared.mod, tvm_target, skip=None if retune else entries,
                                deadline=deadline, progress=on_kernel)
        if not outcome.finished:
            report.stopped_by = "seconds"
        save_configs(db_dir, entries, target_class(tvm_target),
                     {"cpu": cpu_description(), "target": canonical_json(tvm_target)})
    report.seconds = round(time.monotonic() - started, 2)
    return report
