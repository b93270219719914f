"""Cheap predictions of a policy's latency, size, MACs and error, from tables measured once.

Tables (one build per knob choice, measured on the calibration data and the backend):
  single[knob][choice]  the model with only that choice applied: output rel L2 vs the
                        input model on calibration batches, latency ratio to the input model
                        (timed in the same interleaved rounds), size in bytes, MACs
  int8_all              latency ratio of the model with every `bits` knob in int8
  int8_loo[knob]        ... with every `bits` knob in int8 except this one

Predictions:
  latency ratio = (1 + sum of the prune/rank choices' ratio - 1)
                  x (1 + (int8_all - 1) x the int8 layers' share of the leave-one-out weights
                  |int8_loo - int8_all|)
      int8's gain is not additive per layer (Q/DQ pairs between int8 layers vanish), so it
      is measured from the all-int8 end and shared out by how much each layer's leave-one-
      out moved it; exact for the input model and all-int8, bounded in between
  size, MACs    the input model's plus each choice's change
  error         the sum of each choice's error (conservative for errors that partly cancel)
`Correction` then scales each predicted change by the least-squares factor measured/
predicted over the candidates built so far.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from .space import Policy, Space


def knob_id(space: Space, i: int) -> str:
    knob = space.knobs[i]
    return f"{knob.kind}:{knob.key}"


@dataclass
class ProxyTables:
    base: dict[str, float]  # the input model: latency_ms, size_bytes, macs
    single: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    int8_all: float | None = None
    int8_loo: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)  # "knob=choice" -> why

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "single": self.single, "int8_all": self.int8_all,
                "int8_loo": self.int8_loo, "failed": self.failed}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxyTables:
        return cls(data["base"], data["single"], data["int8_all"], data["int8_loo"],
                   data.get("failed", {}))

    def useful_choices(self, space: Space) -> list[list[int]]:
        """Per knob the choice indices the search may use: 0 (unchanged) and those that
        built, were timed and changed something (size, MACs or the outputs)."""
        allowed = []
        for i, knob in enumerate(space.knobs):
            rows = self.single.get(knob_id(space, i), {})
            allowed.append([0] + [c for c in range(1, len(knob.choices)) if str(c) in rows
                                  and "latency_ratio" in rows[str(c)]
                                  and _changed(rows[str(c)], self.base)])
        return allowed


def _changed(row: dict[str, float], base: dict[str, float]) -> bool:
    return (row["error"] > 0 or row["size_bytes"] != base["size_bytes"]
            or row["macs"] != base["macs"])


@dataclass
class Prediction:
    latency_ratio: float
    size_bytes: float
    macs: float
    error: float

    def to_dict(self) -> dict[str, float]:
        return {"latency_ratio": self.latency_ratio, "size_bytes": self.size_bytes,
                "macs": self.macs, "error": self.error}


def predict(tables: ProxyTables, space: Space, policy: Policy) -> Prediction:
    base = tables.base
    float_part, int8_term = 1.0, 0.0
    size_float, int8_bytes, macs, error = base["size_bytes"], 0.0, base["macs"], 0.0
    bits = [i for i, k in enumerate(space.knobs) if k.kind == "bits"]
    any_int8 = any(policy[i] for i in bits)
    for i, choice in enumerate(policy):
        if not choice:
            continue
        row = tables.single[knob_id(space, i)][str(choice)]
        error += row["error"]
        if space.knobs[i].kind == "bits":
            int8_bytes += row["size_bytes"] - base["size_bytes"]
            continue
        size_float += row["size_bytes"] - base["size_bytes"]
        macs += row["macs"] - base["macs"]
        float_part += row["latency_ratio"] - 1.0
    if any_int8 and tables.int8_all is not None:
        # the all-int8 change, in the share of the int8 layers' leave-one-out weights
        weights = {i: abs(tables.int8_loo.get(knob_id(space, i), tables.int8_all)
                          - tables.int8_all) for i in bits}
        total = sum(weights.values())
        share = (sum(weights[i] for i in bits if policy[i]) / total if total > 0
                 else sum(1 for i in bits if policy[i]) / len(bits))
        int8_term = (tables.int8_all - 1.0) * share
    ratio = max(float_part, 0.05) * max(1.0 + int8_term, 0.05)
    # int8 saves on what pruning and low rank left: its saving scaled by the size left
    size = size_float + int8_bytes * max(size_float, 0.0) / max(base["size_bytes"], 1.0)
    return Prediction(ratio, max(size, 0.0), max(macs, 0.0), error)


@dataclass
class Correction:
    """Scales the predicted *change* from the input model (latency ratio - 1, size change,
    error) by the least-squares factor fit to the candidates built so far (1 until one
    other than the input model has been measured; clamped to [0.1, 5] so one noisy
    measurement cannot flip the search). The input model's prediction stays exact."""

    latency: float = 1.0
    error: float = 1.0
    size: float = 1.0
    base_size: float = 0.0

    @classmethod
    def fit(cls, pairs: list[tuple[Prediction, dict[str, Any]]], base_size: float
            ) -> Correction:
        def factor(pred: list[float], meas: list[float]) -> float:
            den = sum(p * p for p in pred)
            if not pairs or den <= 0:
                return 1.0
            return min(max(sum(p * m for p, m in zip(pred, meas)) / den, 0.1), 5.0)

        rows = [(p, m) for p, m in pairs if m.get("latency_ratio") and m.get("size_bytes")]
        return cls(
            factor([p.latency_ratio - 1 for p, _ in rows], [m["latency_ratio"] - 1
                                                            for _, m in rows]),
            factor([p.error for p, _ in rows], [m.get("calib_error") or 0.0 for _, m in rows]),
            factor([p.size_bytes - base_size for p, _ in rows],
                   [m["size_bytes"] - base_size for _, m in rows]),
            base_size)

    def apply(self, p: Prediction) -> Prediction:
        return Prediction(1 + (p.latency_ratio - 1) * self.latency,
                          self.base_size + (p.size_bytes - self.base_size) * self.size
                          if self.base_size else p.size_bytes,
                          p.macs, p.error * self.error)

    def to_dict(self) -> dict[str, float]:
        return {"latency": round(self.latency, 4), "error": round(self.error, 4),
                "size": round(self.size, 4)}


def _jobs(space: Space, tables: ProxyTables, kinds: tuple[str, ...]
          ) -> list[tuple[str, str, Policy]]:
    """(knob id, choice | "all" | "loo", policy) of every table entry of the knobs of
    `kinds` still to measure."""
    bits = [i for i, k in enumerate(space.knobs) if k.kind == "bits" and "bits" in kinds]
    all_int8 = tuple(1 if i in bits else 0 for i in range(len(space.knobs)))
    jobs: list[tuple[str, str, Policy]] = []
    for i, knob in enumerate(space.knobs):
        kid = knob_id(space, i)
        tables.single.setdefault(kid, {})
        if knob.kind not in kinds:
            continue
        for c in range(1, len(knob.choices)):
            if str(c) not in tables.single[kid] and f"{kid}={c}" not in tables.failed:
                jobs.append((kid, str(c), space.single(i, c)))
    if bits and tables.int8_all is None and "=all" not in tables.failed:
        jobs.append(("", "all", all_int8))
    for i in bits if len(bits) > 1 else ():
        kid = knob_id(space, i)
        if kid not in tables.int8_loo and f"{kid}=loo" not in tables.failed:
            jobs.append((kid, "loo", tuple(0 if j == i else c for j, c in enumerate(all_int8))))
    return jobs


class OutOfTime(Exception):
    """Raised by the `on_step` callback of `measure_tables` when the time budget is spent."""


def measure_tables(space: Space, tables: ProxyTables,
                   build: Callable[[Policy], ir.Model],
                   calib_error: Callable[[ir.Model], float],
                   resources: Callable[[ir.Model], dict[str, float]],
                   time_ratios: Callable[[list[ir.Model]], list[float]],
                   on_step: Callable[[str], None] = lambda text: None,
                   chunk: int = 6, kinds: tuple[str, ...] = ("prune", "rank", "bits")
                   ) -> bool:
    """Build and measure every single-choice model and the int8 leave-one-out models
    into `tables`, skipping what it holds already (a resumed run). `time_ratios(models)`
    times them interleaved with the input model and returns each one's latency ratio to
    it; models are timed `chunk` at a time to bound memory. `on_step` may raise OutOfTime:
    the models built so far are timed, stay in `tables`, and False is returned (True:
    complete)."""
    from .build import BuildError

    pending: list[tuple[str, str, ir.Model, dict[str, float] | None]] = []

    def flush() -> None:
        ratios = time_ratios([m for _, _, m, _ in pending])
        for (kid, choice, _, row), ratio in zip(pending, ratios):
            if math.isnan(ratio):  # the backend refused to time it (TVM: failed verification)
                tables.failed[f"{kid}={choice}"] = "the latency backend refused it"
            elif choice == "all":
                tables.int8_all = ratio
            elif choice == "loo":
                tables.int8_loo[kid] = ratio
            else:
                tables.single[kid][choice] = {**row, "latency_ratio": ratio}
        pending.clear()

    jobs = _jobs(space, tables, kinds)
    try:
        for kid, choice, policy in jobs:
            on_step(f"proxies: {kid or 'all int8'} "
                    f"{'int8 leave-one-out' if choice == 'loo' else choice}")
            try:
                model = build(policy)
            except BuildError as exc:
                tables.failed[f"{kid}={choice}"] = str(exc)
                continue
            row = None
            if choice not in ("all", "loo"):
                row = {"error": calib_error(model), **resources(model)}
            pending.append((kid, choice, model, row))
            if len(pending) >= chunk:
                flush()
        if pending:
            flush()
    except OutOfTime:
        if pending:  # built already (PP-OCRv4 rec: ~50 s a prune build here): keep them
            flush()
        return False
    return True
