"""Schedule config databases: which knob setting of a default rule is fastest per kernel.

The default CPU rules pick their knobs (register tile, row width) by a heuristic.
``config_search`` times the other settings on the machine and keeps, per kernel, the one
that beat the heuristic; this module says how those findings are stored
(``configs_document``; ``backends.tvm.database.save_configs`` writes the file, with
onnxforge's one atomic writer) and looks them up at compile time (like TVM's old TopHub
did for AutoTVM templates). It imports nothing from onnxforge outside ``kernels``.

File: ``<db dir>/schedule_configs.json``, the same folder MetaSchedule's
``database_*.json`` live in (``tune`` writes both)::

    {"format": 1, "tvm": "0.27.0", "target_class": "x86_64-avx512",
     "entries": {"<workload key>": {"rule": "conv2d-nchw-tiled",
                                    "config": {"nb": 16, "mb": 7, "n_padded": 64},
                                    "us": 41.0, "default_us": 55.2,
                                    "task": "fused_conv2d3_add5", "model": "mobilenet_v2"}}}

The workload key is the structural hash of the normalized, unscheduled PrimFunc (shapes,
dtypes, fused epilogue and which parameters are weights), so an entry applies to every
model that contains the same kernel. A file written by another TVM version is ignored:
its hashes would not match anyway.

Shipped database: ``onnxforge/kernels/tuning_db/<target class>/`` (``tools/
build_tuning_db.py`` regenerates it). ``compile_model`` uses it automatically when the
target's class (architecture and SIMD width, ``target_class``) matches.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG_FILE = "schedule_configs.json"
FORMAT = 1
SHIPPED_ROOT = Path(__file__).resolve().parent / "tuning_db"
CONFIG_ATTR = "onnxforge.schedule_config"


def tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def _same_release(a: str, b: str) -> bool:
    """Same major.minor: structural hashes are stable within a TVM release line."""
    return a.split(".")[:2] == b.split(".")[:2]


def workload_key(func) -> str:
    """Hex structural hash of an unscheduled PrimFunc, normalized as MetaSchedule does."""
    import tvm
    import tvm_ffi

    normalize = tvm.get_global_func("tvm.s_tir.meta_schedule.normalize_mod")
    return f"{tvm_ffi.structural_hash(normalize(func)) & (2**64 - 1):016x}"


def target_class(target) -> str | None:
    """The class of CPU a config database is valid for: ``x86_64-avx512``,
    ``x86_64-avx2``, ``aarch64-neon`` ...; None for non-CPU targets.

    Knob settings depend on the ISA's vector width and register count, not on the exact
    CPU model or core count, so that is what a shipped database is matched on.
    """
    from .cpu_target import cpu_info

    if target.kind.name != "llvm":
        return None
    info = cpu_info(target)
    if info.arch in ("x86_64", "x86"):
        isa = {512: "avx512", 256: "avx2"}.get(info.vector_bits, "sse")
    elif info.arch == "aarch64":
        isa = "neon" if info.vector_bits == 128 else f"sve{info.vector_bits}"
    else:
        isa = f"v{info.vector_bits}"
    return f"{info.arch}-{isa}"


def shipped_db_dir(target) -> Path | None:
    """The database shipped with onnxforge for ``target``'s class, if there is one."""
    cls = target_class(target)
    if cls is None:
        return None
    path = SHIPPED_ROOT / cls
    return path if (path / CONFIG_FILE).is_file() else None


def load_configs(db_dir: Path | None) -> dict[str, dict]:
    """The entries of ``db_dir/schedule_configs.json`` ({} when absent or for another TVM)."""
    if db_dir is None:
        return {}
    path = Path(db_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        logger.warning("schedule config database %s is unreadable, ignored: %s", path, exc)
        return {}
    if data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        logger.warning("schedule config database %s has an unknown format, ignored", path)
        return {}
    if not _same_release(str(data.get("tvm", "")), tvm_version()):
        logger.warning("schedule config database %s was written by TVM %s (this is %s), "
                       "ignored", path, data.get("tvm"), tvm_version())
        return {}
    # "config": null records a kernel where the heuristic setting measured fastest
    return {k: v for k, v in data["entries"].items()
            if isinstance(v, dict) and "rule" in v
            and (v.get("config") is None or isinstance(v.get("config"), dict))}


def configs_document(entries: Mapping[str, dict], target_cls: str | None,
                     provenance: Mapping | None = None) -> dict:
    """The content of ``schedule_configs.json`` for ``entries`` (sorted, so that diffs of a
    shipped one are small)."""
    return {"format": FORMAT, "tvm": tvm_version(), "target_class": target_cls,
            "provenance": dict(provenance or {}),
            "entries": {k: dict(entries[k]) for k in sorted(entries)}}
