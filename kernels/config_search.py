"""Measure the knob settings of the default CPU rules, kernel by kernel.

For each unscheduled PrimFunc of a fused Relax module whose rule has knobs (register
tile of conv/matmul, row width of depthwise/pooling), every setting from
``rule.configs`` is compiled on its own and timed on this machine, interleaved with the
heuristic setting (so a load spike hits all of them). A setting is kept only when its
median beats the heuristic's by ``min_gain``, and only after its output matched the
heuristic's on random inputs. The result feeds ``schedule_configs``.

Timing follows the compiled model: weights are packed ahead of time there, so the
packing block is removed (``RemoveWeightLayoutRewriteBlock``) and the kernel is timed on
arguments already in the packed layout. The output check keeps the packing block, so
both settings read the same unpacked weights.

This searches a handful of settings per kernel (seconds each), where MetaSchedule
searches thousands of schedules (hours on two cores); the two combine: ``tune`` runs
this first and MetaSchedule only has to beat the result.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import tirx

from .cpu_rules import default_rules
from .kernel_check import random_arrays
from .schedule_configs import workload_key
from .schedule_pass import apply_rule, attach_layout_free_buffers, is_scheduled, matching_rule
from .vector_rounding import vectorizable_rounding

logger = logging.getLogger(__name__)


@dataclass
class KernelResult:
    """What was measured for one kernel (times in microseconds, medians)."""

    name: str
    key: str
    rule: str
    default_us: float
    best_us: float
    best_config: dict | None
    trials: list[tuple[dict, float]] = field(default_factory=list)
    note: str = ""

    @property
    def improved(self) -> bool:
        return self.best_config is not None

    def entry(self, model: str) -> dict:
        return {"rule": self.rule, "config": self.best_config, "us": round(self.best_us, 2),
                "default_us": round(self.default_us, 2), "task": self.name, "model": model}


def _build(func: tirx.PrimFunc, target, keep_packing: bool):
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = tvm.IRModule({"main": func.with_attr("global_symbol", "main")})
    if not keep_packing:
        mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    with vectorizable_rounding(target):
        return tvm.compile(mod, target=target), mod["main"]


def _random_args(func: tirx.PrimFunc, seed: int) -> list:
    return [tvm.runtime.tensor(a) for a in random_arrays(func, seed)]


def _timer(lib, func, min_repeat_ms: float):
    args = _random_args(func, seed=0)
    evaluator = lib.mod.time_evaluator("main", tvm.cpu(), number=1, repeat=1,
                                   min_repeat_ms=int(min_repeat_ms))
    return lambda: evaluator(*args).mean * 1e6


def _same_output(a: tirx.PrimFunc, b: tirx.PrimFunc, target) -> bool:
    """Both schedules (packing kept) give the same output on the same random inputs."""
    outs = []
    for func in (a, b):
        lib, built = _build(func, target, keep_packing=True)
        args = _random_args(built, seed=1)
        lib["main"](*args)
        outs.append(args[-1].numpy().astype(np.float64))
    ref, got = outs
    scale = max(float(np.abs(ref).max()), 1e-6)
    return float(np.abs(ref - got).max()) <= 1e-4 * scale


def search_kernel(name: str, func: tirx.PrimFunc, target, *, rounds: int = 5,
                  min_repeat_ms: float = 20.0, min_gain: float = 0.03,
                  max_configs: int = 12) -> KernelResult | None:
    """Time the knob settings of the rule that schedules ``func``; None without knobs."""
    rule, default = matching_rule(func, target, default_rules())
    if rule is None:
        return None
    configs = rule.configs(func, target)[:max_configs]
    if len(configs) < 2:
        return None
    variants: list[tuple[dict | None, tirx.PrimFunc, Callable]] = []
    for i, config in enumerate(configs):
        scheduled = default if i == 0 else apply_rule(rule, func, target, config)
        if scheduled is None:
            continue
        try:
            lib, built = _build(scheduled, target, keep_packing=False)
        except Exception as exc:  # noqa: BLE001 - a setting that does not build is dropped
            logger.info("%s %s does not build: %s", name, config, str(exc).splitlines()[-1:])
            continue
        variants.append((None if i == 0 else config, scheduled,
                         _timer(lib, built, min_repeat_ms)))
    if not variants or variants[0][0] is not None:
        return None
    samples: list[list[float]] = [[] for _ in variants]
    for _ in range(rounds):
        for i, (_, _, timer) in enumerate(variants):
            samples[i].append(timer())
    medians = [float(np.median(s)) for s in samples]
    trials = [(configs[0] if c is None else c, m) for (c, _, _), m in zip(variants, medians)]
    result = KernelResult(name, workload_key(func), rule.name, medians[0], medians[0], None,
                          trials)
    for i in sorted(range(1, len(variants)), key=lambda i: medians[i]):
        if medians[i] > medians[0] * (1.0 - min_gain):
            break
        if _same_output(default, variants[i][1], target):
            result.best_us, result.best_config = medians[i], variants[i][0]
            break
        result.note = f"setting {variants[i][0]} gave different outputs, dropped"
        logger.warning("%s: %s", name, result.note)
    return result


@dataclass
class SearchOutcome:
    results: list[KernelResult]
    kernels: int  # distinct kernels to look at (those in ``skip`` excluded)
    visited: int  # how many of them were looked at before the deadline

    @property
    def finished(self) -> bool:
        return self.visited == self.kernels


def search_module(mod: tvm.IRModule, target, *, skip: Mapping[str, dict] | None = None,
                  deadline: float | None = None,
                  progress: Callable[[KernelResult | None, str, int, int], None] | None = None,
                  **kwargs) -> SearchOutcome:
    """``search_kernel`` for every distinct unscheduled PrimFunc of a fused Relax module.

    Kernels whose workload key is in ``skip`` (already measured for the rule that
    schedules them now) are not timed again.
    Stops before a kernel when ``deadline`` (``time.time()``) has passed.
    """
    mod = attach_layout_free_buffers(tvm.IRModule(dict(mod.functions_items()), attrs=mod.attrs))
    todo = []
    seen = set()
    skip = skip or {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        key = workload_key(func)
        if key in seen:
            continue
        seen.add(key)
        if key in skip:  # known, unless measured for another rule (a rule changed since)
            rule, _ = matching_rule(func, target, default_rules())
            if rule is None or skip[key].get("rule") == rule.name:
                continue
        todo.append((gvar.name_hint, func))
    outcome = SearchOutcome([], len(todo), 0)
    for i, (name, func) in enumerate(todo):
        if deadline is not None and time.time() >= deadline:
            break
        with target:
            result = search_kernel(name, func, target, **kwargs)
        outcome.visited = i + 1
        if result is not None:
            outcome.results.append(result)
        if progress is not None:
            progress(result, name, i + 1, len(todo))
    return outcome
