"""The 4-bit form of each layer for mixed precision (`quantize(mixed,bits=4)`): which
layers can take 4-bit weights, their codes (rounded once, on the float model), and
writing them into a candidate model.

  MatMul / Gemm, constant 2-D weight  ->  MatMulNBits, blocks of `block` along K
                                          (int4.py; onnxruntime quantizes the activations
                                          to int8 on the fly at accuracy_level=4)
  Conv, not depthwise                 ->  4-bit codes per output channel in the int8 QDQ
                                          weight, packed two per byte in the file
                                          (int4.pack_int4_codes), run by QLinearConv
  Gather of an embedding table        ->  GatherBlockQuantized (4-bit row blocks)

Depthwise convs, ConvTranspose and MatMul weights that are not 2-D have no 4-bit form
here (the reasons are in rounding.four_bit_convs and int4.int4_ineligible).
Rounding: to nearest, or GPTQ (`rounding=gptq`: one pass over the calibration data
collects every layer's Hessian; GPTQ on the same grid as rounding to nearest).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir import constant_array
from ..graph import attr, weight_axis
from .gptq import Grid, block_grid, symmetric_grid
from .hessian import from_rows
from .int4 import int4_ineligible, nearest_block_codes
from .observers import quantize_weight, weight_scales
from .rounding import round_layers


@dataclass
class FourBitWeights:
    """Per layer, its 4-bit weight: conv codes for the int8 QDQ rewrite (name -> int8
    codes in [-7, 7], scales, dequantized), MatMul/Gemm block codes (name -> codes [N, K],
    grid), and the embedding tables' Gather nodes (rounded when written)."""

    convs: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict)
    matmuls: dict[str, tuple[np.ndarray, Grid]] = field(default_factory=dict)
    tables: set[str] = field(default_factory=set)
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> set[str]:
        return set(self.convs) | set(self.matmuls) | self.tables


def four_bit_kind(node: ir.Node, block: int) -> str | None:
    """"conv", "matmul" or "table" when `node` has a 4-bit form, else None."""
    if node.op_type == "Conv":
        w = constant_array(node.inputs[1])
        depthwise = w is not None and int(attr(node, "group", 1)) > 1 and w.shape[1] == 1
        return "conv" if w is not None and w.ndim >= 3 and not depthwise else None
    if node.op_type in ("MatMul", "Gemm"):
        return "matmul" if int4_ineligible(node) is None else None
    if node.op_type == "Gather":
        table = constant_array(node.inputs[0])
        return "table" if table is not None and table.ndim == 2 \
            and table.shape[1] % block == 0 else None
    return None


def round_four_bit(model: ir.Model, nodes: list[ir.Node], opts: Any,
                   context: Any) -> FourBitWeights:
    """The 4-bit weights of `nodes` (each with a `four_bit_kind`), rounded to nearest or,
    with rounding=gptq, by GPTQ on the float `model`'s calibration Hessians."""
    out = FourBitWeights()
    kinds = {n.name: four_bit_kind(n, opts.block) for n in nodes}
    out.tables = {n.name for n in nodes if kinds[n.name] == "table"}
    weighted = [n for n in nodes if kinds[n.name] in ("conv", "matmul")]
    per_channel = opts.per_channel and model.opset_imports.get("", 13) >= 13
    grids: dict[str, Grid] = {}
    conv_scales: dict[str, np.ndarray] = {}

    def grid_for(node: ir.Node, rows: np.ndarray) -> list[Grid]:
        if kinds[node.name] == "matmul":
            grids[node.name] = block_grid(rows[0], opts.block, 4, symmetric=opts.int4_symmetric)
            return [grids[node.name]]
        w = constant_array(node.inputs[1])
        scales = weight_scales(w, weight_axis(node, w) if per_channel else None, bits=4,
                               method=opts.weight_calibration)
        conv_scales[node.name] = scales
        per_row = np.broadcast_to(scales.astype(np.float64), (rows.shape[0] * rows.shape[1],))
        return [symmetric_grid(s, rows.shape[2], 4)
                for s in per_row.reshape(rows.shape[0], rows.shape[1])]

    rounded = {}
    if opts.rounding == "gptq" and weighted:
        rounded, out.report = round_layers(model, weighted, grid_for, context,
                                           damp=opts.gptq_damp, act_order=opts.act_order,
                                           limit=opts.calib_batches or None)
    for n in weighted:
        w = constant_array(n.inputs[1])
        if kinds[n.name] == "matmul":
            out.matmuls[n.name] = ((rounded[n.name].codes[0], grids[n.name]) if n.name in rounded
                                   else nearest_block_codes(n, opts))
        elif n.name in rounded:
            r = rounded[n.name]
            out.convs[n.name] = (from_rows(n, r.codes, w.shape).astype(np.int8),
                                 conv_scales[n.name],
                                 from_rows(n, r.dequantized, w.shape).astype(np.float32))
        else:
            out.convs[n.name] = quantize_weight(w, weight_axis(n, w) if per_channel else None,
                                                bits=4, method=opts.weight_calibration)
    return out
