"""Mixed precision under a budget (`quantize(mode=mixed, max_error=0.01)`; with 4-bit
weights `quantize(mode=mixed, bits=4, max_size_ratio=0.16)`).

Algorithm:
  1. Prepare the float model as int8 quantization does (BatchNorm folding, Gemm
     alpha/beta), calibrate once for every quantizable layer (Conv, ConvTranspose,
     Gemm, MatMul, and embedding tables: Gather of a constant matrix) and keep a few
     calibration batches plus the float outputs on them. With `bits=4`, round every
     layer that has a 4-bit form once (four_bit.py; GPTQ with `rounding=gptq`).
  2. Sensitivity: for each layer, the error of the model with only that layer in
     int8 (everything else float); with `bits=4` also with only that layer in 4 bits.
  3. Budget curve: layers are switched to int8 in increasing sensitivity order; at
     each step the remaining layers are fp16 (weights stored as float16) or fp32, and
     the model's error and weight bytes are measured. With `bits=4` the curve goes on
     from all-int8: layers are switched to 4 bits one by one, ordered by the error each
     adds alone (squared 4-bit minus squared 8-bit error) per weight byte it saves.
     When all-int8 is already larger than `max_size_ratio`, the int8/float part is
     skipped; the 4-bit part stops at the first point that meets every budget.
  4. Choice: the last point of the curve (the most compressed) whose error is within
     every error budget given; with `max_size_ratio` (weight bytes / fp32 weight
     bytes) the first point within the error budgets that reaches it.
  5. The chosen configuration is applied and its error measured once more. The pass
     refuses (raises `BudgetExceededError`, the budget error of the whole package:
     exit code 6, nothing written) when even the all-float16 / float32 point misses the
     budget, or when no point within the error budget reaches `max_size_ratio`.

Budgets (any combination; all must hold):
  max_error          relative L2 error of the outputs vs float (default 0.01)
  max_accuracy_drop  top-1 accuracy drop (fraction) on the calibration labels
  metric             Python callback metric(ref_outputs, cand_outputs) -> error, with
                     the lists of output dicts of the evaluation batches; compared
                     against max_error instead of the relative L2 error
  max_size_ratio     weight bytes target as a fraction of the fp32 weight bytes
                     (1/6 = 0.167 for "6x smaller")

Per-layer precisions: int4 (`bits=4`: MatMulNBits, packed 4-bit conv codes run by
QLinearConv, GatherBlockQuantized tables), int8 (QDQ, integer kernels in onnxruntime;
int8 rows for tables), fp16 (weights stored in float16 behind a Cast: half the bytes;
onnxruntime's CPU provider folds the Cast at load and computes in fp32, true fp16
compute needs a GPU target), fp32.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from ...errors import BudgetExceededError
from ...ir import constant_array, infer_shapes, load_model
from ..graph import attr, remove_unused
from ..naming import NameAllocator
from . import repair
from .auto_calibration import choose_calibration, describe_choice
from .core import (
    Calibration,
    QuantizeOptions,
    apply_calibrated,
    bias_correction_inputs,
    calibrate,
    make_plan,
    quantize_embeddings,
    weight_bytes,
)
from .four_bit import FourBitWeights, four_bit_kind, round_four_bit
from .int4 import pack_int4_codes, quantize_embeddings_int4, write_matmulnbits
from .output_error import OutputErrorEvaluator
from .prepare import (
    add_const,
    ensure_node_names,
    fold_into_weights,
    merge_for_int8,
    upgrade_opset,
)

logger = logging.getLogger(__name__)


def store_fp16_weights(model: ir.Model, names: set[str]) -> int:
    """Store the constant weight (input 1; a Gather's table, input 0) of the named nodes
    as float16 + Cast."""
    graph = model.graph
    alloc = NameAllocator(graph)
    count = 0
    for n in list(graph):
        index = 0 if n.op_type == "Gather" else 1
        if n.name not in names or len(n.inputs) <= index:
            continue
        w = constant_array(n.inputs[index])
        if w is None or w.dtype != np.float32:
            continue
        half = add_const(graph, f"{n.inputs[index].name}_fp16", w.astype(np.float16), alloc)
        cast = alloc.make_node("Cast", [half], {"to": int(ir.DataType.FLOAT)},
                               name=f"{n.name}_weight_cast", output_names=[f"{n.name}_weight_fp32"])
        cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        graph.insert_before(n, cast)
        n.replace_input_with(index, cast.outputs[0])
        count += 1
    remove_unused(model)
    return count


def quantize_mixed(model: ir.Model, opts: QuantizeOptions, context: Any) -> dict[str, Any]:
    """Choose a precision per layer under the budget and rewrite `model` in place."""
    start = time.perf_counter()
    stats = _prepare(model, opts, context)
    fp32 = load_model(model, check=False)
    int8_opts = replace(opts, mode="int8")
    full = make_plan(load_model(fp32, check=False), int8_opts)
    tables = embedding_tables(fp32, opts)
    layers = [n.name for n in full.compute] + tables
    if not layers:
        stats["bits_per_layer"] = {}
        return stats
    four = None
    if opts.bits == 4:
        wanted = set(layers)
        four = round_four_bit(fp32, [n for n in fp32.graph if n.name in wanted
                                     and four_bit_kind(n, opts.block)], opts, context)
    names = {t.data_name for t in full.tensors.values()}
    if opts.calibration == "auto":
        opts, int8_opts = _auto_calibration(fp32, opts, context, stats, names, full, layers,
                                            set(tables), four)
    calib = calibrate(fp32, context, names, method=opts.calibration,
                      channel_inputs=bias_correction_inputs(full, opts),
                      limit=opts.calib_batches or None)
    evaluator = _evaluator(fp32, calib, opts, context)
    precisions = _Precisions(fp32, calib, int8_opts, set(tables), four)
    fp32_bytes = weight_bytes(fp32)
    # 2. sensitivity of each layer alone (int8; with bits=4 also 4-bit)
    key = "metric" if opts.metric is not None else "rel_l2"
    sensitivity, bytes8 = _sensitivities(layers, 8, evaluator, precisions)
    order = sorted(layers, key=lambda n: (sensitivity[n][key],
                                          sensitivity[n].get("accuracy_drop", 0.0)))
    # 3. budget curve, 4. choice
    curve = _Curve(evaluator, precisions, fp32_bytes)
    all_int8 = {n: 8 for n in layers}
    skip_float_points = (opts.bits == 4 and opts.max_size_ratio > 0
                         and curve.add(all_int8, measure_only=True) > opts.max_size_ratio)
    if not skip_float_points:
        for k in _points(len(order)):
            rest = 16 if opts.fp16_fallback else 32
            curve.add({n: 8 if i < k else rest for i, n in enumerate(order)})
    else:  # no int8/float point is as small as the target: start at all-int8
        curve.add(all_int8)
    sensitivity4: dict[str, dict[str, float]] = {}
    if four is not None:
        order4, sensitivity4 = _four_bit_order(order, four, evaluator, precisions,
                                               sensitivity, bytes8, key)
        for j in _points(len(order4))[1:]:
            curve.add({**all_int8, **{n: 4 for n in order4[:j]}})
            last = curve.points[-1]
            if 0 < last["size_ratio"] <= opts.max_size_ratio and last["within_budget"]:
                break  # the point _choose takes: the rest of the curve is not needed
    chosen, size_met, forced = _choose(curve.points, opts, force=getattr(context, "force", False))
    config = curve.configs[chosen["step"]]
    # 5. apply to the model itself and verify
    precisions.apply(model, config)
    final = evaluator.errors(model)
    if not evaluator.within(final) and not forced:
        raise BudgetExceededError(f"quantize(mode=mixed): the chosen configuration measured "
                                  f"{final}, over budget")
    if forced:
        logger.warning("%s; written anyway (--force): step %d, size ratio %s", forced,
                       chosen["step"], chosen["size_ratio"])
        stats["forced_past_budget"] = forced
    stats.update({
        "bits_per_layer": config,
        **{f"layers_{name}": sum(1 for b in config.values() if b == bits)
           for name, bits in (("int4", 4), ("int8", 8), ("fp16", 16), ("fp32", 32))},
        "sensitivity": {n: {k: round(v, 6) for k, v in sensitivity[n].items()} for n in order},
        "budget_curve": curve.points,
        "chosen_step": chosen["step"],
        "final_error": {k: round(v, 6) for k, v in final.items()},
        "budget": {"max_error": opts.max_error, "max_accuracy_drop": opts.max_accuracy_drop,
                   "max_size_ratio": opts.max_size_ratio, "metric": opts.metric is not None,
                   "bits": opts.bits},
        "size_target_met": size_met,
        "evaluations": evaluator.evaluations,
        "eval_batches": len(evaluator.batches),
        "seconds": round(time.perf_counter() - start, 2),
    })
    if four is not None:
        stats["sensitivity_int4"] = sensitivity4
        stats["int4_block"] = opts.block
        stats.update({f"int4_{k}": v for k, v in four.report.items()})
    if skip_float_points:
        stats["budget_curve_note"] = ("int8/float points skipped: all-int8 is already larger "
                                      "than max_size_ratio")
    return stats


def _auto_calibration(fp32: ir.Model, opts: QuantizeOptions, context: Any,
                      stats: dict[str, Any], names: set[str], full: Any, layers: list[str],
                      tables: set[str], four: FourBitWeights | None
                      ) -> tuple[QuantizeOptions, QuantizeOptions]:
    """calibration=auto (auto_calibration.py), measured on the most compressed
    configuration the pass offers (every layer at `bits`, 4 where it has a 4-bit form):
    the options (and int8 options) with the chosen method; the report's
    `calibration_auto`."""
    lowest = {n: 4 if four is not None and n in four.names else 8 for n in layers}

    def build(cand_opts: QuantizeOptions, calib: Calibration) -> ir.Model:
        return _Precisions(fp32, calib, replace(cand_opts, mode="int8"), tables,
                           four).build(lowest)

    chosen, report = choose_calibration(context, opts, fp32, names,
                                        bias_correction_inputs(full, opts), build)
    report["measured_on"] = ("every layer in 4 bits where it has a 4-bit form, int8 otherwise"
                             if four is not None else "every layer in int8")
    stats["calibration_auto"] = report
    stats["calibration_chosen"] = chosen
    stats.setdefault("notes", []).append(describe_choice(report))
    chosen_opts = replace(opts, calibration=chosen)
    return chosen_opts, replace(chosen_opts, mode="int8")


def embedding_tables(model: ir.Model, opts: QuantizeOptions, *, min_size: int = 4096) -> list[str]:
    """The Gather nodes of constant float32 2-D tables (axis 0, at least `min_size`
    elements: what `quantize_embeddings` quantizes) that mixed precision allocates like
    layers; none with `embeddings=false`, none named in `keep_float`."""
    if not opts.embeddings:
        return []
    keep = {t.strip() for t in opts.keep_float.split(",") if t.strip()}
    out = []
    for n in model.graph:
        if n.op_type != "Gather" or n.domain not in ("", "ai.onnx") or n.name in keep \
                or int(attr(n, "axis", 0)) != 0:
            continue
        table = constant_array(n.inputs[0])
        if table is not None and table.dtype == np.float32 and table.ndim == 2 \
                and table.size >= min_size:
            out.append(n.name)
    return out


def _points(n: int) -> list[int]:
    """0..n, or 41 evenly spaced values on deep models (bounds the evaluations)."""
    if n + 1 > 41:
        return sorted({round(i * n / 40) for i in range(41)})
    return list(range(n + 1))


def _sensitivities(layers: list[str], bits: int, evaluator: OutputErrorEvaluator,
                   precisions: _Precisions) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Per layer, the error and the weight bytes of the model with only it at `bits`."""
    errors, sizes = {}, {}
    for name in layers:
        cand = precisions.build({name: bits})
        errors[name] = evaluator.errors(cand)
        sizes[name] = weight_bytes(cand)
    return errors, sizes


def _four_bit_order(order: list[str], four: FourBitWeights, evaluator: OutputErrorEvaluator,
                    precisions: _Precisions, eight: dict[str, dict[str, float]],
                    bytes8: dict[str, int], key: str
                    ) -> tuple[list[str], dict[str, dict[str, float]]]:
    """The layers with a 4-bit form, in the order they go from 8 to 4 bits: by the
    error each adds alone (squared, as independent errors add) per byte it saves;
    layers that lose nothing first. And the 4-bit sensitivities, for the report."""
    names = [n for n in order if n in four.names]
    sens4, bytes4 = _sensitivities(names, 4, evaluator, precisions)
    score = {}
    for n in names:
        added = sens4[n][key] ** 2 - eight[n][key] ** 2
        saved = max(bytes8[n] - bytes4[n], 1)
        score[n] = added / saved
    ordered = sorted(names, key=lambda n: score[n])
    report = {n: {**{k: round(v, 6) for k, v in sens4[n].items()},
                  "bytes_saved": bytes8[n] - bytes4[n]} for n in ordered}
    return ordered, report


class _Curve:
    """Budget-curve points (error, weight bytes, within budget) and their configurations."""

    def __init__(self, evaluator: OutputErrorEvaluator, precisions: _Precisions, fp32_bytes: int):
        self.evaluator, self.precisions, self.fp32_bytes = evaluator, precisions, fp32_bytes
        self.points: list[dict[str, Any]] = []
        self.configs: list[dict[str, int]] = []

    def add(self, config: dict[str, int], *, measure_only: bool = False) -> float:
        """Measure `config` and append it (unless `measure_only`); its size ratio."""
        cand = self.precisions.build(config)
        size = weight_bytes(cand)
        if measure_only:
            return size / self.fp32_bytes
        err = self.evaluator.errors(cand)
        bits = list(config.values())
        self.points.append({"step": len(self.points), "int8_layers": bits.count(8),
                            "int4_layers": bits.count(4),
                            **{e: round(v, 6) for e, v in err.items()},
                            "weight_bytes": size, "size_ratio": round(size / self.fp32_bytes, 4),
                            "within_budget": self.evaluator.within(err)})
        self.configs.append(dict(config))
        return size / self.fp32_bytes


def _prepare(model: ir.Model, opts: QuantizeOptions, context: Any) -> dict[str, Any]:
    """1. The float rewrites int8 quantization runs first: folding, SmoothQuant (exact in
    float; `smooth`, auto as for mode=int8), the merges for int8."""
    if opts.per_channel and model.opset_imports.get("", 13) < 13:
        upgrade_opset(model, 13)
    infer_shapes(model)
    stats: dict[str, Any] = fold_into_weights(model)
    repair.smooth_as_configured(model, opts, context, stats)
    stats.update(merge_for_int8(model))
    ensure_node_names(model.graph)
    return stats


def _evaluator(fp32: ir.Model, calib: Calibration, opts: QuantizeOptions,
               context: Any) -> OutputErrorEvaluator:
    """An evaluator on the first calibration batches (at most 8, or `calib_batches`),
    with their labels when the calibration data has them."""
    eval_count = min(calib.batches, opts.calib_batches or 8)
    batches = list(context.calibration_batches(eval_count))
    labels = None
    if context.calibration is not None and hasattr(context.calibration, "labels"):
        labels = context.calibration.labels()
    return OutputErrorEvaluator(fp32, batches, opts, labels, context.threads)


class _Precisions:
    """Builds the float model with a chosen precision per layer (name -> bits: 4, 8, 16
    or 32; layers not named stay fp32)."""

    def __init__(self, fp32: ir.Model, calib: Calibration, int8_opts: QuantizeOptions,
                 tables: set[str], four: FourBitWeights | None):
        self.fp32, self.calib, self.int8_opts = fp32, calib, int8_opts
        self.tables, self.four = tables, four or FourBitWeights()

    def apply(self, target: ir.Model, config: dict[str, int]) -> ir.Model:
        """Rewrite `target` (a copy of the float model) to `config`, in place."""
        def named(bits: int) -> set[str]:
            return {n for n, b in config.items() if b == bits}

        four, eight = named(4), named(8)
        conv4 = four & set(self.four.convs)
        int8 = (eight - self.tables) | conv4
        if int8:
            plan = make_plan(target, self.int8_opts, only=int8)
            apply_calibrated(target, plan, self.calib, self.int8_opts,
                             rounded={n: self.four.convs[n] for n in conv4})
            pack_int4_codes(target, sorted(conv4))
        if eight & self.tables:
            quantize_embeddings(target, self.tables - eight)
        if four & self.tables:
            quantize_embeddings_int4(target, self.int8_opts, keep=self.tables - four)
        if named(16):
            store_fp16_weights(target, named(16))
        matmul4 = {n: self.four.matmuls[n] for n in four & set(self.four.matmuls)}
        if matmul4:
            write_matmulnbits(target, matmul4, self.int8_opts)
        return target

    def build(self, config: dict[str, int]) -> ir.Model:
        """A new copy of the float model with these precisions."""
        return self.apply(load_model(self.fp32, check=False), config)


def _choose(curve: list[dict[str, Any]], opts: QuantizeOptions, force: bool = False
            ) -> tuple[dict[str, Any], bool | None, str | None]:
    """The point of the curve to apply, whether the size target was met (None without
    one), and, when `force` made it write past a budget, why: the last point (the most
    compressed) within the error budgets, or with `max_size_ratio` the first point within
    them that reaches it. Refuses (BudgetExceededError) when no point is within the error
    budgets, or none within them reaches the size target; with `force` it takes the least
    lossy point, or the smallest within the error budgets, instead."""
    ok_points = [p for p in curve if p["within_budget"]]
    if not ok_points:
        least = min(curve, key=lambda p: (p.get("metric", p["rel_l2"]), p["step"]))
        message = (f"quantize(mode=mixed): no configuration meets the budget (max_error="
                   f"{opts.max_error}, max_accuracy_drop={opts.max_accuracy_drop}); the least "
                   f"lossy point has error {least}")
        if force:
            return least, None if opts.max_size_ratio <= 0 else False, message
        raise BudgetExceededError(f"{message}. Raise the budget or use mode=fp16.")
    chosen = ok_points[-1]
    if opts.max_size_ratio <= 0:
        return chosen, None, None
    small = [p for p in ok_points if p["size_ratio"] <= opts.max_size_ratio]
    if small:
        return small[0], True, None
    smallest = min(ok_points, key=lambda p: (p["size_ratio"], p["step"]))
    reaching = [p for p in curve if p["size_ratio"] <= opts.max_size_ratio]
    at_target = (f"; the first point that small has error {reaching[0]}" if reaching
                 else "; no point is that small" + (" (try bits=4)" if opts.bits == 8 else ""))
    message = (f"quantize(mode=mixed): max_size_ratio={opts.max_size_ratio} is not reached "
               f"within the error budget (max_error={opts.max_error}, max_accuracy_drop="
               f"{opts.max_accuracy_drop}): the smallest point within it has size ratio "
               f"{smallest['size_ratio']}{at_target}")
    if force:
        return smallest, False, message
    raise BudgetExceededError(f"{message}. Nothing was written; raise max_error or "
                              "max_size_ratio, or pass --force to write that smallest point.")
