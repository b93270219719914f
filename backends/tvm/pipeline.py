"""The TVM compile pipeline, top to bottom: named lists of passes, `prepare_module`
(import + prepare + legalize/fuse, shared with the tuner) and `compile_model`.

The compile pipeline is a few short, named lists of passes, in the spirit of TVM's
`relax/backend/cpu_generic/pipeline.py`:

  import     `importer.import_onnx`: `tvm.relax.frontend.onnx.from_onnx` with fixed shapes;
             CPU: `qdq.integer_contractions` makes quantized conv/matmul integer,
             `sparse.sparse_contractions` block-sparse matmuls/convs BSR (below break-even)
  prepare    DispatchSampling, DispatchSortScan, (CPU: `onnxforge.kernels.
             relax_prepasses`, which fold BatchNorm into convs), DecomposeOpsForInference
  legalize   LegalizeOps, AnnotateTIROpPattern, PresetOpPattern, FoldConstant, FuseOps, FuseTIR
  schedule   MetaScheduleApplyDatabase (if a tuning database is given;
             `database.apply_database` keeps the default schedule where the tuner
             measured it faster), then CPU: `onnxforge.kernels.default_schedule_pass(
             target, configs)` for the rest, with the knob settings measured per kernel
             (`schedules.schedule_configs_for`: the database shipped for the target's CPU
             class, then the user's), GPU: dlight's default GPU rules
  lower      the target's dataflow-lowering and finalize passes, then `tvm.compile`

`prepare_module` (import + prepare + legalize) is shared with the tuner, so tuning tasks
and the functions the database is applied to are the same PrimFuncs (the database is
applied after fusion; applying it to a module from the importer finds nothing).
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...errors import (
    BackendError,
)
from ...kernels.int8_intrin import intrinsic_for
from ...kernels.schedule_configs import target_class
from ...kernels.sparse_matmul import break_even
from ...kernels.vector_rounding import vectorizable_rounding
from ..targets import (
    plain_target_dict,
    preset_name,
    resolve_target,
    target_key,
)
from .artifact import TVMArtifact
from .conv_transpose import conv_transpose_as_conv
from .database import (
    apply_database,
    database_is_populated,
    open_database,
    read_baselines,
    resolve_tuning_db,
)
from .importer import InputSpec, import_onnx, input_specs, load_onnx
from .layout import channels_last
from .lookup_tables import lookup_tables
from .qdq import IntegerReport, integer_contractions
from .schedules import (
    count_configured,
    default_cpu_schedule_pass,
    prim_funcs,
    schedule_configs_for,
    scheduled_names,
)
from .sparse import sparse_contractions

logger = logging.getLogger(__name__)

# Targets whose quantized conv/matmul run as integer kernels (`qdq.integer_contractions`);
# GPU targets keep QDQ as float fake-quantization.
INTEGER_TARGET_KINDS = ("llvm", "hexagon")


def prepare_passes(target) -> list:
    """Relax rewrites before legalization: decompositions + the kernels' prepasses."""
    from tvm import relax

    passes = [
        # Sampling/sort/scan ops (TopK, ...) have no legalization of their own; TVM's
        # own pipelines dispatch them first too.
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
    ]
    if target.kind.name == "llvm":
        # They fold BatchNorm into the conv weights and then run DecomposeOpsForInference
        # themselves: decomposing first would leave a multiply-add per element instead.
        try:
            from ...kernels import relax_prepasses

            return passes + list(relax_prepasses(target))
        except (ImportError, AttributeError):
            pass
    return passes + [relax.transform.DecomposeOpsForInference()]


def legalize_passes(target) -> list:
    """Relax ops -> TIR PrimFuncs, fused; these PrimFuncs are the tuning tasks."""
    from tvm import relax

    from ...kernels import legalize_and_fuse_passes

    return [*legalize_and_fuse_passes(), relax.transform.DeadCodeElimination()]


def gpu_schedule_passes(target) -> list:
    """dlight's default GPU schedules (Adreno: its own conv/pool rules first)."""
    from tvm.s_tir import dlight as dl

    passes = []
    if "adreno" in target.keys:
        passes.append(dl.ApplyDefaultSchedule(
            dl.adreno.Conv2d(), dl.adreno.LayoutTransform(), dl.adreno.Pool2D()))
        passes.append(dl.ApplyDefaultSchedule(
            dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()))
    else:
        passes.append(dl.ApplyDefaultSchedule(
            dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(),
            dl.gpu.Fallback()))
    return passes


def _backend_pipeline_module(target):
    name = target.kind.name
    if name == "llvm":
        module = "cpu_generic"
    elif name == "cuda":
        module = "cuda"
    elif name == "opencl" and "adreno" in target.keys:
        module = "adreno"
    else:
        module = "gpu_generic"
    return importlib.import_module(f"tvm.relax.backend.{module}.pipeline")


def lower_passes(target) -> list:
    """The target's dataflow-lowering and finalize passes (memory planning, VM lowering)."""
    pipeline = _backend_pipeline_module(target)
    return list(pipeline.dataflow_lower_passes(target)) + list(pipeline.finalize_passes(target))


def pass_names(passes: Sequence) -> list[str]:
    return [p.info.name for p in passes]


def sequential(passes: Sequence):
    import tvm

    return tvm.transform.Sequential(list(passes))


@dataclass
class PreparedModule:
    """The fused Relax module plus what is needed to call it."""

    mod: Any
    target: Any
    inputs: list[InputSpec]
    output_names: list[str]
    label: str
    seconds: dict[str, float] = field(default_factory=dict)
    pipeline: dict[str, list[str]] = field(default_factory=dict)
    integer: dict[str, Any] = field(default_factory=dict)  # qdq.IntegerReport.as_dict()
    sparse: dict[str, Any] = field(default_factory=dict)  # sparse.SparseReport.as_dict()


def _has_dequantize(graph) -> bool:
    """Whether a DequantizeLinear is in the graph or any If/Loop/Scan body of it."""
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            return True
        for attribute in node.attribute:
            bodies = [attribute.g] if attribute.HasField("g") else list(attribute.graphs)
            if any(_has_dequantize(body) for body in bodies):
                return True
    return False


def prepare_module(model: Any, target: Any = "host", *,
                   input_shapes: Mapping[str, Sequence[int]] | None = None,
                   sparse_break_even: Mapping[str, Mapping[str, float]] | None = None
                   ) -> PreparedModule:
    """Load, import, prepare and legalize+fuse: the module tuning and compiling share."""
    target = resolve_target(target)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    proto, label = load_onnx(model)
    specs = input_specs(proto, input_shapes)
    mod = import_onnx(proto, specs, label)
    mod, _ = conv_transpose_as_conv(mod)
    integer: dict[str, Any] = IntegerReport().as_dict()  # nothing quantized
    # (a float model skips this: finding the intrinsic imports TVM's tensor_intrin
    # package for ARM and Hexagon targets, ~50 s once per process)
    if target.kind.name in INTEGER_TARGET_KINDS and _has_dequantize(proto.graph):
        dot = intrinsic_for(target)
        mod, found = integer_contractions(
            mod, signed_activations=dot is not None and dot.data_dtype == "int8",
            channel_multiple=dot.lanes if dot is not None else 1)
        integer = found.as_dict()
        if dot is not None and found.integer:
            mod, integer["layout"] = channels_last(mod)
        mod, integer["lookup_tables"] = lookup_tables(mod, target)
    sparse: dict[str, Any] = {}
    if target.kind.name == "llvm":
        metadata = {p.key: p.value for p in proto.metadata_props}
        table = break_even(target_class(target)) if sparse_break_even is None \
            else sparse_break_even
        mod, found_sparse = sparse_contractions(mod, metadata, table, target)
        sparse = found_sparse.as_dict()
    seconds["import"] = time.perf_counter() - start

    start = time.perf_counter()
    prepare = prepare_passes(target)
    legalize = legalize_passes(target)
    try:
        with target:
            mod = sequential(prepare + legalize)(mod)
    except Exception as exc:
        raise BackendError(f"{label}: TVM failed to legalize/fuse the model: {exc}") from exc
    seconds["legalize"] = time.perf_counter() - start
    outputs = [o.name for o in proto.graph.output]
    return PreparedModule(mod, target, specs, outputs, label, seconds,
                          {"prepare": pass_names(prepare), "legalize": pass_names(legalize)},
                          integer, sparse)


def compile_model(
    model: Any,
    target: Any = "host",
    *,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    tuning_db: str | os.PathLike | None = None,
    default_schedules: bool = True,
    shipped_db: bool = True,
    opt_level: int = 3,
    threads: int | None = None,
    sparse_break_even: Mapping[str, Mapping[str, float]] | None = None,
) -> TVMArtifact:
    """Compile an ONNX model for `target` (preset name, JSON dict string or Target).

    Args:
        model: `onnx.ModelProto`, `onnx_ir.Model` or a path.
        target: e.g. "host", "cortex-a72", "cuda-sm87", "opencl-mali" or a JSON dict.
        input_shapes: concrete shapes for inputs with dynamic dims.
        tuning_db: folder written by `tuning.tune` (its per-target
            subfolder is chosen here) or a plain MetaSchedule work dir. Never tunes.
        default_schedules: schedule what the database does not cover with onnxforge's
            default CPU rules (CPU) or dlight (GPU). GPU code always needs them.
        shipped_db: use the schedule configs measured for the target's CPU class that ship
            with onnxforge (`onnxforge/kernels/tuning_db/`); `tuning_db` entries win.
        opt_level: TVM PassContext opt_level for the lowering.
        threads: default TVM thread count for `run` / `benchmark` (None: all cores).
        sparse_break_even: kernel kind -> block pattern -> nonzero-block fraction up to
            which block-sparse weights use the BSR kernels, instead of the table measured
            for the target's CPU class (`tools/bench_sparse.py` measures with it).
    """
    started = time.perf_counter()
    requested = target
    target = resolve_target(target)
    prepared = prepare_module(model, target, input_shapes=input_shapes,
                              sparse_break_even=sparse_break_even)
    mod = prepared.mod
    report = _base_report(requested, target, prepared)
    pipeline = dict(prepared.pipeline)
    seconds = dict(prepared.seconds)

    # schedule: the tuning database first, then the default rules for the rest
    start = time.perf_counter()
    db_dir = resolve_tuning_db(tuning_db, target)
    report["tuning_db"] = str(db_dir) if db_dir is not None else None
    configs, config_sources = ({}, [])
    if default_schedules and target.kind.name == "llvm":
        configs, config_sources = schedule_configs_for(target, db_dir, shipped_db)
    mod, by_database, pipeline["schedule"] = _apply_tuning_db(
        mod, target, db_dir, tuning_db, default_schedules, config_sources, report)
    by_default: set[str] = set()
    default_rule = None
    if default_schedules:
        before = scheduled_names(mod)
        mod, default_rule, names = _apply_default_schedules(mod, target, configs,
                                                            prepared.label, report)
        pipeline["schedule"] += names
        by_default = scheduled_names(mod) - before
    elif target.kind.name != "llvm":
        report["notes"].append("GPU code without default schedules has no thread binding "
                               "and will not build unless the database covers everything")
    seconds["schedule"] = time.perf_counter() - start
    report.update(_schedule_report(mod, target, by_database, by_default, default_rule,
                                   configs, config_sources))

    # lower + build
    start = time.perf_counter()
    lower = lower_passes(target)
    pipeline["lower"] = pass_names(lower)
    executable = _build(mod, target, lower, opt_level, prepared.label)
    seconds["build"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    report["compile_seconds"] = round(seconds["total"], 3)
    report["pipeline"] = pipeline
    report["pipeline_text"] = " | ".join(f"{k}: {','.join(v)}" for k, v in pipeline.items())
    return TVMArtifact(executable, target, prepared.inputs, prepared.output_names, report,
                       threads=threads)


def _base_report(requested, target, prepared: PreparedModule) -> dict[str, Any]:
    """What the compile report says before scheduling: target, model, inputs, integer ops."""
    return {
        "target": preset_name(requested) or target_key(target),
        "target_json": plain_target_dict(target),
        "target_key": target_key(target),
        "model": prepared.label,
        "inputs": {s.name: {"shape": list(s.shape), "dtype": s.dtype} for s in prepared.inputs},
        "notes": [],
        "num_primfuncs": len(prim_funcs(prepared.mod)),
        "integer": prepared.integer,
        "sparse": prepared.sparse,
    }


def _apply_tuning_db(mod, target, db_dir: Path | None, tuning_db, default_schedules: bool,
                     config_sources: list[str], report: dict
                     ) -> tuple[Any, set[str], list[str]]:
    """MetaSchedule records of the database, if any: (module, functions they scheduled,
    pass names for the report)."""
    if db_dir is None:
        return mod, set(), []
    if database_is_populated(db_dir):
        database = open_database(db_dir)
        baselines = read_baselines(db_dir) if default_schedules else {}
        with target:
            mod, by_database, kept = apply_database(mod, database, target, baselines)
        report["default_kept_over_database"] = sorted(kept)
        return mod, by_database, [f"MetaScheduleApplyDatabase({db_dir})"]
    if str(db_dir) not in config_sources:
        report["notes"].append(
            f"tuning database {db_dir} is empty or missing: nothing applied "
            f"(tune first: onnxforge tune MODEL --target ... --tuning-db {tuning_db})"
        )
        logger.warning("tuning database %s is empty or missing", db_dir)
    return mod, set(), []


def _apply_default_schedules(mod, target, configs: Mapping[str, dict], label: str,
                             report: dict) -> tuple[Any, str | None, list[str]]:
    """onnxforge's CPU rules (with the measured knob settings) or dlight's GPU rules for
    every function still unscheduled: (module, rule family, pass names)."""
    if target.kind.name != "llvm":
        passes = gpu_schedule_passes(target)
        with target:
            mod = sequential(passes)(mod)
        return mod, "dlight", pass_names(passes)
    schedule_pass, why_not = default_cpu_schedule_pass(target, configs)
    if schedule_pass is None:
        report["notes"].append(
            f"default CPU schedules unavailable, functions not in the database are "
            f"compiled unscheduled (slow): {why_not}")
        logger.warning("%s", why_not)
        return mod, None, []
    try:
        with target:
            mod = schedule_pass(mod)
    except Exception as exc:
        raise BackendError(f"{label}: onnxforge default CPU schedules failed: {exc}") from exc
    return mod, "onnxforge.kernels", [schedule_pass.info.name]


def _schedule_report(mod, target, by_database: set[str], by_default: set[str],
                     default_rule: str | None, configs: Mapping[str, dict],
                     config_sources: list[str]) -> dict[str, Any]:
    """Who scheduled how many functions, for the compile report and summary line."""
    prims_after = prim_funcs(mod)
    scheduled = scheduled_names(mod)
    report: dict[str, Any] = {
        "scheduled_by_database": len(by_database),
        "schedule_configs": {"sources": config_sources, "entries": len(configs),
                             "applied": count_configured(mod)},
        "scheduled_by_default": len(by_default),
        "default_rules": default_rule,
        "unscheduled": len(set(prims_after) - scheduled),
        "unscheduled_funcs": sorted(set(prims_after) - scheduled),
        "num_primfuncs_final": len(prims_after),
    }
    try:
        from ...kernels import schedule_summary

        if target.kind.name == "llvm" and default_rule:
            summary: dict[str, int] = {}
            per_kernel = schedule_summary(mod)
            for rule in per_kernel.values():
                summary[rule] = summary.get(rule, 0) + 1
            report["schedule_rules"] = summary
            report["kernel_schedules"] = dict(sorted(per_kernel.items()))  # the HTML report
    except Exception as exc:  # noqa: BLE001 - optional detail
        logger.debug("no per-rule schedule summary: %s", exc)
    return report


def _build(mod, target, lower: Sequence, opt_level: int, label: str):
    import tvm

    try:
        with tvm.transform.PassContext(opt_level=opt_level), vectorizable_rounding(target):
            return tvm.compile(mod, target=target, relax_pipeline=sequential(lower))
    except Exception as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else ""
        raise BackendError(f"{label}: TVM failed to build for {target_key(target)}: "
                           f"{type(exc).__name__}: {last}") from exc
