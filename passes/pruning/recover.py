"""Training-free recovery after channel removal.

Least-squares refit of consumer layers
    Every weight layer that lost input channels (Conv with group 1, Gemm,
    MatMul with a constant 2-D weight) gets new weights for its kept inputs that
    best reproduce the *original* layer output on calibration data:

        min_{W', b'} || Y_orig - [X'_pruned, 1] [W'; b'] ||^2 + lam ||W'||^2

    X' is what the layer reads in the pruned model (im2col patches for a conv),
    Y_orig the original model's output at that layer (kept output channels
    only). Closed form through the normal equations, accumulated batch by batch
    in float64 (`G = A^T A`, `R = A^T Y`), so memory is bounded by the layer's
    width, not by the data. The bias column absorbs the mean contribution of the
    removed channels (a Conv or Gemm without bias gets one; a MatMul is refit
    with its following constant-bias Add, or without bias).

BatchNorm statistics re-estimation
    A BatchNormalization whose input changed gets running mean/variance that
    make its output moments per channel equal the original model's:
    sigma' = sigma * sqrt(var_pruned / var_orig) and
    mu' = mean_pruned - sigma' * (mean_orig - mu) / sigma
    (with accurate running statistics this is the usual re-estimation,
    mu' ~ mean_pruned; with random weights it still preserves fidelity).

Both are *sequential*: layers are processed in waves of increasing depth, and
each wave reads the pruned model as already corrected by the earlier waves, so
a refit compensates the error of everything upstream and no shift is corrected
twice (one-shot BN re-estimation over a chain of BNs over-corrects).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_ir as ir

from ...activations import ActivationReader
from ...ir import add_initializer, constant_array
from ..graph import attr
from .apply import set_constant

logger = logging.getLogger(__name__)

Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


@dataclass
class RefitTarget:
    """A layer of the pruned model to refit against the original layer output."""

    node: ir.Node  # in the pruned model
    kept_out: np.ndarray  # original output channels it still computes
    attrs: dict = field(default_factory=dict)

    @property
    def op(self) -> str:
        return self.node.op_type


def _im2col(x: np.ndarray, kernel, strides, pads, dilations) -> np.ndarray:
    """[N, C, H, W] -> [N*Ho*Wo, C*kh*kw] with columns ordered (c, kh, kw)."""
    n, c = x.shape[:2]
    kh, kw = kernel
    top, left, bottom, right = pads
    xp = np.pad(x, ((0, 0), (0, 0), (top, bottom), (left, right)))
    eh, ew = (kh - 1) * dilations[0] + 1, (kw - 1) * dilations[1] + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(2, 3))
    win = win[:, :, :: strides[0], :: strides[1], :: dilations[0], :: dilations[1]]
    ho, wo = win.shape[2], win.shape[3]
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * ho * wo, c * kh * kw)


def conv_geometry(node: ir.Node, x_shape, w_shape, y_shape):
    """(kernel, strides, pads, dilations) of a 2-D conv, resolving auto_pad."""
    kernel = tuple(w_shape[2:])
    strides = tuple(attr(node, "strides", (1, 1)))
    dilations = tuple(attr(node, "dilations", (1, 1)))
    auto = attr(node, "auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0, 0, 0, 0]
        for i in range(2):
            total = max((y_shape[2 + i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1
                        - x_shape[2 + i], 0)
            begin = total // 2 if auto == "SAME_UPPER" else total - total // 2
            pads[i], pads[2 + i] = begin, total - begin
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    else:
        pads = list(attr(node, "pads", (0, 0, 0, 0)))
    return kernel, strides, tuple(pads), dilations


def _bias_slot(target: RefitTarget) -> tuple[str, ir.Value | None]:
    """Where the refit bias goes: ("input", value-or-None) | ("add", value) | ("none", None)."""
    node = target.node
    if target.op in ("Conv", "Gemm"):
        value = node.inputs[2] if len(node.inputs) > 2 else None
        if value is not None and (constant_array(value) is None
                                  or constant_array(value).ndim != 1):
            return "none", None
        return "input", value
    uses = list(node.outputs[0].uses())
    if len(uses) == 1 and uses[0].node.op_type == "Add":
        other = uses[0].node.inputs[1 - uses[0].idx]
        arr = constant_array(other)
        if arr is not None and arr.ndim == 1 and len(other.uses()) == 1:
            return "add", other
    return "none", None


def _rows_seen(target: RefitTarget) -> int:
    return int(target.attrs.get("rows", 0))


def _token_mask(batch: dict[str, np.ndarray]) -> np.ndarray | None:
    """Real-token mask of a transformer batch (an integer input named *attention_mask*)."""
    for name, arr in batch.items():
        if "attention_mask" in name and arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer):
            return arr != 0
    return None


def _design(target: RefitTarget, x: np.ndarray, y: np.ndarray, rng, max_rows: int,
            token_mask: np.ndarray | None = None):
    """Rows of kept inputs (pruned model) and original outputs (kept channels).

    For a MatMul over [batch, tokens, features] and a batch with an attention
    mask, padding tokens are left out: they would dominate short sentences.
    """
    if target.op == "Conv":
        cols = _im2col(x.astype(np.float32), *target.attrs["geometry"])
        ys = y[:, target.kept_out].transpose(0, 2, 3, 1).reshape(-1, len(target.kept_out))
    elif target.op == "Gemm":
        cols, ys = x, y[:, target.kept_out]
    else:
        cols = x.reshape(-1, x.shape[-1])
        ys = y.reshape(-1, y.shape[-1])[:, target.kept_out]
        if token_mask is not None and x.ndim == 3 and x.shape[:2] == token_mask.shape \
                and y.shape[:2] == token_mask.shape and token_mask.any():
            keep = token_mask.reshape(-1)
            cols, ys = cols[keep], ys[keep]
    if len(cols) > max_rows:
        pick = rng.choice(len(cols), max_rows, replace=False)
        cols, ys = cols[pick], ys[pick]
    return cols.astype(np.float64), ys.astype(np.float64)


RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0)
# A full least-squares refit needs at least this many calibration rows per input column.
MIN_ROWS_PER_INPUT = 2


def _solve(target: RefitTarget, folds: list[tuple[np.ndarray, np.ndarray]], ridge: float | None,
           graph: ir.Graph) -> bool:
    """Solve the normal equations, regularized toward the pruned (original) weights.

    min ||Y - A W'||^2 + lam ||W' - W_K||^2: with few calibration rows per weight
    the refit stays near the plain pruned layer instead of overfitting. With two
    folds of data and `ridge=None`, lam (relative to the mean input energy) is
    chosen from `RIDGE_GRID` by fitting on one fold and measuring the layer output
    error on the other; keeping the pruned weights unchanged and refitting only
    the bias are candidates too (they win when calibration data is scarce).
    """
    kind, bias_value = _bias_slot(target)
    use_bias = kind != "none"
    if not use_bias:
        folds = [(g[:-1, :-1], r[:-1]) for g, r in folds]
    g = sum(f[0] for f in folds)
    r = sum(f[1] for f in folds)
    w = constant_array(target.node.inputs[1])
    refit = _Refit(_prior(target, w, use_bias), use_bias, g)
    rows = float(g[-1, -1]) if use_bias else float(_rows_seen(target))
    sol = _choose_solution(refit, folds, g, r, ridge, rows)
    if sol is None:
        return False
    _write_solution(target, sol[:refit.m].T, sol[refit.m] if use_bias else None, kind,
                    bias_value, graph)
    return True


def _prior(target: RefitTarget, w: np.ndarray, use_bias: bool) -> np.ndarray:
    """The pruned layer's weights as [input columns (+ the bias row), outputs], float64."""
    if target.op == "Conv":
        prior = w.reshape(w.shape[0], -1).T
    elif target.op == "Gemm" and target.attrs.get("transB"):
        prior = w.T
    else:
        prior = w
    prior = prior.astype(np.float64)
    if use_bias:  # the bias row is not regularized; its prior value does not matter
        prior = np.vstack([prior, np.zeros((1, prior.shape[1]))])
    return prior


class _Refit:
    """Ridge fits toward the `prior` weights, from a Gram matrix and cross products."""

    def __init__(self, prior: np.ndarray, use_bias: bool, g: np.ndarray):
        self.prior, self.use_bias = prior, use_bias
        self.m = len(g) - (1 if use_bias else 0)  # input columns, without the bias row
        self.scale = float(np.mean(np.diag(g)[:self.m])) + 1e-12

    def fit(self, gram: np.ndarray, cross: np.ndarray, rel: float) -> np.ndarray:
        reg = np.full(len(gram), rel * self.scale)
        if self.use_bias:
            reg[-1] = 0.0
        lhs, rhs = gram + np.diag(reg), cross + reg[:, None] * self.prior
        try:
            return np.linalg.solve(lhs, rhs)
        except np.linalg.LinAlgError:
            return np.linalg.lstsq(lhs, rhs, rcond=None)[0]

    def bias_only(self, gram: np.ndarray, cross: np.ndarray) -> np.ndarray:
        # pruned weights, bias refit: absorbs the mean output of the removed inputs
        prior = self.prior
        bias = (cross[-1] - gram[-1, :-1] @ prior[:-1]) / max(float(gram[-1, -1]), 1.0)
        return np.vstack([prior[:-1], bias[None, :]])


def _fit_error(sol: np.ndarray, gram: np.ndarray, cross: np.ndarray) -> float:
    # ||Y - A W||^2 up to the constant ||Y||^2
    return float(np.sum(sol * (gram @ sol)) - 2 * np.sum(sol * cross))


def _choose_solution(refit: _Refit, folds: list[tuple[np.ndarray, np.ndarray]],
                     g: np.ndarray, r: np.ndarray, ridge: float | None,
                     rows: float) -> np.ndarray | None:
    """The refit weights (bias row last), or None when the pruned layer is best kept."""
    m = refit.m
    if ridge is not None:
        return refit.fit(g, r, ridge)
    if len(folds) == 2:
        (g_fit, r_fit), (g_val, r_val) = folds
        candidates = {}
        if rows >= MIN_ROWS_PER_INPUT * m:  # else a full refit only memorizes the data
            candidates = {("ridge", rel): refit.fit(g_fit, r_fit, rel) for rel in RIDGE_GRID}
        candidates[("keep", 0.0)] = refit.prior
        if refit.use_bias:
            candidates[("bias", 0.0)] = refit.bias_only(g_fit, r_fit)
        scores = {key: _fit_error(sol, g_val, r_val) for key, sol in candidates.items()}
        kind_best, rel_best = min(scores, key=scores.get)
        if kind_best == "keep":
            return None  # the plain pruned layer predicts held-out data best
        return refit.bias_only(g, r) if kind_best == "bias" else refit.fit(g, r, rel_best)
    if rows >= MIN_ROWS_PER_INPUT * m:
        return refit.fit(g, r, 1e-2)
    if refit.use_bias:
        return refit.bias_only(g, r)
    return None


def _write_solution(target: RefitTarget, weights: np.ndarray, bias: np.ndarray | None,
                    kind: str, bias_value: ir.Value | None, graph: ir.Graph) -> None:
    """Store the refit `weights` ([out, in_cols]) and `bias` in the layer's slots."""
    node = target.node
    w_value = node.inputs[1]
    w = constant_array(w_value)
    if target.op == "Conv":
        new_w = weights.reshape(w.shape)
    elif target.op == "Gemm":
        new_w = weights if target.attrs.get("transB") else weights.T
    else:
        new_w = weights.T
    set_constant(w_value, new_w.astype(w.dtype))
    if bias is None:
        return
    if kind == "add":
        # the fit targets the MatMul output; the Add still adds the layer's own bias
        set_constant(bias_value, (constant_array(bias_value) + bias).astype(w.dtype))
        return
    bias = bias.astype(w.dtype)
    if bias_value is not None and len(bias_value.uses()) == 1:
        set_constant(bias_value, bias)
        return
    new = add_initializer(graph, f"{node.name or w_value.name}_bias", bias)
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, new)


def _bn_update(bn: ir.Node, graph: ir.Graph, orig: tuple, pruned: tuple,
               keep: np.ndarray | None) -> bool:
    mean_o, var_o = orig
    mean_p, var_p = pruned
    if keep is not None:
        mean_o, var_o = mean_o[keep], var_o[keep]
    mu, var = constant_array(bn.inputs[3]), constant_array(bn.inputs[4])
    if mu is None or var is None or mu.shape != mean_p.shape or mean_o.shape != mean_p.shape:
        return False
    eps = float(attr(bn, "epsilon", 1e-5))
    sigma = np.sqrt(var.astype(np.float64) + eps)
    ok = var_o > 1e-12
    ratio = np.where(ok, np.sqrt(np.maximum(var_p, 0) / np.where(ok, var_o, 1)), 1.0)
    moved = (np.abs(mean_p - mean_o) > 1e-6 * (np.abs(mean_o) + sigma)) | (np.abs(ratio - 1) > 1e-6)
    moved &= ok
    if not moved.any():
        return False
    sigma_new = sigma * ratio
    mu_new = np.where(moved, mean_p - sigma_new * (mean_o - mu) / sigma, mu)
    var_new = np.where(moved, np.maximum(sigma_new**2 - eps, 1e-12), var)
    for index, array in ((3, mu_new), (4, var_new)):
        value = bn.inputs[index]
        array = array.astype(constant_array(value).dtype)
        if len(value.uses()) == 1:
            set_constant(value, array)
        else:
            bn.replace_input_with(index, add_initializer(graph, f"{value.name}_recal", array))
    return True


def node_dag(graph: ir.Graph) -> nx.DiGraph:
    """Producer -> consumer graph of the nodes of `graph`."""
    dag = nx.DiGraph()
    producer = {}
    for node in graph:
        dag.add_node(node)
        for out in node.outputs:
            producer[id(out)] = node
    for node in graph:
        for inp in node.inputs:
            if inp is not None and id(inp) in producer:
                dag.add_edge(producer[id(inp)], node)
    return dag


def _waves(graph: ir.Graph, targets: list[ir.Node]) -> list[list[ir.Node]]:
    """Targets grouped by depth: a target's wave is after every target upstream of it."""
    dag = node_dag(graph)
    is_target = {id(t) for t in targets}
    level: dict[ir.Node, int] = {}
    for node in nx.topological_sort(dag):
        base = max((level[p] for p in dag.predecessors(node)), default=0)
        level[node] = base + (1 if id(node) in is_target else 0)
    waves: dict[int, list[ir.Node]] = {}
    for t in targets:
        waves.setdefault(level[t], []).append(t)
    return [waves[k] for k in sorted(waves)]


def recover(original: ir.Model, pruned: ir.Model, refits: list[RefitTarget],
            bns: list[ir.Node], kept_channels: dict[str, np.ndarray], batches: Batches, *,
            threads: int | None = None, max_rows: int = 4096, ridge: float | None = None,
            seed: int = 0, sequential: bool = True) -> dict[str, int]:
    """Refit `refits` and re-estimate `bns` of `pruned` in place, wave by wave.

    `kept_channels` maps a BN input name to the original channels it kept.
    `sequential=False` refits every layer in one first wave (each from the pruned
    model's inputs before any refit: the independent, layer-local reconstruction),
    then re-estimates the BNs wave by wave; kept to measure what ordering buys.
    Returns how many layers were refit and BNs re-estimated.
    """
    by_node = {id(t.node): t for t in refits}
    rng = np.random.default_rng(seed)
    if sequential:
        waves = _waves(pruned.graph, [t.node for t in refits] + list(bns))
    else:
        waves = ([[t.node for t in refits]] if refits else []) + _waves(pruned.graph, list(bns))
    wanted = sorted({t.node.outputs[0].name for t in refits} | {n.inputs[0].name for n in bns})
    reference = ActivationReader(original, wanted, threads=threads)

    def stream(x_names: list[str], y_names: list[str]):
        probe = ActivationReader(pruned, x_names, threads=threads)
        for batch in batches():
            yield (reference.read(batch, y_names), probe.read(batch, x_names),
                   _token_mask(batch))

    done = {"refit_layers": 0, "bn_recalibrated": 0, "recovery_waves": 0}
    for wave in waves:
        wave_refits = [by_node[id(n)] for n in wave if id(n) in by_node]
        wave_bns = [n for n in wave if id(n) not in by_node]
        x_names = sorted({t.node.inputs[0].name for t in wave_refits}
                         | {n.inputs[0].name for n in wave_bns})
        y_names = sorted({t.node.outputs[0].name for t in wave_refits}
                         | {n.inputs[0].name for n in wave_bns})
        gram: dict[tuple[int, int], np.ndarray] = {}
        cross: dict[tuple[int, int], np.ndarray] = {}
        moments_o: dict[str, list] = {}
        moments_p: dict[str, list] = {}
        for step, (acts_o, acts_p, mask) in enumerate(stream(x_names, y_names)):
            for t in wave_refits:
                cols, ys = _design(t, acts_p[t.node.inputs[0].name],
                                   acts_o[t.node.outputs[0].name], rng, max_rows, mask)
                a = np.hstack([cols, np.ones((len(cols), 1))])
                t.attrs["rows"] = t.attrs.get("rows", 0) + len(cols)
                key = (id(t.node), step % 2)  # two folds to choose the regularization
                gram[key] = gram.get(key, 0) + a.T @ a
                cross[key] = cross.get(key, 0) + a.T @ ys
            for bn in wave_bns:
                name = bn.inputs[0].name
                _accumulate(moments_o, name, acts_o[name])
                _accumulate(moments_p, name, acts_p[name])
        for t in wave_refits:
            folds = [(gram.pop((id(t.node), f)), cross.pop((id(t.node), f))) for f in (0, 1)
                     if (id(t.node), f) in gram]
            if folds and _solve(t, folds, ridge, pruned.graph):
                done["refit_layers"] += 1
        for bn in wave_bns:
            name = bn.inputs[0].name
            if name in moments_o and name in moments_p and _bn_update(
                    bn, pruned.graph, _finish(moments_o[name]), _finish(moments_p[name]),
                    kept_channels.get(name)):
                done["bn_recalibrated"] += 1
        done["recovery_waves"] += 1
    logger.info("recovery: %d layers refit, %d BN re-estimated in %d waves",
                done["refit_layers"], done["bn_recalibrated"], done["recovery_waves"])
    return done


def _accumulate(store: dict[str, list], name: str, x: np.ndarray) -> None:
    x = np.moveaxis(x, 1, -1).reshape(-1, x.shape[1]).astype(np.float64)
    entry = store.setdefault(name, [0.0, 0.0, 0])
    entry[0] = entry[0] + x.sum(0)
    entry[1] = entry[1] + (x * x).sum(0)
    entry[2] += len(x)


def _finish(entry: list) -> tuple[np.ndarray, np.ndarray]:
    mean = entry[0] / entry[2]
    return mean, np.maximum(entry[1] / entry[2] - mean**2, 0.0)
