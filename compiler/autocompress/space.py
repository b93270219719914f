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
  sparse a float32 Conv/Gemm/MatMul whose weight the backend's block-sparse kernels can
         take (`sparse_knobs` says which); choices: the share of its weight zeroed by
         `sparsify(pattern=block(16x1))` (0: dense), only the shares at or below the
         break-even the target measured for that kernel kind. Offered only with a backend
         that runs sparse weights faster (TVM on a CPU class with a measured break-even
         table, `sparse_support`); onnxruntime runs the dense ONNX at dense speed.

A layer with a sparse choice is built float and whole (`Space.repair`): its int8 and rank
choices in the same policy are dropped, since quantize re-encodes the weight (and the
sparsity record would name a weight that is gone) and lowrank replaces the layer.
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
# block(16x1) is the block the sparse kernels pay best with (README "Sparse kernels in
# compiled code"); the shares: 0.5 and 0.7 pay on kxk/1x1 convs (break-even 0.7/0.9
# nonzero blocks), 0.7 and 0.9 on gemv (0.4), only 0.9 on matmul (0.2). Three choices at
# most per layer: each is one backend compile in the proxy tables.
SPARSE_PATTERN = "block(16x1)"
SPARSE_RATIOS = (0.0, 0.5, 0.7, 0.9)
SPARSE_MAX_LAYERS = 8  # the largest eligible layers by MACs get a knob (proxy compiles)
# backends.tvm.sparse.DENSITY_SLACK: sparsify zeros floor(ratio x blocks) blocks, a
# fraction of a block fewer than the ratio asks (not imported: that module needs TVM)
DENSITY_SLACK = 0.005
KINDS = ("prune", "rank", "bits", "sparse")
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")

Policy = tuple[int, ...]


@dataclass(frozen=True)
class Knob:
    kind: str  # prune | rank | bits | sparse
    key: str  # prune: the group's unique name; rank/bits/sparse: the node name
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
        if self.kind == "sparse":
            return "dense" if value == 0 else f"sparse {value:.0%} {SPARSE_PATTERN}"
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

    def repair(self, policy: Policy) -> Policy:
        """`policy` as it is built: a layer with a sparse choice keeps it, its int8 and rank
        choices are dropped (the layer stays float and whole; see the module docstring)."""
        sparse = {k.key for k, c in zip(self.knobs, policy) if k.kind == "sparse" and c}
        if not sparse:
            return tuple(policy)
        return tuple(0 if c and k.kind in ("bits", "rank") and k.key in sparse else c
                     for k, c in zip(self.knobs, policy))

    def dropped_for_sparse(self, policy: Policy) -> list[str]:
        """The choices of `policy` that `repair` drops, as "kind:layer"."""
        fixed = self.repair(policy)
        return [f"{k.kind}:{k.key}" for k, a, b in zip(self.knobs, policy, fixed) if a != b]

    def by_kind(self, policy: Policy, kind: str) -> dict[str, float]:
        """{key: value} of the knobs of `kind` that `policy` changes."""
        return {k.key: k.value(c) for k, c in zip(self.knobs, policy)
                if k.kind == kind and c}

    def table(self, policy: Policy) -> list[dict[str, Any]]:
        """The per-layer policy as rows: kind, layer/group, choice (as built: a choice
        `repair` drops says so)."""
        built = self.repair(policy)
        return [{"kind": k.kind, "layer": k.key,
                 "choice": k.describe(b) + (f" ({k.describe(c)} dropped: the layer is "
                                            "sparse)" if b != c else ""),
                 "value": k.value(b)} for k, c, b in zip(self.knobs, policy, built)]

    def to_dict(self) -> dict[str, Any]:
        return {"knobs": [{"kind": k.kind, "key": k.key, "choices": list(k.choices),
                           "units": k.units} for k in self.knobs],
                "skipped": dict(self.skipped)}


def discover(model: ir.Model, context: PassContext, kinds: tuple[str, ...] = KINDS,
             prune_ratios: tuple[float, ...] = PRUNE_RATIOS,
             rank_fractions: tuple[float, ...] = RANK_FRACTIONS,
             sparse: dict[str, dict[str, float]] | None = None) -> Space:
    """Every knob of `model` (not modified) for the passes in `kinds`. `sparse`: the
    backend's sparse break-even table (`sparse_support`); None: no sparse knobs."""
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
    if "sparse" in kinds and sparse is not None:
        knobs += sparse_knobs(model, context, sparse, skipped)
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


def sparse_support(backend: str, target: str = "host"
                   ) -> tuple[dict[str, dict[str, float]] | None, str]:
    """(the sparse break-even table of `backend`/`target`, "") when sparse weights can run
    faster there, else (None, why not). Only TVM runs them faster (the BSR kernels of
    `backends.tvm.sparse`, where the break-even for the target's CPU class was measured)."""
    if not backend.startswith("tvm"):
        return None, (f"backend {backend}: onnxruntime runs the sparse weights of the dense "
                      "ONNX at dense speed (same latency, same file size), so sparsity "
                      "would only cost accuracy; --backend tvm offers it on a target with a "
                      "measured sparse break-even")
    try:
        from ..backends.targets import resolve_target
        from ..kernels.schedule_configs import target_class
        from ..kernels.sparse_matmul import break_even
    except ImportError as exc:  # TVM not installed
        return None, f"the sparse kernels need TVM ({exc})"
    resolved = resolve_target(target)
    cls = target_class(resolved)
    table = {kind: per for kind, per in break_even(cls).items() if SPARSE_PATTERN in per}
    if not table:
        return None, (f"--target {target}: no sparse break-even measured for its CPU class "
                      f"({cls or resolved.kind.name}; tools/bench_sparse.py measures one), so "
                      "the compiled code would keep every weight dense")
    return table, ""


def _sparse_kernel(node: ir.Node, shaped: ir.Node | None) -> str:
    """The kernel kind (`kernels.sparse_matmul.break_even`'s keys) `backends.tvm.sparse`
    gives `node`, or "why: ..." when it keeps it dense; `shaped` is the node in a copy with
    inferred shapes."""
    from ..passes.graph import attr

    if node.op_type == "Conv":
        if len(node.inputs[1].const_value.shape) != 4:
            return "why: not a 2-D conv (the sparse conv kernel is NCHW 2-D)"
        if int(attr(node, "group", 1)) != 1:
            return "why: grouped conv (no sparse kernel)"
        if any(int(d) != 1 for d in attr(node, "dilations", None) or ()):
            return "why: dilated conv (no sparse kernel)"
        kh, kw = node.inputs[1].const_value.shape[2:]
        if (kh, kw) == (1, 1):
            return "conv1x1"
        if any(int(s) != 1 for s in attr(node, "strides", None) or ()):
            return "why: strided kxk conv (no sparse kernel)"
        return "conv"
    if node.op_type == "Gemm" and int(attr(node, "transA", 0)):
        return "why: Gemm with transA (no sparse kernel)"
    x = shaped.inputs[0] if shaped is not None else None
    dims = list(x.shape) if x is not None and x.shape is not None else []
    if not dims or not all(isinstance(d, int) for d in dims):
        return "why: the activation's shape is unknown (give --input-shape)"
    rows = 1
    for d in dims[:-1]:
        rows *= d
    if rows % 16 and rows > 16:
        return f"why: {rows} activation rows, not a multiple of 16 (the kernel's vector)"
    return "gemv" if rows < 16 else "matmul"


def sparse_knobs(model: ir.Model, context: PassContext, table: dict[str, dict[str, float]],
                 skipped: dict[str, str], ratios: tuple[float, ...] = SPARSE_RATIOS,
                 max_layers: int = SPARSE_MAX_LAYERS) -> list[Knob]:
    """A sparse knob per layer `sparsify` may touch (its `find_layers`, not kept dense by
    its default keep rules first/last/depthwise), with a float32 weight that
    `SPARSE_PATTERN` tiles and a kernel kind `backends.tvm.sparse` uses; its choices are
    the `ratios` whose nonzero-block share is at or below that kind's measured
    break-even. Only the `max_layers` largest by MACs; every other layer is in `skipped`
    with the reason."""
    import numpy as np

    from ..ir import infer_shapes
    from ..metrics import compute_metrics
    from ..passes.sparsity.layers import find_layers, kept_dense
    from ..passes.sparsity.patterns import parse_pattern

    pattern = parse_pattern(SPARSE_PATTERN)
    shaped = load_model(model, check=False)
    for value in shaped.graph.inputs:
        if value.name in context.input_shapes:
            value.shape = ir.Shape(context.input_shapes[value.name])
    infer_shapes(shaped)
    shaped_nodes = {n.name: n for n in shaped.graph if n.name}
    layers, refused = find_layers(model.graph)
    for key, why in refused.items():
        skipped[f"sparse:{key}"] = why
    kept = kept_dense(model.graph, layers, "first,last,depthwise")
    found: list[Knob] = []
    for layer in layers:
        name = layer.node.name
        why = kept.get(layer.key)
        if why is None and (not name or set("*?[]=;,") & set(name)):
            why = "no node name an override can address it by"
        if why is None and layer.array.dtype != np.float32:
            why = f"weight dtype {layer.array.dtype} (the sparse kernels are float32)"
        if why is None:
            why = pattern.unfit_reason(layer.view().shape)
        kind = "" if why is not None else _sparse_kernel(layer.node, shaped_nodes.get(name))
        if why is None and kind.startswith("why: "):
            why = kind[5:]
        limit = None if why is not None else table.get(kind, {}).get(SPARSE_PATTERN)
        if why is None and limit is None:
            why = f"no measured {kind} break-even for {SPARSE_PATTERN} on this target"
        choices = [] if why is not None else [
            r for r in ratios[1:] if 1.0 - r <= limit + DENSITY_SLACK]
        if why is None and not choices:
            why = (f"{kind} break-even {limit:g} nonzero blocks: none of the sparsities "
                   f"{', '.join(f'{r:g}' for r in ratios[1:])} reaches it")
        if why is not None:
            skipped[f"sparse:{layer.key}"] = why
            continue
        found.append(Knob("sparse", name, (0.0, *choices)))
    if len(found) > max_layers:
        macs = compute_metrics(model, context.input_shapes or None).node_macs
        ranked = sorted(found, key=lambda k: -float(macs.get(k.key) or 0.0))
        for knob in ranked[max_layers:]:
            skipped[f"sparse:{knob.key}"] = (f"not among the {max_layers} largest eligible "
                                            "layers by MACs (each sparse choice costs a "
                                            "backend compile in the proxy tables)")
        keep = {k.key for k in ranked[:max_layers]}
        found = [k for k in found if k.key in keep]
    return found
