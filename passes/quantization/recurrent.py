"""int8 weights for recurrent layers (LSTM, GRU), in every graph and subgraph.

Rewrite rules (`quantize(int8)`, option `recurrent=lstm|all|none`, default lstm):
  * LSTM (opset domain, layout 0, no peepholes) with constant W [D, 4H, I] and
    R [D, 4H, H] ==> onnxruntime's `com.microsoft.DynamicQuantizeLSTM` with
    W_q [D, I, 4H] and R_q [D, H, 4H] int8, symmetric, one scale per gate row
    (`W_scale`/`R_scale` [D, 4H], zero points 0): onnxruntime quantizes the input and
    hidden state per step at run time and runs int8 GEMMs (as ORT's own quantizer
    emits it; measured with onnxruntime 1.31).
  * GRU (no DynamicQuantizeGRU exists) and LSTM that the rule above refuses, only with
    `recurrent=all`: weight-only int8, `DequantizeLinear(int8 W, scale, axis=1)` feeding
    the float op: 3.7x smaller weights but float compute plus a DQ per call (a GRU
    I=64 H=128 x16 steps ran 1.4x slower in onnxruntime 1.31, 1 thread), hence opt-in.
W / R that are computed from constants (the Slice/Concat gate reordering torch's
exporter emits inside Silero VAD's If branches) are evaluated first (`fold_constant`).
Each rewritten layer's weight error (relative L2 of the dequantized weights) is
reported; the output error is measured by the pass manager like every lossy rewrite.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir import constant_array
from ...subgraphs import node_subgraphs
from ..naming import NameAllocator
from .observers import quantize_weight

logger = logging.getLogger(__name__)

# Data-movement ops whose value is a function of constant inputs only (W / R reordering).
_FOLDABLE = {"Slice", "Concat", "Unsqueeze", "Squeeze", "Transpose", "Reshape", "Gather",
             "Identity", "Split", "Cast"}
RECURRENT_OPS = ("LSTM", "GRU")


def fold_constant(value: ir.Value | None, depth: int = 12) -> np.ndarray | None:
    """The value of `value` when it is a constant or a chain of data-movement ops over
    constants (evaluated with onnx.reference), else None."""
    arr = constant_array(value)
    if arr is not None or value is None or depth == 0:
        return arr
    node = value.producer()
    if node is None or node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx"):
        return None
    inputs = []
    for v in node.inputs:
        a = fold_constant(v, depth - 1) if v is not None else None
        if v is not None and a is None:
            return None
        inputs.append(a)
    import onnx
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if a is not None else "" for i, a in enumerate(inputs)]
    outs = [f"out{i}" for i in range(len(node.outputs))]
    attrs = {k: a.value for k, a in node.attributes.items() if isinstance(a, ir.Attr)}
    proto_node = onnx.helper.make_node(node.op_type, names, outs, **attrs)
    evaluator = ReferenceEvaluator(proto_node)
    results = evaluator.run(None, {n: a for n, a in zip(names, inputs) if n})
    return np.asarray(results[list(node.outputs).index(value)])


def _all_nodes(graph: ir.Graph):
    for node in list(graph):
        yield node
        for _, sub in node_subgraphs(node):
            yield from _all_nodes(sub)


def _lstm_refusal(node: ir.Node, w: np.ndarray | None, r: np.ndarray | None) -> str | None:
    if w is None or r is None:
        return "W or R is not constant"
    if w.dtype != np.float32 or w.ndim != 3 or r.ndim != 3:
        return "W / R are not float32 [D, 4H, *]"
    layout = node.attributes.get("layout")
    if layout is not None and layout.value:
        return "layout=1 (DynamicQuantizeLSTM has no layout attribute)"
    if len(node.inputs) > 7 and node.inputs[7] is not None:
        return "peephole weights P"
    return None


def _first_output(node: ir.Node) -> str:
    """The name of the layer's first produced output (Y, else Y_h): what error is read on."""
    return next((o.name for o in node.outputs if o.name), "")


def _rel_err(w: np.ndarray, w_deq: np.ndarray) -> float:
    return float(np.linalg.norm(w_deq - w) / max(np.linalg.norm(w), 1e-12))


class RecurrentQuantizer:
    """Rewrites every LSTM / GRU of a model (subgraphs included); see the module doc."""

    def __init__(self, model: ir.Model, *, weight_only: bool):
        self.model = model
        self.weight_only = weight_only
        self.names = NameAllocator(model.graph)
        self.shared: dict[tuple, tuple] = {}
        self.report: dict[str, Any] = {"lstm_int8": 0, "weight_only_int8": 0, "kept_float": {},
                                       "layers": {}}

    def run(self) -> dict[str, Any]:
        for node in list(_all_nodes(self.model.graph)):
            if node.op_type in RECURRENT_OPS and node.domain in ("", "ai.onnx"):
                self._rewrite(node)
        if self.report["lstm_int8"]:
            self.model.opset_imports.setdefault("com.microsoft", 1)
        return self.report

    def _rewrite(self, node: ir.Node) -> None:
        w, r = fold_constant(node.inputs[1]), fold_constant(node.inputs[2])
        refusal = _lstm_refusal(node, w, r) if node.op_type == "LSTM" else None
        if node.op_type == "LSTM" and refusal is None:
            self._dynamic_lstm(node, w, r)
        elif not self.weight_only:
            self.report["kept_float"][node.name] = (
                (f"{refusal}; " if refusal else "") + "weight-only int8 runs slower in "
                "onnxruntime (a DequantizeLinear per call): recurrent=all to quantize anyway")
        elif w is not None and r is not None and w.dtype == np.float32 and w.ndim == 3:
            self._weight_only(node, w, r)
            if refusal:
                self.report["layers"][node.name]["note"] = f"weight-only: {refusal}"
        else:
            self.report["kept_float"][node.name] = refusal or "W or R is not constant"

    def _dynamic_lstm(self, node: ir.Node, w: np.ndarray, r: np.ndarray) -> None:
        graph = node.graph
        base = node.name or "lstm"
        extra = []
        errors = {}
        for label, arr in (("W", w), ("R", r)):
            key = (arr.shape, hash(arr.tobytes()))
            if key in self.shared:  # the same weights under two If branches: one copy
                extra.append(self.shared[key][0])
                errors[label] = self.shared[key][1]
                continue
            d, rows, cols = arr.shape
            q, scales, deq = quantize_weight(arr.reshape(d * rows, cols), 0)
            errors[label] = _rel_err(arr, deq.reshape(arr.shape))
            q_t = np.ascontiguousarray(q.reshape(d, rows, cols).transpose(0, 2, 1))
            extra.append((self.names.initializer(f"{base}_{label}_quantized", q_t),
                          self.names.initializer(f"{base}_{label}_scale",
                                                 scales.reshape(d, rows).astype(np.float32)),
                          self.names.initializer(f"{base}_{label}_zero_point",
                                                 np.zeros((d, rows), np.int8))))
            self.shared[key] = (extra[-1], errors[label])
        inputs = [node.inputs[0], extra[0][0], extra[1][0]]
        inputs += [node.inputs[i] if len(node.inputs) > i else None for i in range(3, 8)]
        inputs += [extra[0][1], extra[0][2], extra[1][1], extra[1][2]]
        attrs = [a for k, a in node.attributes.items() if k != "layout"]
        new = ir.Node("com.microsoft", "DynamicQuantizeLSTM", inputs, attrs,
                      num_outputs=len(node.outputs), name=self.names.node(f"{base}_int8"))
        graph.insert_before(node, new)
        for old, out in zip(node.outputs, new.outputs):
            out.name, out.type, out.shape = None, old.type, old.shape
            if old.is_graph_output():
                graph.outputs[list(graph.outputs).index(old)] = out
            old.replace_all_uses_with(out)
            name = old.name
            old.name = self.names.value(f"{name}_float")
            out.name = name
        graph.remove(node, safe=True)
        self.report["lstm_int8"] += 1
        self.report["layers"][node.name] = {"op": "LSTM", "as": "DynamicQuantizeLSTM",
                                            "weight_rel_err": errors,
                                            "output": _first_output(new)}

    def _weight_only(self, node: ir.Node, w: np.ndarray, r: np.ndarray) -> None:
        graph = node.graph
        base = node.name or node.op_type.lower()
        errors = {}
        for index, label, arr in ((1, "W", w), (2, "R", r)):
            q, scales, deq = quantize_weight(arr, 1)  # one scale per gate row
            errors[label] = _rel_err(arr, deq)
            qv = self.names.initializer(f"{base}_{label}_quantized", q)
            sv = self.names.initializer(f"{base}_{label}_scale", scales.astype(np.float32))
            zv = self.names.initializer(f"{base}_{label}_zero_point",
                                        np.zeros(scales.size, np.int8))
            dq = self.names.make_node("DequantizeLinear", [qv, sv, zv], {"axis": 1},
                                      name=f"{base}_{label}_DequantizeLinear")
            dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
            graph.insert_before(node, dq)
            node.replace_input_with(index, dq.outputs[0])
        self.report["weight_only_int8"] += 1
        self.report["layers"][node.name] = {"op": node.op_type, "as": "weight-only int8 QDQ",
                                            "weight_rel_err": errors,
                                            "output": _first_output(node)}


def quantize_recurrent(model: ir.Model, policy: str = "lstm") -> dict[str, Any]:
    """int8 weights for the LSTM / GRU layers of `model` (in place); returns the report.
    `policy`: "lstm" (DynamicQuantizeLSTM only; GRU and refused LSTMs stay float),
    "all" (those get weight-only int8 too), "none" (nothing)."""
    if policy == "none":
        return {}
    report = RecurrentQuantizer(model, weight_only=policy == "all").run()
    if report["lstm_int8"] or report["weight_only_int8"]:
        from ..graph import remove_unused

        remove_unused(model)
    return report
