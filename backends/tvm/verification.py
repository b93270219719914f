"""A compiled model against onnxruntime: seeded inputs, the shared output comparison
(`onnxforge.verify`), several inputs and a repeated run."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import (
    BackendError,
    InputSpecError,
    VerificationError,
)
from ...tolerance import QDQ_FLOOR, QDQ_MARGIN, VERIFY_ATOL, VERIFY_RTOL
from ...verify import Comparison, OutputComparer, OutputError
from .artifact import TVMArtifact
from .importer import InputSpec, load_onnx

logger = logging.getLogger(__name__)


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


VERIFY_SAMPLES = 3


def is_qdq(model: Any) -> bool:
    """Whether the model quantizes activations (QuantizeLinear nodes in its main graph)."""
    proto, _ = load_onnx(model)
    return any(node.op_type == "QuantizeLinear" for node in proto.graph.node)


def _ort_reference(model: Any, threads: int | None, optimize: bool = True):
    import onnxruntime as ort

    from ..ort import session_options

    proto, _ = load_onnx(model)
    session = ort.InferenceSession(proto.SerializeToString(),
                                   session_options(threads, optimize=optimize),
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
    # QDQ models: rel L2 between onnxruntime's integer kernels and its float
    # fake-quantization on the same inputs, which sets `rtol` (None: not quantized)
    ort_spread: float | None = None

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
    # QDQ: onnxruntime without graph optimizations runs the float fake-quantization
    float_reference = _ort_reference(model, threads, optimize=False) if is_qdq(model) else None
    comparer, spread = OutputComparer(), OutputComparer()
    nondeterministic: list[str] = []
    for seed in range(samples):
        inputs = random_inputs(artifact.inputs, seed=seed)
        expected = reference(inputs)
        got = artifact.run(inputs)
        _check_outputs(expected, got)
        comparer.add(expected, got)
        if float_reference is not None:
            spread.add(expected, float_reference(inputs))
        if seed == 0:
            again = artifact.run(inputs)
            nondeterministic = [name for name in expected
                                if not np.array_equal(got[name], again[name], equal_nan=True)]
    ort_spread = None
    if float_reference is not None:
        ort_spread = max((o.rel_l2 for o in spread.result().outputs), default=0.0)
        rtol = max(rtol, QDQ_MARGIN * ort_spread, QDQ_FLOOR)
    result = Verification(comparer.result(), rtol, samples, nondeterministic, ort_spread)
    if raise_on_failure and not result.ok:
        raise VerificationError(f"{artifact.report.get('model', '<model>')}: {result.problem()}")
    return result
