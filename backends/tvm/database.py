"""The tuning database on disk: where it lives for a target, its files, and applying
it to a fused module (keeping the default schedule where the tuner measured it faster).

A database folder holds MetaSchedule's two JSON-lines files, the default-schedule
latencies the tuner measured (`BASELINE_FILE`) and the measured knob settings of the
default rules (`schedule_configs.json`, format in `kernels.schedule_configs`)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from ... import safe_write
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
