"""The decision space of `autocompress`: one knob per prunable dependency group, per
decomposable layer and per quantizable layer, each with a few choices.

A policy is a tuple of choice indices, one per knob, index 0 always meaning "leave it
as it is"; so the all-zero policy is the input model. Policies are hashable and turn
into JSON as plain lists.

Knobs:
  prune  a dependency group of `prune` (channels that go together), keyed by a node or
         weight name only that group has; choices: the fraction of its units removed
  rank   a Conv/Gemm/MatMul that `lowrank` can decompose; choices: the kept rank as a
         fraction of the full rank (0: not decomposed)
  bits   a Conv/Gemm/MatMul with a constant weight; choices: 32 (float) or 8 (int8 QDQ)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx_ir as ir

from ..ir import constant_array, load_model
from ..passes.base import PassContext

PRUNE_RATIOS = (0.0, 0.25, 0.5, 0.75)
RANK_FRACTIONS = (0.0, 0.5, 0.25)
BITS = (32, 8)
KINDS = ("prune", "rank", "bits")
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")

Policy = tuple[int, ...]


@dataclass(frozen=True)
class Knob:
    kind: str  # prune | rank | bits
    key: str  # prune: the group's unique name; rank/bits: the node name
    choices: tuple[float, ...]
    units: int = 0  # prune: the group's units (channels, neurons, heads)

    def value(self, index: int) -> float:
        return self.choices[index]

    def describe(self, index: int) -> str:
        value = self.choices[index]
        if self.kind == "prune":
            return "keep" if value == 0 else f"prune {value:.0%}"
        if self.kind == "rank":
            return "full" if value == 0 else f"rank {value:.0%}"
        return "fp32" if value == 32 else "int8"


@dataclass
class Space:
    knobs: list[Knob]
    skipped: dict[str, str] = field(default_factory=dict)  # layer/group -> why no knob

    @property
    def origin(self) -> Policy:
        return tuple(0 for _ in self.knobs)

    def single(self, knob: int, choice: int) -> Policy:
        """The policy that changes only `knob` (to `choice`)."""
        policy = list(self.origin)
        policy[knob] = choice
        return tuple(policy)

    def by_kind(self, policy: Policy, kind: str) -> dict[str, float]:
        """{key: value} of the knobs of `kind` that `policy` changes."""
        return {k.key: k.value(c) for k, c in zip(self.knobs, policy)
                if k.kind == kind and c}

    def table(self, policy: Policy) -> list[dict[str, Any]]:
        """The per-layer policy as rows: kind, layer/group, choice."""
        return [{"kind": k.kind, "layer": k.key, "choice": k.describe(c),
                 "value": k.value(c)} for k, c in zip(self.knobs, policy)]

    def to_dict(self) -> dict[str, Any]:
        return {"knobs": [{"kind": k.kind, "key": k.key, "choices": list(k.choices),
                           "units": k.units} for k in self.knobs],
                "skipped": dict(self.skipped)}


def discover(model: ir.Model, context: PassContext, kinds: tuple[str, ...] = KINDS,
             prune_ratios: tuple[float, ...] = PRUNE_RATIOS,
             rank_fractions: tuple[float, ...] = RANK_FRACTIONS) -> Space:
    """Every knob of `model` (not modified) for the passes in `kinds`."""
    knobs: list[Knob] = []
    skipped: dict[str, str] = {}
    if "prune" in kinds:
        knobs += _prune_knobs(model, context, prune_ratios, skipped)
    layers = [n for n in model.graph if n.op_type in COMPUTE_OPS and n.name]
    if "rank" in kinds:
        from ..passes.lowrank.graph import inspect_node

        for node in layers:
            found = inspect_node(node, "tucker2")
            if isinstance(found, str):
                skipped[f"rank:{node.name}"] = found
            elif found is not None:
                knobs.append(Knob("rank", node.name, tuple(rank_fractions)))
    if "bits" in kinds:
        for node in layers:
            if "," in node.name:  # quantize(keep_float=...) is a comma-separated list
                skipped[f"bits:{node.name}"] = "a ',' in the node name"
            elif len(node.inputs) > 1 and constant_array(node.inputs[1]) is not None:
                knobs.append(Knob("bits", node.name, BITS))
    return Space(knobs, skipped)


def _prune_knobs(model: ir.Model, context: PassContext, ratios: tuple[float, ...],
                 skipped: dict[str, str]) -> list[Knob]:
    from ..passes.pruning.prune import PruneOptions, PrunePass

    prune = PrunePass(PruneOptions(ratio=0.0, recover=False), context)
    plan = prune.plan(load_model(model, check=False))
    groups = [g for g in plan.analysis.groups if len(g.units) >= 2]
    counts = Counter(name for g in groups for name in set(g.names))
    knobs = []
    for g in groups:
        # the override pattern must match this group only: a name no other group has
        unique = [n for n in g.names if counts[n] == 1 and not set("*?[]=;,") & set(n)]
        if not unique:
            skipped[f"prune:{g.name or g.id}"] = "no name of its own to address it by"
            continue
        knobs.append(Knob("prune", unique[0], tuple(ratios), len(g.units)))
    return knobs


def override_text(ratios: dict[str, float]) -> str:
    """prune(overrides=...) text fixing each group's ratio (the names hold no fnmatch
    wildcard, see `_prune_knobs`, so each matches itself only)."""
    return ";".join(f"{name}={ratio:g}" for name, ratio in ratios.items())
