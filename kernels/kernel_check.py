"""Differential check of the default CPU schedules, one fused kernel at a time.

When a compiled model is wrong and the same model without the default schedules is
right (``compile_model(..., default_schedules=False)``), one of the rules scheduled
some kernel wrongly. ``check_kernels`` finds which: every PrimFunc of the fused Relax
module is compiled twice on its own, as TVM wrote it (the reference: plain loops) and as
its rule schedules it (weight packing included), both are run on the same seeded random
arguments, and every buffer is compared. The scheduled one is also run twice, since
uninitialised memory shows up as outputs that change between runs.

``python tools/bisect_kernels.py MODEL --input-shape x:1,3,48,320`` prints the result.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import tvm
from tvm import tirx

from .cpu_rules import default_rules
from .schedule_pass import attach_layout_free_buffers, matching_rule
from .vector_rounding import vectorizable_rounding

RTOL = 1e-4


@dataclass
class KernelCheck:
    """One kernel: its rule and how far the scheduled code is from the plain loops."""

    name: str
    rule: str
    rel_error: float  # max |scheduled - plain| / max |plain| over all buffers and seeds
    deterministic: bool
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.deterministic and bool(self.rel_error <= RTOL)


def random_arrays(func: tirx.PrimFunc, seed: int, floats=(-1.0, 1.0), ints=(-8, 8)
                  ) -> list[np.ndarray]:
    """Seeded numpy arguments for every buffer of ``func``: floats uniform in ``floats``,
    integers in ``ints`` (upper bound excluded), bools 0/1."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    rng = np.random.default_rng(seed)
    arrays = []
    for info in ArgInfo.from_prim_func(func):
        shape = [int(d) for d in info.shape]
        dtype = str(info.dtype)
        if dtype.startswith("float"):
            arrays.append(rng.uniform(*floats, shape).astype(dtype))
        elif dtype == "bool":
            arrays.append(rng.integers(0, 2, shape).astype(dtype))
        else:
            arrays.append(rng.integers(*ints, shape).astype(dtype))
    return arrays


def _arguments(func: tirx.PrimFunc, seed: int) -> list[np.ndarray]:
    """Floats in [0.1, 1), so that sqrt/log/pow of the inputs stay finite; small
    non-negative integers, which are safe as indices."""
    return random_arrays(func, seed, floats=(0.1, 1.0), ints=(0, 4))


def _run(lib, arrays: list[np.ndarray]) -> list[np.ndarray]:
    tensors = [tvm.runtime.tensor(a.copy()) for a in arrays]
    lib["main"](*tensors)
    return [t.numpy() for t in tensors]


def _rel_error(ref: np.ndarray, got: np.ndarray) -> float:
    ref = ref.astype(np.float64)
    got = got.astype(np.float64)
    finite = np.isfinite(ref)
    # non-finite values must match exactly (NaN where the plain loops give NaN)
    if not np.array_equal(finite, np.isfinite(got)) or not np.array_equal(
        ref[~finite], got[~finite], equal_nan=True
    ):
        return float("inf")
    if not finite.any():
        return 0.0
    scale = max(float(np.abs(ref[finite]).max()), 1e-6)
    return float(np.abs(ref[finite] - got[finite]).max()) / scale


def check_kernel(name: str, func: tirx.PrimFunc, target, seeds=(0, 1)) -> KernelCheck | None:
    """Compare one PrimFunc as scheduled by its default rule with its plain loops (None:
    no rule schedules it)."""
    rule, scheduled = matching_rule(func, target, default_rules())
    if rule is None:
        return None

    def build(f: tirx.PrimFunc):
        with vectorizable_rounding(target):
            return tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}),
                               target=target)

    plain, fast = build(func), build(scheduled)
    worst, deterministic = 0.0, True
    for seed in seeds:
        arrays = _arguments(func, seed)
        expected = _run(plain, arrays)
        got = _run(fast, arrays)
        again = _run(fast, arrays)
        deterministic &= all(np.array_equal(a, b, equal_nan=True) for a, b in zip(got, again))
        for ref, out in zip(expected, got):
            worst = max(worst, _rel_error(ref, out))
    return KernelCheck(name, rule.name, worst, deterministic)


def check_kernels(mod: tvm.IRModule, target,
                  progress: Callable[[KernelCheck], None] | None = None) -> list[KernelCheck]:
    """``check_kernel`` for every unscheduled PrimFunc of a fused Relax module (the
    ``prepare_module(...).mod`` of the TVM backend), inside ``with target``."""
    mod = attach_layout_free_buffers(mod)
    results = []
    with target:
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            try:
                result = check_kernel(gvar.name_hint, func, target)
            except Exception as exc:  # noqa: BLE001 - report it as a failed kernel
                result = KernelCheck(gvar.name_hint, "?", float("inf"), False,
                                     f"{type(exc).__name__}: {str(exc).splitlines()[-1:]}")
            if result is None:
                continue
            results.append(result)
            if progress is not None:
                progress(result)
    return results
