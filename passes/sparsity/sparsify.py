"""`sparsify`: zero a share of the Conv / Gemm / MatMul weights in a pattern (lossy).

Pipeline text: `sparsify(0.5)`, `sparsify(0.8,pattern=block(1x8),criterion=wanda)`,
`sparsify(pattern=2:4)`, `sparsify(0.7,scope=global,overrides="conv2=0;fc*=0.9")`.

What it does
1. Candidates (`layers`): Conv / Gemm / MatMul whose weight is a float initializer read by
   that node only. Kept dense unless an override names them (`keep`, default
   `first,last,depthwise`): the first Conv, the last Gemm/MatMul (the classifier) and
   depthwise convs; `keep` also takes fnmatch name patterns, or `none`.
2. Scores (`scores`) on each weight's 2-D view [outputs, inputs]: `magnitude` |w|, or
   `wanda` |w| * RMS of the input feature on the calibration data.
3. Masks (`patterns`): `unstructured`, `block(RxC)` or `N:M` (e.g. 2:4: 2 nonzeros in
   every 4 consecutive inputs of a row). `ratio` (default 0.5) is the share of each layer's
   weights zeroed (`scope=layer`), or of all the sparsified layers' weights ranked together
   (`scope=global`); `overrides="PATTERN=RATIO;..."` fixes the ratio of the layers whose
   node or weight name matches (0 keeps a layer dense; an override wins over `keep`).
   N:M fixes the sparsity at 1 - N/M: a different `ratio`, `scope=global` or a non-zero
   override is refused. A layer whose view the pattern does not tile is skipped.
4. `recover` (default: on with calibration data; `refit`): the kept weights of every
   sparsified layer are refit by ridge least squares (`ridge`, default 0.1 of the mean
   input energy) to the original layer outputs on the calibration data, layer after
   layer; the zeros stay zero. A held-out half of the calibration batches chooses per
   layer between that refit, a bias-only refit and the masked weights as they are.
5. The ONNX stays dense (zeros stored in the initializers, every runtime runs it). The
   model's `metadata_props` get the key `onnxforge.sparsity` (`metadata`), a JSON object
   with one entry per sparsified initializer:

       {"<initializer name>": {"pattern": "unstructured" | "block(RxC)" | "N:M",
                               "sparsity": <fraction of its elements that are 0>,
                               "shape": [<its dims>]}}

   e.g. `{"conv2.weight": {"pattern": "block(1x8)", "sparsity": 0.5, "shape": [64, 32, 3,
   3]}}`; the pattern applies to the 2-D view above. A backend reads it to choose sparse
   kernels: speed needs such kernels, onnxruntime runs the zeros at dense speed.

Lossy (`exact = False`): the pass manager records the output error of the step and the
run's budget (`--max-error`, `--max-accuracy-drop`) applies. `stats` has per layer the
asked ratio, the sparsity reached, and with `recover` the layer's output error relative
to the original layer (masked weights and refit, on the calibration data); the layers kept
dense or skipped, with the reason. With nothing to zero the model is left unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from ...errors import InputSpecError, OptionText
from ...ir import constant_array, load_model
from ..base import ForgePass, option, register
from ..overrides import override_for, parse_overrides
from ..pruning.apply import set_constant
from .layers import SparseLayer, find_layers, kept_dense
from .metadata import SPARSITY_KEY, entry, record_sparsity
from .patterns import Pattern, global_masks, layer_mask, parse_pattern
from .refit import refit, refit_refusal
from .scores import input_rms, weight_scores

logger = logging.getLogger(__name__)

DEFAULT_RATIO = 0.5


@dataclass
class SparsifyOptions:
    ratio: float | None = option(None, ge=0.0, lt=1.0)  # share zeroed (default 0.5; N:M fixes it)
    pattern: str = "unstructured"  # unstructured | block(RxC) | N:M, on the [out, in] view
    criterion: Literal["magnitude", "wanda"] = "magnitude"
    # ratio per layer, or over all layers ranked together
    scope: Literal["layer", "global"] = "layer"
    overrides: str = ""  # "PATTERN=RATIO;..." per layer name (0 = dense); wins over keep
    # kept dense: first conv, last Gemm/MatMul, depthwise, name patterns, none
    keep: str = "first,last,depthwise"
    recover: bool | None = None  # refit the kept weights; None: on with calibration data
    calib_batches: int | None = option(None, ge=1)  # None: the run's calibration batch limit (64)
    max_rows: int = option(2048, ge=1)  # refit rows sampled per batch and layer
    ridge: float = option(0.1, ge=0.0)  # refit regularization, relative to the mean input energy

    def validate(self) -> None:
        pattern = parse_pattern(self.pattern)
        fixed_ratios = parse_overrides(self.overrides, "sparsify")
        fixed = pattern.fixed_ratio
        if fixed is None:
            return
        if self.ratio is not None and abs(self.ratio - fixed) > 1e-9:
            raise ValueError(f"pattern={pattern.text} fixes the sparsity at {fixed:g}; "
                             f"ratio={self.ratio:g} contradicts it (leave ratio out)")
        if self.scope == "global":
            raise ValueError(f"pattern={pattern.text} fixes every group's sparsity: "
                             "scope=global does not apply")
        if any(r not in (0.0, fixed) for _, r in fixed_ratios):
            raise ValueError(f"pattern={pattern.text}: an override can only be 0 (dense)")


@register
class SparsifyPass(ForgePass):
    """Zero weights in a pattern, optionally refit the rest (see the module docstring)."""

    name = "sparsify"
    summary = ("weight sparsity (unstructured, block(RxC), N:M) by magnitude or Wanda, "
               "least-squares refit of the kept weights; dense ONNX + metadata")
    exact = False
    Options = SparsifyOptions
    subgraph_note = "layers inside If/Loop/Scan bodies are not sparsified (main graph only)"
    positional = ("ratio",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        with self.context.blas_threads():  # the refit's many small solves
            return self._call(model)

    def _call(self, model: ir.Model) -> ir.passes.PassResult:
        opts: SparsifyOptions = self.options
        if (opts.recover or opts.criterion == "wanda") and not self.context.has_calibration:
            raise InputSpecError(OptionText.of(
                f"sparsify({'criterion=wanda' if opts.criterion == 'wanda' else 'recover=true'}) "
                "needs calibration data (", ("calibration", None), ")"))
        pattern = parse_pattern(opts.pattern)
        layers, skipped = find_layers(model.graph)
        plan, kept = self._plan(model.graph, layers, pattern, skipped)
        self.stats = {"sparsity": 0.0, "sparsified": 0, "kept_dense": len(kept), "refit": 0,
                      "pattern": pattern.text, "criterion": opts.criterion, "scope": opts.scope,
                      "layers": {}, "kept": kept, "skipped": skipped}
        masks = self._masks(model, plan, pattern)
        masks = {k: v for k, v in masks.items() if not v[1].all()}
        if not masks:
            logger.info("sparsify: nothing to zero")
            return ir.passes.PassResult(model, modified=False)
        recovering = opts.recover if opts.recover is not None else self.context.has_calibration
        original = load_model(model, check=False) if recovering else None
        for layer, mask in masks.values():
            set_constant(layer.weight, layer.unview(layer.view() * mask))
        records = self._refit(original, model, masks) if original is not None else {}
        self._report(model, masks, plan, pattern, records)
        return ir.passes.PassResult(model, modified=True)

    # ------------------------------------------------------------ choosing

    def _plan(self, graph: ir.Graph, layers: list[SparseLayer], pattern: Pattern,
              skipped: dict[str, str]) -> tuple[dict[str, tuple[SparseLayer, float | None]],
                                                dict[str, str]]:
        """Layer key -> (layer, fixed ratio or None for the global ranking); kept layers."""
        opts: SparsifyOptions = self.options
        fixed_ratios = parse_overrides(opts.overrides, "sparsify")
        keep = kept_dense(graph, layers, opts.keep)
        base = opts.ratio if opts.ratio is not None else (pattern.fixed_ratio or DEFAULT_RATIO)
        plan: dict[str, tuple[SparseLayer, float | None]] = {}
        kept: dict[str, str] = {}
        for layer in layers:
            ratio = override_for(layer.names, fixed_ratios)
            if ratio is None and layer.key in keep:
                kept[layer.key] = keep[layer.key]
                continue
            if ratio == 0.0:
                kept[layer.key] = "override ratio 0"
                continue
            reason = pattern.unfit_reason(layer.view().shape)
            if reason is not None:
                skipped[layer.key] = reason
                continue
            if ratio is None and opts.scope == "layer":
                ratio = base
            plan[layer.key] = (layer, ratio)
        return plan, kept

    def _masks(self, model: ir.Model, plan: dict[str, tuple[SparseLayer, float | None]],
               pattern: Pattern) -> dict[str, tuple[SparseLayer, np.ndarray]]:
        opts: SparsifyOptions = self.options
        layers = [layer for layer, _ in plan.values()]
        rms = {}
        if opts.criterion == "wanda" and layers:
            rms = input_rms(model, layers, self._batches(), threads=self.context.threads)
        scores = {key: weight_scores(layer, opts.criterion, rms)
                  for key, (layer, _) in plan.items()}
        masks = {key: (layer, layer_mask(scores[key], pattern, ratio))
                 for key, (layer, ratio) in plan.items() if ratio is not None}
        ranked = [key for key, (_, ratio) in plan.items() if ratio is None]
        if ranked:
            base = opts.ratio if opts.ratio is not None else DEFAULT_RATIO
            chosen = global_masks({k: scores[k] for k in ranked}, pattern, base)
            masks.update({k: (plan[k][0], chosen[k]) for k in ranked})
        return masks

    # ------------------------------------------------------------ recovery

    def _batches(self):
        return self.context.calibration_batches(self.options.calib_batches)

    def _refit(self, original: ir.Model, model: ir.Model,
               masks: dict[str, tuple[SparseLayer, np.ndarray]]) -> dict[str, dict[str, Any]]:
        opts: SparsifyOptions = self.options
        records: dict[str, dict[str, Any]] = {}
        todo = {}
        for key, (layer, mask) in masks.items():
            reason = refit_refusal(layer)
            if reason is None:
                todo[key] = (layer, mask)
            else:
                records[key] = {"refit": False, "note": reason}
        if todo:
            records.update(refit(original, model, todo, self._batches,
                                 threads=self.context.threads, max_rows=opts.max_rows,
                                 ridge=opts.ridge, seed=self.context.seed))
        return records

    # ------------------------------------------------------------ report

    def _report(self, model: ir.Model, masks: dict[str, tuple[SparseLayer, np.ndarray]],
                plan: dict[str, tuple[SparseLayer, float | None]], pattern: Pattern,
                records: dict[str, dict[str, Any]]) -> None:
        entries = {}
        zeros = total = 0
        for key, (layer, _mask) in masks.items():
            stored = constant_array(layer.weight)
            entries[layer.weight.name] = entry(pattern.text, stored)
            layer_zeros = int(stored.size - np.count_nonzero(stored))
            zeros, total = zeros + layer_zeros, total + stored.size
            asked = plan[key][1]
            self.stats["layers"][key] = {
                "weight": layer.weight.name, "op": layer.op,
                "view": list(layer.view().shape),
                "ratio": asked if asked is not None else f"global {self._global_ratio()}",
                "sparsity": round(layer_zeros / stored.size, 6),
                **records.get(key, {}),
            }
        record_sparsity(model, entries)
        self.stats.update(sparsified=len(masks), sparsity=round(zeros / total, 6),
                          zeros=zeros, weights=total,
                          refit=sum(bool(r.get("refit")) for r in records.values()),
                          metadata_key=SPARSITY_KEY)
        logger.info("sparsify: %d layers at %s, %.1f%% zeros", len(masks), pattern.text,
                    100 * zeros / total)

    def _global_ratio(self) -> float:
        return self.options.ratio if self.options.ratio is not None else DEFAULT_RATIO
