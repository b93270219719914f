"""MetaSchedule tuning with a budget, a persistent per-target database, and TVM RPC.

    from onnxforge.backends.tvm.tuning import tune
    report = tune("model.onnx", "host", "tuning/", max_trials=64, max_seconds=600)
    art = compile_model("model.onnx", "host", tuning_db="tuning/")   # never tunes

Layout: `work_dir/<target-key>/database_{workload,tuning_record}.json` (a plain
MetaSchedule JSON database), `work_dir/<target-key>/logs/` (MetaSchedule's logs of the
last run), and beside them `schedule_configs.json` when `config_tuning.search_configs`
measured the default rules' knob settings there (`onnxforge tune --method both` runs
that first). The key is derived from the whole target (`targets.target_key`), so records
for different targets never mix.

How a run goes:
  1. The parent process prepares the module exactly as `compile_model` does (import,
     legalize, fuse), extracts the tasks and asks the database which are already tuned.
     When every task that matters is covered it returns at once: nothing is tuned again.
  2. Otherwise a worker subprocess (`tuning_worker`) tunes the remaining tasks into a
     staging copy of the database. Tasks are ordered by their share of the model's FLOPs
     (tasks under `min_flop_share` are left to the default schedules); the scheduler gives
     each task one search round in that order, then more rounds to the task that costs most in the
     model. Budget: `max_trials` and `max_seconds`, whichever ends first; the worker stops
     between rounds when the next round would not fit, and the parent kills it (the
     whole process group) shortly after the deadline.
     Before searching, the worker times each task under onnxforge's default CPU schedule
     (weights marked layout-free, as compile packs them; knob settings from the schedule
     config databases compile uses: the shipped one for the target's class and
     `schedule_configs.json` of this folder, written by `config_tuning.search_configs`)
     with the same builder and runner, into `default_schedules.json`: compile_model
     applies a tuning record only where it beats that time, so a small budget never makes
     the model slower than untuned, nor slower than the measured knob settings.
  3. Whatever was measured is kept: the staging files are cut back to their last whole
     record, checked by loading them, and moved over the database with `os.replace`,
     under a lock (`database.commit_staging`). A crash or kill never leaves a
     half-written database.

Builds run in a persistent pool of worker processes (`tuning_worker`) with a 120 s build
timeout (the default 30 s kills builds on a loaded 2-core machine).

RPC: `rpc_tracker="host:port", rpc_key="board"` measures on the device registered with
TVM's RPC tracker (`python -m tvm.exec.rpc_tracker`, `python -m tvm.exec.rpc_server
--tracker host:port --key board` on the board) through MetaSchedule's RPCRunner
(`metaschedule.make_runner`).
Without RPC only targets that run on this machine can be tuned.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ...errors import BackendError, InputSpecError, OptionText
from ..targets import (
    canonical_json,
    is_gpu_target,
    plain_target_dict,
    resolve_target,
    runs_on_this_machine,
    target_key,
)
from .database import (
    commit_staging,
    count_records,
    database_is_populated,
    db_lock,
    open_database,
    resolve_tuning_db,
    staging_copy,
)
from .metaschedule import TaskInfo, check_rpc_device, describe_tasks, extract_tasks, is_cached
from .tuning_worker import LOG_FILE, run_worker

logger = logging.getLogger(__name__)

DEFAULT_BUILDER_TIMEOUT = 120.0
DEFAULT_RUNNER_TIMEOUT = 60.0


@dataclass
class TuningReport:
    target: str
    target_key: str
    db_dir: str
    max_trials: int
    max_seconds: float | None
    tasks: list[TaskInfo] = field(default_factory=list)
    trials: int = 0
    seconds: float = 0.0
    setup_seconds: float = 0.0
    stopped_by: str = "nothing to tune"  # trials | seconds | all tasks done | crash | ...
    reused: bool = False
    records_before: int = 0
    records_after: int = 0
    rpc: str | None = None
    log: str | None = None
    errors: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def tune(
    model: Any,
    target: Any,
    work_dir: str | os.PathLike,
    *,
    max_trials: int,
    max_seconds: float | None = None,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    rpc_tracker: str | None = None,
    rpc_key: str | None = None,
    progress: bool = True,
    min_flop_share: float = 0.005,
    retune: bool = False,
    builder_timeout: float = DEFAULT_BUILDER_TIMEOUT,
    runner_timeout: float = DEFAULT_RUNNER_TIMEOUT,
    console: Any = None,
) -> TuningReport:
    """Tune `model` for `target` into `work_dir/<target-key>/` within the budget.

    Args:
        max_trials: total measured candidates, over all tasks.
        max_seconds: wall-clock budget for the whole call (setup included).
        min_flop_share: tasks under this share of the model's FLOPs are not tuned.
        retune: tune tasks the database already covers (default: only uncovered ones).
        rpc_tracker / rpc_key: measure on a remote device through TVM's RPC tracker.
    """
    from .pipeline import prepare_module

    started = time.monotonic()
    tvm_target = _check_request(target, max_trials, rpc_tracker, rpc_key)
    report = _new_report(target, tvm_target, work_dir, max_trials, max_seconds, rpc_tracker,
                         rpc_key)
    db_dir = Path(report.db_dir)
    prepared = prepare_module(model, tvm_target, input_shapes=input_shapes)
    tasks = extract_tasks(prepared.mod, tvm_target)
    report.tasks = describe_tasks(tasks)
    report.records_before = count_records(db_dir)
    todo, cached = _plan(tasks, report.tasks, db_dir, retune, min_flop_share)
    report.setup_seconds = round(time.monotonic() - started, 2)
    if not todo:
        report.reused = bool(cached)
        return _ended_early(report, started, "nothing to tune: the database covers every task"
                            if cached else "nothing to tune: no task above the FLOP threshold")
    if max_seconds and time.monotonic() - started >= max_seconds:
        return _ended_early(report, started, "seconds (the budget went on preparing the model)")

    with db_lock(db_dir):
        staging = staging_copy(db_dir)
        try:
            spec = {
                "model": _model_file(model, staging),
                "target": plain_target_dict(tvm_target),
                "input_shapes": {s.name: list(s.shape) for s in prepared.inputs},
                "tasks": todo,
                "max_trials": int(max_trials),
                "deadline_unix": (time.time() + max_seconds - (time.monotonic() - started))
                if max_seconds else None,
                "max_seconds": max_seconds,
                "rpc_tracker": rpc_tracker,
                "rpc_key": rpc_key,
                "builder_timeout": builder_timeout,
                "runner_timeout": runner_timeout,
                "work_dir": str(staging),
                "parent_pid": os.getpid(),
            }
            outcome = _follow_worker(staging, spec, report, started, progress, console)
            report.records_after = commit_staging(staging, db_dir)
            _keep_logs(staging, db_dir, report)
            report.stopped_by = outcome
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    _final_statuses(report.tasks, todo)
    report.seconds = round(time.monotonic() - started, 2)
    return report


def _check_request(target: Any, max_trials: int, rpc_tracker: str | None,
                   rpc_key: str | None) -> Any:
    """The TVM target, once the request is one this machine can serve (an RPC device must
    be registered with the tracker)."""
    if max_trials < 1:
        raise InputSpecError("max_trials must be at least 1")
    if (rpc_tracker is None) != (rpc_key is None):
        raise InputSpecError(OptionText.of(("rpc_tracker", None), " and ", ("rpc_key", None),
                                           " go together"))
    tvm_target = resolve_target(target)
    if rpc_tracker is None and (not runs_on_this_machine(tvm_target) or is_gpu_target(tvm_target)):
        raise BackendError(OptionText.of(
            f"cannot measure {target_key(tvm_target)} code on this machine: tune it on the "
            "device over RPC (", ("rpc_tracker", "HOST:PORT"), " ", ("rpc_key", "KEY"),
            "), or tune for 'host' and apply that database on purpose (",
            ("tuning_db", "DIR/<host-key>"), ")"))
    if rpc_tracker is not None:
        check_rpc_device(rpc_tracker, rpc_key)
    return tvm_target


def _new_report(target: Any, tvm_target: Any, work_dir: str | os.PathLike, max_trials: int,
                max_seconds: float | None, rpc_tracker: str | None,
                rpc_key: str | None) -> TuningReport:
    """The report of a run starting now; its database folder is created."""
    db_dir = resolve_tuning_db(Path(work_dir).resolve(), tvm_target)
    assert db_dir is not None
    db_dir.mkdir(parents=True, exist_ok=True)
    return TuningReport(
        target=target if isinstance(target, str) else canonical_json(tvm_target),
        target_key=target_key(tvm_target), db_dir=str(db_dir), max_trials=max_trials,
        max_seconds=max_seconds, rpc=f"{rpc_key}@{rpc_tracker}" if rpc_tracker else None,
    )


def _plan(tasks: Sequence, infos: list[TaskInfo], db_dir: Path, retune: bool,
          min_flop_share: float) -> tuple[list[str], set[str]]:
    """(names of the tasks to tune, names of those the database covers); marks the
    others' status."""
    cached: set[str] = set()
    if database_is_populated(db_dir) and not retune:
        database = open_database(db_dir)
        cached = {t.task_name for t in tasks if is_cached(database, t)}
    todo = []
    for info in infos:
        if info.name in cached:
            info.status = "cached"
        elif info.share < min_flop_share:
            info.status = "skipped (small)"
        else:
            todo.append(info.name)
    return todo, cached


def _ended_early(report: TuningReport, started: float, stopped_by: str) -> TuningReport:
    """The report of a run that started no worker: the database is as it was."""
    report.stopped_by = stopped_by
    report.records_after = report.records_before
    report.seconds = round(time.monotonic() - started, 2)
    return report


def _model_file(model: Any, staging: Path) -> str:
    """A path the worker can load the model from (in-memory models saved in `staging`)."""
    import onnx

    if isinstance(model, (str, os.PathLike)):
        return str(Path(model).resolve())
    from .importer import load_onnx

    proto, _ = load_onnx(model)
    path = staging / "model.onnx"
    large = proto.ByteSize() > 1_800_000_000
    onnx.save(proto, str(path), save_as_external_data=large)
    return str(path)


def _follow_worker(staging: Path, spec: dict, report: TuningReport, started: float,
                   progress: bool, console) -> str:
    """Run the worker with a progress display, its events applied to `report`; after the
    budget plus a grace period it is killed."""
    max_seconds = spec["max_seconds"]
    hard_deadline = None
    if max_seconds:
        grace = max(15.0, 0.1 * max_seconds)
        hard_deadline = started + max_seconds + grace
    infos = {i.name: i for i in report.tasks}
    with _Display(progress, console, spec["max_trials"], max_seconds,
                  report.target_key) as display:
        return run_worker(staging, spec, hard_deadline,
                          on_event=lambda event: _apply_event(event, infos, report, display),
                          on_tick=lambda: display.tick(time.monotonic() - started))


def _keep_logs(staging: Path, db_dir: Path, report: TuningReport) -> None:
    """MetaSchedule's logs and the worker's log of this run go beside the database."""
    logs = staging / "logs"
    if logs.is_dir():
        shutil.rmtree(db_dir / "logs", ignore_errors=True)
        os.replace(logs, db_dir / "logs")
    worker_log = staging / LOG_FILE
    if worker_log.is_file():
        os.replace(worker_log, db_dir / LOG_FILE)
        report.log = str(db_dir / LOG_FILE)


def _final_statuses(infos: list[TaskInfo], todo: list[str]) -> None:
    for info in infos:
        if info.name in todo:
            info.status = "tuned" if info.best_us is not None else \
                ("failed" if info.trials else "untuned")
            if info.best_us is not None and info.default_us is not None \
                    and info.default_us <= info.best_us:
                info.status = "tuned (default schedule faster, kept)"


def _apply_event(event: dict, infos: dict[str, TaskInfo], report: TuningReport,
                 display: _Display) -> str | None:
    kind = event.get("event")
    if kind == "round":
        info = infos.get(event["task"])
        if info is not None:
            info.trials = event["task_trials"]
            if event.get("best_us") is not None:
                info.best_us = event["best_us"]
                info.history.append([event["task_trials"], event["best_us"]])
        report.trials = event["total_trials"]
        if event.get("errors"):
            report.errors.extend(event["errors"][:2])
        display.update(event)
    elif kind == "baseline":
        info = infos.get(event["task"])
        if info is not None:
            info.default_us = event["us"]
    elif kind == "start":
        display.message(f"tuning {len(event['tasks'])} task(s), setup {event['setup_s']:.0f} s")
    elif kind == "error":
        report.errors.append(event["message"])
    elif kind == "done":
        report.trials = event["total_trials"]
        return event["stopped_by"]
    return None


class _Display:
    """A rich progress bar over trials, with the task being tuned and the time left."""

    def __init__(self, enabled: bool, console, total: int, max_seconds: float | None, key: str):
        self.enabled = enabled
        self.total = total
        self.max_seconds = max_seconds
        self.progress = None
        self.task_id = None
        self.key = key
        self.console = console

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )

            self.progress = Progress(
                TextColumn("[bold]tune[/] {task.fields[key]}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TextColumn("{task.fields[status]}"),
                console=self.console or Console(stderr=True), transient=False,
            )
            self.progress.__enter__()
            self.task_id = self.progress.add_task("tune", total=self.total, key=self.key,
                                                  status="starting worker")
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def message(self, text: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task_id, status=text)

    def update(self, event: dict) -> None:
        if self.progress is None:
            return
        best = event.get("best_us")
        text = f"{event['task']}: {event['task_trials']} trials"
        if best is not None:
            text += f", best {best:.1f} us"
        self.progress.update(self.task_id, completed=min(event["total_trials"], self.total),
                             status=text)

    def tick(self, elapsed: float) -> None:
        if self.progress is not None and self.max_seconds:
            left = max(0.0, self.max_seconds - elapsed)
            fields = self.progress.tasks[0].fields
            status = str(fields.get("status", "")).split(" [")[0]
            self.progress.update(self.task_id, status=f"{status} [{left:.0f} s left]")
