"""Build the model a policy describes, with the project's own passes in a fixed order:
prune (per-group ratios through `overrides`), lowrank (per-layer rank fractions),
sparsify (block(16x1), per-layer ratios through `overrides`, every other layer kept dense,
recovery refit on the calibration data), then quantize(int8) with every layer the policy
keeps float in `keep_float`. A sparse layer stays float and whole (`Space.repair`): its
int8 and rank choices are dropped, and the stats say which (`dropped_for_sparse`).

The pipeline text of a build is recorded for the report; lowrank's per-layer ranks have no
pipeline-text form yet, so that step is written as `lowrank(rank=full)` plus the ranks.
"""

from __future__ import annotations

import math
from typing import Any

import onnx_ir as ir

from ..errors import OnnxforgeError
from ..ir import infer_shapes, load_model
from ..passes.base import PassContext
from ..passes.lowrank.lowrank import LowRankOptions, LowRankPass
from ..passes.lowrank.rank import round_rank
from ..passes.pruning.prune import PruneOptions, PrunePass
from ..passes.quantization.core import QuantizeOptions
from ..passes.quantization.prepare import merge_for_int8
from ..passes.quantization.quantize import QuantizePass
from ..passes.sparsity.sparsify import SparsifyOptions, SparsifyPass
from .space import COMPUTE_OPS, SPARSE_PATTERN, Policy, Space, override_text


class BuildError(OnnxforgeError):
    """A policy whose model could not be built (a pass refused); the search skips it."""


class _PerLayerLowRank(LowRankPass):
    """`lowrank` with a rank fraction per layer key; the other layers stay whole."""

    def __init__(self, options: Any, context: PassContext, fractions: dict[str, float]):
        super().__init__(options, context)
        self.fractions = fractions

    def _select_ranks(self, layers, plans):
        ranks: dict[str, tuple[int, ...] | None] = {}
        for layer in layers:
            fraction = self.fractions.get(layer.key)
            if not fraction:
                layer.attrs["_refused_ranks"] = None
                ranks[layer.key] = None
                continue
            _spectra, fulls, _shapes = self._spectra(layer, plans[layer.key])
            chosen = tuple(round_rank(math.ceil(fraction * f), f, self.options.round_to)
                           for f in fulls)
            ranks[layer.key] = chosen if self._saves_enough(layer, chosen) else None
            if ranks[layer.key] is None:
                layer.attrs["_refused_ranks"] = chosen
        return ranks

    def _no_rank_reason(self, layer, plan) -> str:
        if layer.attrs.get("_refused_ranks") is None:
            return "not chosen by the policy"
        return super()._no_rank_reason(layer, plan)


def build(model: ir.Model, space: Space, policy: Policy, context: PassContext,
          *, lowrank_guard: bool = True, recover: bool = True
          ) -> tuple[ir.Model, dict[str, Any]]:
    """(a new model for `policy`, {"pipeline": text, "stats": per pass}); `model` is not
    modified. Raises BuildError when a pass refuses. `recover=False`: prune without its
    least-squares recovery (same structure, so the same latency, size and MACs; the proxy
    tables' prune entries, whose error comes from the sensitivity probe instead)."""
    work = load_model(model, check=False)
    steps: list[str] = []
    stats: dict[str, Any] = {}
    dropped = space.dropped_for_sparse(policy)
    if dropped:
        policy = space.repair(policy)
        stats["dropped_for_sparse"] = dropped
    prune = space.by_kind(policy, "prune")
    if prune:
        p = PrunePass(PruneOptions(ratio=0.0, overrides=override_text(prune),
                                   recover=recover), context)
        p(work)
        if "refused" in p.stats:
            raise BuildError(f"prune refused: {p.stats['refused']}")
        steps.append(p.describe())
        stats["prune"] = {k: p.stats.get(k) for k in ("units_removed", "macs_removed_fraction")}
    ranks = space.by_kind(policy, "rank")
    if ranks:
        p = _PerLayerLowRank(LowRankOptions(rank="full", guard=lowrank_guard), context, ranks)
        p(work)
        steps.append(p.describe() + "+ranks{" + ",".join(f"{k}:{v:g}" for k, v in
                                                       ranks.items()) + "}")
        stats["lowrank"] = {"decomposed": p.stats.get("decomposed"),
                            "skipped_by_guard": p.stats.get("skipped_by_guard")}
    sparse = space.by_kind(policy, "sparse")
    if sparse:
        # keep="*": only the layers the overrides name are sparsified (an override wins)
        p = SparsifyPass(SparsifyOptions(pattern=SPARSE_PATTERN, overrides=override_text(sparse),
                                         keep="*"), context)
        p(work)
        steps.append(p.describe())
        done = p.stats.get("layers", {})
        stats["sparsify"] = {"sparsified": {k: v.get("sparsity") for k, v in done.items()},
                             "refit": p.stats.get("refit")}
        missed = {k: p.stats.get("skipped", {}).get(k, "not sparsified") for k in sparse
                  if k not in done}
        if missed:  # e.g. pruning left a channel count the block does not tile
            stats["sparsify"]["not_sparsified"] = missed
    int8 = space.by_kind(policy, "bits")
    if int8:
        # quantize merges MatMul + bias Add into a Gemm named `<matmul>_gemm` before it
        # reads keep_float: merge first (exact), so keep_float names the nodes it will see
        infer_shapes(work)
        merge_for_int8(work)
        keep = [n.name for n in work.graph
                if n.op_type in COMPUTE_OPS and _owner(n.name, space) not in int8]
        opts = QuantizeOptions(mode="int8", keep_float=",".join(keep), matmul_activations=False)
        p = QuantizePass(opts, context)
        try:
            p(work)
        except OnnxforgeError as exc:  # e.g. keep_float naming a MatMul that quantize's
            # MatMul + bias Add -> Gemm merge renamed (MiniLM): the policy cannot be built
            raise BuildError(f"quantize refused: {exc}") from exc
        steps.append(f"quantize(int8,matmul_activations=false,keep_float=<{len(keep)} layers>)")
        stats["quantize"] = {"int8_layers": len(int8), "float_layers": len(keep)}
    return work, {"pipeline": ",".join(steps), "stats": stats}


def _owner(node_name: str, space: Space) -> str:
    """The original layer a node of the built model comes from: itself, or the layer that
    lowrank replaced by `<name>/lowrank_<i>` nodes."""
    node_name = node_name.removesuffix("_gemm")  # merge_for_int8's MatMul + Add -> Gemm
    base, sep, _ = node_name.rpartition("/lowrank_")
    return base if sep else node_name
