"""Which PrimFunc is scheduled by what: the default CPU rules with their measured knob
settings, a tuning database, or nothing yet."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def prim_funcs(mod) -> dict[str, Any]:
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def is_scheduled(func) -> bool:
    attrs = func.attrs
    if attrs is None:
        return False
    return any(k in attrs and bool(attrs[k]) for k in ("tirx.is_scheduled", "tir.is_scheduled"))


def count_configured(mod) -> int:
    """PrimFuncs scheduled with a measured knob setting (schedule config database)."""
    from ...kernels.schedule_configs import CONFIG_ATTR

    return sum(1 for f in prim_funcs(mod).values()
               if f.attrs is not None and CONFIG_ATTR in f.attrs)


def scheduled_names(mod) -> set[str]:
    return {name for name, f in prim_funcs(mod).items() if is_scheduled(f)}


def default_cpu_schedule_pass(target, configs: Mapping[str, dict] | None = None):
    """(pass, None) from `onnxforge.kernels`, or (None, why it is unavailable)."""
    try:
        from ...kernels import default_schedule_pass
    except Exception as exc:  # noqa: BLE001 - a half-written kernels module must not break us
        return None, f"onnxforge.kernels.default_schedule_pass is not available ({exc})"
    try:
        return default_schedule_pass(target, configs), None
    except Exception as exc:  # noqa: BLE001
        return None, f"onnxforge.kernels.default_schedule_pass({target.kind.name}) failed: {exc}"


def schedule_configs_for(target, db_dir: Path | None, shipped: bool) -> tuple[dict, list[str]]:
    """Measured knob settings for the default CPU rules: the database shipped with
    onnxforge for the target's class (when `shipped`), then the user's `db_dir`, whose
    entries win. Returns (entries by workload key, the folders they came from)."""
    from ...kernels.schedule_configs import load_configs, shipped_db_dir

    configs: dict[str, dict] = {}
    sources: list[str] = []
    for folder in ((shipped_db_dir(target) if shipped else None), db_dir):
        found = load_configs(folder)
        if found:
            configs.update(found)
            sources.append(str(folder))
    return configs, sources
