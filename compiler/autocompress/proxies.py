"""Cheap predictions of a policy's latency, size, MACs and error, from tables measured once.

Tables (one build per knob choice, measured on the calibration data and the backend):
  single[knob][choice]  the model with only that choice applied: output rel L2 vs the
                        input model on calibration batches, latency ratio to the input model
                        (timed in the same interleaved rounds), size in bytes, MACs
  int8_all              latency ratio of the model with every `bits` knob in int8
  int8_loo[knob]        ... with every `bits` knob in int8 except this one
  int8_rest_loo         ... except the `int8_rest` layers together (the small ones)

A sparse entry's latency is always timed on the search's backend (`backend_ratios`),
even when the other entries are timed on onnxruntime (`--proxy-latency ort`): ORT runs
the sparse weights of the dense ONNX at dense speed and would say "no gain". One backend
compile per sparse entry (`space.SPARSE_MAX_LAYERS` layers, at most 3 choices each).

What keeps them affordable on a real model (PP-OCRv4 rec: 23 prune groups x 3 ratios,
33 rank layers x 2, 47 int8 layers; a prune build with its recovery refit took ~57 s
under load):
  - prune entries are built without recovery (the structure, hence latency, size and
    MACs, is the same) and their error is prune's own sensitivity curve (its probe: the
    consumers refit in closed form on one onnxruntime session, all groups x ratios in
    one sweep), measured with the no-recovery build only where the probe cannot see the
    group. The candidates the search picks are built with recovery and measured for
    real: the proxies only rank them.
  - an int8 entry's own latency is not timed: the prediction does not use it (int8
    latency comes from the all-int8 end).
  - leave-one-out only for the int8 layers that hold most of the int8 layers' MACs
    (`LOO_SHARE`); the others are left out together in one model, and that model's
    change is shared among them by MACs.

Predictions:
  latency ratio = (1 + sum of the prune/rank choices' ratio - 1)
                  x (1 + (int8_all - 1) x the int8 layers' share of the leave-one-out weights
                  |int8_loo - int8_all|)
      int8's gain is not additive per layer (Q/DQ pairs between int8 layers vanish), so it
      is measured from the all-int8 end and shared out by how much each layer's leave-one-
      out moved it; exact for the input model and all-int8, bounded in between
  size, MACs    the input model's plus each choice's change
  error         the root of the sum of the squares of each choice's error (rel L2): the
                output perturbations of different layers add up about like independent
                vectors. On PP-OCRv4 rec's 58 measured candidates, once scaled by its
                factor, it is off by a mean |log| of 0.24 against 0.63 for the plain sum
                (digits on TVM, 42 candidates: 0.27 against 0.32); both rank them alike
                (Spearman 0.89)
`Correction` then scales each predicted change by the least-squares factor measured/
predicted over the candidates built so far.

A prune/rank entry's latency is one timing of a model that differs from the input model
by a few per cent, so under load its noise can be larger than its change, and a search
that sums such entries picks the lucky ones: on PP-OCRv4 rec (tables timed under load),
entries that removed no MACs at all had been timed at up to 41 % faster, and the joint
search's picks were predicted at 0.03x the input model's latency and measured at
0.48-0.64x. So each entry's change is modelled first from its MAC change, with one slope
per kind fit by least squares on all the kind's timed entries (`latency_slopes`: what a
removed MAC saves on this backend), and the entry's own timing is trusted by a weight
`trust` (0: slope only, 1: the timing only) that `Correction.fit` chooses among
`TRUSTS` by how well it predicts the candidates measured whole (0 until `MIN_FIT` of
them). On the 58 candidates of that PP-OCRv4 rec run, the slope alone (trust 0) ranks
their measured latency with Spearman 0.83 and a mean |log(predicted/measured)| of 0.07;
the timings alone (trust 1): 0.31 and 1.75.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from .space import Policy, Space

# leave-one-out for the largest int8 layers up to this share of the int8 layers' MACs
LOO_SHARE = 0.9


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
    int8_rest: list[str] = field(default_factory=list)  # int8 knobs without their own loo
    int8_rest_loo: float | None = None
    int8_macs: dict[str, float] = field(default_factory=dict)  # bits knob -> its MACs

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "single": self.single, "int8_all": self.int8_all,
                "int8_loo": self.int8_loo, "failed": self.failed,
                "int8_rest": self.int8_rest, "int8_rest_loo": self.int8_rest_loo,
                "int8_macs": self.int8_macs}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProxyTables:
        return cls(data["base"], data["single"], data["int8_all"], data["int8_loo"],
                   data.get("failed", {}), data.get("int8_rest", []),
                   data.get("int8_rest_loo"), data.get("int8_macs", {}))

    def useful_choices(self, space: Space) -> list[list[int]]:
        """Per knob the choice indices the search may use: 0 (unchanged) and those that
        built, were timed (int8 entries: not timed, see the module docstring) and changed
        something (size, MACs or the outputs). A sparse choice changes neither size nor
        MACs (the ONNX stays dense): it stays when the backend ran it faster (a sparse
        layer the backend kept dense only costs error)."""
        allowed = []
        for i, knob in enumerate(space.knobs):
            rows = self.single.get(knob_id(space, i), {})
            allowed.append([0] + [c for c in range(1, len(knob.choices)) if str(c) in rows
                                  and ("latency_ratio" in rows[str(c)] or knob.kind == "bits")
                                  and _changed(rows[str(c)], self.base)
                                  and (knob.kind != "sparse"
                                       or rows[str(c)]["latency_ratio"] < 1.0)])
        return allowed

    def int8_weights(self, space: Space) -> dict[int, float]:
        """Per bits knob index, how much leaving it float moves the all-int8 latency:
        |its leave-one-out - all-int8|, or for the `int8_rest` layers their group's
        change shared out by MACs (equally when their MACs are unknown or zero)."""
        bits = [i for i, k in enumerate(space.knobs) if k.kind == "bits"]
        weights = {i: abs(self.int8_loo.get(knob_id(space, i), self.int8_all)
                          - self.int8_all) for i in bits}
        rest = [i for i in bits if knob_id(space, i) in self.int8_rest]
        if rest and self.int8_rest_loo is not None:
            change = abs(self.int8_rest_loo - self.int8_all)
            macs = [self.int8_macs.get(knob_id(space, i), 0.0) for i in rest]
            total = sum(macs)
            for i, m in zip(rest, macs):
                weights[i] = change * (m / total if total > 0 else 1 / len(rest))
        return weights


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


TRUSTS = (0.0, 0.25, 0.5, 0.75, 1.0)
MIN_FIT = 3  # candidates measured whole before an entry's own timing is trusted
SLOPE_KINDS = ("prune", "rank")  # entries whose latency change is modelled from MACs


def latency_slopes(tables: ProxyTables, space: Space) -> dict[str, float]:
    """Per kind of `SLOPE_KINDS`, the latency ratio change per MAC ratio change over the
    kind's timed entries (least squares through the origin, clamped to [0, 1.5]); a kind
    whose entries change no MACs has no slope (its timings are used as they are)."""
    sums: dict[str, list[float]] = {}
    base_macs = tables.base.get("macs") or 0.0
    for i, knob in enumerate(space.knobs):
        if knob.kind not in SLOPE_KINDS or not base_macs:
            continue
        for row in tables.single.get(knob_id(space, i), {}).values():
            if "latency_ratio" in row:
                x, y = row["macs"] / base_macs - 1.0, row["latency_ratio"] - 1.0
                xx_xy = sums.setdefault(knob.kind, [0.0, 0.0])
                xx_xy[0] += x * x
                xx_xy[1] += x * y
    return {kind: min(max(xy / xx, 0.0), 1.5) for kind, (xx, xy) in sums.items() if xx > 0}


def predict(tables: ProxyTables, space: Space, policy: Policy, trust: float = 1.0,
            slopes: dict[str, float] | None = None) -> Prediction:
    """The proxies' prediction for `policy`; `trust` and `slopes`: how a prune/rank
    entry's latency change is taken (module docstring; the defaults: its timing only)."""
    policy = space.repair(policy)  # as built: a sparse layer's int8/rank choice dropped
    base = tables.base
    float_part, int8_term = 1.0, 0.0
    size_float, int8_bytes, macs, error_sq = base["size_bytes"], 0.0, base["macs"], 0.0
    bits = [i for i, k in enumerate(space.knobs) if k.kind == "bits"]
    any_int8 = any(policy[i] for i in bits)
    for i, choice in enumerate(policy):
        if not choice:
            continue
        row = tables.single[knob_id(space, i)][str(choice)]
        error_sq += row["error"] ** 2
        if space.knobs[i].kind == "bits":
            int8_bytes += row["size_bytes"] - base["size_bytes"]
            continue
        size_float += row["size_bytes"] - base["size_bytes"]
        macs += row["macs"] - base["macs"]
        timed = row["latency_ratio"] - 1.0
        slope = (slopes or {}).get(space.knobs[i].kind)
        if slope is None:
            float_part += timed
        else:
            modelled = slope * (row["macs"] / base["macs"] - 1.0)
            float_part += modelled + trust * (timed - modelled)
    if any_int8 and tables.int8_all is not None:
        # the all-int8 change, in the share of the int8 layers' leave-one-out weights
        weights = tables.int8_weights(space)
        total = sum(weights.values())
        share = (sum(weights[i] for i in bits if policy[i]) / total if total > 0
                 else sum(1 for i in bits if policy[i]) / len(bits))
        int8_term = (tables.int8_all - 1.0) * share
    ratio = max(float_part, 0.05) * max(1.0 + int8_term, 0.05)
    # int8 saves on what pruning and low rank left: its saving scaled by the size left
    size = size_float + int8_bytes * max(size_float, 0.0) / max(base["size_bytes"], 1.0)
    return Prediction(ratio, max(size, 0.0), max(macs, 0.0), math.sqrt(error_sq))


@dataclass
class Correction:
    """Scales the predicted *change* from the input model (latency ratio - 1, size change,
    error) by the least-squares factor fit to the candidates built so far (1 until one
    other than the input model has been measured; clamped to [0.1, 5] so one noisy
    measurement cannot flip the search), and holds how far prune/rank entries' own
    timings are trusted (`trust`, `slopes`: module docstring). The input model's
    prediction stays exact."""

    latency: float = 1.0
    error: float = 1.0
    size: float = 1.0
    base_size: float = 0.0
    trust: float = 1.0
    slopes: dict[str, float] = field(default_factory=dict)

    @classmethod
    def fit(cls, tables: ProxyTables, space: Space, records: list[dict[str, Any]],
            base_size: float) -> Correction:
        """Fit on the `records` measured whole (each with its "policy"): the trust among
        `TRUSTS` whose latency predictions, once scaled by their factor, are nearest to the
        measured ones (least squares on the change; 0 with fewer than `MIN_FIT`), then the
        three factors."""
        slopes = latency_slopes(tables, space)
        rows = [r for r in records if r.get("latency_ratio") and r.get("size_bytes")]
        trusts = TRUSTS if len(rows) >= MIN_FIT and slopes else (0.0,)
        fits = []
        for trust in trusts:
            pairs = [(predict(tables, space, tuple(r["policy"]), trust, slopes), r)
                     for r in rows]
            pred = [p.latency_ratio - 1 for p, _ in pairs]
            meas = [r["latency_ratio"] - 1 for r in rows]
            f = _factor(pred, meas)
            fits.append((sum((f * p - m) ** 2 for p, m in zip(pred, meas)), trust, f, pairs))
        _, trust, latency, pairs = min(fits, key=lambda x: x[:2])
        return cls(latency,
                   _factor([p.error for p, _ in pairs],
                           [r.get("calib_error") or 0.0 for _, r in pairs]),
                   _factor([p.size_bytes - base_size for p, _ in pairs],
                           [r["size_bytes"] - base_size for _, r in pairs]),
                   base_size, trust, slopes)

    def predict(self, tables: ProxyTables, space: Space, policy: Policy) -> Prediction:
        return self.apply(predict(tables, space, policy, self.trust, self.slopes))

    def apply(self, p: Prediction) -> Prediction:
        return Prediction(1 + (p.latency_ratio - 1) * self.latency,
                          self.base_size + (p.size_bytes - self.base_size) * self.size
                          if self.base_size else p.size_bytes,
                          p.macs, p.error * self.error)

    def to_dict(self) -> dict[str, Any]:
        return {"latency": round(self.latency, 4), "error": round(self.error, 4),
                "size": round(self.size, 4), "trust": self.trust,
                "slopes": {k: round(v, 4) for k, v in self.slopes.items()}}


def _factor(pred: list[float], meas: list[float]) -> float:
    """The least-squares factor measured/predicted, clamped to [0.1, 5]; 1 without data."""
    den = sum(p * p for p in pred)
    if den <= 0:
        return 1.0
    return min(max(sum(p * m for p, m in zip(pred, meas)) / den, 0.1), 5.0)


def split_loo(space: Space, layer_macs: dict[str, float] | None,
              share: float = LOO_SHARE) -> tuple[list[int], list[int]]:
    """(bits knobs that get their own leave-one-out, those left out together): the
    largest by MACs until `share` of the bits layers' MACs is covered get their own; a
    rest of one layer gets its own too. Without MACs every layer gets its own."""
    bits = [i for i, k in enumerate(space.knobs) if k.kind == "bits"]
    if not layer_macs:
        return bits, []
    macs = {i: float(layer_macs.get(space.knobs[i].key) or 0.0) for i in bits}
    total = sum(macs.values())
    own, covered = [], 0.0
    for i in sorted(bits, key=lambda i: (-macs[i], i)):
        if total > 0 and covered >= share * total:
            break
        own.append(i)
        covered += macs[i]
    rest = [i for i in bits if i not in own]
    if len(rest) == 1:
        own, rest = own + rest, []
    return sorted(own), rest


def _jobs(space: Space, tables: ProxyTables, kinds: tuple[str, ...]
          ) -> list[tuple[str, str, Policy]]:
    """(knob id, choice | "all" | "loo" | "rest", policy) of every table entry of the
    knobs of `kinds` still to measure."""
    bits = [i for i, k in enumerate(space.knobs) if k.kind == "bits" and "bits" in kinds]
    all_int8 = tuple(1 if i in bits else 0 for i in range(len(space.knobs)))
    rest = [i for i in bits if knob_id(space, i) in tables.int8_rest]
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
        if i not in rest and kid not in tables.int8_loo and f"{kid}=loo" not in tables.failed:
            jobs.append((kid, "loo", tuple(0 if j == i else c for j, c in enumerate(all_int8))))
    if rest and tables.int8_rest_loo is None and "=rest" not in tables.failed:
        jobs.append(("", "rest", tuple(0 if j in rest else c for j, c in enumerate(all_int8))))
    return jobs


class OutOfTime(Exception):
    """Raised by the `on_step` callback of `measure_tables` when the time budget is spent."""


def measure_tables(space: Space, tables: ProxyTables,
                   build: Callable[[Policy], ir.Model],
                   calib_error: Callable[[ir.Model], float],
                   resources: Callable[[ir.Model], dict[str, float]],
                   time_ratios: Callable[[list[ir.Model]], list[float]],
                   on_step: Callable[[str], None] = lambda text: None,
                   chunk: int = 6, kinds: tuple[str, ...] = ("prune", "rank", "bits",
                                                             "sparse"),
                   prune_errors: Callable[[], dict[str, dict[str, float]]] | None = None,
                   layer_macs: dict[str, float] | None = None,
                   backend_ratios: Callable[[list[ir.Model]], list[float]] | None = None
                   ) -> bool:
    """Build and measure every single-choice model and the int8 leave-one-out models
    into `tables`, skipping what it holds already (a resumed run). `build(policy)` is the
    proxies' build (prune without recovery, see the module docstring). `time_ratios
    (models)` times them interleaved with the input model and returns each one's latency
    ratio to it; models are timed `chunk` at a time to bound memory. `prune_errors()`
    (called once, when a prune entry is to be measured) gives {knob id: {choice: rel L2}}
    from prune's sensitivity curves; an entry it lacks is measured on its build instead
    (`calib_error`). `layer_macs` ({layer name: MACs}) chooses the int8 layers that get
    their own leave-one-out (`split_loo`; None: all). `backend_ratios` times the sparse
    entries (None: `time_ratios`; see the module docstring). `on_step` may raise
    OutOfTime: the models built so far are timed, stay in `tables`, and False is
    returned (True: complete)."""
    from .build import BuildError

    if "bits" in kinds and not tables.int8_loo and tables.int8_rest_loo is None:
        _set_loo_split(space, tables, layer_macs)
    pending: list[tuple[str, str, ir.Model, dict[str, float] | None]] = []
    probe_errors: dict[str, dict[str, float]] | None = None

    on_backend: list[tuple[str, str, ir.Model, dict[str, float] | None]] = []

    def flush() -> None:
        for queue, timer in ((pending, time_ratios), (on_backend, backend_ratios
                                                     or time_ratios)):
            if queue:
                ratios = timer([m for _, _, m, _ in queue])
                for (kid, choice, _, row), ratio in zip(queue, ratios):
                    _store(tables, kid, choice, row, ratio)
                queue.clear()

    jobs = _jobs(space, tables, kinds)
    try:
        for kid, choice, policy in jobs:
            on_step(f"proxies: {kid or 'all int8'} "
                    f"{'int8 leave-one-out' if choice in ('loo', 'rest') else choice}"
                    f"{' (the small layers together)' if choice == 'rest' else ''}")
            kind = kid.partition(":")[0]
            if kind == "prune" and probe_errors is None and prune_errors is not None:
                probe_errors = prune_errors()
            try:
                model = build(policy)
            except BuildError as exc:
                tables.failed[f"{kid}={choice}"] = str(exc)
                continue
            row = None
            if choice not in ("all", "loo", "rest"):
                row = _single_row(kind, (probe_errors or {}).get(kid, {}).get(choice),
                                  model, calib_error, resources)
                if kind == "bits":  # not timed: int8 latency comes from the all-int8 end
                    tables.single[kid][choice] = row
                    continue
            queue = on_backend if kind == "sparse" else pending
            queue.append((kid, choice, model, row))
            if len(queue) >= chunk:
                flush()
        flush()
    except OutOfTime:
        # built already (PP-OCRv4 rec: ~50 s a prune build here): keep them
        flush()
        return False
    return True


def _store(tables: ProxyTables, kid: str, choice: str, row: dict[str, Any] | None,
           ratio: float) -> None:
    """A timed entry into its table."""
    if math.isnan(ratio):  # the backend refused to time it (TVM: failed verification)
        tables.failed[f"{kid}={choice}"] = "the latency backend refused it"
    elif choice == "all":
        tables.int8_all = ratio
    elif choice == "loo":
        tables.int8_loo[kid] = ratio
    elif choice == "rest":
        tables.int8_rest_loo = ratio
    else:
        tables.single[kid][choice] = {**row, "latency_ratio": ratio}


def _set_loo_split(space: Space, tables: ProxyTables,
                   layer_macs: dict[str, float] | None) -> None:
    """Which int8 layers share one leave-one-out (decided once per table: a resumed run
    keeps the split it measured)."""
    _own, rest = split_loo(space, layer_macs)
    tables.int8_rest = [knob_id(space, i) for i in rest]
    tables.int8_macs = {knob_id(space, i): float((layer_macs or {}).get(k.key) or 0.0)
                        for i, k in enumerate(space.knobs) if k.kind == "bits"}


def _single_row(kind: str, probe_error: float | None, model: ir.Model,
                calib_error: Callable[[ir.Model], float],
                resources: Callable[[ir.Model], dict[str, float]]) -> dict[str, Any]:
    """A single-choice entry's error (a prune entry: the probe's when it has one), size,
    MACs."""
    row: dict[str, Any] = {"error": calib_error(model) if probe_error is None
                           else probe_error, **resources(model)}
    if kind == "prune":
        row["error_source"] = ("sensitivity probe" if probe_error is not None else
                               "measured without recovery")
    if kind == "sparse":
        row["latency_source"] = "backend"
    return row


def prune_curve_errors(model: ir.Model, space: Space, context: Any,
                       sens_batches: int = 8) -> dict[str, dict[str, float]]:
    """{prune knob id: {choice: estimated output rel L2}} from `prune`'s sensitivity
    curves (PrunePass.sensitivity_curves: the unit order and rounding of the build, the
    consumers refit in closed form): the square root of the probe's mean squared relative
    error. Groups the probe cannot see are left out (measured on their build)."""
    from ..passes.pruning.prune import PruneOptions, PrunePass

    knobs = [(i, k) for i, k in enumerate(space.knobs) if k.kind == "prune"]
    if not knobs:
        return {}
    ratios = sorted({r for _, k in knobs for r in k.choices})
    curves = PrunePass(PruneOptions(ratio=0.0, recover=False, sens_batches=sens_batches),
                       context).sensitivity_curves(model, ratios)
    out: dict[str, dict[str, float]] = {}
    for i, knob in knobs:
        curve = next((c for names, c in curves if knob.key in names), None)
        if curve is None:
            continue
        by_ratio = dict(zip(ratios, curve))
        out[knob_id(space, i)] = {str(c): math.sqrt(by_ratio[r]) for c, r in
                                  enumerate(knob.choices) if c and by_ratio[r] is not None}
    return out
