"""`prune`: structured channel pruning with dependency analysis and training-free recovery.

Pipeline text: `prune(0.3)`, `prune(macs=0.5,criterion=l2,round_to=8)`,
`prune(ratio=0.3,kinds=linear)` (transformer FFN neurons only),
`prune(macs=0.5,overrides="conv1=0;layer4.*=0.6")`.

What it does
1. Analysis (`groups.analyze`) on a copy with concrete input shapes:
   *units* (channels that must go together: a conv filter with its BN entries,
   every consumer's input column, the matching channel of a residual Add or a
   slice of a Concat; a whole conv group; an attention head with its Q/K/V
   columns and output-projection rows; an FFN neuron) and *groups* of units.
   Units that reach a graph output, an unknown op, a Softmax/LayerNorm over the
   channel axis, etc. are never touched.
2. Importance per unit, summed over every member: `l1`/`l2` of all weight
   slices (producer filters and consumer columns), `bn` (|gamma| of the BNs in
   the group), `activation` (mean |x| of the consumers' inputs on calibration
   data). Groups without the criterion's data fall back to `l2`. Scores are
   normalized by the group mean so groups can be ranked against each other.
3. How much: `ratio` removes that fraction of the units of every group;
   `macs=F` / `params=F` remove a fraction F of the model's MACs / parameters by
   a global threshold over normalized scores (each group capped at
   `max_ratio`) with `allocate=threshold`, or with `allocate=sensitivity` (the
   default when calibration data is given) from the model's measured output error
   per group and candidate ratio, least error per MAC removed (`sensitivity`);
   `overrides="pattern=ratio;..."` fixes the ratio of groups whose
   layer or weight names match the fnmatch pattern (e.g. `layer4.*`); every
   group keeps at least `min_channels` channels, and groups of single channels
   keep a multiple of `round_to`.
4. Physical removal (`apply`): smaller weights and ops, not masks.
5. Recovery without training (`recover`, with calibration data and
   `recover=true`): least-squares refit of every layer that lost inputs, against
   the original layer outputs; then BN running statistics re-estimated
   (`bn_recalib`); wave by wave in topological order, each layer fit on the
   pruned and already corrected model's inputs (`sequential=false`: all layers
   in one wave, for comparison), ridge chosen on a held-out fold.
6. The pruned copy must load and run in onnxruntime with the original output
   shapes; otherwise the pass refuses and leaves the model unchanged.

Lossy (`exact = False`): the pass manager records the error; `stats` has MACs
and parameters before/after, units and channels removed, and why the other
units were not prunable. With nothing to remove (ratio 0) the model is left
bit-identical.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Literal

import networkx as nx
import numpy as np
import onnx_ir as ir

from ...activations import iter_activations, probe_shapes
from ...backends.ort import OrtArtifact
from ...errors import OnnxforgeError, PipelineError
from ...ir import constant_array, infer_shapes, load_model
from ...metrics import MAC_OPS, compute_metrics, node_macs
from ...shapes import model_inputs
from .. import overrides
from ..base import ForgePass, option, register
from ..graph import attr, weight_out_axis
from .apply import PruneApplyError, apply_plan, group_removed, kept_indices
from .groups import Analysis, Group, _Shapes, analyze
from .recover import RefitTarget, conv_geometry, node_dag, recover
from .sensitivity import SensitivityProbe, allocate, candidate_counts, measure

logger = logging.getLogger(__name__)

Criterion = Literal["l1", "l2", "bn", "activation", "energy", "reconstruction"]
Allocation = Literal["auto", "threshold", "sensitivity"]


@dataclass
class PruneOptions:
    ratio: float = option(0.3, ge=0.0, lt=1.0)
    macs: float | None = option(None, ge=0.0, lt=1.0)
    params: float | None = option(None, ge=0.0, lt=1.0)
    criterion: Criterion = "l2"
    overrides: str = ""
    min_channels: int = option(1, ge=0)
    round_to: int = option(1, ge=1)
    max_ratio: float = option(0.8, gt=0.0, le=1.0)
    kinds: str = "all"
    recover: bool = True
    bn_recalib: bool = True
    calib_batches: int | None = option(None, ge=1)  # None: the run's calibration batch limit (64)
    max_rows: int = option(2048, ge=1)
    # None: chosen per layer by two-fold cross-validation
    ridge: float | None = option(None, ge=0.0)
    # how a macs=/params= target is spread over groups (auto: sensitivity with calibration)
    allocate: Allocation = "auto"
    sens_batches: int = option(4, ge=1)  # calibration batches of the sensitivity sweep
    sequential: bool = True  # recovery wave by wave (False: every layer in one wave)


def parse_overrides(text: str) -> list[tuple[str, float]]:
    """`"conv1=0.2;layer4.*=0.5"` -> [("conv1", 0.2), ("layer4.*", 0.5)]."""
    return overrides.parse_overrides(text, "prune")


class CostModel:
    """MACs and parameters of the model as a function of removed counts per axis node."""

    def __init__(self, model: ir.Model, analysis: Analysis):
        self.sizes = np.array([an.size for an in analysis.nodes], dtype=np.float64)
        self.mac_terms: list[tuple[float, list[int]]] = []
        self.total_macs = 0.0
        kernel_axes = {id(k.node): k.mac_axes for k in analysis.kernels}
        for node in model.graph:
            if node.op_type not in MAC_OPS:
                continue
            macs = node_macs(node) or 0
            self.total_macs += macs
            axes = kernel_axes.get(id(node), [])
            nids = sorted({analysis.index[(id(v), a)] for v, a in axes
                           if (id(v), a) in analysis.index})
            if macs and nids:
                self.mac_terms.append((float(macs), nids))
        self.total_params = float(compute_metrics(model, with_macs=False).params)
        by_value: dict[int, list[int]] = defaultdict(list)
        for an in analysis.nodes:
            if an.constant:
                by_value[id(an.value)].append(an.id)
        s = _Shapes(model)
        self.param_terms = []
        for nids in by_value.values():
            shape = s.shape(analysis.nodes[nids[0]].value) or ()
            self.param_terms.append((float(np.prod(shape)), nids))

    def removed(self, removed_counts: np.ndarray) -> tuple[float, float]:
        """(MACs removed, params removed) for per-axis-node removed counts."""
        frac = 1.0 - removed_counts / np.maximum(self.sizes, 1)
        macs = sum(base * (1.0 - float(np.prod(frac[n]))) for base, n in self.mac_terms)
        params = sum(size * (1.0 - float(np.prod(frac[n]))) for size, n in self.param_terms)
        return macs, params


@dataclass
class PrunePlan:
    """What `PrunePass.plan` decided; `work` is the shape-inferred copy it refers to."""

    work: ir.Model
    analysis: Analysis
    chosen: list[int]
    removed: dict[int, np.ndarray]
    shapes: dict[str, tuple[int, ...]]
    original_shapes: dict
    cost: CostModel


@register
class PrunePass(ForgePass):
    """Structured channel pruning (see module docstring for rules and options)."""

    name = "prune"
    summary = ("structured channel/neuron/head pruning with dependency analysis, "
               "least-squares recovery and BN re-estimation")
    exact = False
    Options = PruneOptions
    subgraph_note = ("the dependency analysis stops at If/Loop/Scan boundaries: layers inside "
                     "bodies are not pruned, and channels read inside a body are blocked")
    positional = ("ratio",)

    # ------------------------------------------------------------ entry point

    def _analyse(self, model: ir.Model):
        """(a copy of `model` with concrete shapes, its input shapes, the original value
        shapes, the dependency analysis, the eligible groups); `model` is not modified."""
        self._check_options(self.options)
        work = load_model(model, check=False)
        original_shapes = {v.name: (v.shape, v.type) for v in _all_values(work)}
        shapes = self._input_shapes(work)
        for value in model_inputs(work):
            if value.name in shapes:
                value.shape = ir.Shape(shapes[value.name])
        infer_shapes(work)
        _probe_shapes(work, self._sample_batch(work, shapes), self.context.threads)
        analysis = analyze(work)
        return work, shapes, original_shapes, analysis, self._eligible_groups(analysis)

    def plan(self, model: ir.Model) -> PrunePlan:
        """Analyse `model` (not modified) and choose the units to remove."""
        work, shapes, original_shapes, analysis, groups = self._analyse(model)
        self.stats.update(
            groups=len(analysis.groups),
            eligible_groups=len(groups),
            prunable_units=len(analysis.units),
            unprunable_units=analysis.blocked_units,
            unprunable_reasons=dict(sorted(analysis.block_reasons.items(),
                                           key=lambda kv: -kv[1])[:8]),
        )
        cost = CostModel(work, analysis)
        chosen: list[int] = []
        self._probe, self._group_error = None, {}
        if groups and self._needs_probe():
            start = time.perf_counter()
            self._probe = self._make_probe(work, analysis, groups)
            self.stats["sensitivity_setup_s"] = round(time.perf_counter() - start, 2)
        if groups:
            scores = self._unit_scores(model, work, analysis, groups)
            chosen = self._select(analysis, groups, scores, cost)
        self._probe = None
        removed = group_removed(analysis, chosen)
        return PrunePlan(work, analysis, chosen, removed, shapes, original_shapes, cost)

    def sensitivity_curves(self, model: ir.Model, ratios: list[float]
                           ) -> list[tuple[list[str], list[float | None]]]:
        """Per eligible group (its names, as `overrides` patterns match them): the output
        error of removing `ratio` of its units alone, for each of `ratios`, measured by
        the sensitivity probe (`allocate=sensitivity`'s numbers: the consumers refit in
        closed form, mean over outputs of ||y - y_ref||^2 / ||y_ref||^2 on `sens_batches`
        calibration batches). The units and their count are those a build with
        `overrides="name=ratio"` removes (same criterion order and rounding). None where
        no layer reading the group could be probed. Needs calibration data."""
        if not self.context.has_calibration:
            raise PipelineError("prune: sensitivity curves need calibration data (--calib)")
        work, _shapes, _orig, analysis, groups = self._analyse(model)
        if not groups:
            return []
        self._probe = self._make_probe(work, analysis, groups)
        try:
            scores = self._unit_scores(model, work, analysis, groups)
            out = []
            for g in groups:
                order = sorted(g.units, key=lambda u: (scores[u.id], u.id))
                curve: list[float | None] = []
                for ratio in ratios:
                    k = self._rounded(g, math.floor(ratio * len(order)))
                    if not self._probe.consumers.get(g.id):
                        curve.append(None)
                    else:
                        curve.append(0.0 if k == 0 else self._probe.error(
                            self._probe.removal_feeds(g, order[:k])))
                out.append((list(g.names), curve))
            return out
        finally:
            self._probe = None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts: PruneOptions = self.options
        plan = self.plan(model)
        if not plan.chosen:
            logger.info("prune: nothing to remove")
            self.stats["units_removed"] = 0
            return ir.passes.PassResult(model, modified=False)
        work, analysis, removed, cost = plan.work, plan.analysis, plan.removed, plan.cost
        counts = np.zeros(len(analysis.nodes))
        for nid, idx in removed.items():
            counts[nid] = len(idx)
        macs_removed, params_removed = cost.removed(counts)
        self.stats.update(
            units_removed=len(plan.chosen),
            macs_before=int(cost.total_macs),
            macs_after=round(cost.total_macs - macs_removed),
            macs_removed_fraction=round(macs_removed / max(cost.total_macs, 1), 4),
            params_before=int(cost.total_params),
            params_after=round(cost.total_params - params_removed),
            removed_by_kind=self._by_kind(analysis, plan.chosen),
            per_group=self._per_group(analysis, plan.chosen),
        )
        try:
            kept = kept_indices(analysis, removed)
            changed = _changed_kernels(analysis, kept)
            targets = self._refit_targets(work, analysis, kept, changed) \
                if self._recovering() else []
            self.stats.update(apply_plan(work, analysis, removed))
            # MACs of the pruned graph on the shapes the cost model used (before the model's
            # own dynamic dims come back): the cost model misses MACs on axes it does not
            # follow (a Gemm's rows tied to channels by a Reshape: fuzzer, 2142 MACs)
            macs_after = compute_metrics(work, plan.shapes).macs
            self.stats.update(macs_after=int(macs_after), macs_removed_fraction=round(
                1.0 - macs_after / max(cost.total_macs, 1), 4))
            _restore_shapes(work, plan.original_shapes, analysis, kept)
            if self._recovering():
                bns = _bns_downstream(work, changed) if opts.bn_recalib else []
                kept_by_name = {analysis.nodes[n].value.name: k for n, k in kept.items()
                                if analysis.nodes[n].axis == 1}
                self.stats.update(recover(
                    model, work, targets, bns, kept_by_name, self._batches,
                    threads=self.context.threads, max_rows=opts.max_rows, ridge=opts.ridge,
                    seed=self.context.seed, sequential=opts.sequential))
            # the written model's parameters, with the biases a refit gives layers without
            # one (fuzzer: the cost model's count was 28 short)
            self.stats["params_after"] = int(compute_metrics(work, with_macs=False).params)
            self._validate(model, work, plan.shapes)
        except (PruneApplyError, ValueError, np.linalg.LinAlgError) as exc:
            logger.error("prune: refused, model left unchanged: %s", exc)
            self.stats["refused"] = str(exc)
            return ir.passes.PassResult(model, modified=False)
        model.graph = work.graph
        return ir.passes.PassResult(model, modified=True)

    # ------------------------------------------------------------ helpers

    def _check_options(self, opts: PruneOptions) -> None:
        for key in ("macs", "params"):
            value = getattr(opts, key)
            if value is not None and not 0.0 <= value < 1.0:
                raise PipelineError(f"prune: {key}={value} must be a fraction in [0, 1)")
        if not 0.0 <= opts.ratio < 1.0:
            raise PipelineError(f"prune: ratio={opts.ratio} must be in [0, 1)")
        if opts.round_to < 1 or opts.min_channels < 0:
            raise PipelineError("prune: round_to must be >= 1 and min_channels >= 0")
        kinds = {k.strip() for k in opts.kinds.split(",") if k.strip()}
        if not kinds <= {"all", "conv", "linear", "heads"}:
            raise PipelineError(f"prune: kinds={opts.kinds!r}: use all or a list of "
                                "conv,linear,heads")
        parse_overrides(opts.overrides)

    def _allocation(self) -> str:
        """threshold | sensitivity, resolving `auto` (sensitivity for a target with data)."""
        opts: PruneOptions = self.options
        if opts.allocate != "auto":
            return opts.allocate
        has_target = opts.macs is not None or opts.params is not None
        return "sensitivity" if has_target and self.context.has_calibration else "threshold"

    def _needs_probe(self) -> bool:
        opts: PruneOptions = self.options
        if opts.criterion in ("energy", "reconstruction") or (
                self._allocation() == "sensitivity"
                and (opts.macs is not None or opts.params is not None)):
            if not self.context.has_calibration:
                raise PipelineError(f"prune: criterion={opts.criterion} / allocate="
                                    f"{opts.allocate} need calibration data (--calib)")
            return True
        return False

    def _make_probe(self, work: ir.Model, analysis: Analysis, groups: list[Group]
                    ) -> SensitivityProbe:
        """The sensitivity probe: output errors on the first `sens_batches` calibration
        batches, its refits fit on the others (on all of them when there are too few)."""
        opts: PruneOptions = self.options
        batches = list(self.context.calibration_batches(opts.calib_batches))
        n = opts.sens_batches
        evaluate, fit = batches[:n], batches[n:]
        if len(fit) < n:
            fit = batches
        return SensitivityProbe(work, analysis, groups, evaluate, fit,
                                threads=self.context.threads, seed=self.context.seed)

    def _recovering(self) -> bool:
        return bool(self.options.recover and self.context.has_calibration)

    def _batches(self):
        return self.context.calibration_batches(self.options.calib_batches)

    def _input_shapes(self, model: ir.Model) -> dict[str, tuple[int, ...]]:
        shapes = dict(self.context.input_shapes or {})
        if self.context.has_calibration:
            for batch in self.context.calibration_batches(1):
                for name, arr in batch.items():
                    shapes.setdefault(name, tuple(arr.shape))
        for value in model_inputs(model):
            if value.name not in shapes and value.shape is not None:
                shapes[value.name] = tuple(d if isinstance(d, int) else 1 for d in value.shape)
        return shapes

    def _eligible_groups(self, analysis: Analysis) -> list[Group]:
        kinds = {k.strip() for k in self.options.kinds.split(",") if k.strip()}
        groups = []
        for g in analysis.groups:
            if "all" not in kinds and g.kind not in kinds:
                continue
            if len(g.units) < 2:
                continue
            groups.append(g)
        return groups

    @staticmethod
    def _by_kind(analysis: Analysis, chosen: list[int]) -> dict[str, int]:
        kind_of = {}
        for g in analysis.groups:
            for u in g.units:
                kind_of[u.id] = g.kind
        out: dict[str, int] = defaultdict(int)
        for uid in chosen:
            out[kind_of[uid]] += 1
        return dict(out)

    def _per_group(self, analysis: Analysis, chosen: list[int]) -> dict[str, dict]:
        """Units kept/removed per group that lost any, with the sensitivity probe's
        output error for that group's removal alone where it ran (HTML report)."""
        picked = set(chosen)
        errors = getattr(self, "_group_error", {})  # set by _select_sensitivity
        out = {}
        for g in analysis.groups:
            removed = sum(1 for u in g.units if u.id in picked)
            if removed:
                label = g.name or (g.names[0] if g.names else f"group {g.id}")
                label = f"{label} #{g.id}" if label in out else label
                out[label] = {"kind": g.kind, "units": len(g.units), "removed": removed,
                              "ratio": round(removed / len(g.units), 4),
                              "sensitivity": errors.get(g.id)}
        return out

    # ------------------------------------------------------------ importance

    def _unit_scores(self, model: ir.Model, work: ir.Model, analysis: Analysis,
                     groups: list[Group]) -> dict[int, float]:
        """Normalized importance per unit id (group mean = 1)."""
        criterion = self.options.criterion
        s = _Shapes(work)
        l2 = _weight_element_scores(s, analysis, squared=True)
        elem = l2
        if criterion == "l1":
            elem = _weight_element_scores(s, analysis, squared=False)
        elif criterion == "bn":
            elem = _bn_element_scores(s, work, analysis)
        elif criterion == "activation":
            elem = self._activation_element_scores(model, analysis)
        scores: dict[int, float] = {}
        for g in groups:
            energy = None
            if criterion == "energy":
                energy = self._probe.unit_energy(g)
            elif criterion == "reconstruction":
                energy = self._probe.greedy_order(g)
                energy = None if energy is None else energy + 1.0  # later removal: higher
            if energy is not None:
                mean = float(energy.mean())
                for u, v in zip(g.units, energy / mean if mean > 0 else np.ones_like(energy)):
                    scores[u.id] = float(v)
                continue
            use = elem if any(n in elem for n in g.nodes) else l2
            raw = []
            for u in g.units:
                total = sum(float(np.sum(use[n][idx])) for n, idx in u.members.items()
                            if n in use)
                raw.append(math.sqrt(total) if use is l2 else total)
            raw_arr = np.array(raw)
            mean = float(raw_arr.mean()) if raw_arr.size else 0.0
            norm = raw_arr / mean if mean > 0 else np.ones_like(raw_arr)
            for u, v in zip(g.units, norm):
                scores[u.id] = float(v)
        return scores

    def _activation_element_scores(self, model: ir.Model, analysis: Analysis) -> dict:
        sinks: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for k in analysis.kernels:
            if k.in_axis is None:
                continue
            nid = analysis.index.get((id(k.in_axis[0]), k.in_axis[1]))
            if nid is not None:
                sinks[k.in_axis[0].name].append((nid, k.in_axis[1]))
        if not sinks:
            return {}
        sums: dict[int, np.ndarray] = {}
        counts: dict[int, int] = defaultdict(int)
        for acts in iter_activations(model, sorted(sinks), self._batches(),
                                     threads=self.context.threads):
            for name, entries in sinks.items():
                x = np.abs(acts[name].astype(np.float64))
                for nid, axis in entries:
                    moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
                    sums[nid] = sums.get(nid, 0) + moved.sum(0)
                    counts[nid] += len(moved)
        return {nid: total / counts[nid] for nid, total in sums.items()}

    # ------------------------------------------------------------ selection

    def _select(self, analysis: Analysis, groups: list[Group], scores: dict[int, float],
                cost: CostModel) -> list[int]:
        opts: PruneOptions = self.options
        fixed_ratios = parse_overrides(opts.overrides)
        plans = []
        for g in groups:
            order = sorted(g.units, key=lambda u: (scores[u.id], u.id))
            plans.append((g, order, overrides.override_for(g.names, fixed_ratios)))
        global_target = opts.macs if opts.macs is not None else opts.params
        if global_target is None:
            chosen = []
            for g, order, fixed in plans:
                k = self._rounded(g, math.floor((opts.ratio if fixed is None else fixed)
                                                * len(order)))
                chosen.extend(u.id for u in order[:k])
            return chosen
        which = "macs" if opts.macs is not None else "params"
        if self._allocation() == "sensitivity":
            return self._select_sensitivity(plans, cost, global_target, which)
        return self._select_global(analysis, plans, scores, cost, global_target, which)

    def _select_sensitivity(self, plans, cost: CostModel, target: float, which: str
                            ) -> list[int]:
        """Ratios from the measured output error per group and candidate (`sensitivity`)."""
        n_nodes = len(cost.sizes)
        base = np.zeros(n_nodes)
        free, chosen = [], []
        for g, order, fixed in plans:
            if fixed is not None:
                k = self._rounded(g, math.floor(fixed * len(order)))
                chosen.extend(u.id for u in order[:k])
                for u in order[:k]:
                    for nid, idx in u.members.items():
                        base[nid] += len(idx)
                continue
            cap = math.floor(self.options.max_ratio * len(order))
            ks = candidate_counts(len(order), self.options.max_ratio,
                                  lambda k, g=g, cap=cap: self._rounded(g, k, cap))
            free.append((g, order, ks, _cumulative_members(g, order, n_nodes)))
        errors, seconds = measure(self._probe, [f[0] for f in free], [f[1] for f in free],
                                  [f[2] for f in free])
        total = cost.total_macs if which == "macs" else cost.total_params

        def removed_fraction(choice: list[int]) -> float:
            counts = base.copy()
            for (_g, _order, ks, cum), j in zip(free, choice):
                counts += cum[ks[j]]
            macs, params = cost.removed(counts)
            return (macs if which == "macs" else params) / max(total, 1.0)

        unprobed = [f[0].name or f[0].names[0] for f, e in zip(free, errors)
                    if len(e) > 1 and not np.isfinite(e[1])]
        if unprobed:
            # no layer reading them could be probed (e.g. only ConvTranspose consumers)
            logger.warning("prune: %d groups kept whole, their sensitivity could not be "
                           "measured: %s", len(unprobed), ", ".join(unprobed[:5]))
            self.stats["groups_not_probed"] = unprobed
        picks = allocate([f[2] for f in free], errors, removed_fraction, target)
        reached = removed_fraction(picks)
        if reached < target:
            logger.warning("prune: %s target %.2f not reachable; removing %.3f", which,
                           target, reached)
        for (_g, order, ks, _cum), j in zip(free, picks):
            chosen.extend(u.id for u in order[:ks[j]])
        # output error measured with only this group's chosen units removed
        self._group_error = {f[0].id: round(float(e[j]), 6) for f, e, j in zip(free, errors, picks)
                             if j and np.isfinite(e[j])}
        self.stats.update({f"{which}_target": target, "allocation": "sensitivity",
                           "sensitivity_s": round(seconds, 2),
                           "sensitivity_runs": sum(len(f[2]) - 1 for f in free),
                           "predicted_output_error": round(float(sum(
                               e[j] for e, j in zip(errors, picks))), 6)})
        return chosen

    def _rounded(self, g: Group, k: int, cap: int | None = None) -> int:
        """Units to remove after min_channels / round_to; never more than asked."""
        n = len(g.units)
        if cap is not None:
            k = min(k, cap)
        width = g.width
        keep = n - max(0, k)
        if width == 1 and self.options.round_to > 1:
            r = self.options.round_to
            keep = min(n, -(-keep // r) * r)
        min_keep = max(1, -(-self.options.min_channels // width))
        keep = max(keep, min(min_keep, n))
        return max(0, n - keep)

    def _select_global(self, analysis, plans, scores, cost: CostModel, target: float,
                       which: str) -> list[int]:
        n_nodes = len(analysis.nodes)
        base = np.zeros(n_nodes)
        tables = []
        for g, order, fixed in plans:
            sig = list(g.nodes)
            pos = {nid: j for j, nid in enumerate(sig)}
            m = np.zeros((len(order) + 1, len(sig)))
            for r, u in enumerate(order, start=1):
                m[r] = m[r - 1]
                for nid, idx in u.members.items():
                    m[r, pos[nid]] += len(idx)
            svals = np.array([scores[u.id] for u in order])
            if fixed is not None:
                k = self._rounded(g, math.floor(fixed * len(order)))
                base[sig] += m[k]
                tables.append((g, order, sig, m, None, k))
            else:
                cap = math.floor(self.options.max_ratio * len(order))
                tables.append((g, order, sig, m, svals, cap))
        total = cost.total_macs if which == "macs" else cost.total_params

        def evaluate(tau: float) -> tuple[float, list[int]]:
            counts = base.copy()
            ks = []
            for g, _order, sig, m, svals, cap in tables:
                if svals is None:
                    ks.append(cap)
                    continue
                k = self._rounded(g, int(np.searchsorted(svals, tau, side="left")), cap)
                counts[sig] += m[k]
                ks.append(k)
            macs, params = cost.removed(counts)
            return (macs if which == "macs" else params) / max(total, 1.0), ks

        hi = max([float(t[4].max()) for t in tables if t[4] is not None and len(t[4])],
                 default=0.0) * 2 + 1.0
        reached, ks = evaluate(hi)
        if reached < target:
            logger.warning("prune: %s target %.2f not reachable; removing %.3f", which,
                           target, reached)
        else:
            lo = 0.0
            for _ in range(60):
                mid = (lo + hi) / 2
                frac, _ks = evaluate(mid)
                if frac >= target:
                    hi = mid
                else:
                    lo = mid
            reached, ks = evaluate(hi)
        self.stats[f"{which}_target"] = target
        chosen = []
        for (_g, order, *_rest), k in zip(tables, ks):
            chosen.extend(u.id for u in order[:k])
        return chosen

    # ------------------------------------------------------------ recovery

    def _refit_targets(self, work: ir.Model, analysis: Analysis, kept: dict[int, np.ndarray],
                       changed: list[ir.Node]) -> list[RefitTarget]:
        """Layers that lost inputs and can be refit (computed before the removal)."""
        s = _Shapes(work)
        kernels = {id(k.node): k for k in analysis.kernels}
        targets = []
        for node in changed:
            k = kernels[id(node)]
            if k.weight is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
                continue
            w = s.const(k.weight)
            if w is None or len(k.weight.uses()) != 1:
                continue  # shared weight: a refit for one user would break the other
            out_axis = weight_out_axis(node)
            out_nid = analysis.index.get((id(k.weight), out_axis))
            kept_out = kept.get(out_nid) if out_nid is not None else None
            if kept_out is None:
                kept_out = np.arange(w.shape[out_axis])
            attrs: dict = {}
            if node.op_type == "Conv":
                xs, ys = s.shape(node.inputs[0]), s.shape(node.outputs[0])
                if w.ndim != 4 or xs is None or ys is None or None in xs or None in ys:
                    continue
                attrs["geometry"] = conv_geometry(node, xs, w.shape, ys)
            elif node.op_type == "Gemm":
                if float(attr(node, "alpha", 1.0)) != 1.0 or float(attr(node, "beta", 1.0)) \
                        != 1.0 or int(attr(node, "transA", 0)):
                    continue
                attrs["transB"] = int(attr(node, "transB", 0))
            targets.append(RefitTarget(node, np.asarray(kept_out), attrs))
        return targets

    # ------------------------------------------------------------ validation

    def _sample_batch(self, model: ir.Model,
                      shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
        """First calibration batch, else seeded random inputs of the concrete shapes."""
        if self.context.has_calibration:
            batch = next(iter(self.context.calibration_batches(1)), None)
            if batch is not None:
                return batch
        rng = np.random.default_rng(self.context.seed)
        batch = {}
        for value in model_inputs(model):
            dtype = value.dtype.numpy() if value.dtype is not None else np.float32
            shape = shapes[value.name]
            batch[value.name] = (rng.standard_normal(shape).astype(dtype)
                                 if np.issubdtype(dtype, np.floating) else np.zeros(shape, dtype))
        return batch

    def _validate(self, original: ir.Model, pruned: ir.Model,
                  shapes: dict[str, tuple[int, ...]]) -> None:
        batch = self._sample_batch(original, shapes)
        try:
            ref = OrtArtifact(original, threads=self.context.threads).run(batch)
            got = OrtArtifact(pruned, threads=self.context.threads).run(batch)
        except OnnxforgeError as exc:
            raise PruneApplyError(f"pruned model does not run in onnxruntime: {exc}") from exc
        for (name, a), b in zip(ref.items(), got.values()):
            if a.shape != b.shape:
                raise PruneApplyError(f"output {name}: shape {b.shape} != original {a.shape}")
            if np.issubdtype(b.dtype, np.floating) and not np.all(np.isfinite(b)):
                raise PruneApplyError(f"output {name}: non-finite values after pruning")


def _cumulative_members(g: Group, order: list, n_nodes: int) -> dict[int, np.ndarray]:
    """Removed count per axis node after removing the first k units of `order`, by k."""
    out = {0: np.zeros(n_nodes)}
    current = np.zeros(n_nodes)
    for k, u in enumerate(order, start=1):
        for nid, idx in u.members.items():
            current[nid] += len(idx)
        out[k] = current.copy()
    return out


def _weight_element_scores(s: _Shapes, analysis: Analysis, squared: bool) -> dict:
    """Per axis node of a kernel weight: per-index sum |w| (or sum w^2) over other axes."""
    out: dict[int, np.ndarray] = {}
    for k in analysis.kernels:
        w = s.const(k.weight) if k.weight is not None else None
        if w is None:
            continue
        for axis in range(min(2, w.ndim)):
            nid = analysis.index.get((id(k.weight), axis))
            if nid is None or nid in out:
                continue
            other = tuple(i for i in range(w.ndim) if i != axis)
            wf = w.astype(np.float64)
            out[nid] = np.sum(wf * wf if squared else np.abs(wf), axis=other)
    return out


def _bn_element_scores(s: _Shapes, model: ir.Model, analysis: Analysis) -> dict:
    out: dict[int, np.ndarray] = {}
    for node in model.graph:
        if node.op_type != "BatchNormalization":
            continue
        gamma = s.const(node.inputs[1])
        nid = analysis.index.get((id(node.inputs[1]), 0))
        if gamma is not None and nid is not None:
            out[nid] = np.abs(gamma.astype(np.float64))
    return out


def _changed_kernels(analysis: Analysis, kept: dict[int, np.ndarray]) -> list[ir.Node]:
    """Weight layers whose inputs lose channels (their outputs change)."""
    out = []
    for k in analysis.kernels:
        if k.in_axis is not None and analysis.index.get((id(k.in_axis[0]), k.in_axis[1])) in kept:
            out.append(k.node)
    return out


def _bns_downstream(model: ir.Model, changed: list[ir.Node]) -> list[ir.Node]:
    """BatchNormalization nodes whose input depends on a changed layer."""
    dag = node_dag(model.graph)
    reach: set = set()
    for node in changed:
        if node in dag:
            reach |= nx.descendants(dag, node)
    return [n for n in model.graph if n in reach and n.op_type == "BatchNormalization"
            and len(n.inputs) >= 5]


def _probe_shapes(model: ir.Model, batch: dict[str, np.ndarray], threads: int | None) -> int:
    """Fill shapes that ONNX shape inference left symbolic by running the model once.

    Shapes then hold for the concrete input shapes the analysis uses (masks built
    with Expand/Where, shape arithmetic that data propagation cannot follow).
    """
    missing = []
    for node in model.graph:
        for out in node.outputs:
            if not out.name or constant_array(out) is not None:
                continue
            shape = out.shape
            if shape is None or not all(isinstance(d, int) for d in shape):
                missing.append(out)
    if not missing:
        return 0
    try:
        shapes = probe_shapes(model, [v.name for v in missing], batch, threads=threads)
    except (OnnxforgeError, KeyError) as exc:
        logger.warning("prune: shape probe failed (%s); using inferred shapes", exc)
        return 0
    for value in missing:
        if value.name in shapes:
            value.shape = ir.Shape(shapes[value.name])
    return len(missing)


def _all_values(model: ir.Model):
    yield from model.graph.inputs
    for node in model.graph:
        yield from node.outputs


def _restore_shapes(work: ir.Model, original: dict, analysis: Analysis,
                    kept: dict[int, np.ndarray]) -> None:
    """Put back the model's own shape annotations (dynamic dims), pruned axes resized."""
    new_sizes: dict[str, dict[int, int]] = defaultdict(dict)
    for nid, keep in kept.items():
        an = analysis.nodes[nid]
        new_sizes[an.value.name][an.axis] = len(keep)
    for value in _all_values(work):
        if value.is_initializer() or value.name not in original:
            continue
        shape, vtype = original[value.name]
        if shape is not None and value.name in new_sizes:
            dims = list(shape)
            for axis, n in new_sizes[value.name].items():
                if axis < len(dims) and isinstance(dims[axis], int):
                    dims[axis] = n
            shape = ir.Shape(dims)
        value.shape = shape
        if vtype is not None:
            value.type = vtype
