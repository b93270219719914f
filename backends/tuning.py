"""MetaSchedule tuning with a budget, a persistent per-target database, and TVM RPC.

    from onnxforge.backends.tuning import tune
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
  2. Otherwise a worker subprocess tunes the remaining tasks into a staging copy of the
     database. Tasks are ordered by their share of the model's FLOPs (tasks under
     `min_flop_share` are left to the default schedules); the scheduler gives each task
     one search round in that order, then more rounds to the task that costs most in the
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
     under a lock. A crash or kill never leaves a half-written database.

Builds run in a persistent pool of worker processes (MetaSchedule's LocalBuilder starts
a fresh pool, i.e. a fresh TVM import, for every batch) with a 120 s build timeout (the
default 30 s kills builds on a loaded 2-core machine).

RPC: `rpc_tracker="host:port", rpc_key="board"` measures on the device registered with
TVM's RPC tracker (`python -m tvm.exec.rpc_tracker`, `python -m tvm.exec.rpc_server
--tracker host:port --key board` on the board) through MetaSchedule's RPCRunner.
Without RPC only targets that run on this machine can be tuned.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import safe_write
from ..errors import BackendError, InputSpecError
from ..kernels.schedule_configs import CONFIG_ATTR, CONFIG_FILE  # measured knob settings
from .targets import (
    canonical_json,
    is_gpu_target,
    physical_cores,
    plain_target_dict,
    resolve_target,
    runs_on_this_machine,
    target_arch,
    target_key,
)
from .tvm.database import BASELINE_FILE, RECORD_FILE, WORKLOAD_FILE, read_baselines

logger = logging.getLogger(__name__)

DEFAULT_BUILDER_TIMEOUT = 120.0
DEFAULT_RUNNER_TIMEOUT = 60.0


@dataclass
class TaskInfo:
    """One tuning task (a fused PrimFunc) and what happened to it."""

    name: str
    flop: float
    weight: int
    share: float  # of the model's FLOPs
    status: str = "pending"  # cached | tuned | untuned | skipped (small) | failed
    trials: int = 0
    best_us: float | None = None
    default_us: float | None = None  # the default schedule, measured the same way


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


# ---------------------------------------------------------------------------------------
# Database files
# ---------------------------------------------------------------------------------------

def _valid_lines(path: Path) -> list[str]:
    """Lines of a JSON-lines file that parse; stops at the first broken one (a torn write)."""
    if not path.is_file():
        return []
    lines = []
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if not line.endswith("\n"):
                break
            try:
                json.loads(line)
            except json.JSONDecodeError:
                break
            lines.append(line)
    return lines


def count_records(db_dir: Path) -> int:
    return len(_valid_lines(db_dir / RECORD_FILE))


def _sanitize(staging: Path) -> tuple[list[str], list[str]]:
    """Whole workload lines, and the record lines that refer to one of them."""
    workloads = _valid_lines(staging / WORKLOAD_FILE)
    records = [line for line in _valid_lines(staging / RECORD_FILE)
               if isinstance(json.loads(line), list) and 0 <= json.loads(line)[0] < len(workloads)]
    return workloads, records


def _write_atomic(path: Path, lines: Sequence[str]) -> None:
    safe_write.write_text(path, "".join(lines))  # temp + fsync + rename, umask mode


@contextlib.contextmanager
def db_lock(db_dir: Path, *, wait: float = 3600.0):
    """An exclusive lock on a database folder (one tuner per target at a time)."""
    db_dir.mkdir(parents=True, exist_ok=True)
    handle = open(db_dir / ".lock", "w")  # noqa: SIM115 - closed below
    deadline = time.monotonic() + wait
    try:
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackendError(f"{db_dir} is locked by another tuning run") from None
                time.sleep(0.5)
        yield
    finally:
        with contextlib.suppress(OSError):
            fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _commit(staging: Path, db_dir: Path) -> int:
    """Move the staging database over the real one (workloads first: records refer to them)."""
    workloads, records = _sanitize(staging)
    if not workloads:
        return count_records(db_dir)
    # A final check that TVM can read what is about to become the database.
    check = Path(tempfile.mkdtemp(prefix=".check.", dir=staging))
    try:
        (check / WORKLOAD_FILE).write_text("".join(workloads), encoding="utf-8")
        (check / RECORD_FILE).write_text("".join(records), encoding="utf-8")
        from .tvm.database import open_database

        open_database(check)
    finally:
        shutil.rmtree(check, ignore_errors=True)
    _write_atomic(db_dir / WORKLOAD_FILE, workloads)
    _write_atomic(db_dir / RECORD_FILE, records)
    baselines = read_baselines(db_dir)
    baselines.update(read_baselines(staging))
    if baselines:
        _write_atomic(db_dir / BASELINE_FILE, [json.dumps(baselines, indent=1, sort_keys=True)])
    return len(records)


# ---------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------

def extract_tasks(mod, target) -> list:
    """MetaSchedule tasks of a fused module (the PrimFuncs compile_model applies a DB to)."""
    from tvm.s_tir import meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(mod, target))


def _task_flop(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # noqa: BLE001 - some functions have no countable FLOPs
        return 0.0


def describe_tasks(tasks: Sequence) -> list[TaskInfo]:
    """TaskInfo per task, ordered by FLOP share (biggest first)."""
    flops = [_task_flop(t) * int(t.weight) for t in tasks]
    total = sum(flops) or 1.0
    infos = [TaskInfo(t.task_name, f / max(int(t.weight), 1), int(t.weight), f / total)
             for t, f in zip(tasks, flops)]
    return sorted(infos, key=lambda i: -i.share)


def _is_cached(database, task) -> bool:
    try:
        record = database.query_tuning_record(task.dispatched[0], task.target, "main")
    except Exception:  # noqa: BLE001
        return False
    return record is not None


def _model_file(model: Any, staging: Path) -> str:
    import onnx

    if isinstance(model, (str, os.PathLike)):
        return str(Path(model).resolve())
    from .tvm.importer import load_onnx

    proto, _ = load_onnx(model)
    path = staging / "model.onnx"
    large = proto.ByteSize() > 1_800_000_000
    onnx.save(proto, str(path), save_as_external_data=large)
    return str(path)


def check_rpc_device(rpc_tracker: str, rpc_key: str, *, wait: float = 60.0) -> dict:
    """Ask the tracker whether a device with `rpc_key` is registered (waits up to `wait` s)."""
    from tvm import rpc

    host, port = _parse_tracker(rpc_tracker)
    deadline = time.monotonic() + wait
    last_error = None
    while True:
        try:
            summary = rpc.connect_tracker(host, port).summary()
            queue = summary.get("queue_info", {})
            if rpc_key in queue:
                return dict(queue[rpc_key])
            keys = sorted(queue)
            last_error = f"no device with key {rpc_key!r} (registered keys: {keys or 'none'})"
        except Exception as exc:  # noqa: BLE001 - socket and RPC errors alike
            last_error = f"cannot reach the tracker at {host}:{port} ({exc})"
        if time.monotonic() > deadline:
            raise BackendError(
                f"RPC tuning: {last_error}. Start a tracker (python -m tvm.exec.rpc_tracker "
                f"--host 0.0.0.0 --port {port}) and on the device: python -m tvm.exec.rpc_server "
                f"--tracker {host}:{port} --key {rpc_key}"
            )
        time.sleep(1.0)


def _parse_tracker(rpc_tracker: str) -> tuple[str, int]:
    host, sep, port = rpc_tracker.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputSpecError(f"--rpc-tracker {rpc_tracker!r}: expected HOST:PORT, e.g. 127.0.0.1:9190")
    return host, int(port)


# ---------------------------------------------------------------------------------------
# The public entry point (parent process)
# ---------------------------------------------------------------------------------------

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
    from .tvm.database import database_is_populated, open_database, resolve_tuning_db
    from .tvm.pipeline import prepare_module

    started = time.monotonic()
    if max_trials < 1:
        raise InputSpecError("max_trials must be at least 1")
    if (rpc_tracker is None) != (rpc_key is None):
        raise InputSpecError("--rpc-tracker and --rpc-key go together")
    tvm_target = resolve_target(target)
    if rpc_tracker is None and (not runs_on_this_machine(tvm_target) or is_gpu_target(tvm_target)):
        raise BackendError(
            f"cannot measure {target_key(tvm_target)} code on this machine: tune it on the "
            "device over RPC (--rpc-tracker HOST:PORT --rpc-key KEY), or tune for 'host' and "
            "apply that database on purpose (--tuning-db DIR/<host-key>)"
        )
    if rpc_tracker is not None:
        check_rpc_device(rpc_tracker, rpc_key)
    db_dir = resolve_tuning_db(Path(work_dir).resolve(), tvm_target)
    assert db_dir is not None
    db_dir.mkdir(parents=True, exist_ok=True)
    report = TuningReport(
        target=target if isinstance(target, str) else canonical_json(tvm_target),
        target_key=target_key(tvm_target), db_dir=str(db_dir), max_trials=max_trials,
        max_seconds=max_seconds, rpc=f"{rpc_key}@{rpc_tracker}" if rpc_tracker else None,
    )

    prepared = prepare_module(model, tvm_target, input_shapes=input_shapes)
    tasks = extract_tasks(prepared.mod, tvm_target)
    infos = describe_tasks(tasks)
    report.tasks = infos
    report.records_before = count_records(db_dir)
    cached: set[str] = set()
    if database_is_populated(db_dir) and not retune:
        database = open_database(db_dir)
        cached = {t.task_name for t in tasks if _is_cached(database, t)}
    todo = []
    for info in infos:
        if info.name in cached:
            info.status = "cached"
        elif info.share < min_flop_share:
            info.status = "skipped (small)"
        else:
            todo.append(info.name)
    report.setup_seconds = round(time.monotonic() - started, 2)
    if not todo:
        report.reused = bool(cached)
        report.stopped_by = "nothing to tune: the database covers every task" if cached \
            else "nothing to tune: no task above the FLOP threshold"
        report.records_after = report.records_before
        report.seconds = round(time.monotonic() - started, 2)
        return report

    if max_seconds and time.monotonic() - started >= max_seconds:
        report.stopped_by = "seconds (the budget went on preparing the model)"
        report.records_after = report.records_before
        report.seconds = round(time.monotonic() - started, 2)
        return report

    with db_lock(db_dir):
        _remove_stale_staging(db_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=db_dir))
        try:
            # the schedule configs too: the worker times the default schedule with them
            for name in (WORKLOAD_FILE, RECORD_FILE, BASELINE_FILE, CONFIG_FILE):
                if (db_dir / name).is_file():
                    shutil.copyfile(db_dir / name, staging / name)
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
            (staging / "spec.json").write_text(json.dumps(spec, default=str), encoding="utf-8")
            outcome = _run_worker(staging, spec, infos, report, started, max_seconds, progress,
                                  console)
            report.records_after = _commit(staging, db_dir)
            logs = staging / "logs"
            if logs.is_dir():
                shutil.rmtree(db_dir / "logs", ignore_errors=True)
                os.replace(logs, db_dir / "logs")
            worker_log = staging / "worker.log"
            if worker_log.is_file():
                os.replace(worker_log, db_dir / "worker.log")
                report.log = str(db_dir / "worker.log")
            report.stopped_by = outcome
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    for info in infos:
        if info.name in todo:
            info.status = "tuned" if info.best_us is not None else \
                ("failed" if info.trials else "untuned")
            if info.best_us is not None and info.default_us is not None \
                    and info.default_us <= info.best_us:
                info.status = "tuned (default schedule faster, kept)"
    report.seconds = round(time.monotonic() - started, 2)
    return report


def _remove_stale_staging(db_dir: Path) -> None:
    """Staging folders left by a tuner that was killed (its pid is gone)."""
    for folder in db_dir.glob(".staging-*"):
        try:
            pid = int(folder.name.split("-")[1])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            alive = pid != os.getpid()
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if not alive:
            shutil.rmtree(folder, ignore_errors=True)


def _run_worker(staging: Path, spec: dict, infos: list[TaskInfo], report: TuningReport,
                started: float, max_seconds: float | None, progress: bool, console) -> str:
    """Start the worker, follow its progress file, enforce the hard deadline."""
    events_path = staging / "progress.jsonl"
    log = open(staging / "worker.log", "w")  # noqa: SIM115 - closed below
    env = dict(os.environ)
    env.setdefault("TVM_NUM_THREADS", str(physical_cores()))
    cmd = [sys.executable, "-m", "onnxforge.backends.tuning", str(staging / "spec.json")]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    info_by_name = {i.name: i for i in infos}
    hard_deadline = None
    if max_seconds:
        grace = max(15.0, 0.1 * max_seconds)
        hard_deadline = started + max_seconds + grace
    outcome = None
    offset = 0
    display = _Display(progress, console, spec["max_trials"], max_seconds, report.target_key)
    try:
        with display:
            while True:
                finished = proc.poll() is not None
                if events_path.is_file():
                    with open(events_path, encoding="utf-8") as handle:
                        handle.seek(offset)
                        chunk = handle.read()
                    complete = chunk[: chunk.rfind("\n") + 1]
                    offset += len(complete.encode("utf-8"))
                    for line in complete.splitlines():
                        event = json.loads(line)
                        outcome = _apply_event(event, info_by_name, report, display) or outcome
                if finished:
                    break
                if hard_deadline and time.monotonic() > hard_deadline:
                    _kill_group(proc)
                    outcome = "seconds (worker stopped at the deadline)"
                    break
                display.tick(time.monotonic() - started)
                time.sleep(0.5)
    except KeyboardInterrupt:
        _kill_group(proc)
        outcome = "interrupted"
    finally:
        # Also after a normal exit: builder/runner pool processes must not outlive the run.
        _kill_group(proc)
        log.close()
    if outcome is None:
        tail = (staging / "worker.log").read_text(errors="replace").strip().splitlines()[-15:]
        outcome = f"crash (exit code {proc.returncode})"
        report.errors.append("tuning worker died: " + " | ".join(tail))
        logger.warning("tuning worker exited with %s; measured records are kept", proc.returncode)
    return outcome


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the worker and everything it started (it leads its own process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def _apply_event(event: dict, infos: dict[str, TaskInfo], report: TuningReport,
                 display: _Display) -> str | None:
    kind = event.get("event")
    if kind == "round":
        info = infos.get(event["task"])
        if info is not None:
            info.trials = event["task_trials"]
            if event.get("best_us") is not None:
                info.best_us = event["best_us"]
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


# ---------------------------------------------------------------------------------------
# The worker process
# ---------------------------------------------------------------------------------------

def _emit(path: Path, event: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(event) + "\n")
        handle.flush()


def _make_components(state: dict):
    """MetaSchedule pieces defined here so they can subclass TVM's Python bases lazily."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class ReusingLocalBuilder(PyBuilder):
        """LocalBuilder whose worker processes live for the whole run (one TVM import each)."""

        def __init__(self, max_workers: int, timeout_sec: float, f_build=None, f_export=None):
            super().__init__()
            self.timeout_sec = timeout_sec
            self.f_build = f_build
            self.f_export = f_export
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                          maximum_process_uses=256)
            # Start the workers now: their TVM import overlaps the first search round.
            for _ in range(max_workers):
                self.pool.submit(_warm_worker)

        def build(self, build_inputs):
            results = []
            jobs = [(self.f_build, self.f_export, b.mod, b.target,
                     lb._serialize_params(b.params))
                    for b in build_inputs]
            for item in self.pool.map_with_error_catching(lambda x: lb._worker_func(*x), jobs):
                if item.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(item.value, None))
                elif item.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(
                        None, f"LocalBuilder: Timeout, killed after {self.timeout_sec} seconds"))
                else:
                    results.append(BuilderResult(None, f"LocalBuilder: {item.value}"))
            return results

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        """Records per-task best latency for the scheduler and reports each round."""

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            name = state["names"][task_id]
            best = state["best_us"].get(name)
            errors = []
            for built, ran in zip(builder_results, runner_results):
                if built.error_msg:
                    errors.append(built.error_msg.strip().splitlines()[0][:200])
                    continue
                if ran.error_msg or not ran.run_secs:
                    errors.append((ran.error_msg or "no timing").strip().splitlines()[0][:200])
                    continue
                secs = sorted(float(s) for s in ran.run_secs)
                us = secs[len(secs) // 2] * 1e6
                best = us if best is None else min(best, us)
            state["best_us"][name] = best
            state["trials"][name] = state["trials"].get(name, 0) + len(runner_results)
            state["total_trials"] += len(runner_results)
            _emit(state["events"], {
                "event": "round", "task": name, "task_trials": state["trials"][name],
                "best_us": best, "total_trials": state["total_trials"],
                "errors": errors[:3] if len(errors) == len(runner_results) else [],
                "elapsed": time.time() - state["t0"],
            })
            state["rounds"] = state.get("rounds", 0) + 1
            _inject_fault(state)

    @derived_object
    class BudgetScheduler(PyTaskScheduler):
        """FLOP-share order first, then the task costing most; stops at the deadline."""

        def __init__(self, order: list[int], deadline: float | None):
            super().__init__()
            self.order = order
            self.deadline = deadline
            self.rounds: list[float] = []
            self.dispatched_at: float | None = None
            self.started: set[int] = set()

        def next_task_id(self) -> int:
            sched = self._outer()
            for i, task in enumerate(sched.tasks_):
                if not task.is_terminated and task.measure_candidates is not None:
                    sched.join_running_task(i)
            now = time.time()
            if self.dispatched_at is not None:
                self.rounds.append(now - self.dispatched_at)
                self.dispatched_at = None
            alive = [i for i in self.order if not sched.tasks_[i].is_terminated]
            if not alive:
                state["stopped_by"] = "all tasks done"
                return -1
            if self.deadline is not None:
                typical = sorted(self.rounds)[len(self.rounds) // 2] if self.rounds else 0.0
                if now + 0.5 * typical >= self.deadline:
                    state["stopped_by"] = "seconds"
                    return -1
            fresh = [i for i in alive if i not in self.started]
            if fresh:
                choice = fresh[0]
            else:
                def cost(i: int) -> float:
                    best = state["best_us"].get(state["names"][i])
                    weight = float(sched.tasks_[i].task_weight)
                    return (best if best is not None else 0.0) * weight
                choice = max(alive, key=cost)
            self.started.add(choice)
            self.dispatched_at = time.time()
            return choice

    return ReusingLocalBuilder, ProgressCallback, BudgetScheduler, ms


def _inject_fault(state: dict) -> None:
    """Test hook: ONNXFORGE_TUNE_FAULT=crash-after:N tears a record line and dies (SIGKILL)
    after N rounds, the way a segfault in the database writer would."""
    fault = os.environ.get("ONNXFORGE_TUNE_FAULT", "")
    if fault.startswith("crash-after:") and state["rounds"] >= int(fault.split(":", 1)[1]):
        with open(state["work_dir"] / RECORD_FILE, "a", encoding="utf-8") as handle:
            handle.write('[0,[[[["GetSBlock",[],["torn')
        os.kill(os.getpid(), signal.SIGKILL)


def _warm_worker() -> bool:
    import tvm.s_tir.meta_schedule  # noqa: F401 - the import is the point

    return True


def _build(mod, target, _params):
    """MetaSchedule's default_build without `import tvm.s_tir.tensor_intrin`.

    That import parses every CUDA tensor-core intrinsic (23 s of CPU here, minutes on a
    loaded machine) in each builder process; a scheduled module does not need them.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _load_cpu_tensor_intrinsics(arch: str) -> None:
    """Register only the CPU tensor intrinsics (x86 VNNI/AMX, ARM dot product).

    `TuneContext` imports the whole `tvm.s_tir.tensor_intrin` package, whose CUDA part
    dominates the setup time. For CPU targets the package is pre-registered as an empty
    namespace and only the CPU modules are imported; GPU targets import everything.
    """
    import importlib
    import importlib.util
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = name
    sys.modules[name] = package
    modules = ["x86"] if arch == "x86_64" else ["arm_cpu"] if arch == "aarch64" else ["x86", "arm_cpu"]
    for module in modules:
        try:
            setattr(package, module, importlib.import_module(f"{name}.{module}"))
        except Exception as exc:  # noqa: BLE001 - fall back to the full import
            logger.debug("tensor intrinsics %s: %s", module, exc)
            del sys.modules[name]
            importlib.import_module(name)
            return


def _watch_parent(parent: int) -> None:
    """Kill this worker's process group when the tuning parent disappears."""
    import threading

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                os._exit(1)
            time.sleep(2)

    threading.Thread(target=watch, daemon=True).start()


def _cross_export_aarch64(mod) -> str:
    """Builder export for AArch64 boards over RPC: a .so linked by the cross compiler."""
    from .tvm.aarch64 import aarch64_compiler

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, cc=aarch64_compiler())
    return path


def _search_strategy(per_iter: int):
    from tvm.s_tir import meta_schedule as ms

    population = int(min(512, max(64, 4 * per_iter)))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population,
        init_min_unmeasured=min(50, population // 2),
        genetic_num_iters=3 if population <= 128 else 4,
    )


def _weight_params(relax_mod) -> dict[str, Any]:
    """{PrimFunc name: its `layout_free_buffers` (weight parameters)} as compile marks them.

    The default CPU rules pack weights at compile time only for parameters marked this way;
    timing a task without the mark would time a slower, unpacked schedule.
    """
    import tvm

    try:
        from ..kernels.schedule_pass import attach_layout_free_buffers
    except Exception:  # noqa: BLE001 - older kernels: time the unmarked schedule
        return {}
    copy = tvm.IRModule(dict(relax_mod.functions_items()), attrs=relax_mod.attrs)
    marked = attach_layout_free_buffers(copy)
    return {gv.name_hint: f.attrs["layout_free_buffers"] for gv, f in marked.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "layout_free_buffers" in f.attrs}


def _measure_default_schedules(tasks, relax_mod, target, builder, runner, database,
                               work_dir: Path, events: Path) -> None:
    """Time each task under onnxforge's default CPU schedule with the tuner's own builder and
    runner, so that compile_model can keep it where tuning found nothing faster. The
    schedule uses the knob settings compile_model would apply (``schedule_configs_for``:
    the shipped database, then ``work_dir/schedule_configs.json``).

    Weights are packed ahead of time in the compiled model, so the packing blocks are
    removed before timing (the builder's RemoveWeightLayoutRewriteBlock, as for tuned
    candidates) and the runner feeds arguments in the packed layout."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from .tvm.schedules import default_cpu_schedule_pass, schedule_configs_for

    # the knob settings compile_model would use: the shipped database for the target's
    # class and the measured ones (`schedule_configs.json`, copied into `work_dir`)
    configs, sources = schedule_configs_for(target, work_dir, shipped=True)
    if configs:
        logger.info("default-schedule baseline with %d schedule config(s) from %s",
                    len(configs), ", ".join(sources))
    schedule_pass, why_not = default_cpu_schedule_pass(target, configs)
    if schedule_pass is None:
        logger.info("no default-schedule baseline: %s", why_not)
        return
    import tvm

    weights = _weight_params(relax_mod)
    items = []
    configured: dict[str, dict] = {}
    for task in tasks:
        mod = task.dispatched[0]
        # a copy: the pass may update the module it is given in place, and `mod` is the very
        # module the tuning context searches
        functions = dict(mod.functions_items())
        if task.task_name in weights and len(functions) == 1:
            (gvar, func), = functions.items()
            functions = {gvar: func.with_attr("layout_free_buffers", weights[task.task_name])}
        try:
            scheduled = schedule_pass(tvm.IRModule(functions, attrs=mod.attrs))
        except Exception as exc:  # noqa: BLE001 - no baseline for this task
            logger.info("default schedule failed on %s: %s", task.task_name, exc)
            continue
        funcs = [f for _, f in scheduled.functions_items()]
        if len(funcs) != 1 or not (funcs[0].attrs and funcs[0].attrs.get("tirx.is_scheduled")):
            continue
        items.append((task, mod, scheduled))
        setting = funcs[0].attrs.get(CONFIG_ATTR)
        if setting is not None:  # the knob setting timed (None: the rule's heuristic)
            configured[task.task_name] = json.loads(str(setting))
    if not items:
        return
    built = builder.build([BuilderInput(s, target) for _, _, s in items])
    measured, inputs = [], []
    for (task, mod, scheduled), result in zip(items, built):
        if result.error_msg or not result.artifact_path:
            logger.warning("default schedule of %s did not build: %s", task.task_name,
                           (result.error_msg or "").strip()[:500])
            continue
        measured.append((task, mod, result.artifact_path))
        device = "cpu" if target.kind.name == "llvm" else target.kind.name
        inputs.append(RunnerInput(result.artifact_path, device,
                                  ArgInfo.from_entry_func(scheduled, remove_preproc=True)))
    baselines = read_baselines(work_dir)
    for (task, mod, path), future in zip(measured, runner.run(inputs)):
        result = future.result()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        if result.error_msg or not result.run_secs:
            logger.warning("default schedule of %s did not run: %s", task.task_name,
                           (result.error_msg or "no timing").strip()[:500])
            continue
        secs = [float(x) for x in result.run_secs]
        us = sum(secs) / len(secs) * 1e6
        shash = database.commit_workload(mod).as_json()[0]
        baselines[str(shash)] = {"us": us, "task": task.task_name,
                                 "config": configured.get(task.task_name)}
        _emit(events, {"event": "baseline", "task": task.task_name, "us": us})
    _write_atomic(work_dir / BASELINE_FILE, [json.dumps(baselines, indent=1, sort_keys=True)])


def worker_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec.get("parent_pid"):
        _watch_parent(int(spec["parent_pid"]))
    work_dir = Path(spec["work_dir"])
    events = work_dir / "progress.jsonl"
    t0 = time.time()
    state: dict[str, Any] = {"names": [], "best_us": {}, "trials": {}, "total_trials": 0,
                             "events": events, "t0": t0, "stopped_by": "trials",
                             "work_dir": work_dir}
    try:
        import tvm

        from .tvm.pipeline import prepare_module

        target = tvm.target.Target(spec["target"])
        gpu = is_gpu_target(target)
        if not gpu:
            _load_cpu_tensor_intrinsics(target_arch(target))
        prepared = prepare_module(spec["model"], target, input_shapes=spec["input_shapes"])
        wanted = set(spec["tasks"])
        tasks = [t for t in extract_tasks(prepared.mod, target) if t.task_name in wanted]
        infos = {i.name: i for i in describe_tasks(tasks)}
        tasks.sort(key=lambda t: -infos[t.task_name].share)
        ReusingLocalBuilder, ProgressCallback, BudgetScheduler, ms = _make_components(state)

        n_tasks = len(tasks)
        max_trials = int(spec["max_trials"])
        per_task = max(1, math.ceil(max_trials / n_tasks))
        per_iter = int(min(64, per_task))
        if spec.get("max_seconds"):
            # finer rounds under a short wall-clock budget: the deadline is checked per round
            per_iter = int(min(per_iter, max(8, spec["max_seconds"] / 10)))
        contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
            tasks, str(work_dir), strategy=_search_strategy(per_iter),
            num_threads=physical_cores(), seed=0)
        state["names"] = [c.task_name for c in contexts]
        cores = physical_cores()
        f_export = None
        if spec["rpc_tracker"] and target_arch(target) == "aarch64" and \
                target_arch(tvm.target.Target({"kind": "llvm"})) != "aarch64":
            f_export = _cross_export_aarch64
        builder = ReusingLocalBuilder(max_workers=cores, timeout_sec=spec["builder_timeout"],
                                      f_build=None if gpu else _build, f_export=f_export)
        evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                              enable_cpu_cache_flush=False)
        if spec["rpc_tracker"]:
            host, port = _parse_tracker(spec["rpc_tracker"])
            runner = ms.runner.RPCRunner(
                rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                               tracker_key=spec["rpc_key"],
                                               session_timeout_sec=int(spec["runner_timeout"])),
                evaluator_config=evaluator, max_workers=1)
        else:
            runner = ms.runner.LocalRunner(timeout_sec=spec["runner_timeout"],
                                           evaluator_config=evaluator)
        database = ms.database.JSONDatabase(
            path_workload=str(work_dir / WORKLOAD_FILE),
            path_tuning_record=str(work_dir / RECORD_FILE), allow_missing=True)
        if not gpu:
            _measure_default_schedules(tasks, prepared.mod, target, builder, runner, database,
                                       work_dir, events)
        order = list(range(len(contexts)))
        scheduler = BudgetScheduler(order, spec["deadline_unix"])
        _emit(events, {"event": "start", "tasks": state["names"], "per_task": per_task,
                       "per_iter": per_iter, "setup_s": time.time() - t0})
        ms.tune_tasks(
            tasks=contexts, task_weights=weights, work_dir=str(work_dir),
            max_trials_global=max_trials, max_trials_per_task=per_task,
            num_trials_per_iter=per_iter, builder=builder, runner=runner, database=database,
            measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                               ProgressCallback()],
            task_scheduler=scheduler,
        )
        stopped = state["stopped_by"]
        if stopped == "all tasks done" and state["total_trials"] >= max_trials:
            stopped = "trials"
        _emit(events, {"event": "done", "stopped_by": stopped,
                       "total_trials": state["total_trials"], "seconds": time.time() - t0})
        builder.pool.shutdown()
        return 0
    except Exception as exc:
        _emit(events, {"event": "error", "message": f"{type(exc).__name__}: {exc}"})
        raise


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
