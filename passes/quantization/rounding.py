"""`rounding=gptq`: GPTQ rounding of the weights a quantize mode is about to write, and
its report against round-to-nearest on the same grid.

`round_layers` takes the compute nodes and, per node, the grid the mode uses (int8
per-channel symmetric, or int4 blocks); it reads the layer inputs from the calibration
data (hessian.py), rounds with GPTQ (gptq.py) and measures both roundings on held-out
calibration batches: relative output error tr(ΔW H ΔWᵀ) / tr(W H Wᵀ) per layer.
Nodes GPTQ cannot handle are rounded to nearest and listed in the report.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir import constant_array
from ..graph import attr, weight_axis
from .gptq import Grid, output_error, round_gptq, round_nearest, symmetric_grid
from .hessian import collect_hessians, from_rows, gptq_unsupported, weight_rows
from .observers import quantize_weight, weight_scales

logger = logging.getLogger(__name__)

# grid_for(node, weight rows [groups, rows, d]) -> one Grid per group
GridFor = Callable[[ir.Node, np.ndarray], list[Grid]]


@dataclass
class RoundedWeight:
    """A weight rounded by GPTQ: integer codes and dequantized values, both as
    [groups, rows, d] (hessian.weight_rows layout), and the held-out errors."""

    codes: np.ndarray
    dequantized: np.ndarray
    rtn_error: float
    gptq_error: float


def round_layers(model: ir.Model, nodes: list[ir.Node], grid_for: GridFor, context: Any, *,
                 damp: float, act_order: bool, limit: int | None,
                 ) -> tuple[dict[str, RoundedWeight], dict[str, Any]]:
    """GPTQ-round the weights of `nodes`: (results by node name, report for the stats)."""
    start = time.perf_counter()
    skipped = {n.name: r for n in nodes if (r := gptq_unsupported(n)) is not None}
    todo = [n for n in nodes if n.name not in skipped]
    results: dict[str, RoundedWeight] = {}
    hessians = None
    with _single_blas_thread():
        if todo:
            limit = limit or context.max_calibration_batches
            hessians = collect_hessians(model, todo, context.calibration_batches(limit),
                                        threads=context.threads)
        for n in todo:
            pair = hessians.by_node[n.name]
            if pair.fit is None:
                skipped[n.name] = "no calibration rows"
                continue
            rows = weight_rows(n, constant_array(n.inputs[1]).astype(np.float64))
            results[n.name] = _round_node(rows, pair, grid_for(n, rows), damp, act_order)
    if skipped:
        logger.warning("quantize rounding=gptq: %d weight(s) rounded to nearest instead: %s",
                       len(skipped), "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:5]))
    report = _report(results, skipped, hessians, time.perf_counter() - start)
    return results, report


def _single_blas_thread() -> contextlib.AbstractContextManager:
    """GPTQ's factorizations are of d x d Hessians (d = a layer's input features, at most
    a few thousand), where a second BLAS thread gains little and, on a loaded machine,
    spins: measured on 2 shared cores, MiniLM's 36 layers 4.7 s with 1 thread, ~30 s
    with 2. No-op without threadpoolctl."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _round_node(rows: np.ndarray, pair, grids: list[Grid], damp: float,
                act_order: bool) -> RoundedWeight:
    codes, deq = np.empty_like(rows), np.empty_like(rows)
    rtn_err = gptq_err = reference = 0.0
    for g, grid in enumerate(grids):
        w = rows[g]
        _, w_rtn = round_nearest(w, grid)
        codes[g], deq[g] = round_gptq(w, pair.fit[g], grid, damp=damp, act_order=act_order)
        h_eval = pair.held_out[g]
        rtn_err += output_error(w, w_rtn, h_eval)
        gptq_err += output_error(w, deq[g], h_eval)
        reference += output_error(w, np.zeros_like(w), h_eval)
    reference = reference or 1.0
    return RoundedWeight(codes, deq, rtn_err / reference, gptq_err / reference)


def _report(results: dict[str, RoundedWeight], skipped: dict[str, str], hessians,
            seconds: float) -> dict[str, Any]:
    rtn = np.array([r.rtn_error for r in results.values()])
    gptq = np.array([r.gptq_error for r in results.values()])
    report: dict[str, Any] = {
        "gptq_layers": len(results),
        "gptq_rounded_to_nearest": skipped,
        "gptq_seconds": round(seconds, 2),
    }
    if hessians is not None:
        report["gptq_calibration_batches"] = hessians.batches
        report["gptq_held_out_batches"] = hessians.held_out_batches
        if hessians.batches and not hessians.held_out_batches:
            report["gptq_held_out_note"] = "one calibration batch: errors measured on it"
    if results:
        # Relative output error on held-out batches, per layer: tr(ΔW H ΔWᵀ) / tr(W H Wᵀ).
        report["rtn_rel_error_median"] = float(np.median(rtn))
        report["gptq_rel_error_median"] = float(np.median(gptq))
        report["gptq_over_rtn_error_median"] = float(np.median(gptq / np.maximum(rtn, 1e-30)))
        report["gptq_worse_layers"] = int(np.sum(gptq > rtn))
        report["gptq_per_layer"] = {k: [round(r.rtn_error, 8), round(r.gptq_error, 8)]
                                    for k, r in results.items()}
    return report


def four_bit_convs(nodes: list[ir.Node], opts: Any) -> set[str]:
    """The Conv nodes whose weights get 4-bit codes run by int8 kernels (mode=int4,
    convs=int4): every Conv with a constant weight but depthwise ones (k·k weights per
    channel: 4 bits cost them the most accuracy and save the least). MatMul/Gemm are not
    offered this form: per output channel 4-bit codes with int8 activations took MiniLM's
    cosine to 0.85-0.88 (MatMulNBits blocks of 32: 0.97-0.98)."""
    if opts.mode != "int4" or opts.convs != "int4":
        return set()
    out = set()
    for n in nodes:
        w = constant_array(n.inputs[1]) if n.op_type == "Conv" else None
        if w is not None and not (int(attr(n, "group", 1)) > 1 and w.shape[1] == 1):
            out.add(n.name)
    return out


def choose_weights(model: ir.Model, nodes: list[ir.Node], opts: Any, context: Any,
                   stats: dict[str, Any]) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The weights of static quantization's compute `nodes` that are not plain int8
    round-to-nearest: GPTQ-rounded ones (rounding=gptq) and 4-bit conv codes (stored in
    int8 initializers, packed later by int4.pack_int4_codes); {node: (codes, scales,
    dequantized)}. The GPTQ report goes into `stats`."""
    four = four_bit_convs(nodes, opts)
    if four:
        stats["int4_codes"] = sorted(four)
    if opts.rounding == "gptq":
        rounded, report = gptq_int8(model, nodes, opts, context, four_bit=four)
        stats.update(report)
        return rounded
    per_channel = opts.per_channel and model.opset_imports.get("", 13) >= 13
    rounded = {}
    for n in nodes:
        if n.name in four:
            w = constant_array(n.inputs[1])
            axis = weight_axis(n, w) if per_channel else None
            rounded[n.name] = quantize_weight(w, axis, bits=4, method=opts.weight_calibration)
    return rounded


def gptq_int8(model: ir.Model, nodes: list[ir.Node], opts: Any, context: Any, *,
              four_bit: set[str] | None = None,
              ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], dict[str, Any]]:
    """rounding=gptq for static int8: the int8 weights of `nodes` (symmetric, per output
    channel, scales as round-to-nearest picks them; 4-bit codes for the nodes in
    `four_bit`) as {node: (codes, scales, dequantized)} in the ONNX weight layout, and the
    report."""
    per_channel = opts.per_channel and model.opset_imports.get("", 13) >= 13
    scales_of: dict[str, np.ndarray] = {}
    four_bit = four_bit or set()

    def grid_for(node: ir.Node, rows: np.ndarray) -> list[Grid]:
        w = constant_array(node.inputs[1])
        axis = weight_axis(node, w) if per_channel else None
        bits = 4 if node.name in four_bit else 8
        scales = weight_scales(w, axis, bits=bits, method=opts.weight_calibration)
        scales_of[node.name] = scales
        per_row = np.broadcast_to(scales.astype(np.float64), (rows.shape[0] * rows.shape[1],))
        return [symmetric_grid(s, rows.shape[2], bits)
                for s in per_row.reshape(rows.shape[0], rows.shape[1])]

    candidates = [n for n in nodes if len(n.inputs) > 1 and constant_array(n.inputs[1]) is not None]
    results, report = round_layers(model, candidates, grid_for, context, damp=opts.gptq_damp,
                                   act_order=opts.act_order, limit=opts.calib_batches or None)
    out: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    by_name = {n.name: n for n in candidates}
    for name in four_bit - set(results):  # GPTQ could not take it: 4-bit to nearest
        w = constant_array(by_name[name].inputs[1])
        axis = weight_axis(by_name[name], w) if per_channel else None
        out[name] = quantize_weight(w, axis, bits=4, method=opts.weight_calibration)
    for name, r in results.items():
        node = by_name[name]
        w = constant_array(node.inputs[1])
        codes = from_rows(node, r.codes, w.shape).astype(np.int8)
        deq = from_rows(node, r.dequantized, w.shape).astype(np.float32)
        out[name] = (codes, scales_of[name], deq)
    return out, report
