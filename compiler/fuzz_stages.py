"""The stages of the differential fuzzer (`onnxforge.fuzz`) and what they share: a
stage's result, onnxruntime references, the comparison, the exception classes, and the
pipeline, compile and int8 stages. The lossy stages (`fuzz_lossy`) build on these; the
orchestration (workers, shrinking, the summary) lives in `fuzz`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from .errors import one_line

DEFAULT_PIPELINE = "cleanup,fuse"
RTOL = 1e-4
ATOL = 1e-6


@dataclass
class StageResult:
    status: str  # correct / refused / wrong / crash / skipped
    detail: str = ""
    rel: float | None = None  # max |got - ref| / max |ref|, worst output and input set
    rel_l2: float | None = None  # ||got - ref|| / ||ref||, worst output
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the sparse ops a stage ran


def ort_session(model: onnx.ModelProto | bytes, optimize: bool = False):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def ort_outputs(model: onnx.ModelProto, input_sets: list[dict[str, np.ndarray]]
                ) -> list[dict[str, np.ndarray]]:
    session = ort_session(model)
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(names, feed))) for feed in input_sets]


def compare(references: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]],
            rtol: float = RTOL, atol: float = ATOL) -> StageResult:
    """`correct` or `wrong` (with the worst relative errors) over all input sets."""
    from .errors import VerificationError
    from .verify import OutputComparer

    comparer = OutputComparer()
    try:
        for ref, out in zip(references, got):
            comparer.add(ref, out)
    except VerificationError as exc:
        return StageResult("wrong", one_line(str(exc)))
    result = comparer.result()
    worst_rel, worst_l2, worst_name = 0.0, 0.0, ""
    for o in result.outputs:
        rel = o.max_abs / o.ref_max_abs if o.ref_max_abs else o.max_abs
        if not np.isfinite(rel) or rel > worst_rel or not np.isfinite(o.rel_l2):
            worst_rel, worst_name = float(rel), o.name
        worst_l2 = max(worst_l2, o.rel_l2) if np.isfinite(o.rel_l2) else float("nan")
    if result.within(rtol, atol):
        return StageResult("correct", rel=worst_rel, rel_l2=worst_l2)
    nonfinite = any(not np.all(np.isfinite(v)) for out in got for v in out.values())
    detail = f"output {worst_name!r} differs (max abs {result.max_abs:.3g})"
    if nonfinite:
        detail += ", non-finite values"
    return StageResult("wrong", detail, rel=worst_rel, rel_l2=worst_l2)


REFUSAL_NAMES = ("UnsupportedOpError", "InputSpecError", "ModelLoadError", "InvalidModelError")


def classify_exception(exc: BaseException) -> StageResult:
    """refused for a clear onnxforge error about the model, crash for anything else."""
    from .errors import OnnxforgeError

    text = one_line(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OnnxforgeError):
        cause = exc.__cause__
        if type(exc).__name__ in REFUSAL_NAMES or cause is None or \
                isinstance(cause, OnnxforgeError):
            return StageResult("refused", text)
        return StageResult("crash", one_line(
            f"{type(exc).__name__} wrapping {type(cause).__name__}: {exc}"))
    return StageResult("crash", text)


# ---------------------------------------------------------------------- stages


def run_pipeline_stage(model: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
                       references: list[dict[str, np.ndarray]], pipeline: str = DEFAULT_PIPELINE,
                       rtol: float = RTOL) -> StageResult:
    """`pipeline` through PassManager (no verification of its own), then ORT on the result."""
    from .ir import load_model, to_proto
    from .pass_manager import PassManager
    from .passes.base import PassContext

    start = time.perf_counter()
    shapes = {name: tuple(array.shape) for name, array in inputs[0].items()}
    try:
        working = load_model(model)
        working, _ = PassManager(pipeline, PassContext(input_shapes=shapes)).run(working)
        optimized = to_proto(working)
    except Exception as exc:  # noqa: BLE001 - classified, never raised
        result = classify_exception(exc)
    else:
        try:
            got = ort_outputs(optimized, inputs)
        except Exception as exc:  # noqa: BLE001
            result = StageResult("wrong", one_line(f"ORT cannot run the rewritten model: "
                                                    f"{exc}"))
        else:
            result = compare(references, got, rtol)
    result.seconds = time.perf_counter() - start
    return result


def run_compile_stage(model: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
                      references: list[dict[str, np.ndarray]], target: str = "host",
                      rtol: float = RTOL, sparse_break_even: dict | None = None
                      ) -> StageResult:
    """compile_model with its defaults (or the given sparse break-even table), run every
    input set (the first one twice); the compile report's `sparse` entry goes to `extra`."""
    from .backends.tvm import compile_model

    start = time.perf_counter()
    shapes = {name: tuple(array.shape) for name, array in inputs[0].items()}
    sparse: dict[str, Any] = {}
    try:
        artifact = compile_model(model, target, input_shapes=shapes, threads=1,
                                 sparse_break_even=sparse_break_even)
        sparse = artifact.report.get("sparse", {})
        got = [artifact.run(feed, threads=1) for feed in inputs]
        again = artifact.run(inputs[0], threads=1)
    except Exception as exc:  # noqa: BLE001 - classified, never raised
        result = classify_exception(exc)
    else:
        result = compare(references, got, rtol)
        differing = [name for name, value in got[0].items()
                     if name not in again or value.tobytes() != again[name].tobytes()]
        if differing:
            a, b = got[0][differing[0]], again.get(differing[0])
            if b is not None and b.shape == a.shape:
                bytes_a = np.ascontiguousarray(a).view(np.uint8).reshape(a.size, -1)
                bytes_b = np.ascontiguousarray(b).view(np.uint8).reshape(b.size, -1)
                changed = int(np.count_nonzero((bytes_a != bytes_b).any(axis=1)))
                what = f"{changed} of {a.size} elements"
            else:
                what = "shape"
            note = (f"nondeterministic: output {differing[0]!r} differs between two runs on "
                    f"the same input ({what})")
            result = StageResult("wrong", note + ("; " + result.detail if result.detail else ""),
                                 result.rel, result.rel_l2)
    result.extra = {"sparse": sparse} if sparse else {}
    result.seconds = time.perf_counter() - start
    return result


QUANTIZE_PIPELINE = "cleanup,fuse,quantize(int8)"


def run_int8_stage(model: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
                   target: str = "host", seed: int = 0) -> StageResult:
    """`cleanup,fuse,quantize(int8)` calibrated on 8 random batches, then the QDQ model
    compiled (integer kernels where the target has them) and checked against onnxruntime
    on the same QDQ file by compile's own verification (`verify_artifact`: the QDQ
    tolerance that onnxruntime's integer vs float spread sets, and two runs bit-equal).
    The quantization error against the float graph is not judged: random graphs have no
    accuracy to keep, and a lossy pass may lose it; what must hold is that the compiled
    integer code computes what the QDQ file says."""
    from .backends.tvm import compile_model
    from .backends.tvm.verification import verify_artifact
    from .calibration import RandomSource
    from .ir import load_model, to_proto
    from .pass_manager import PassManager
    from .passes.base import PassContext

    start = time.perf_counter()
    shapes = {name: tuple(array.shape) for name, array in inputs[0].items()}
    dtypes = {name: array.dtype for name, array in inputs[0].items()}
    calibration = RandomSource(shapes, dtypes, count=8, seed=seed)
    try:
        working = load_model(model)
        context = PassContext(calibration=calibration, input_shapes=shapes)
        working, _ = PassManager(QUANTIZE_PIPELINE, context).run(working)
        quantized = to_proto(working)
    except Exception as exc:  # noqa: BLE001 - classified, never raised
        result = classify_exception(exc)
        result.seconds = time.perf_counter() - start
        return result
    try:
        ort_outputs(quantized, inputs[:1])
    except Exception as exc:  # noqa: BLE001
        result = StageResult("wrong", one_line(f"ORT cannot run the quantized model: {exc}"))
        result.seconds = time.perf_counter() - start
        return result
    try:
        artifact = compile_model(quantized, target, input_shapes=shapes, threads=1)
        check = verify_artifact(artifact, quantized, threads=1, raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001
        result = classify_exception(exc)
    else:
        integer = artifact.report.get("integer", {})
        what = (f"{integer.get('integer_total', 0)} integer op(s), "
                f"{integer.get('float_total', 0)} float, layout {integer.get('layout', '-')}, "
                f"{integer.get('lookup_tables', 0)} table(s)")
        worst = max(check.comparison.outputs, default=None,
                    key=lambda o: o.rel_l2 if np.isfinite(o.rel_l2) else np.inf)
        rel_l2 = None if worst is None else float(worst.rel_l2)
        rel = None if worst is None else float(
            worst.max_abs / worst.ref_max_abs if worst.ref_max_abs else worst.max_abs)
        if check.ok:
            result = StageResult("correct", what, rel, rel_l2)
        else:
            result = StageResult("wrong", f"{check.problem()} ({what})", rel, rel_l2)
    result.seconds = time.perf_counter() - start
    return result
