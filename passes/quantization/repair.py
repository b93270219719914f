"""Training-free accuracy repair for post-training quantization.

* Bias correction (`analytic_bias_shifts`): the expected error a layer's weight
  quantization adds to its output, E[(W_q - W) x] = (W_q - W) E[x], with E[x] the
  per-input-channel mean measured on calibration data, is subtracted from the
  layer's bias (Conv, Gemm). Nagel et al. 2019, "Data-Free Quantization".
* Cross-layer equalization (`equalize_model`): for Conv/Gemm -> (Relu) -> Conv/Gemm
  chains, output channel i of the first layer is divided by s_i and input channel i
  of the second multiplied by s_i, s_i = sqrt(r1_i / r2_i), equalizing per-channel
  weight ranges. Exact in float because Relu is positively homogeneous.
  Preconditions: the first layer's output feeds only the Relu (or directly only the
  second layer), the Relu feeds only the second layer, the second layer has group=1,
  all weights constant. Relu6/Clip/SiLU are not homogeneous: such pairs are skipped.
* SmoothQuant (`smooth_model`): for MatMul/Gemm layers with constant weights fed by a
  LayerNormalization (or a decomposed LayerNorm ending in Mul(gamma) -> Add(beta)),
  activation channel j is divided by s_j = max|x_j|^a / max|W_j|^(1-a) (folded into
  gamma/beta) and weight row j multiplied by s_j, moving activation outliers into the
  weights. Exact in float. Preconditions: every consumer of the normalized tensor is
  such a layer, gamma/beta constant.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from ...activations import iter_activations
from ...ir import constant_array
from ..graph import attr, remove_unused, sole_consumer, weight_axis
from ..naming import NameAllocator
from .observers import ChannelMeanObserver, quantize_weight

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------- bias correction


def expected_output_shift(node: ir.Node, w: np.ndarray, w_deq: np.ndarray,
                          mean_in: np.ndarray) -> np.ndarray | None:
    """(W_q - W) E[x] per output channel, or None when the layer type is not handled."""
    err = (w_deq.astype(np.float64) - w.astype(np.float64))
    m = mean_in.astype(np.float64)
    if node.op_type == "Conv":
        group = int(attr(node, "group", 1))
        cout, cpg = w.shape[0], w.shape[1]
        if m.size != cpg * group:
            return None
        per_ci = err.reshape(cout, cpg, -1).sum(-1)  # [cout, cin/group]
        m_g = m.reshape(group, cpg)
        out_group = np.arange(cout) // (cout // group)
        return np.einsum("oc,oc->o", per_ci, m_g[out_group])
    if node.op_type == "Gemm":
        if int(attr(node, "transB", 0)):
            return err @ m if err.shape[1] == m.size else None
        return m @ err if err.shape[0] == m.size else None
    if node.op_type == "MatMul" and w.ndim == 2:
        return m @ err if err.shape[0] == m.size else None
    return None


def analytic_bias_shifts(nodes: list[ir.Node], channel_stats: dict[str, ChannelMeanObserver],
                         *, per_channel: bool = True, method: str = "minmax",
                         dequantized: dict[str, np.ndarray] | None = None,
                         ) -> dict[str, np.ndarray]:
    """Per compute node (Conv/Gemm with room for a bias), the expected output shift
    (of the weights in `dequantized` by node name, else of round-to-nearest)."""
    dequantized = dequantized or {}
    shifts = {}
    for n in nodes:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        x = n.inputs[0]
        w = constant_array(n.inputs[1])
        obs = channel_stats.get(x.name) if x is not None else None
        if w is None or obs is None or obs.sum is None:
            continue
        axis = weight_axis(n, w) if per_channel else None
        w_deq = dequantized.get(n.name)
        if w_deq is None:
            _, _, w_deq = quantize_weight(w, axis, method=method)
        shift = expected_output_shift(n, w, w_deq, obs.mean)
        if shift is not None and np.all(np.isfinite(shift)):
            shifts[n.name] = shift
    return shifts


# ---------------------------------------------------------------- equalization


def _out_axis_range(node: ir.Node, w: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return np.abs(w).reshape(w.shape[0], -1).max(1)
    return np.abs(w).max(1) if int(attr(node, "transB", 0)) else np.abs(w).max(0)


def _in_axis_range(node: ir.Node, w: np.ndarray) -> np.ndarray:
    if node.op_type == "Conv":
        return np.abs(w).transpose(1, 0, *range(2, w.ndim)).reshape(w.shape[1], -1).max(1)
    if node.op_type == "MatMul":
        return np.abs(w).max(1)
    return np.abs(w).max(0) if int(attr(node, "transB", 0)) else np.abs(w).max(1)


def equalizable_pairs(model: ir.Model) -> list[tuple[ir.Node, ir.Node]]:
    """(first, second) layer pairs that cross-layer equalization may rescale."""
    pairs = []
    for n1 in model.graph:
        if n1.op_type not in ("Conv", "Gemm"):
            continue
        if n1.op_type == "Gemm" and int(attr(n1, "transA", 0)):
            continue
        y = n1.outputs[0]
        nxt = sole_consumer(y)
        if nxt is not None and nxt.op_type == "Relu":
            nxt = sole_consumer(nxt.outputs[0])
        if nxt is None or nxt.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        if nxt.op_type == "Conv" and int(attr(nxt, "group", 1)) != 1:
            continue
        if nxt.op_type == "Gemm" and int(attr(nxt, "transA", 0)):
            continue
        w1, w2 = constant_array(n1.inputs[1]), constant_array(nxt.inputs[1])
        if w1 is None or w2 is None or (nxt.op_type == "MatMul" and w2.ndim != 2):
            continue
        if n1.op_type == "Conv" and nxt.op_type != "Conv":
            continue  # Conv -> Gemm goes through Flatten/pooling: not a direct chain
        if n1.op_type != "Conv" and nxt.op_type == "Conv":
            continue
        if len(_out_axis_range(n1, w1)) != len(_in_axis_range(nxt, w2)):
            continue
        pairs.append((n1, nxt))
    return pairs


def equalize_model(model: ir.Model, iterations: int = 8) -> int:
    """Cross-layer equalization in place; returns the number of rescaled pairs."""
    graph = model.graph
    names = NameAllocator(graph)
    pairs = equalizable_pairs(model)
    for _ in range(iterations):
        for n1, n2 in pairs:
            w1, w2 = constant_array(n1.inputs[1]), constant_array(n2.inputs[1])
            r1, r2 = _out_axis_range(n1, w1), _in_axis_range(n2, w2)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            if np.allclose(s, 1.0, rtol=1e-3):
                continue
            s = s.astype(np.float32)
            if n1.op_type == "Conv":
                w1n = w1 / s.reshape(-1, *([1] * (w1.ndim - 1)))
            elif int(attr(n1, "transB", 0)):
                w1n = w1 / s[:, None]
            else:
                w1n = w1 / s[None, :]
            n1.replace_input_with(1, names.initializer(f"{n1.name}_cle_W", w1n.astype(np.float32)))
            if len(n1.inputs) > 2 and n1.inputs[2] is not None:
                b1 = constant_array(n1.inputs[2])
                if b1 is not None:
                    b1n = (b1.reshape(-1) / s).reshape(b1.shape)
                    n1.replace_input_with(2, names.initializer(f"{n1.name}_cle_B",
                                                               b1n.astype(np.float32)))
            if n2.op_type == "Conv":
                w2n = w2 * s.reshape(1, -1, *([1] * (w2.ndim - 2)))
            elif n2.op_type == "MatMul" or not int(attr(n2, "transB", 0)):
                w2n = w2 * s[:, None]
            else:
                w2n = w2 * s[None, :]
            n2.replace_input_with(1, names.initializer(f"{n2.name}_cle_W", w2n.astype(np.float32)))
    if pairs:
        remove_unused(model)
    logger.info("cross-layer equalization: %d pairs", len(pairs))
    return len(pairs)


# ---------------------------------------------------------------- SmoothQuant


def _layernorm_affine(x: ir.Value) -> tuple[ir.Node, int, int] | None:
    """(node, gamma input index, beta input index or -1) holding x's per-channel affine.

    Either a LayerNormalization node (gamma=input 1, beta=input 2) or the Add(beta)
    of a decomposed LayerNorm whose other input is Mul(., gamma).
    """
    p = x.producer()
    if p is None:
        return None
    if p.op_type == "LayerNormalization" and len(p.outputs) >= 1 and p.outputs[0] is x:
        if constant_array(p.inputs[1]) is None:
            return None
        if int(attr(p, "axis", -1)) != -1:
            return None
        beta = (2 if len(p.inputs) > 2 and p.inputs[2] is not None
                and constant_array(p.inputs[2]) is not None else -1)
        return p, 1, beta
    return None


def _smooth_consumer(c: ir.Node, x: ir.Value) -> bool:
    """A MatMul/Gemm reading `x` as its activation with a constant 2-D weight."""
    if c.op_type not in ("MatMul", "Gemm") or c.inputs[0] is not x or len(c.inputs) < 2:
        return False
    w = constant_array(c.inputs[1])
    if w is None or w.ndim != 2 or w.dtype != np.float32:
        return False
    return not (c.op_type == "Gemm" and int(attr(c, "transA", 0)))


def smoothable_groups(model: ir.Model, *,
                      insert: bool = True) -> list[tuple[ir.Value, list[ir.Node], bool]]:
    """(activation, layers reading it, folds-into-LayerNorm) for every smoothable activation.

    A LayerNormalization output is smoothed through its gamma/beta; its other
    consumers (e.g. the residual Add of a post-LN transformer) get a compensating
    Mul(s). Any other activation read only by such layers is smoothed by an inserted
    Mul(1/s) when `insert` (the cost of one elementwise op).
    """
    groups = []
    seen: set[str] = set()
    for n in model.graph:
        for x in n.outputs:
            if x.name in seen or x.is_graph_output():
                continue
            consumers = list(x.consumers())
            layers = [c for c in consumers if _smooth_consumer(c, x)]
            if not layers:
                continue
            if (n.op_type == "LayerNormalization" and x is n.outputs[0]
                    and _layernorm_affine(x) is not None):
                groups.append((x, layers, True))
            elif insert and len(layers) == len(consumers):
                groups.append((x, layers, False))
            seen.add(x.name)
    return groups


def _weight_rows_absmax(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """max |W| per input channel (the K axis)."""
    if node.op_type == "Gemm" and int(attr(node, "transB", 0)):
        return np.abs(w).max(0)
    return np.abs(w).max(1)


def smooth_as_configured(model: ir.Model, opts: Any, context: Any,
                         stats: dict[str, Any]) -> None:
    """SmoothQuant as the quantize options say (`smooth`; -1: alpha 0.5 when a
    LayerNormalization feeds MatMul/Gemm layers, else off), in place; what it did goes
    into `stats` (smooth_alpha, smoothed)."""
    alpha = opts.smooth
    if alpha < 0:
        alpha = 0.5 if any(g[2] for g in smoothable_groups(model, insert=False)) else 0.0
    if alpha > 0:
        stats["smooth_alpha"] = alpha
        stats["smoothed"] = smooth_model(model, context, alpha, limit=opts.calib_batches or None,
                                         insert=opts.smooth_insert)


def smooth_model(model: ir.Model, context: Any, alpha: float, *, limit: int | None = None,
                 insert: bool = True) -> int:
    """SmoothQuant migration in place (one calibration pass); returns activations smoothed."""
    groups = smoothable_groups(model, insert=insert)
    if not groups:
        return 0
    names = [x.name for x, _, _ in groups]
    stats = {n: ChannelMeanObserver(-1) for n in names}
    batches = context.calibration_batches(limit or context.max_calibration_batches)
    for acts in iter_activations(model, names, batches, threads=context.threads):
        for n in names:
            stats[n].add(acts[n])
    graph = model.graph
    names = NameAllocator(graph)
    done = 0
    for x, layers, via_ln in groups:
        act_max = stats[x.name].absmax
        k = constant_array(layers[0].inputs[1])
        k = (k.shape[1] if layers[0].op_type == "Gemm" and int(attr(layers[0], "transB", 0))
             else k.shape[0])
        if act_max is None or act_max.size != k:
            continue
        w_max = np.max([_weight_rows_absmax(c, constant_array(c.inputs[1])) for c in layers],
                       axis=0)
        s = (np.power(np.maximum(act_max, 1e-5), alpha)
             / np.power(np.maximum(w_max, 1e-5), 1 - alpha))
        s = np.clip(s, 1e-5, 1e5).astype(np.float32)
        others = [c for c in x.consumers() if c not in layers]
        if via_ln:
            ln, gi, bi = _layernorm_affine(x)  # type: ignore[misc]
            gamma = constant_array(ln.inputs[gi])
            ln.replace_input_with(gi, names.initializer(f"{ln.name}_smooth_gamma",
                                                      (gamma / s).astype(np.float32)))
            if bi >= 0:
                beta = constant_array(ln.inputs[bi])
                ln.replace_input_with(bi, names.initializer(f"{ln.name}_smooth_beta",
                                                          (beta / s).astype(np.float32)))
            if others:  # undo the scaling for consumers that are not smoothed layers
                sv = names.initializer(f"{x.name}_unsmooth", s)
                mul = names.make_node("Mul", [x, sv], name=f"{x.name}_unsmooth_mul",
                                      output_names=[f"{x.name}_unsmoothed"])
                mul.outputs[0].type, mul.outputs[0].shape = (ir.TensorType(ir.DataType.FLOAT),
                                                             x.shape)
                graph.insert_after(ln, mul)
                for c in others:
                    for i, v in enumerate(c.inputs):
                        if v is x:
                            c.replace_input_with(i, mul.outputs[0])
        else:
            inv = names.initializer(f"{x.name}_smooth_inv", (1.0 / s).astype(np.float32))
            mul = names.make_node("Mul", [x, inv], name=f"{x.name}_smooth_mul",
                                  output_names=[f"{x.name}_smoothed"])
            mul.outputs[0].type, mul.outputs[0].shape = ir.TensorType(ir.DataType.FLOAT), x.shape
            graph.insert_before(layers[0], mul)
            for c in layers:
                c.replace_input_with(0, mul.outputs[0])
        for c in layers:
            w = constant_array(c.inputs[1])
            if c.op_type == "Gemm" and int(attr(c, "transB", 0)):
                wn = w * s[None, :]
            else:
                wn = w * s[:, None]
            c.replace_input_with(1, names.initializer(f"{c.name}_smooth_W", wn.astype(np.float32)))
        done += 1
    remove_unused(model)
    return done
