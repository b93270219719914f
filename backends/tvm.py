"""TVM backend: ONNX -> Relax -> scheduled TIR -> a VM executable for CPU or GPU.

    from onnxforge.backends.tvm import compile_model
    art = compile_model("model.onnx", "host", tuning_db="tuning/")
    outputs = art.run({"input": x})
    art.benchmark({"input": x}, threads=2)
    art.export("model.so")

The compile pipeline is a few short, named lists of passes, in the spirit of TVM's
`relax/backend/cpu_generic/pipeline.py`:

  import     `tvm.relax.frontend.onnx.from_onnx` with fixed input shapes
  prepare    DispatchSampling, DispatchSortScan, (CPU: `onnxforge.kernels.
             relax_prepasses`, which fold BatchNorm into convs), DecomposeOpsForInference
  legalize   LegalizeOps, AnnotateTIROpPattern, FoldConstant, FuseOps, FuseTIR
  schedule   MetaScheduleApplyDatabase (if a tuning database is given; `apply_database`
             keeps the default schedule where the tuner measured it faster), then
             CPU: `onnxforge.kernels.default_schedule_pass(target, configs)` for the
             rest, with the knob settings measured per kernel (`schedule_configs_for`:
             the database shipped for the target's CPU class, then the user's),
             GPU: dlight's default GPU rules (Adreno: dlight's Adreno rules first)
  lower      the target's dataflow-lowering and finalize passes, then `tvm.compile`

`prepare_module` (import + prepare + legalize) is shared with the tuner, so tuning tasks
and the functions the database is applied to are the same PrimFuncs (the database is
applied after fusion; applying it to a module from the importer finds nothing).

Threads: TVM's thread pool is sized once per process from `TVM_NUM_THREADS` (default:
half the logical CPUs, i.e. 1 on a 2-core machine). Importing this module sets
`TVM_NUM_THREADS` to the number of physical cores when it is unset; `run()` and
`benchmark()` then pick `threads` (default: all of them) with
`runtime.config_threadpool`. Set `TVM_NUM_THREADS` yourself to cap it.
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
import traceback
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from .. import safe_write
from ..errors import (
    BackendError,
    InputSpecError,
    ModelLoadError,
    UnsupportedOpError,
    VerificationError,
)
from ..verify import Comparison, OutputComparer, OutputError
from .base import Timing, time_callable
from .targets import (
    physical_cores,
    plain_target_dict,
    preset_name,
    resolve_target,
    runs_on_this_machine,
    target_arch,
    target_key,
)

logger = logging.getLogger(__name__)

os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))

# Ops the TVM importer lacks, and what to do about them.
_OP_ADVICE = {
    "QLinearConv": "rewrite it to QDQ form (onnxforge `quantize` emits QDQ, which TVM imports)",
    "QLinearMatMul": "rewrite it to QDQ form (onnxforge `quantize` emits QDQ, which TVM imports)",
    "ConvInteger": "rewrite it to QDQ form (onnxforge `quantize` emits QDQ, which TVM imports)",
    "DynamicQuantizeLinear": "use static QDQ quantization instead of dynamic int8",
}
_SHAPE_OPS = {"Reshape", "ConstantOfShape", "Expand", "Tile", "Slice", "Range", "Shape",
              "Gather", "Concat", "Unsqueeze", "Squeeze", "Resize", "Upsample", "Pad"}
_SHAPE_ADVICE = (
    "the model computes this op's shape argument at run time (a Shape/Gather/Concat "
    "subgraph); with fixed input shapes `-p cleanup` (onnxforge.api.optimize(model, "
    "'cleanup', input_shapes=...)) folds it into constants, after which TVM imports it"
)
_DEFAULT_ADVICE = (
    "run the onnxforge pipeline first (`-p cleanup` folds constant subgraphs, `fuse` "
    "rewrites common patterns) or replace the op before exporting"
)


# ---------------------------------------------------------------------------------------
# Loading and importing
# ---------------------------------------------------------------------------------------

def load_onnx(model: Any) -> tuple[onnx.ModelProto, str]:
    """`onnx.ModelProto`, `onnx_ir.Model` or a path -> (ModelProto, label for messages)."""
    if isinstance(model, onnx.ModelProto):
        return model, "<in-memory model>"
    try:
        import onnx_ir as ir
    except ImportError:  # pragma: no cover - onnx-ir is a hard dependency
        ir = None
    if ir is not None and isinstance(model, ir.Model):
        return ir.serde.serialize_model(model), "<in-memory model>"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"{path}: no such model file")
        try:
            return onnx.load(str(path)), str(path)
        except Exception as exc:
            raise ModelLoadError(f"{path}: not a readable ONNX model ({exc})") from exc
    raise ModelLoadError(
        f"cannot compile a {type(model).__name__}: give an onnx.ModelProto, an onnx_ir.Model "
        "or a path to a .onnx file"
    )


@dataclass
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str


def _opset(proto: onnx.ModelProto, domain: str = "") -> int | None:
    for entry in proto.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(entry.version)
    return None


def input_specs(proto: onnx.ModelProto,
                input_shapes: Mapping[str, Sequence[int]] | None = None) -> list[InputSpec]:
    """Concrete shape and dtype for each real graph input; dynamic dims need input_shapes."""
    overrides = {k: tuple(int(d) for d in v) for k, v in (input_shapes or {}).items()}
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    for name in overrides:
        if name not in names:
            raise InputSpecError(f"input_shapes names {name!r}, but the model's inputs are {names}")
    specs = []
    for value in inputs:
        tensor_type = value.type.tensor_type
        dtype = str(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        declared = [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in tensor_type.shape.dim
        ] if tensor_type.HasField("shape") else None
        if value.name in overrides:
            shape = overrides[value.name]
            if declared is not None and len(declared) != len(shape):
                raise InputSpecError(
                    f"input {value.name!r} has rank {len(declared)}, input_shapes gave {shape}"
                )
        elif declared is None:
            raise InputSpecError(
                f"input {value.name!r} has no declared shape; give it with "
                f"--input-shape {value.name}:D1,D2,..."
            )
        else:
            dynamic = [i for i, d in enumerate(declared) if not isinstance(d, int) or d <= 0]
            if dynamic:
                example = ",".join(str(d) if isinstance(d, int) and d > 0 else "1"
                                   for d in declared)
                raise InputSpecError(
                    f"input {value.name!r} has dynamic dimension(s) {dynamic} "
                    f"(shape {declared}); TVM compiles fixed shapes: give one with "
                    f"--input-shape {value.name}:{example} (input_shapes= in Python)"
                )
            shape = tuple(int(d) for d in declared)
        specs.append(InputSpec(value.name, shape, dtype))
    return specs


def _unsupported_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    try:
        from tvm.relax.frontend.onnx.onnx_frontend import _get_convert_map
    except ImportError:  # private helper moved: rely on the importer's own error
        return []
    convert_map = _get_convert_map()
    handled = {"If", "Constant"}
    return [n for n in proto.graph.node
            if n.op_type not in convert_map and n.op_type not in handled]


def _describe(node: onnx.NodeProto, proto: onnx.ModelProto) -> str:
    domain = node.domain or "ai.onnx"
    opset = _opset(proto, node.domain or "")
    return (f"node {node.name or '<unnamed>'!r} (op {node.op_type}, domain {domain}, "
            f"opset {opset if opset is not None else '?'})")


def _failing_node(exc: BaseException) -> onnx.NodeProto | None:
    """The ONNX node the importer was converting when it raised (from traceback locals)."""
    tb = exc.__traceback__
    found = None
    while tb is not None:
        node = tb.tb_frame.f_locals.get("node")
        if isinstance(node, onnx.NodeProto):
            found = node
        tb = tb.tb_next
    return found


def _static_shapes(proto: onnx.ModelProto, specs: Sequence[InputSpec]) -> dict[str, list[int]]:
    """Shapes of the top graph's values once the inputs have the shapes in `specs`."""
    pinned = onnx.ModelProto()
    pinned.CopyFrom(proto)
    by_name = {s.name: s.shape for s in specs}
    for value in pinned.graph.input:
        if value.name in by_name:
            dims = value.type.tensor_type.shape.dim
            del dims[:]
            for d in by_name[value.name]:
                dims.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(pinned, strict_mode=False)
    except Exception:  # noqa: BLE001 - no shapes: the checks below then see nothing
        return {}
    shapes = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes


def _constants(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    values = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer
              if i.data_location != onnx.TensorProto.EXTERNAL}
    for node in proto.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return values


def _miscompiled_forms(proto: onnx.ModelProto, specs: Sequence[InputSpec]) -> list[tuple]:
    """(node, why) for forms TVM 0.27's importer accepts but computes differently from
    ONNX; found by the differential fuzzer (`tools/fuzz_graphs.py`). They are refused
    rather than compiled wrong.

    * Resize by `scales` where an input size times its scale is not a whole number: ONNX
      maps output to input coordinates with the given scale, TVM with output/input size
      (wrong for every coordinate mode but align_corners, nearest and linear alike).
    """
    resizes = [n for n in proto.graph.node if n.op_type == "Resize"]
    if not resizes:
        return []
    shapes, constants = _static_shapes(proto, specs), _constants(proto)
    found = []
    for node in resizes:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        mode = attrs.get("coordinate_transformation_mode", b"half_pixel")
        has_sizes = len(node.input) > 3 and node.input[3]
        if mode == b"align_corners" or has_sizes or len(node.input) < 3 or not node.input[2]:
            continue
        scales, shape = constants.get(node.input[2]), shapes.get(node.input[0])
        if scales is None or shape is None or scales.size != len(shape):
            continue
        products = np.asarray(shape, np.float64) * scales.astype(np.float64)
        if not np.allclose(products, np.round(products), rtol=0, atol=1e-6):
            why = (f"input shape {shape} times scales {scales.tolist()} is not whole: TVM "
                   "resizes by output/input size, ONNX by the scale")
            found.append((node, why))
    return found


def import_onnx(proto: onnx.ModelProto, specs: Sequence[InputSpec], label: str = "<model>"):
    """`from_onnx` with fixed shapes; unsupported ops, and forms the importer is known to
    get wrong (`_miscompiled_forms`), become UnsupportedOpError."""
    from tvm.relax.frontend.onnx import from_onnx

    wrong = _miscompiled_forms(proto, specs)
    if wrong:
        node, why = wrong[0]
        raise UnsupportedOpError(
            f"{label}: TVM would compute {_describe(node, proto)} differently from ONNX: {why}"
            + (f" ({len(wrong)} such nodes)" if len(wrong) > 1 else "")
            + "; give Resize `sizes` instead of `scales`, or scales that give whole sizes"
        )
    missing = _unsupported_nodes(proto)
    if missing:
        first = missing[0]
        ops = sorted({n.op_type for n in missing})
        advice = _OP_ADVICE.get(first.op_type, _DEFAULT_ADVICE)
        raise UnsupportedOpError(
            f"{label}: TVM's ONNX importer does not support {_describe(first, proto)}"
            + (f" ({len(missing)} unsupported nodes, ops: {', '.join(ops)})"
               if len(missing) > 1 else "")
            + f"; {advice}"
        )
    try:
        return from_onnx(
            proto,
            shape_dict={s.name: list(s.shape) for s in specs},
            dtype_dict={s.name: s.dtype for s in specs},
            keep_params_in_input=False,
        )
    except Exception as exc:
        node = _failing_node(exc)
        where = _describe(node, proto) if node is not None else "a node"
        advice = _DEFAULT_ADVICE
        if node is not None:
            advice = _OP_ADVICE.get(node.op_type) or (
                _SHAPE_ADVICE if node.op_type in _SHAPE_OPS else _DEFAULT_ADVICE)
        message = str(exc).strip().splitlines()
        reason = message[-1] if message else type(exc).__name__
        raise UnsupportedOpError(
            f"{label}: TVM's ONNX importer failed on {where}: {type(exc).__name__}: {reason}; "
            f"{advice}"
        ) from exc


# ---------------------------------------------------------------------------------------
# The pipeline, as named lists of passes
# ---------------------------------------------------------------------------------------

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
            from ..kernels import relax_prepasses

            return passes + list(relax_prepasses(target))
        except (ImportError, AttributeError):
            pass
    return passes + [relax.transform.DecomposeOpsForInference()]


def legalize_passes(target) -> list:
    """Relax ops -> TIR PrimFuncs, fused; these PrimFuncs are the tuning tasks."""
    from tvm import relax

    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        relax.transform.DeadCodeElimination(),
    ]


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


def _names(passes: Sequence) -> list[str]:
    return [p.info.name for p in passes]


def _sequential(passes: Sequence):
    import tvm

    return tvm.transform.Sequential(list(passes))


# ---------------------------------------------------------------------------------------
# Scheduling bookkeeping
# ---------------------------------------------------------------------------------------

def _prim_funcs(mod) -> dict[str, Any]:
    from tvm import tirx

    return {gv.name_hint: f for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}


def _is_scheduled(func) -> bool:
    attrs = func.attrs
    if attrs is None:
        return False
    return any(k in attrs and bool(attrs[k]) for k in ("tirx.is_scheduled", "tir.is_scheduled"))


def _count_configured(mod) -> int:
    """PrimFuncs scheduled with a measured knob setting (schedule config database)."""
    from ..kernels.schedule_configs import CONFIG_ATTR

    return sum(1 for f in _prim_funcs(mod).values()
               if f.attrs is not None and CONFIG_ATTR in f.attrs)


def _scheduled_names(mod) -> set[str]:
    return {name for name, f in _prim_funcs(mod).items() if _is_scheduled(f)}


def default_cpu_schedule_pass(target, configs: Mapping[str, dict] | None = None):
    """(pass, None) from `onnxforge.kernels`, or (None, why it is unavailable)."""
    try:
        from ..kernels import default_schedule_pass
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
    from ..kernels.schedule_configs import load_configs, shipped_db_dir

    configs: dict[str, dict] = {}
    sources: list[str] = []
    for folder in ((shipped_db_dir(target) if shipped else None), db_dir):
        found = load_configs(folder)
        if found:
            configs.update(found)
            sources.append(str(folder))
    return configs, sources


def resolve_tuning_db(tuning_db: str | os.PathLike | None, target) -> Path | None:
    """The database folder for `target` under `tuning_db`.

    `tuning_db/<target-key>/` (what `tune` writes), or `tuning_db` itself when it is a plain
    MetaSchedule work dir (holding database_workload.json): that is how a database tuned
    for one target is applied to another on purpose.
    """
    if tuning_db is None:
        return None
    root = Path(tuning_db)
    if (root / "database_workload.json").is_file():
        return root
    return root / target_key(target)


def open_database(db_dir: Path):
    """A JSONDatabase over `db_dir` (files must exist)."""
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(
        path_workload=str(db_dir / "database_workload.json"),
        path_tuning_record=str(db_dir / "database_tuning_record.json"),
        allow_missing=False,
    )


def _read_baselines(db_dir: Path) -> dict[str, dict]:
    from .tuning import read_baselines

    return read_baselines(db_dir)


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
        if not isinstance(func, tvm.tirx.PrimFunc) or _is_scheduled(func):
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
    records = db_dir / "database_tuning_record.json"
    return records.is_file() and records.stat().st_size > 0


# ---------------------------------------------------------------------------------------
# Compile
# ---------------------------------------------------------------------------------------

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


def prepare_module(model: Any, target: Any = "host", *,
                   input_shapes: Mapping[str, Sequence[int]] | None = None) -> PreparedModule:
    """Load, import, prepare and legalize+fuse: the module tuning and compiling share."""
    target = resolve_target(target)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    proto, label = load_onnx(model)
    specs = input_specs(proto, input_shapes)
    mod = import_onnx(proto, specs, label)
    seconds["import"] = time.perf_counter() - start

    start = time.perf_counter()
    prepare = prepare_passes(target)
    legalize = legalize_passes(target)
    try:
        with target:
            mod = _sequential(prepare + legalize)(mod)
    except Exception as exc:
        raise BackendError(f"{label}: TVM failed to legalize/fuse the model: {exc}") from exc
    seconds["legalize"] = time.perf_counter() - start
    outputs = [o.name for o in proto.graph.output]
    return PreparedModule(mod, target, specs, outputs, label, seconds,
                          {"prepare": _names(prepare), "legalize": _names(legalize)})


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
) -> TVMArtifact:
    """Compile an ONNX model for `target` (preset name, JSON dict string or Target).

    Args:
        model: `onnx.ModelProto`, `onnx_ir.Model` or a path.
        target: e.g. "host", "cortex-a72", "cuda-sm87", "opencl-mali" or a JSON dict.
        input_shapes: concrete shapes for inputs with dynamic dims.
        tuning_db: folder written by `onnxforge.backends.tuning.tune` (its per-target
            subfolder is chosen here) or a plain MetaSchedule work dir. Never tunes.
        default_schedules: schedule what the database does not cover with onnxforge's
            default CPU rules (CPU) or dlight (GPU). GPU code always needs them.
        shipped_db: use the schedule configs measured for the target's CPU class that ship
            with onnxforge (`onnxforge/kernels/tuning_db/`); `tuning_db` entries win.
        opt_level: TVM PassContext opt_level for the lowering.
        threads: default TVM thread count for `run` / `benchmark` (None: all cores).
    """
    import tvm

    started = time.perf_counter()
    requested = target
    target = resolve_target(target)
    prepared = prepare_module(model, target, input_shapes=input_shapes)
    mod = prepared.mod
    report: dict[str, Any] = {
        "target": preset_name(requested) or target_key(target),
        "target_json": plain_target_dict(target),
        "target_key": target_key(target),
        "model": prepared.label,
        "inputs": {s.name: {"shape": list(s.shape), "dtype": s.dtype} for s in prepared.inputs},
        "notes": [],
    }
    pipeline = dict(prepared.pipeline)
    seconds = dict(prepared.seconds)
    prims = set(_prim_funcs(mod))
    report["num_primfuncs"] = len(prims)

    # schedule: database first, then default rules for the rest
    start = time.perf_counter()
    schedule_names: list[str] = []
    by_database: set[str] = set()
    db_dir = resolve_tuning_db(tuning_db, target)
    report["tuning_db"] = str(db_dir) if db_dir is not None else None
    configs, config_sources = ({}, [])
    if default_schedules and target.kind.name == "llvm":
        configs, config_sources = schedule_configs_for(target, db_dir, shipped_db)
    if db_dir is not None:
        if database_is_populated(db_dir):
            database = open_database(db_dir)
            baselines = _read_baselines(db_dir) if default_schedules else {}
            with target:
                mod, by_database, kept = apply_database(mod, database, target, baselines)
            report["default_kept_over_database"] = sorted(kept)
            schedule_names.append(f"MetaScheduleApplyDatabase({db_dir})")
        elif str(db_dir) not in config_sources:
            report["notes"].append(
                f"tuning database {db_dir} is empty or missing: nothing applied "
                f"(tune first: onnxforge tune MODEL --target ... --tuning-db {tuning_db})"
            )
            logger.warning("tuning database %s is empty or missing", db_dir)

    by_default: set[str] = set()
    default_rule = None
    if default_schedules:
        before = _scheduled_names(mod)
        if target.kind.name == "llvm":
            schedule_pass, why_not = default_cpu_schedule_pass(target, configs)
            if schedule_pass is None:
                report["notes"].append(
                    f"default CPU schedules unavailable, functions not in the database are "
                    f"compiled unscheduled (slow): {why_not}")
                logger.warning("%s", why_not)
            else:
                try:
                    with target:
                        mod = schedule_pass(mod)
                except Exception as exc:
                    raise BackendError(
                        f"{prepared.label}: onnxforge default CPU schedules failed: {exc}"
                    ) from exc
                default_rule = "onnxforge.kernels"
                schedule_names.append(schedule_pass.info.name)
        else:
            passes = gpu_schedule_passes(target)
            with target:
                mod = _sequential(passes)(mod)
            default_rule = "dlight"
            schedule_names += _names(passes)
        by_default = _scheduled_names(mod) - before
    elif target.kind.name != "llvm":
        report["notes"].append("GPU code without default schedules has no thread binding "
                               "and will not build unless the database covers everything")
    seconds["schedule"] = time.perf_counter() - start
    prims_after = _prim_funcs(mod)
    scheduled = _scheduled_names(mod)
    report["scheduled_by_database"] = len(by_database)
    report["schedule_configs"] = {"sources": config_sources, "entries": len(configs),
                                  "applied": _count_configured(mod)}
    report["scheduled_by_default"] = len(by_default)
    report["default_rules"] = default_rule
    report["unscheduled"] = len(set(prims_after) - scheduled)
    report["unscheduled_funcs"] = sorted(set(prims_after) - scheduled)
    report["num_primfuncs_final"] = len(prims_after)
    try:
        from ..kernels import schedule_summary

        if target.kind.name == "llvm" and default_rule:
            summary: dict[str, int] = {}
            for rule in schedule_summary(mod).values():
                summary[rule] = summary.get(rule, 0) + 1
            report["schedule_rules"] = summary
    except Exception as exc:  # noqa: BLE001 - optional detail
        logger.debug("no per-rule schedule summary: %s", exc)
    pipeline["schedule"] = schedule_names

    # lower + build
    start = time.perf_counter()
    lower = lower_passes(target)
    pipeline["lower"] = _names(lower)
    try:
        with tvm.transform.PassContext(opt_level=opt_level):
            executable = tvm.compile(mod, target=target, relax_pipeline=_sequential(lower))
    except Exception as exc:
        raise BackendError(
            f"{prepared.label}: TVM failed to build for {target_key(target)}: "
            f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        ) from exc
    seconds["build"] = time.perf_counter() - start
    seconds["total"] = time.perf_counter() - started
    report["seconds"] = {k: round(v, 3) for k, v in seconds.items()}
    report["compile_seconds"] = round(seconds["total"], 3)
    report["pipeline"] = pipeline
    report["pipeline_text"] = " | ".join(f"{k}: {','.join(v)}" for k, v in pipeline.items())
    return TVMArtifact(executable, target, prepared.inputs, prepared.output_names, report,
                       threads=threads)


class TVMBackend:
    """The backend protocol object (`backends.base.Backend`)."""

    name = "tvm"

    def compile(self, model: Any, target: Any = "host", **options: Any) -> TVMArtifact:
        return compile_model(model, target or "host", **options)


# ---------------------------------------------------------------------------------------
# The artifact
# ---------------------------------------------------------------------------------------

def _flatten(value) -> list:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    if type(value).__name__ == "Shape":  # an ONNX Shape output: one int64 tensor, not a tuple
        return [np.asarray(tuple(value), dtype=np.int64)]
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__"):
        out = []
        for item in value:
            out += _flatten(item)
        return out
    return [value]


def _contiguous(value, dtype) -> np.ndarray:
    """C-contiguous array of `dtype` that keeps 0-d scalars 0-d (np.ascontiguousarray
    would make them shape (1,))."""
    return np.require(np.asarray(value, dtype=dtype), requirements="C")


def _set_threads(threads: int | None) -> int:
    import tvm

    cap = int(os.environ.get("TVM_NUM_THREADS", physical_cores()) or 1)
    wanted = max(1, min(threads or cap, cap))
    tvm.get_global_func("runtime.config_threadpool")(0, wanted)
    return wanted


def _atomic_target(path: Path) -> Path:
    """An empty temp file beside `path` with its suffix (TVM picks the format by it)."""
    return safe_write.reserve_temp(path, suffix=path.suffix)


def _publish(tmp: Path, path: Path, mode: int) -> None:
    """fsync, give the temp file normal permissions (mode & ~umask), then rename it."""
    safe_write.publish(tmp, path, mode)


def _write_text_atomic(path: Path, text: str) -> Path:
    return safe_write.write_text(path, text)


def _device_modules(executable) -> list:
    found = []

    def walk(module):
        for sub in module.imports:
            if sub.kind in ("cuda", "opencl", "vulkan", "metal", "rocm", "webgpu"):
                found.append(sub)
            walk(sub)

    walk(executable.mod)
    return found


_SOURCE_SUFFIX = {"cuda": ".cu", "opencl": ".cl", "metal": ".metal", "vulkan": ".spv"}


def aarch64_compiler() -> str | None:
    """Debian's cross compiler driver, when installed (`gcc-aarch64-linux-gnu`)."""
    for name in ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc"):
        path = shutil.which(name)
        if path:
            return path
    return None


class TVMArtifact:
    """A compiled model: run / benchmark on this machine, export for the target."""

    backend = "tvm"

    def __init__(self, executable, target, inputs: list[InputSpec], output_names: list[str],
                 report: dict[str, Any], *, threads: int | None = None):
        self.executable = executable
        self.threads = threads
        self.target = target
        self.inputs = inputs
        self.input_names = [s.name for s in inputs]
        self.output_names = output_names
        self.report = report
        self._vm = None
        self._device = None

    # -- running ---------------------------------------------------------------------------
    def _runtime_device(self):
        import tvm

        if self.target.kind.name == "llvm":
            if not runs_on_this_machine(self.target):
                return None
            return tvm.cpu(0)
        if self.target.kind.name == "cuda":
            dev = tvm.cuda(0)
        elif self.target.kind.name == "opencl":
            dev = tvm.opencl(0)
        elif self.target.kind.name == "vulkan":
            dev = tvm.vulkan(0)
        else:
            return None
        try:
            exists = dev.exist
        except Exception:  # noqa: BLE001 - runtime without that device API
            exists = False
        if not exists or target_arch(self.target) != target_arch(resolve_target("host")):
            return None
        return dev

    def _get_vm(self):
        from tvm import relax

        if self._vm is None:
            dev = self._runtime_device()
            if dev is None:
                raise BackendError(
                    f"cannot run {self.report.get('target') or self.report['target_key']} code "
                    "on this machine (no such device or a different CPU architecture); "
                    "export it and run it on the target "
                    "(AArch64: onnxforge.backends.tvm.run_under_qemu)"
                )
            self._device = dev
            self._vm = relax.VirtualMachine(self.executable, dev)
        return self._vm

    def _arguments(self, inputs: Mapping[str, np.ndarray]) -> list:
        import tvm

        args = []
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InputSpecError(f"missing input {spec.name!r} (inputs: {self.input_names})")
            array = _contiguous(inputs[spec.name], spec.dtype)
            if tuple(array.shape) != spec.shape:
                raise InputSpecError(
                    f"input {spec.name!r} has shape {tuple(array.shape)}, the model was "
                    f"compiled for {spec.shape}"
                )
            args.append(tvm.runtime.tensor(array, device=self._device))
        return args

    def _name_outputs(self, values: list) -> dict[str, np.ndarray]:
        arrays = [v.numpy() if hasattr(v, "numpy") else np.asarray(v) for v in values]
        names = self.output_names
        if len(names) != len(arrays):
            names = [f"output_{i}" for i in range(len(arrays))]
        return dict(zip(names, arrays))

    def can_run(self) -> bool:
        """True when `run` works here (in process, or AArch64 under qemu)."""
        if self._runtime_device() is not None:
            return True
        return target_arch(self.target) == "aarch64" and self.target.kind.name == "llvm" \
            and qemu_available()

    def run(self, inputs: Mapping[str, np.ndarray], *, threads: int | None = None
            ) -> dict[str, np.ndarray]:
        """Run `main` on this machine; AArch64 CPU code runs under qemu when available."""
        if (self.target.kind.name == "llvm" and target_arch(self.target) == "aarch64"
                and not runs_on_this_machine(self.target)):
            return run_under_qemu(self, inputs)
        vm = self._get_vm()
        _set_threads(threads or self.threads)
        args = self._arguments(inputs)
        try:
            result = vm["main"](*args)
        except Exception as exc:
            raise BackendError(f"TVM failed to run the model: {exc}") from exc
        return self._name_outputs(_flatten(result))

    def benchmark(self, inputs: Mapping[str, np.ndarray], *, warmup: int = 5, repeat: int = 30,
                  threads: int | None = None) -> Timing:
        """Median latency of `main` (threads: TVM thread-pool size, default all cores)."""
        vm = self._get_vm()
        self.report["bench_threads"] = _set_threads(threads or self.threads)
        args = self._arguments(inputs)
        main = vm["main"]
        device = self._device

        def call():
            main(*args)
            device.sync()

        return time_callable(call, warmup=warmup, repeat=repeat)

    # -- exporting --------------------------------------------------------------------------
    def export(self, path: str | os.PathLike) -> Path:
        """Write the deployable library atomically; return the path written.

        CPU: `.so` (x86: the system compiler; AArch64: `aarch64-linux-gnu-g++`, else a
        `.tar` of objects to link on the board). GPU: the `.so` host module with the device
        code inside, plus the device source next to it (`.cu` / `.cl`).
        """
        path = Path(path)
        if path.suffix not in (".so", ".tar"):
            raise BackendError(f"{path}: export to a .so (shared library) or .tar (objects)")
        arch = target_arch(self.target)
        options: dict[str, Any] = {}
        native = arch == target_arch(resolve_target("host"))
        if path.suffix == ".so" and not native:
            compiler = aarch64_compiler() if arch == "aarch64" else None
            if compiler is None:
                logger.warning("no cross compiler for %s: writing a .tar instead of %s",
                               arch, path.name)
                self.report["notes"].append(
                    f"no {arch} cross compiler (apt-get install g++-aarch64-linux-gnu): "
                    "exported a .tar of objects; link it on the board"
                )
                path = path.with_suffix(".tar")
            else:
                options["cc"] = compiler
        if path.suffix == ".tar":
            from tvm.support.tar import tar

            options = {"fcompile": tar}
        tmp = _atomic_target(path)
        try:
            self.executable.export_library(str(tmp), **options)
            _publish(tmp, path, 0o777 if path.suffix == ".so" else 0o666)
        except Exception as exc:
            raise BackendError(f"exporting {path} failed: {exc}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        written = [str(path)]
        for module in _device_modules(self.executable):
            source = module.inspect_source()
            if source:
                suffix = _SOURCE_SUFFIX.get(module.kind, f".{module.kind}")
                written.append(str(_write_text_atomic(path.with_suffix(suffix), source)))
            for fmt, suffix in (("ptx", ".ptx"),):
                try:
                    extra = module.inspect_source(fmt)
                except Exception:  # noqa: BLE001 - format not kept by this runtime
                    extra = ""
                if extra:
                    written.append(str(_write_text_atomic(path.with_suffix(suffix), extra)))
        self.report["exported"] = written
        return path

    def device_source(self) -> str:
        """Generated GPU source (CUDA C / OpenCL C); '' for CPU targets."""
        return "\n".join(m.inspect_source() for m in _device_modules(self.executable))

    def __repr__(self) -> str:
        return (f"TVMArtifact(target={self.report.get('target') or self.report['target_key']}, "
                f"primfuncs={self.report['num_primfuncs']}, "
                f"compile={self.report['compile_seconds']}s)")


# ---------------------------------------------------------------------------------------
# Verification against onnxruntime
# ---------------------------------------------------------------------------------------

def random_inputs(specs: Sequence[InputSpec], seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded inputs: floats ~ N(0, 1), ints in [0, 100), bools 0/1; `*mask*` inputs are all
    ones and `*type*` inputs (token types) all zeros, so BERT-style models stay in range."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in specs:
        dtype = np.dtype(spec.dtype)
        if np.issubdtype(dtype, np.floating):
            inputs[spec.name] = rng.standard_normal(spec.shape).astype(dtype)
        elif dtype == np.bool_:
            inputs[spec.name] = rng.integers(0, 2, spec.shape).astype(dtype)
        elif "mask" in spec.name.lower():
            inputs[spec.name] = np.ones(spec.shape, dtype=dtype)
        elif "type" in spec.name.lower():  # token_type_ids: segment 0
            inputs[spec.name] = np.zeros(spec.shape, dtype=dtype)
        else:
            inputs[spec.name] = rng.integers(0, 100, spec.shape).astype(dtype)
    return inputs


VERIFY_RTOL = 1e-4  # compiler.verify.OutputError.within: rel L2, or every element
VERIFY_ATOL = 1e-6  # absolute floor: float32 noise on outputs whose values are all ~0
VERIFY_SAMPLES = 3


def _ort_reference(model: Any, threads: int | None):
    import onnxruntime as ort

    from .ort import session_options

    proto, _ = load_onnx(model)
    session = ort.InferenceSession(proto.SerializeToString(), session_options(threads),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    inputs = [i.name for i in session.get_inputs()]

    def run(feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(names, session.run(names, {k: np.asarray(feed[k]) for k in inputs})))

    return run


def _check_outputs(reference: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> None:
    for name, ref in reference.items():
        if name not in got:
            raise BackendError(f"TVM output {name!r} missing (got {sorted(got)})")
        if got[name].shape != ref.shape:
            raise BackendError(
                f"output {name!r}: TVM shape {got[name].shape} != ORT shape {ref.shape}")


def compare_to_ort(artifact: TVMArtifact, model: Any, inputs: Mapping[str, np.ndarray], *,
                   threads: int | None = None) -> list[OutputError]:
    """Run the artifact and onnxruntime on the same inputs; errors per output (the same
    `OutputError` and tolerance rule as `onnxforge verify`)."""
    reference = _ort_reference(model, threads)(inputs)
    got = artifact.run(inputs)
    _check_outputs(reference, got)
    comparer = OutputComparer()
    comparer.add(reference, got)
    return comparer.result().outputs


@dataclass
class Verification:
    """TVM vs ORT over several inputs, plus the repeat-run check."""

    comparison: Comparison
    rtol: float
    samples: int
    nondeterministic: list[str]  # outputs that changed between two runs on one input

    @property
    def ok(self) -> bool:
        return not self.nondeterministic and self.comparison.within(self.rtol, VERIFY_ATOL)

    def problem(self) -> str:
        """One line saying why the check failed ('' when it passed)."""
        if self.nondeterministic:
            return (f"TVM output(s) {', '.join(map(repr, self.nondeterministic))} changed between "
                    "two runs on the same input (the compiled code reads uninitialised memory)")
        bad = [o for o in self.comparison.outputs if not o.within(self.rtol, VERIFY_ATOL)]
        if not bad:
            return ""
        worst = max(bad, key=lambda o: o.rel_l2 if np.isfinite(o.rel_l2) else np.inf)
        return (f"TVM output {worst.name!r} differs from onnxruntime on {self.samples} random "
                f"inputs: max abs {worst.max_abs:.3e} (relative {worst.rel:.3e}), rel L2 "
                f"{worst.rel_l2:.3e} > {self.rtol:g}")


def verify_artifact(artifact: TVMArtifact, model: Any, *, rtol: float = VERIFY_RTOL,
                    samples: int = VERIFY_SAMPLES, threads: int | None = None,
                    raise_on_failure: bool = True) -> Verification:
    """Compare a compiled artifact with onnxruntime on `samples` different seeded random
    inputs, and run it twice on the first one: wrong numbers that come from uninitialised
    memory pass one comparison and fail the next, so outputs must also be bit-identical
    between runs. Raises VerificationError when the check fails (unless told not to)."""
    if samples < 1:
        raise InputSpecError(f"verification needs at least one sample, got {samples}")
    reference = _ort_reference(model, threads)
    comparer = OutputComparer()
    nondeterministic: list[str] = []
    for seed in range(samples):
        inputs = random_inputs(artifact.inputs, seed=seed)
        expected = reference(inputs)
        got = artifact.run(inputs)
        _check_outputs(expected, got)
        comparer.add(expected, got)
        if seed == 0:
            again = artifact.run(inputs)
            nondeterministic = [name for name in expected
                                if not np.array_equal(got[name], again[name], equal_nan=True)]
    result = Verification(comparer.result(), rtol, samples, nondeterministic)
    if raise_on_failure and not result.ok:
        raise VerificationError(f"{artifact.report.get('model', '<model>')}: {result.problem()}")
    return result


# ---------------------------------------------------------------------------------------
# AArch64 under qemu
# ---------------------------------------------------------------------------------------

RUNNER_SOURCE = Path(__file__).parent / "aarch64_runner" / "onnxforge_run.cc"
TVM_WHEEL = "apache-tvm==0.27.0.post1"
TVM_FFI_WHEEL = "apache-tvm-ffi==0.1.14.post1"
AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXFORGE_CACHE", Path.home() / ".cache" / "onnxforge"))


def qemu_available() -> bool:
    return shutil.which("qemu-aarch64") is not None and aarch64_compiler() is not None \
        and Path(AARCH64_SYSROOT).is_dir()


def _python_tag() -> str:
    import sys

    return f"{sys.version_info.major}{sys.version_info.minor}"


def _wheel_spec(distribution: str, fallback: str) -> str:
    """`name==version` of the installed distribution, so both sides run the same TVM."""
    from importlib import metadata

    try:
        return f"{distribution}=={metadata.version(distribution)}"
    except metadata.PackageNotFoundError:
        return fallback


def fetch_aarch64_runtime(*, download: bool = True) -> Path:
    """A folder with the AArch64 libtvm_runtime.so and libtvm_ffi.so (cached).

    They come from the manylinux_2_28_aarch64 wheels of apache-tvm and apache-tvm-ffi,
    downloaded once with pip into `$ONNXFORGE_CACHE/wheels` (default ~/.cache/onnxforge).
    """
    import sys
    import zipfile

    root = cache_dir()
    libdir = root / "aarch64-runtime"
    if (libdir / "libtvm_runtime.so").is_file() and (libdir / "libtvm_ffi.so").is_file():
        return libdir
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)

    def find(prefix: str) -> Path | None:
        hits = sorted(wheels.glob(f"{prefix}-*aarch64*.whl"))
        return hits[-1] if hits else None

    for spec, prefix, extra in ((_wheel_spec("apache-tvm", TVM_WHEEL), "apache_tvm", []),
                                (_wheel_spec("apache-tvm-ffi", TVM_FFI_WHEEL), "apache_tvm_ffi",
                                 ["--python-version", _python_tag()])):
        if find(prefix) is None and download:
            cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps",
                   "--platform", "manylinux_2_28_aarch64", "--only-binary=:all:",
                   "-d", str(wheels), *extra]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise BackendError(f"could not download the aarch64 wheel {spec}: "
                                   f"{result.stderr.strip().splitlines()[-1:]}")
    tvm_wheel = find("apache_tvm")
    ffi_wheel = find("apache_tvm_ffi")
    if tvm_wheel is None or ffi_wheel is None:
        raise BackendError(f"aarch64 wheels of {TVM_WHEEL} / {TVM_FFI_WHEEL} not in {wheels}")
    tmp = Path(tempfile.mkdtemp(prefix=".aarch64-runtime.", dir=root))
    try:
        for wheel, member in ((tvm_wheel, "tvm/lib/libtvm_runtime.so"),
                              (ffi_wheel, "tvm_ffi/lib/libtvm_ffi.so")):
            with zipfile.ZipFile(wheel) as archive:
                (tmp / Path(member).name).write_bytes(archive.read(member))
        if libdir.exists():
            shutil.rmtree(libdir)
        os.replace(tmp, libdir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return libdir


def build_aarch64_runner(libdir: Path | None = None) -> Path:
    """Cross-compile `aarch64_runner/onnxforge_run.cc` against the AArch64 TVM runtime."""
    import tvm_ffi

    libdir = libdir or fetch_aarch64_runtime()
    binary = libdir / "onnxforge_run"
    if binary.is_file() and binary.stat().st_mtime >= RUNNER_SOURCE.stat().st_mtime:
        return binary
    compiler = aarch64_compiler()
    if compiler is None or not compiler.endswith("g++"):
        raise BackendError("g++-aarch64-linux-gnu is needed to build the AArch64 runner")
    include = Path(tvm_ffi.__file__).parent / "include"
    tmp = _atomic_target(binary)
    cmd = [compiler, "-std=c++17", "-O2", str(RUNNER_SOURCE), f"-I{include}", f"-L{libdir}",
           "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN", "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BackendError(f"building the AArch64 runner failed:\n{result.stderr[-2000:]}")
    _publish(tmp, binary, 0o777)
    return binary


def run_under_qemu(artifact: TVMArtifact, inputs: Mapping[str, np.ndarray], *,
                   timeout: float = 600.0, threads: int = 1) -> dict[str, np.ndarray]:
    """Export `artifact` for AArch64, run it with the C++ runner under qemu-aarch64."""
    if not qemu_available():
        raise BackendError("qemu-aarch64 and gcc-aarch64-linux-gnu are needed "
                           "(apt-get install qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")
    runner = build_aarch64_runner()
    with tempfile.TemporaryDirectory(prefix="onnxforge-qemu-") as work:
        work_path = Path(work)
        library = artifact.export(work_path / "model.so")
        if library.suffix != ".so":
            raise BackendError("the AArch64 library could not be linked (no cross compiler)")
        paths = []
        for i, spec in enumerate(artifact.inputs):
            if spec.name not in inputs:
                raise InputSpecError(f"missing input {spec.name!r}")
            array = _contiguous(inputs[spec.name], spec.dtype)
            if tuple(array.shape) != spec.shape:
                raise InputSpecError(f"input {spec.name!r} has shape {array.shape}, "
                                     f"the model was compiled for {spec.shape}")
            path = work_path / f"input_{i}.npy"
            np.save(path, array)
            paths.append(str(path))
        out_dir = work_path / "out"
        out_dir.mkdir()
        env = dict(os.environ, TVM_NUM_THREADS=str(threads))
        cmd = ["qemu-aarch64", "-L", AARCH64_SYSROOT, str(runner), str(library), str(out_dir),
               *paths]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                    env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"qemu-aarch64 run timed out after {timeout:.0f} s") from exc
        if result.returncode != 0:
            raise BackendError(f"AArch64 run under qemu failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}")
        outputs = sorted(out_dir.glob("output_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
        return artifact._name_outputs([np.load(p) for p in outputs])


def format_exception(exc: BaseException) -> str:  # pragma: no cover - debugging aid
    return "".join(traceback.format_exception(exc))
