"""Low-rank decomposition of Gemm / MatMul / Conv weights (lossy).

Rewrite rules (W = the layer's constant weight, r = chosen rank):

- Gemm  `Y = α·op(A)·op(B) + β·C`  →  `T = Gemm(A, Fa, transA, transB=1)`,
  `Y = Gemm(T, Fb, C', transB=1)`; α and transB are folded into the factors,
  transA stays on the first Gemm, β·C becomes one bias vector (or C keeps its β
  when it is not a constant vector).
- MatMul `Y = X·W` (X of any rank ≥ 1, e.g. [batch, seq, hidden]) → `MatMul(MatMul(X, Fa), Fb)`;
  a following `Add` of a constant bias vector is kept (and bias-corrected).
- Conv k×k, group 1 (`method=tucker2`, default): 1×1 conv (C_in→r_in) → k×k core
  (r_in→r_out, original strides/pads/dilations/auto_pad) → 1×1 conv (r_out→C_out,
  with the bias). A mode kept at full rank is merged into the core.
- Conv k×k (`method=spatial`): (k_h×1, C_in→r, vertical stride/pads/dilation) →
  (1×k_w, r→C_out, horizontal ones, bias).
- Conv 1×1: two 1×1 convs (the first carries stride and pads).

A layer is replaced only when its parameters and (when shapes are known) MACs
drop to at most `(1 - margin)` of what they were.

Preconditions (a layer failing one is left as is and listed in
`stats["skipped"]` with the reason): float32 constant weight (initializer or
`Constant` node) used by this node only; 2-D weight on the right operand of
MatMul; 2-D conv with group = 1 (grouped / depthwise convs are refused); spatial
SVD needs kh, kw > 1 and explicit pads. Only the main graph is rewritten.

Rank selection (see `rank`): `energy=E` (per layer), `macs=F` /
`params=F` (global budget), `rank=vbmf|full|N|fraction`. Default: energy 0.95.

Data-aware mode (`data_aware`, default on when calibration data is given): the
layer's input statistics are collected with `iter_activations` on the original
model and the factors minimise the output error instead of the weight error
(whiten with the input covariance, truncate, un-whiten; see `linalg`),
with the mean error moved into the bias when the layer has a bias slot. When a
BatchNormalization alone reads the layer's output, each output channel's error is
weighted by its |γ|/σ (the error after BN is what the network sees). The covariance
is damped by `damp` × its mean eigenvalue (0.1: measured best on digits and MiniLM).
The rank is then chosen on the whitened spectrum, so `energy` is the share of the
layer's output energy kept. Layer-local: the error a decomposition leaves is
smaller at the layer's output, not necessarily at the model's (see the benchmark).

Latency guard (`guard`, default on): each decomposition is kept only if a
single-layer model of it runs at least `guard_margin` faster in onnxruntime than
the original layer on the same input shape (threads from the context).

Stats: per layer the method, ranks, params/MACs before/after, energy kept of the
selection spectrum and of the weights, the guard's timings; skipped layers and why.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from ...activations import iter_activations, probe_shapes
from ...calibration import open_calibration
from ...errors import InputSpecError, OptionText, PipelineError
from ...ir import add_initializer, constant_array, infer_shapes, load_model
from ...shapes import model_inputs
from ..base import ForgePass, option, register
from ..graph import drop_if_unused
from .graph import (
    Layer,
    decomposed_chain,
    emit_chain,
    inspect_node,
    layer_key,
    original_chain,
)
from .guard import measure
from .linalg import (
    DEFAULT_DAMP,
    LowRankSVD,
    MomentStats,
    SpatialSVD,
    Tucker2,
    channel_rows,
    energy_kept,
    energy_rank,
    evbmf_rank,
    spatial_factorize,
    spatial_matrix,
    svd_factorize,
    tucker2_factorize,
    tucker_mode1_matrix,
    vertical_patches,
)
from .rank import Choice, allocate, layer_choices, rank_grid, round_rank
from .sensitivity import ErrorCurve, LayerProbe, onnx_weight, probe_ranks, weighted

logger = logging.getLogger(__name__)

OP_GROUPS = {"gemm": {"Gemm"}, "matmul": {"MatMul"}, "conv": {"Conv"},
             "linear": {"Gemm", "MatMul"}, "all": {"Gemm", "MatMul", "Conv"}}
# Largest number of activation rows one batch adds to a statistic (a seeded subsample beyond).
MAX_ROWS_PER_BATCH = 32768


@dataclass
class LowRankOptions:
    # keep >= this share of Σs² per layer (default 0.95)
    energy: float | None = option(None, gt=0.0, le=1.0)
    # remove this share of the decomposable layers' MACs
    macs: float | None = option(None, ge=0.0, lt=1.0)
    # remove this share of the decomposable layers' params
    params: float | None = option(None, ge=0.0, lt=1.0)
    rank: str | None = None  # vbmf | full | an integer rank | a fraction (0, 1) of full rank
    method: Literal["tucker2", "spatial"] = "tucker2"  # k×k conv decomposition
    ops: str = "all"  # all | linear | gemm | matmul | conv, combined with '+'
    round_to: int = option(8, ge=1)  # ranks rounded up to a multiple of this
    margin: float = option(0.1, lt=1.0)  # replace only if params/MACs drop to <= (1 - margin)
    data_aware: bool | None = None  # None: on when calibration data is given
    calib_batches: int = option(16, ge=1)
    damp: float = option(DEFAULT_DAMP, ge=0.0)  # covariance damping (share of its mean eigenvalue)
    guard: bool = True  # keep a decomposition only if measured faster
    guard_margin: float = option(0.03, lt=1.0)  # required latency gain of the decomposed layer
    # budget spread by lost energy, or by lost energy weighted with each layer's measured
    # output sensitivity (needs calibration data; see `sensitivity`)
    allocate: Literal["energy", "sensitivity"] = "energy"
    sens_batches: int = option(4, ge=1)


Plan = LowRankSVD | Tucker2 | SpatialSVD


@register
class LowRankPass(ForgePass):
    """Decompose Gemm/MatMul weights by SVD and convs by Tucker-2 / spatial SVD."""

    name = "lowrank"
    summary = "low-rank decomposition: SVD for Gemm/MatMul, Tucker-2 or spatial SVD for Conv"
    exact = False
    Options = LowRankOptions
    subgraph_note = "layers inside If/Loop/Scan bodies are not decomposed (main graph only)"
    positional = ("energy",)

    def __init__(self, options: Any = None, context: Any = None, **kwargs: Any):
        super().__init__(options, context, **kwargs)
        # Python-only hook: fixed ranks per layer key (benchmarks compare modes at equal rank).
        self.rank_overrides: dict[str, tuple[int, ...]] = {}

    # ------------------------------------------------------------ entry point

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # BLAS threads follow the run's thread count: on a busy machine OpenBLAS with
        # more threads than free cores makes a 512×512 SVD 20× slower.
        with self.context.blas_threads():
            return self._call(model)

    def _call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        ops = self._check_options()
        graph = model.graph
        opset = int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 13)))
        layers, skipped = self._find_layers(graph, ops)
        data_aware = (self.context.has_calibration if opts.data_aware is None
                      else bool(opts.data_aware))
        self.stats = {"selection": self._selection_text(), "data_aware": data_aware,
                      "candidates": len(layers), "decomposed": 0, "skipped_by_guard": 0,
                      "params_before": 0, "params_after": 0, "macs_before": 0, "macs_after": 0,
                      "layers": {}, "skipped": skipped}
        if not layers:
            return ir.passes.PassResult(model, modified=False)
        self._attach_shapes(model, layers)
        self._model = model  # the sensitivity probe copies it before any rewrite
        moments = self._collect_moments(model, layers) if data_aware else {}
        plans = {layer.key: self._plan(layer, moments) for layer in layers}
        ranks = self._select_ranks(layers, plans)
        modified = False
        for layer in layers:
            chosen = ranks.get(layer.key)
            if chosen is None:
                skipped[layer.key] = self._no_rank_reason(layer, plans[layer.key])
                continue
            if self._decompose(model, opset, layer, plans[layer.key], chosen, moments):
                modified = True
        total = {"params": 0, "macs": 0}
        for layer in layers:
            p0, m0 = self._costs(layer, None)
            total["params"] += p0
            total["macs"] += m0 or 0
        # Share of all decomposable layers' params/MACs actually removed (after the guard).
        self.stats["params_removed"] = round(
            (self.stats["params_before"] - self.stats["params_after"]) / total["params"], 4)
        if total["macs"]:
            self.stats["macs_removed"] = round(
                (self.stats["macs_before"] - self.stats["macs_after"]) / total["macs"], 4)
        logger.info("lowrank: %d of %d layers decomposed, params %d -> %d",
                    self.stats["decomposed"], len(layers), self.stats["params_before"],
                    self.stats["params_after"])
        return ir.passes.PassResult(model, modified=modified)

    # ------------------------------------------------------------ options

    def _check_options(self) -> set[str]:
        opts = self.options
        given = [k for k in ("energy", "macs", "params", "rank") if getattr(opts, k) is not None]
        if len(given) > 1:
            raise PipelineError(f"lowrank: give one of energy/macs/params/rank, got {given}")
        if opts.energy is not None and not 0.0 < opts.energy <= 1.0:
            raise PipelineError(f"lowrank: energy={opts.energy} must be in (0, 1]")
        for key in ("macs", "params"):
            value = getattr(opts, key)
            if value is not None and not 0.0 < value < 1.0:
                raise PipelineError(f"lowrank: {key}={value} is the share to remove, in (0, 1)")
        if opts.rank is not None:
            self._parse_rank(opts.rank)
        if opts.round_to < 1:
            raise PipelineError("lowrank: round_to must be >= 1")
        ops: set[str] = set()
        for part in opts.ops.split("+"):
            part = part.strip().lower()
            if part not in OP_GROUPS:
                raise PipelineError(f"lowrank: ops={opts.ops!r}: {part!r} is not one of "
                                    f"{', '.join(OP_GROUPS)} (combine with '+')")
            ops |= OP_GROUPS[part]
        return ops

    @staticmethod
    def _parse_rank(text: str) -> str | int | float:
        text = str(text).strip().lower()
        if text in ("vbmf", "full"):
            return text
        try:
            value = float(text)
        except ValueError:
            raise PipelineError(f"lowrank: rank={text!r} is not vbmf, full, an integer or a "
                                "fraction") from None
        if value >= 1 and value == int(value):
            return int(value)
        if 0 < value < 1:
            return value
        raise PipelineError(f"lowrank: rank={text!r}: an integer >= 1 or a fraction in (0, 1)")

    def _selection_text(self) -> str:
        o = self.options
        if o.rank is not None:
            return f"rank={o.rank}"
        if o.macs is not None:
            return f"macs={o.macs}"
        if o.params is not None:
            return f"params={o.params}"
        return f"energy={o.energy if o.energy is not None else 0.95}"

    # ------------------------------------------------------------ discovery

    def _find_layers(self, graph: ir.Graph, ops: set[str]) -> tuple[list[Layer], dict[str, str]]:
        layers: list[Layer] = []
        skipped: dict[str, str] = {}
        taken: set[str] = set()
        for node in graph:
            found = inspect_node(node, self.options.method)
            if found is None:
                continue
            key = layer_key(node, taken)
            if node.op_type not in ops:
                skipped[key] = f"op {node.op_type} not selected (ops={self.options.ops})"
            elif isinstance(found, str):
                skipped[key] = found
            else:
                found.key = key
                layers.append(found)
        return layers, skipped

    def _attach_shapes(self, model: ir.Model, layers: list[Layer]) -> None:
        """Static shapes of each layer's input and output (None where unknown)."""
        shaped = load_model(model, check=False)
        for value in model_inputs(shaped):
            if value.name in self.context.input_shapes:
                value.shape = ir.Shape(self.context.input_shapes[value.name])
        infer_shapes(shaped)
        static: dict[str, tuple[int, ...]] = {}
        values = list(shaped.graph.inputs) + [v for n in shaped.graph for v in n.outputs]
        for value in values:
            if value.shape is not None and all(isinstance(d, int) for d in value.shape):
                static[value.name] = tuple(int(d) for d in value.shape)
        missing = {name for layer in layers
                   for name in (layer.x.name, layer.node.outputs[0].name) if name not in static}
        if missing:
            static.update(self._probe_shapes(model, sorted(missing)))
        for layer in layers:
            layer.x_shape = static.get(layer.x.name)
            layer.y_shape = static.get(layer.node.outputs[0].name)

    def _probe_shapes(self, model: ir.Model, names: list[str]) -> dict[str, tuple[int, ...]]:
        """Shapes that inference could not settle (after Reshape & co.), from one real run."""
        try:
            if self.context.has_calibration:
                batches = self.context.calibration_batches(1)
            else:
                batches = open_calibration("random:1", model, self.context.input_shapes,
                                           seed=self.context.seed).batches(1)
            batch = next(iter(batches), None)
            if batch is not None:
                return probe_shapes(model, names, batch, threads=self.context.threads)
        except InputSpecError as exc:  # dynamic input dims and no input shapes given
            logger.info("lowrank: shapes unknown for %d values: %s", len(names), exc)
        return {}

    # ------------------------------------------------------------ statistics

    def _moment_keys(self, layer: Layer) -> dict[str, tuple]:
        """Which statistics a layer needs: role -> (kind, value name, params...)."""
        x = layer.x.name
        if layer.op in ("Gemm", "MatMul"):
            return {"in": ("rows", x, int(layer.attrs.get("transA", 0)))}
        at = layer.attrs
        if layer.method == "svd":
            plain = at["auto_pad"] in ("NOTSET", "") and not any(at["pads"])
            sh, sw = at["strides"] if plain else (1, 1)
            return {"in": ("chan", x, sh, sw)}
        if layer.method == "tucker2":
            return {"in": ("chan", x, 1, 1), "out": ("chan", layer.node.outputs[0].name, 1, 1)}
        kh = layer.kernel[0]
        top, _, bottom, _ = at["pads"]
        return {"in": ("vpatch", x, kh, at["strides"][0], at["dilations"][0], top, bottom)}

    def _collect_moments(self, model: ir.Model, layers: list[Layer]) -> dict[tuple, MomentStats]:
        """One pass over the calibration data accumulating every statistic the layers need."""
        if not self.context.has_calibration:
            raise InputSpecError(OptionText.of(
                "lowrank(data_aware=true) needs calibration data (", ("calibration", None),
                "); or set data_aware=false"))
        keys = {key for layer in layers for key in self._moment_keys(layer).values()}
        names = sorted({key[1] for key in keys})
        rng = np.random.default_rng(self.context.seed)
        moments: dict[tuple, MomentStats] = {}
        batches = self.context.calibration_batches(self.options.calib_batches)
        for acts in iter_activations(model, names, batches, threads=self.context.threads):
            for key in keys:
                rows = _rows(key, np.asarray(acts[key[1]], dtype=np.float32))
                if rows.shape[0] > MAX_ROWS_PER_BATCH:
                    rows = rows[rng.choice(rows.shape[0], MAX_ROWS_PER_BATCH, replace=False)]
                if key not in moments:
                    moments[key] = MomentStats(rows.shape[1])
                moments[key].add(rows)
        return moments

    def _layer_moments(self, layer: Layer, moments: dict[tuple, MomentStats]
                       ) -> dict[str, MomentStats]:
        if not moments:
            return {}
        return {role: moments[key] for role, key in self._moment_keys(layer).items()
                if key in moments and moments[key].count > 0}

    # ------------------------------------------------------------ plans and ranks

    def _plan(self, layer: Layer, moments: dict[tuple, MomentStats]) -> Plan:
        """The truncatable decomposition of a layer (weight-only or data-aware)."""
        stats = self._layer_moments(layer, moments)
        centered = layer.bias_kind is not None
        damp = self.options.damp
        white = stats["in"].whitener(centered, damp) if "in" in stats else None
        w = layer.weight
        # Data-aware: the error that matters is after a following BatchNormalization.
        scale = layer.out_scale if white is not None else None
        if layer.method == "svd":
            matrix = w if w.ndim == 2 else w[:, :, 0, 0]
            return svd_factorize(matrix, white, damp, scale)
        if layer.method == "tucker2":
            if white is None:
                return tucker2_factorize(w, damp=damp)
            cov_out = stats["out"].matrix(True) if "out" in stats else None
            return tucker2_factorize(w, stats["in"].matrix(centered), cov_out, damp, white,
                                     scale)
        return spatial_factorize(w, white, damp, scale)

    @staticmethod
    def _spectra(layer: Layer, plan: Plan) -> tuple[list[np.ndarray], list[int],
                                                    list[tuple[int, int]]]:
        """Per mode: spectrum, full rank and the matrix shape (for EVBMF)."""
        w = layer.weight
        if isinstance(plan, Tucker2):
            co, ci, kh, kw = w.shape
            full_in, full_out = min(ci, co * kh * kw), min(co, ci * kh * kw)
            return ([plan.in_spectrum, plan.out_spectrum], [full_in, full_out],
                    [tucker_mode1_matrix(w).shape, (co, ci * kh * kw)])
        if isinstance(plan, SpatialSVD):
            return [plan.svd.s], [plan.full_rank], [spatial_matrix(w).shape]
        return [plan.s], [plan.full_rank], [plan.shape]

    def _costs(self, layer: Layer, ranks: tuple[int, ...] | None) -> tuple[int, int | None]:
        """(params, MACs or None) of the layer at `ranks` (None = as it is)."""
        w = layer.weight
        y, x = layer.y_shape, layer.x_shape
        if layer.op in ("Gemm", "MatMul"):
            n_out, n_in = w.shape
            rows = None if y is None else (int(math.prod(y[:-1])) if layer.op == "MatMul"
                                           else int(y[0]))
            params = n_out * n_in if ranks is None else ranks[0] * (n_out + n_in)
            return params, None if rows is None else rows * params
        co, ci, kh, kw = w.shape
        out_pixels = None if y is None or len(y) != 4 else int(math.prod(y)) // co
        in_pixels = None if x is None or len(x) != 4 else int(math.prod(x)) // ci
        if ranks is None:
            params = co * ci * kh * kw
            return params, None if out_pixels is None else out_pixels * params
        if layer.method == "svd":
            params = ranks[0] * (ci + co)
            return params, None if out_pixels is None else out_pixels * params
        if layer.method == "spatial":
            r = ranks[0]
            params = ci * kh * r + r * kw * co
            if out_pixels is None or x is None:
                return params, None
            mid_pixels = x[0] * y[2] * x[3]  # vertical conv: output height × input width
            return params, mid_pixels * ci * kh * r + out_pixels * r * kw * co
        r_in, r_out = ranks
        first = ci * r_in if r_in < ci else 0
        last = r_out * co if r_out < co else 0
        core = min(r_in, ci) * min(r_out, co) * kh * kw
        params = first + core + last
        if out_pixels is None or in_pixels is None:
            return params, None
        return params, in_pixels * first + out_pixels * (core + last)

    def _saves_enough(self, layer: Layer, ranks: tuple[int, ...]) -> bool:
        limit = 1.0 - self.options.margin
        p0, m0 = self._costs(layer, None)
        p1, m1 = self._costs(layer, ranks)
        if p1 > limit * p0:
            return False
        return m0 is None or m1 is None or m1 <= limit * m0

    def _select_ranks(self, layers: list[Layer], plans: dict[str, Plan]
                      ) -> dict[str, tuple[int, ...] | None]:
        opts = self.options
        ranks: dict[str, tuple[int, ...] | None] = {}
        budget = opts.macs if opts.macs is not None else opts.params
        if budget is not None and not self.rank_overrides:
            use_macs = opts.macs is not None
            if use_macs:
                unknown = [lay.key for lay in layers if self._costs(lay, None)[1] is None]
                if unknown:
                    raise InputSpecError(OptionText.of(
                        f"lowrank(macs=...) needs static shapes, unknown for {unknown[:3]}: "
                        "give ", ("input_shapes", None), ", or use params= instead"))
            all_choices = []
            for layer in layers:
                spectra, fulls, _ = self._spectra(layer, plans[layer.key])
                grids = [rank_grid(f, opts.round_to) for f in fulls]
                index = 1 if use_macs else 0
                all_choices.append(layer_choices(
                    spectra, grids, lambda r, lay=layer, i=index: self._costs(lay, r)[i],
                    self._costs(layer, None)[index],
                    lambda r, lay=layer: self._saves_enough(lay, r)))
            if opts.allocate == "sensitivity":
                all_choices = self._sensitivity_weighted(layers, plans, all_choices)
            picks, achieved = allocate(all_choices, budget)
            self.stats["budget_removed"] = round(achieved, 4)
            if achieved < budget:
                logger.warning("lowrank: only %.1f%% of the %s can be removed (asked %.1f%%)",
                               100 * achieved, "MACs" if use_macs else "params", 100 * budget)
            return {layer.key: pick.ranks for layer, pick in zip(layers, picks)}
        rank = self._parse_rank(opts.rank) if opts.rank is not None else None
        energy = opts.energy if opts.energy is not None else 0.95
        for layer in layers:
            spectra, fulls, shapes = self._spectra(layer, plans[layer.key])
            if layer.key in self.rank_overrides:
                chosen = tuple(min(int(r), f) for r, f in zip(self.rank_overrides[layer.key],
                                                              fulls))
            elif rank == "full":
                chosen = tuple(fulls)
            elif rank == "vbmf":
                chosen = tuple(round_rank(evbmf_rank(s, shape), f, opts.round_to)
                               for s, f, shape in zip(spectra, fulls, shapes))
            elif isinstance(rank, int):
                chosen = tuple(min(rank, f) for f in fulls)
            elif isinstance(rank, float):
                chosen = tuple(round_rank(math.ceil(rank * f), f, opts.round_to) for f in fulls)
            else:
                chosen = tuple(round_rank(energy_rank(s, energy), f, opts.round_to)
                               for s, f in zip(spectra, fulls))
            ranks[layer.key] = chosen if self._saves_enough(layer, chosen) else None
            if ranks[layer.key] is None:
                layer.attrs["_refused_ranks"] = chosen
        return ranks

    def _sensitivity_weighted(self, layers: list[Layer], plans: dict[str, Plan],
                              all_choices: list[list[Choice]]) -> list[list[Choice]]:
        """Each layer's candidate errors scaled by its measured output sensitivity."""
        if not self.context.has_calibration:
            raise PipelineError("lowrank(allocate=sensitivity) needs calibration data (--calib)")
        start = time.perf_counter()
        batches = list(self.context.calibration_batches(self.options.sens_batches))
        probe = LayerProbe(self._model, layers, batches, self.context.threads)
        curves: dict[str, ErrorCurve] = {}
        for layer in layers:
            if layer.key not in probe.inputs:
                continue
            spectra, fulls, _ = self._spectra(layer, plans[layer.key])
            grids = [rank_grid(f, self.options.round_to) for f in fulls]
            losses, errors = [], []
            for ranks in probe_ranks(spectra, grids):
                approx = self._factors(layer, plans[layer.key], ranks)[1]
                losses.append(sum(1.0 - energy_kept(s, r) for s, r in zip(spectra, ranks)))
                errors.append(probe.error(layer.key, onnx_weight(layer, approx)))
            curve = ErrorCurve(losses, errors)
            if curve.usable:
                curves[layer.key] = curve
        # a layer without a curve: the median error per unit of lost energy of the others
        slopes = [c.y[-1] / c.x[-1] for c in curves.values()]
        fallback = float(np.median(slopes)) if slopes else 1.0
        self.stats["sensitivity_s"] = round(time.perf_counter() - start, 2)
        self.stats["sensitivity"] = {k: round(float(c.y[-1] / c.x[-1]), 5)
                                     for k, c in curves.items()}
        return [weighted(c, curves.get(layer.key), fallback)
                for layer, c in zip(layers, all_choices)]

    def _no_rank_reason(self, layer: Layer, plan: Plan) -> str:
        refused = layer.attrs.get("_refused_ranks")
        p0, _ = self._costs(layer, None)
        if refused is None:
            return "kept whole by the global budget"
        p1, _ = self._costs(layer, refused)
        return (f"rank {list(refused)} would keep {p1 / p0:.0%} of the params/MACs "
                f"(> {1 - self.options.margin:.0%}): no saving")

    # ------------------------------------------------------------ rewriting

    def _factors(self, layer: Layer, plan: Plan, ranks: tuple[int, ...]
                 ) -> tuple[tuple[np.ndarray | None, ...], np.ndarray]:
        """Factors in ONNX-ready shapes, and the reconstructed weight (canonical layout)."""
        if isinstance(plan, Tucker2):
            r_in, r_out = ranks
            first, core, last = plan.factors(r_in, r_out)
            approx = plan.reconstruct(r_in, r_out)
            co, ci = layer.weight.shape[:2]
            if r_in >= ci:
                core = np.einsum("rikl,ic->rckl", core, first[:, :, 0, 0], optimize=True)
                first = None
            if r_out >= co:
                core = np.einsum("or,rikl->oikl", last[:, :, 0, 0], core, optimize=True)
                last = None
            return (first, core, last), approx
        if isinstance(plan, SpatialSVD):
            return plan.factors(ranks[0]), plan.reconstruct(ranks[0])
        a, b = plan.factors(ranks[0])
        approx = b @ a
        if layer.op == "Conv":
            return (a[:, :, None, None], b[:, :, None, None]), approx[:, :, None, None]
        return (a, b), approx

    def _bias_correction(self, layer: Layer, delta: np.ndarray,
                         stats: dict[str, MomentStats]) -> np.ndarray | None:
        """(W - Ŵ)·μ: the mean output error the bias absorbs (data-aware, bias slot only)."""
        if layer.bias_kind is None or "in" not in stats:
            return None
        mu = stats["in"].mean
        if layer.op in ("Gemm", "MatMul"):
            return delta @ mu
        if layer.method == "spatial":
            _, ci, kh, _ = delta.shape
            return np.einsum("ocyx,cy->o", delta, mu.reshape(ci, kh), optimize=True)
        return np.einsum("ocyx,c->o", delta, mu, optimize=True)

    def _decompose(self, model: ir.Model, opset: int, layer: Layer, plan: Plan,
                   ranks: tuple[int, ...], moments: dict[tuple, MomentStats]) -> bool:
        graph = model.graph
        factors, approx = self._factors(layer, plan, ranks)
        delta = layer.weight - approx
        stats = self._layer_moments(layer, moments)
        correction = self._bias_correction(layer, delta, stats)
        new_bias: np.ndarray | ir.Value | None
        if layer.bias_kind in ("conv", "gemm"):
            new_bias = layer.bias
            if correction is not None:
                new_bias = correction if new_bias is None else new_bias + correction
        elif layer.bias_kind == "add":
            new_bias = None
        else:  # keep the node's own (non-constant) bias input, read now: an earlier
            # rewrite may have replaced the value the layer was found with
            new_bias = layer.node.inputs[2] if len(layer.node.inputs) > 2 else None
        chain = decomposed_chain(layer, factors, new_bias)
        spectra, fulls, _ = self._spectra(layer, plan)
        p0, m0 = self._costs(layer, None)
        p1, m1 = self._costs(layer, ranks)
        norm = float(np.sum(layer.weight**2))
        record: dict[str, Any] = {
            "op": layer.op, "method": layer.method, "weight_shape": list(layer.weight.shape),
            "rank": list(ranks), "full_rank": fulls,
            "params_before": p0, "params_after": p1, "macs_before": m0, "macs_after": m1,
            "energy_kept": [round(energy_kept(s, r), 5) for s, r in zip(spectra, ranks)],
            "weight_energy_kept": round(1.0 - float(np.sum(delta**2)) / norm, 5) if norm else 1.0,
            "data_aware": bool(stats), "bias_corrected": correction is not None,
        }
        self.stats["layers"][layer.key] = record
        if self.options.guard:
            if layer.x_shape is None:
                record["kept"] = False
                self.stats["skipped"][layer.key] = (
                    "guard: input shape unknown, cannot time it (give the input shapes or "
                    "guard=false)")
                return False
            guard_bias = new_bias if isinstance(new_bias, np.ndarray) else None
            timing = measure(original_chain(layer), decomposed_chain(layer, factors, guard_bias),
                             layer.x_shape, opset, threads=self.context.threads,
                             seed=self.context.seed)
            record["latency_ms_before"] = round(timing.original_ms, 5)
            record["latency_ms_after"] = round(timing.decomposed_ms, 5)
            if timing.decomposed_ms > (1.0 - self.options.guard_margin) * timing.original_ms:
                record["kept"] = False
                self.count("skipped_by_guard")
                self.stats["skipped"][layer.key] = (
                    f"guard: decomposed layer not faster ({timing.decomposed_ms:.4f} ms vs "
                    f"{timing.original_ms:.4f} ms)")
                return False
        record["kept"] = True
        prefix = layer.key.replace("#", "_")
        x = layer.node.inputs[0]  # current value (earlier rewrites re-wire their outputs)
        nodes, out = emit_chain(graph, x, chain, prefix, opset)
        old_out = layer.node.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, layer.node, [layer.node], nodes,
                                                [old_out], [out])
        drop_if_unused(graph, layer.weight_value)
        if layer.bias_kind in ("conv", "gemm"):
            drop_if_unused(graph, layer.bias_value)
        if layer.bias_kind == "add" and correction is not None and layer.add_node is not None:
            old = layer.add_node.inputs[layer.add_index]
            bias = (layer.bias + correction).reshape(constant_array(old).shape)
            bias = bias.astype(np.float32)
            layer.add_node.replace_input_with(
                layer.add_index, add_initializer(graph, f"{prefix}.lowrank_bias", bias))
            drop_if_unused(graph, old)
        self.count("decomposed")
        self.stats["params_before"] += p0
        self.stats["params_after"] += p1
        if m0 is not None and m1 is not None:
            self.stats["macs_before"] += m0
            self.stats["macs_after"] += m1
        return True


def _rows(key: tuple, arr: np.ndarray) -> np.ndarray:
    """The sample rows a statistic accumulates from one activation batch."""
    kind = key[0]
    if kind == "rows":
        trans_a = key[2]
        if trans_a:
            return arr.T
        return arr.reshape(-1, arr.shape[-1])
    if kind == "chan":
        sh, sw = key[2], key[3]
        return channel_rows(arr[:, :, ::sh, ::sw] if arr.ndim == 4 else arr)
    _, _, kh, stride, dilation, top, bottom = key
    return vertical_patches(arr, kh, stride, dilation, top, bottom)
