"""Training-free recovery after channel removal.

Least-squares refit of consumer layers
    For every weight layer that lost input channels (Conv with group 1, Gemm,
    MatMul with a constant 2-D weight), find new weights for the kept inputs
    that best reproduce the *original* layer output on calibration data:

        min_{W', b'} || Y - [X_K, 1] [W'; b'] ||^2 + lam ||W'||^2

    where X_K are the kept input channels (im2col patches for a conv) and Y the
    original output (kept output channels only). Closed form through the normal
    equations, accumulated batch by batch in float64 (`G = A^T A`, `R = A^T Y`),
    so memory is bounded by the layer's width, not by the data. The bias column
    absorbs the mean contribution of removed channels; a layer without a bias
    slot (MatMul not followed by a constant-bias Add) is refit without it.

BatchNorm statistics re-estimation
    A BatchNormalization whose input statistics moved (because an upstream
    layer changed) gets its running mean/variance re-estimated so that its
    output moments per channel match the original model's:
    sigma' = sigma * sqrt(var_pruned / var_orig) and
    mu' = mean_pruned - sigma' * (mean_orig - mu) / sigma.
    For a BN with accurate statistics this is the usual re-estimation (mu' ~
    mean_pruned); for random-weight models it still preserves fidelity.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ..activations import iter_activations
from ..ir import constant_array
from .pruning_groups import _attr

logger = logging.getLogger(__name__)


@dataclass
class RefitTarget:
    """One consumer layer to refit; indices refer to the original layer."""

    node_name: str
    op: str
    x_name: str
    y_name: str
    weight_name: str
    weight: np.ndarray  # original weight
    kept_in: np.ndarray  # kept input channels / features
    kept_out: np.ndarray  # kept output channels / features
    bias_name: str | None = None  # constant to write the refit bias into
    attrs: dict | None = None


def _im2col(x: np.ndarray, kernel: tuple[int, int], strides, pads, dilations) -> np.ndarray:
    """[N, C, H, W] -> [N*Ho*Wo, C*kh*kw] with columns ordered (c, kh, kw)."""
    n, c, _, _ = x.shape
    kh, kw = kernel
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    eh, ew = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))
    win = win[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    # win: N, C, Ho, Wo, kh, kw
    ho, wo = win.shape[2], win.shape[3]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def conv_geometry(node: ir.Node, x_shape, w_shape, y_shape):
    """(kernel, strides, pads, dilations) of a 2-D conv, resolving auto_pad."""
    kernel = tuple(w_shape[2:])
    strides = tuple(_attr(node, "strides", (1, 1)))
    dilations = tuple(_attr(node, "dilations", (1, 1)))
    auto = _attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i in range(2):
            total = max((y_shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                        - x_shape[2 + i], 0)
            small, big = total // 2, total - total // 2
            begin = small if auto == "SAME_UPPER" else big
            pads[i], pads[2 + i] = begin, total - begin
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = list(_attr(node, "pads", (0, 0, 0, 0)))
    return kernel, strides, tuple(pads), dilations


def _rows(target: RefitTarget, x: np.ndarray, y: np.ndarray,
          rng: np.random.Generator, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Design matrix rows (kept inputs) and targets (kept outputs) for one batch."""
    if target.op == "Conv":
        w = target.weight
        geom = target.attrs["geometry"]
        cols = _im2col(x[:, target.kept_in].astype(np.float32), *geom)
        ys = y[:, target.kept_out].transpose(0, 2, 3, 1).reshape(-1, len(target.kept_out))
        del w
    elif target.op == "Gemm":
        xs = x.T if target.attrs.get("transA") else x
        cols = xs[:, target.kept_in]
        ys = y[:, target.kept_out]
    else:  # MatMul
        cols = x.reshape(-1, x.shape[-1])[:, target.kept_in]
        ys = y.reshape(-1, y.shape[-1])[:, target.kept_out]
    if len(cols) > max_rows:
        pick = rng.choice(len(cols), max_rows, replace=False)
        cols, ys = cols[pick], ys[pick]
    return cols.astype(np.float64), ys.astype(np.float64)


def refit_layers(model: ir.Model, targets: list[RefitTarget],
                 batches: Callable[[], Iterable[dict[str, np.ndarray]]], *,
                 threads: int | None = None, max_rows: int = 4096, ridge: float = 1e-3,
                 seed: int = 0) -> dict[str, np.ndarray]:
    """Least-squares refit of each target on the original `model`'s activations.

    Returns constant name -> new array (pruned shape) for weights and biases.
    """
    if not targets:
        return {}
    names = sorted({t.x_name for t in targets} | {t.y_name for t in targets})
    rng = np.random.default_rng(seed)
    gram: dict[str, np.ndarray] = {}
    cross: dict[str, np.ndarray] = {}
    for acts in iter_activations(model, names, batches(), threads=threads):
        for t in targets:
            cols, ys = _rows(t, acts[t.x_name], acts[t.y_name], rng, max_rows)
            a = np.hstack([cols, np.ones((len(cols), 1))])
            if t.node_name not in gram:
                gram[t.node_name] = a.T @ a
                cross[t.node_name] = a.T @ ys
            else:
                gram[t.node_name] += a.T @ a
                cross[t.node_name] += a.T @ ys
    out: dict[str, np.ndarray] = {}
    for t in targets:
        if t.node_name not in gram:
            continue
        g, r = gram.pop(t.node_name), cross.pop(t.node_name)
        use_bias = t.bias_name is not None
        if not use_bias:
            g, r = g[:-1, :-1], r[:-1]
        m = len(g) - (1 if use_bias else 0)
        lam = ridge * float(np.mean(np.diag(g)[:m])) + 1e-12
        reg = np.eye(len(g)) * lam
        if use_bias:
            reg[-1, -1] = 0.0
        try:
            sol = np.linalg.solve(g + reg, r)
        except np.linalg.LinAlgError:
            sol = np.linalg.lstsq(g + reg, r, rcond=None)[0]
        weights = sol[:m].T  # [out, in_cols]
        bias = sol[m] if use_bias else None
        dtype = t.weight.dtype
        if t.op == "Conv":
            w = t.weight
            new_w = weights.reshape(len(t.kept_out), len(t.kept_in), *w.shape[2:])
        elif t.op == "Gemm":
            new_w = weights if t.attrs.get("transB") else weights.T
        else:
            new_w = weights.T
        out[t.weight_name] = new_w.astype(dtype)
        if bias is not None:
            out[t.bias_name] = bias.astype(dtype)
    logger.info("least-squares refit of %d layers", len([t for t in targets if t.weight_name in out]))
    return out


def correct_batchnorm(original: ir.Model, pruned: ir.Model, kept_channels: dict[str, np.ndarray],
                      batches: Callable[[], Iterable[dict[str, np.ndarray]]], *,
                      threads: int | None = None) -> int:
    """Re-estimate running stats of the pruned model's BNs in place; returns how many changed.

    `kept_channels` maps a BN input name to the original channel indices it kept
    (absent: all kept).
    """
    bns = [n for n in pruned.graph if n.op_type == "BatchNormalization" and len(n.inputs) >= 5]
    orig_names = {v.name for n in original.graph for v in n.outputs}
    bns = [n for n in bns if n.inputs[0] is not None and n.inputs[0].name in orig_names]
    if not bns:
        return 0
    names = sorted({n.inputs[0].name for n in bns})
    stats_o = _moments(original, names, batches, threads)
    stats_p = _moments(pruned, names, batches, threads)
    changed = 0
    for bn in bns:
        name = bn.inputs[0].name
        if name not in stats_o or name not in stats_p:
            continue
        mean_o, var_o = stats_o[name]
        mean_p, var_p = stats_p[name]
        keep = kept_channels.get(name)
        if keep is not None:
            mean_o, var_o = mean_o[keep], var_o[keep]
        if mean_o.shape != mean_p.shape:
            continue
        mu = constant_array(bn.inputs[3])
        var = constant_array(bn.inputs[4])
        if mu is None or var is None or mu.shape != mean_p.shape:
            continue
        eps = float(_attr(bn, "epsilon", 1e-5))
        sigma = np.sqrt(var.astype(np.float64) + eps)
        ok = var_o > 1e-12
        ratio = np.where(ok, np.sqrt(np.maximum(var_p, 0) / np.where(ok, var_o, 1)), 1.0)
        moved = np.abs(mean_p - mean_o) > 1e-6 * (np.abs(mean_o) + sigma)
        moved |= np.abs(ratio - 1) > 1e-6
        if not moved.any():
            continue
        sigma_new = sigma * ratio
        mu_new = mean_p - sigma_new * (mean_o - mu) / sigma
        var_new = np.maximum(sigma_new**2 - eps, 1e-12)
        mu_new = np.where(moved & ok, mu_new, mu)
        var_new = np.where(moved & ok, var_new, var)
        _replace_const(pruned.graph, bn, 3, mu_new.astype(mu.dtype))
        _replace_const(pruned.graph, bn, 4, var_new.astype(var.dtype))
        changed += 1
    logger.info("re-estimated statistics of %d BatchNormalization nodes", changed)
    return changed


def _replace_const(graph: ir.Graph, node: ir.Node, index: int, array: np.ndarray) -> None:
    from ..ir import add_initializer

    value = node.inputs[index]
    if value is not None and value.is_initializer() and len(value.uses()) == 1:
        value.const_value = ir.tensor(array, name=value.name)
        return
    new = add_initializer(graph, f"{(value.name if value else 'bn')}_recal", array)
    node.replace_input_with(index, new)


def _moments(model: ir.Model, names: list[str], batches, threads) -> dict[str, tuple]:
    sums: dict[str, np.ndarray] = {}
    sqs: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for acts in iter_activations(model, names, batches(), threads=threads):
        for name in names:
            x = acts[name]
            if x.ndim < 2:
                continue
            x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]).astype(np.float64)
            sums[name] = sums.get(name, 0) + x.sum(0)
            sqs[name] = sqs.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + len(x)
    out = {}
    for name, total in sums.items():
        mean = total / counts[name]
        out[name] = (mean, np.maximum(sqs[name] / counts[name] - mean**2, 0.0))
    return out
