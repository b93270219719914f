"""The tuning database on disk: where it lives for a target, its files, and applying
it to a fused module (keeping the default schedule where the tuner measured it faster).

A database folder holds MetaSchedule's two JSON-lines files, the default-schedule
latencies the tuner measured (`BASELINE_FILE`) and the measured knob settings of the
default rules (`schedule_configs.json`, format in `kernels.schedule_configs`).

A tuning run writes into a staging copy of the folder (`staging_copy`) and moves what it
measured over the database at the end (`commit_staging`), under a lock (`db_lock`): a
crash or kill never leaves a half-written database."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ... import safe_write
from ...errors import BackendError
from ...kernels.schedule_configs import CONFIG_FILE, configs_document
from ..targets import target_key
from .schedules import is_scheduled

logger = logging.getLogger(__name__)


WORKLOAD_FILE = "database_workload.json"
RECORD_FILE = "database_tuning_record.json"
# default-schedule latency per task, measured by the tuner (see `apply_database`)
BASELINE_FILE = "default_schedules.json"


def resolve_tuning_db(tuning_db: str | os.PathLike | None, target) -> Path | None:
    """The database folder for `target` under `tuning_db`.

    `tuning_db/<target-key>/` (what `tune` writes), or `tuning_db` itself when it is a plain
    MetaSchedule work dir (holding database_workload.json): that is how a database tuned
    for one target is applied to another on purpose.
    """
    if tuning_db is None:
        return None
    root = Path(tuning_db)
    if (root / WORKLOAD_FILE).is_file():
        return root
    return root / target_key(target)


def open_database(db_dir: Path):
    """A JSONDatabase over `db_dir` (files must exist)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(
        path_workload=str(db_dir / WORKLOAD_FILE),
        path_tuning_record=str(db_dir / RECORD_FILE),
        allow_missing=False,
    )


def apply_database(mod, database, target, baselines: Mapping[str, dict] | None = None):
    """MetaScheduleApplyDatabase, function by function, keeping the default schedule where
    the tuner measured it faster than the best tuning record (`baselines`).

    Returns (module, names scheduled from the database, names left to the default rules).
    Same lookup as TVM's pass: normalize each PrimFunc, take the database's best record,
    replay its trace, keep the function's attributes and mark it scheduled.
    """
    import tvm

    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")
    baselines = baselines or {}
    applied: set[str] = set()
    kept: set[str] = set()
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tvm.tirx.PrimFunc) or is_scheduled(func):
            continue
        tir_mod = normalize(func)
        record = database.query_tuning_record(tir_mod, target, gvar.name_hint)
        if record is None:
            continue
        baseline = baselines.get(str(record.workload.as_json()[0]))
        if baseline is not None and record.run_secs:
            secs = [float(x) for x in record.run_secs]
            if baseline["us"] <= sum(secs) / len(secs) * 1e6:
                kept.add(gvar.name_hint)
                continue
        sch = database.query_schedule(tir_mod, target, gvar.name_hint)
        if sch is None:
            continue
        (_, new), = sch.mod.functions_items()
        if func.attrs is not None:
            for key, value in func.attrs.items():
                new = new.with_attr(key, value)
        updates[gvar] = new.with_attr("tirx.is_scheduled", True)
        applied.add(gvar.name_hint)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod, applied, kept


def database_is_populated(db_dir: Path | None) -> bool:
    if db_dir is None:
        return False
    records = db_dir / RECORD_FILE
    return records.is_file() and records.stat().st_size > 0


def read_baselines(db_dir: Path | None) -> dict[str, dict]:
    """{workload hash: {"us": default-schedule latency, "task": name, "config": the knob
    setting it was timed with (None: the rule's heuristic)}} (empty if none)."""
    if db_dir is None or not (db_dir / BASELINE_FILE).is_file():
        return {}
    try:
        data = json.loads((db_dir / BASELINE_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def save_configs(db_dir: Path, entries: Mapping[str, dict], target_cls: str | None,
                 provenance: Mapping | None = None) -> Path:
    """Write `db_dir/schedule_configs.json` (`kernels.schedule_configs.configs_document`)
    atomically: a crash never leaves half a file."""
    path = Path(db_dir) / CONFIG_FILE
    safe_write.write_json(path, configs_document(entries, target_cls, provenance),
                          label="schedule configs")
    return path


def write_baselines(db_dir: Path, baselines: Mapping[str, dict]) -> None:
    """Write `BASELINE_FILE` (the format `read_baselines` reads) atomically."""
    _write_atomic(db_dir / BASELINE_FILE, [json.dumps(baselines, indent=1, sort_keys=True)])


# ---------------------------------------------------------------------------------------
# Writing the database: a staging copy, committed under a lock
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


def staging_copy(db_dir: Path) -> Path:
    """A new staging folder inside `db_dir` holding a copy of the database's files (the
    schedule configs too: the tuner times the default schedule with them). Call it under
    `db_lock`; staging folders a killed tuner left behind are removed first."""
    _remove_stale_staging(db_dir)
    staging = Path(tempfile.mkdtemp(prefix=f".staging-{os.getpid()}-", dir=db_dir))
    for name in (WORKLOAD_FILE, RECORD_FILE, BASELINE_FILE, CONFIG_FILE):
        if (db_dir / name).is_file():
            shutil.copyfile(db_dir / name, staging / name)
    return staging


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


def commit_staging(staging: Path, db_dir: Path) -> int:
    """Move the staging database over the real one (workloads first: records refer to
    them): the files are cut back to their last whole record and checked by loading them.
    Returns the number of records the database now holds."""
    workloads, records = _sanitize(staging)
    if not workloads:
        return count_records(db_dir)
    # A final check that TVM can read what is about to become the database.
    check = Path(tempfile.mkdtemp(prefix=".check.", dir=staging))
    try:
        (check / WORKLOAD_FILE).write_text("".join(workloads), encoding="utf-8")
        (check / RECORD_FILE).write_text("".join(records), encoding="utf-8")
        open_database(check)
    finally:
        shutil.rmtree(check, ignore_errors=True)
    _write_atomic(db_dir / WORKLOAD_FILE, workloads)
    _write_atomic(db_dir / RECORD_FILE, records)
    baselines = read_baselines(db_dir)
    baselines.update(read_baselines(staging))
    if baselines:
        write_baselines(db_dir, baselines)
    return len(records)
