"""What the user asked `autocompress` for: one resource budget and the quality limits.

Resource budgets (exactly one):
  latency_ms  the model's median latency on the backend, in ms, at most this
  speedup     the input model's latency / the result's (measured side by side), at least this
  size_mb     the serialized model, in MB (10^6 bytes), at most this
  macs        multiply-accumulates of one inference, at most this (int8 does not change it)

Quality limits (any of them, all must hold; none: the least error wins, unlimited):
  max_error          output relative L2 error vs the input model on the verify data
  max_accuracy_drop  top-1 accuracy drop (a fraction) on labelled verify data, or the drop
                     of the user's metric callback (metric(input) - metric(candidate))

Internally a latency budget is a limit on the latency *ratio* to the input model (both
timed in the same interleaved rounds), so the machine's load drifting between
measurements does not move the goal; `latency_ms` becomes the ratio limit
`latency_ms / input latency` measured at the start, and is checked again in ms at the end.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..errors import InputSpecError

RESOURCES = ("latency_ms", "speedup", "size_mb", "macs")
# the quantity each budget limits, as named in candidate records
QUANTITY = {"latency_ms": "latency_ratio", "speedup": "latency_ratio", "size_mb": "size_bytes",
            "macs": "macs"}


@dataclass(frozen=True)
class Budget:
    kind: str
    value: float
    max_error: float | None = None
    max_accuracy_drop: float | None = None

    @classmethod
    def parse(cls, *, latency_ms: float | None = None, speedup: float | None = None,
              size_mb: float | None = None, macs: float | None = None,
              max_error: float | None = None,
              max_accuracy_drop: float | None = None) -> Budget:
        """The one resource budget given, checked; InputSpecError naming the problem."""
        given = {k: v for k, v in (("latency_ms", latency_ms), ("speedup", speedup),
                                   ("size_mb", size_mb), ("macs", macs)) if v is not None}
        flags = ", ".join("--" + k.replace("_", "-") for k in RESOURCES)
        if not given:
            raise InputSpecError(f"autocompress needs one budget: one of {flags}")
        if len(given) > 1:
            names = " and ".join("--" + k.replace("_", "-") for k in given)
            raise InputSpecError(f"autocompress takes one budget, got {names}: give one of "
                                 f"{flags}")
        kind, value = next(iter(given.items()))
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise InputSpecError(f"--{kind.replace('_', '-')} {value}: must be a finite "
                                 "number > 0")
        for name, limit in (("max_error", max_error), ("max_accuracy_drop", max_accuracy_drop)):
            if limit is not None and not (math.isfinite(limit) and limit >= 0):
                raise InputSpecError(f"--{name.replace('_', '-')} {limit}: must be a finite "
                                     "number >= 0")
        return cls(kind, float(value), max_error, max_accuracy_drop)

    @property
    def quantity(self) -> str:
        return QUANTITY[self.kind]

    def limit(self, base: dict[str, float]) -> float:
        """The budget as a limit on `quantity` (at most), given the input model's numbers."""
        if self.kind == "speedup":
            return 1.0 / self.value
        if self.kind == "latency_ms":
            return self.value / base["latency_ms"]
        if self.kind == "size_mb":
            return self.value * 1e6
        return self.value

    def describe(self) -> str:
        unit = {"latency_ms": f"latency <= {self.value:g} ms", "speedup": f"speedup >= "
                f"{self.value:g}x", "size_mb": f"size <= {self.value:g} MB",
                "macs": f"MACs <= {self.value:.4g}"}[self.kind]
        limits = []
        if self.max_error is not None:
            limits.append(f"rel L2 error <= {self.max_error:g}")
        if self.max_accuracy_drop is not None:
            limits.append(f"accuracy drop <= {self.max_accuracy_drop * 100:g} pt")
        return unit + (", " + ", ".join(limits) if limits else ", no quality limit")

    def quality_problems(self, record: dict[str, Any]) -> list[str]:
        """Why a measured candidate misses the quality limits ([] when it does not); NaN
        always misses."""
        problems = []
        err = record.get("rel_l2")
        if self.max_error is not None and not (err is not None and err <= self.max_error):
            problems.append(f"rel L2 error {err:.4g} > {self.max_error:g}")
        if self.max_accuracy_drop is not None:
            drop = record.get("accuracy_drop")
            if drop is None:
                problems.append("--max-accuracy-drop needs labelled verify data (or a metric)")
            elif not drop <= self.max_accuracy_drop + 1e-12:
                problems.append(f"accuracy drop {drop * 100:.2f} pt > "
                                f"{self.max_accuracy_drop * 100:g} pt")
        return problems

    def resource_problem(self, record: dict[str, Any], base: dict[str, float]) -> str | None:
        value = record.get(self.quantity)
        limit = self.limit(base)
        if value is not None and value <= limit:
            return None
        if self.quantity == "latency_ratio":
            return (f"speedup {1 / value:.3g}x < {1 / limit:.3g}x" if value else
                    "latency not measured")
        return f"{self.quantity} {value:.4g} > {limit:.4g}"

    def quality_loss(self, record: dict[str, Any]) -> tuple[float, float]:
        """Sort key among candidates that meet the budget: the limited quality first
        (accuracy/metric drop when that is the limit), then rel L2."""
        err = record.get("rel_l2")
        err = float("inf") if err is None or not math.isfinite(err) else err
        if self.max_accuracy_drop is not None and record.get("accuracy_drop") is not None:
            return (record["accuracy_drop"], err)
        return (err, err)
