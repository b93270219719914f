"""Per-group sensitivity of the model output to channel removal, and ratio allocation.

`prune(macs=F, allocate=sensitivity)` measures, for every pruning group on its
own and for candidate ratios 10 %, 20 %, ... up to `max_ratio`, how much the
model's outputs change on a few calibration batches when that group loses its
least important units (in the order of the pass's criterion) and the layers
reading those channels are refit by least squares (what recovery will do). The
ratios are then allocated to reach the MACs/params target with the least total
sensitivity: a greedy walk that always takes the step (one group to one of its
larger candidate ratios) with the smallest added error per MAC removed.

Why the model output: a channel's weight norm says nothing about how much the
rest of the network needs it (an early layer of a recognizer is far more
fragile than a late one of equal norm), and the per-layer reconstruction error
does not tell layers apart either; the output error does, and summing it over
groups is a fair approximation for small, independent perturbations.

How it stays cheap: one onnxruntime session on a copy of the model whose
consumer weights (and biases) are graph inputs, so each candidate is one set of
feeds, not a new model; the refit for a candidate is a closed form from the
Gram matrix of the consumer's inputs (collected once): with S the removed input
columns and K the kept ones, W'_K = W_K + G_KK^-1 G_KS W_S minimises
||X W - X_K W'_K|| on the original inputs. Cost: (groups x candidates) runs on
`batches` calibration batches; the pass reports the sweep's time.

Also `energy`, a data-driven unit criterion from the same Gram matrices: the
output energy a unit contributes to the layers that read it, tr(W_c^T G_cc W_c)
summed over consumers (activation-weighted, unlike a weight norm).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ...backends.ort import session_options
from ...ir import add_initializer, constant_array, load_model, model_bytes
from ..graph import attr
from .groups import Analysis, Group
from .recover import MIN_ROWS_PER_INPUT, RefitTarget, _design, conv_geometry

logger = logging.getLogger(__name__)

# Relative ridge of the probe's refit (the recovery chooses its own on held-out data).
PROBE_RIDGE = 1e-2
# Consumers wider than this (im2col columns) are probed without a refit (solve cost).
MAX_REFIT_COLUMNS = 4096


@dataclass
class Consumer:
    """A weight layer reading a group's channels: where its weights go in the probe."""

    name: str  # node name in the probe copy
    op: str
    nid: int  # the analysis axis node of its input channels
    weight: np.ndarray  # as in the model
    bias: np.ndarray | None  # None: a MatMul, fit without a bias column
    w_input: str  # probe graph input that overrides the weight
    b_input: str | None
    per_channel: int  # im2col columns per input channel (kh*kw for a conv, else 1)
    target: RefitTarget
    gram: np.ndarray | None = None  # [cols (+1 bias), same]
    rows: int = 0  # calibration rows behind `gram`

    def matrix(self) -> np.ndarray:
        """Weights as [input columns (+ bias row), outputs], float64."""
        w = self.weight
        if self.op == "Conv":
            m = w.reshape(w.shape[0], -1).T
        elif self.op == "Gemm" and self.target.attrs.get("transB"):
            m = w.T
        else:
            m = w
        m = m.astype(np.float64)
        if self.bias is not None:
            m = np.vstack([m, self.bias.astype(np.float64)[None, :]])
        return m

    def feeds(self, matrix: np.ndarray) -> dict[str, np.ndarray]:
        w = matrix[:-1] if self.bias is not None else matrix
        if self.op == "Conv":
            new_w = w.T.reshape(self.weight.shape)
        elif self.op == "Gemm" and self.target.attrs.get("transB"):
            new_w = w.T
        else:
            new_w = w
        out = {self.w_input: new_w.astype(np.float32)}
        if self.bias is not None and self.b_input is not None:
            out[self.b_input] = matrix[-1].astype(np.float32)
        return out


def _consumer_nodes(analysis: Analysis, groups: list[Group]) -> dict[int, list]:
    """Group id -> kernels reading its channels (Conv group 1, Gemm, MatMul, weight constant)."""
    by_nid: dict[int, list] = {}
    for k in analysis.kernels:
        if k.in_axis is None or k.weight is None or constant_array(k.weight) is None:
            continue
        if k.node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        nid = analysis.index.get((id(k.in_axis[0]), k.in_axis[1]))
        if nid is not None:
            by_nid.setdefault(nid, []).append((k, nid))
    return {g.id: [kn for nid in g.nodes for kn in by_nid.get(nid, [])] for g in groups}


class SensitivityProbe:
    """Output error per group and candidate removal, on one onnxruntime session."""

    def __init__(self, work: ir.Model, analysis: Analysis, groups: list[Group],
                 batches: list[dict[str, np.ndarray]], fit_batches: list[dict[str, np.ndarray]],
                 *, threads: int | None, max_rows: int = 1024, seed: int = 0):
        self.analysis = analysis
        self.batches = batches
        self.probe = load_model(work, check=False)
        by_name = {n.name: n for n in self.probe.graph}
        self.consumers: dict[int, list[Consumer]] = {}
        made: dict[str, Consumer] = {}
        for gid, kernels in _consumer_nodes(analysis, groups).items():
            out = []
            for k, nid in kernels:
                key = f"{k.node.name}:{nid}"
                if key not in made:
                    c = _make_consumer(self.probe, by_name.get(k.node.name), k.node, nid)
                    if c is None:
                        continue
                    made[key] = c
                out.append(made[key])
            self.consumers[gid] = out
        self.all_consumers = list(made.values())
        self.output_names = [v.name for v in self.probe.graph.outputs]
        reads = sorted({c.target.node.inputs[0].name for c in self.all_consumers})
        for name in reads:
            value = _find_value(self.probe, name)
            if value is not None and not value.is_graph_output():
                self.probe.graph.outputs.append(value)
        opts = session_options(threads)
        self.session = ort.InferenceSession(model_bytes(self.probe), opts,
                                            providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._collect_grams(reads, fit_batches, max_rows, np.random.default_rng(seed))
        self.reference = [self.session.run(self.output_names, self._feed(b)) for b in batches]

    def _feed(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v for k, v in batch.items() if k in self.input_names}

    def _collect_grams(self, reads: list[str], fit_batches: list[dict[str, np.ndarray]],
                       max_rows: int, rng) -> None:
        """Gram matrices of every consumer's inputs (the probe's refits are fit on them)."""
        for batch in fit_batches:
            values = self.session.run(reads, self._feed(batch))
            acts = dict(zip(reads, values))
            for c in self.all_consumers:
                x = acts[c.target.node.inputs[0].name]
                cols = _design(c.target, x, _dummy_output(c, x), rng, max_rows)[0]
                c.rows += len(cols)
                if c.bias is not None:
                    cols = np.hstack([cols, np.ones((len(cols), 1))])
                c.gram = (0 if c.gram is None else c.gram) + cols.T @ cols

    def error(self, feeds: dict[str, np.ndarray]) -> float:
        """Mean over outputs of ||y - y_ref||^2 / ||y_ref||^2 with these weight overrides."""
        num = np.zeros(len(self.output_names))
        den = np.zeros(len(self.output_names))
        for batch, ref in zip(self.batches, self.reference):
            got = self.session.run(self.output_names, {**self._feed(batch), **feeds})
            for i, (a, b) in enumerate(zip(ref, got)):
                if not np.issubdtype(a.dtype, np.floating):
                    continue
                d = (b.astype(np.float64) - a).ravel()
                num[i] += float(d @ d)
                den[i] += float(np.sum(a.astype(np.float64) ** 2))
        ok = den > 0
        return float(np.mean(num[ok] / den[ok])) if ok.any() else 0.0

    def removal_feeds(self, group: Group, removed_units: list, refit: bool = True
                      ) -> dict[str, np.ndarray]:
        """Weight overrides of the group's consumers with these units removed (and the
        kept inputs refit; `refit=False`: the plain pruned layers)."""
        feeds: dict[str, np.ndarray] = {}
        for c in self.consumers.get(group.id, []):
            idx = [u.members[c.nid] for u in removed_units if c.nid in u.members]
            if not idx:
                continue
            channels = np.unique(np.concatenate(idx))
            feeds.update(c.feeds(_refit(c, channels) if refit else _zeroed(c, channels)))
        return feeds

    def unit_energy(self, group: Group) -> np.ndarray | None:
        """Output energy each unit of `group` feeds into its consumers (None: no consumer)."""
        consumers = self.consumers.get(group.id, [])
        if not consumers:
            return None
        scores = np.zeros(len(group.units))
        for c in consumers:
            m = c.matrix()
            for i, u in enumerate(group.units):
                if c.nid not in u.members:
                    continue
                cols = _columns(c, u.members[c.nid])
                block = m[cols]
                scores[i] += float(np.sum(block * (c.gram[np.ix_(cols, cols)] @ block)))
        return scores


    def greedy_order(self, group: Group) -> np.ndarray | None:
        """Removal rank per unit (0 = first to go) by greedy output reconstruction.

        ThiNet/CP-style channel selection on the Gram matrices: starting from all
        units, repeatedly drop the unit whose removal (with the kept inputs refit by
        ridge least squares) raises the consumers' output reconstruction error
        least. With P = (G_KK + lam I)^-1 and B = P G_K: W the refit weights, dropping
        column j costs ||B_j||^2 / P_jj (a unit's columns are summed, their mutual
        correlation ignored); P and B are downdated in closed form, O(n * outputs)
        per step.
        """
        consumers = [c for c in self.consumers.get(group.id, []) if c.gram is not None
                     and len(c.gram) <= MAX_REFIT_COLUMNS]
        if not consumers:
            return None
        states = [_GreedyState(c, group) for c in consumers]
        alive = np.ones(len(group.units), bool)
        rank = np.zeros(len(group.units))
        for step in range(len(group.units)):
            cost = sum(st.costs() for st in states)
            cost = np.where(alive, cost, np.inf)
            j = int(np.argmin(cost))
            rank[j] = step
            alive[j] = False
            for st in states:
                st.drop(j)
        return rank


class _GreedyState:
    """Ridge least-squares state of one consumer during greedy unit removal."""

    def __init__(self, c: Consumer, group: Group):
        m = c.matrix()
        g = c.gram
        n_in = len(g) - (1 if c.bias is not None else 0)
        reg = PROBE_RIDGE * float(np.mean(np.diag(g)[:n_in])) + 1e-12
        lam = np.full(len(g), reg)
        if c.bias is not None:
            lam[-1] = 1e-9 * reg
        self.p = np.linalg.inv(g + np.diag(lam))
        self.b = self.p @ (g @ m)
        self.kept = np.arange(len(g))  # columns still in the fit (positions into p/b)
        self.unit_cols = [_columns(c, u.members[c.nid]) if c.nid in u.members
                          else np.zeros(0, int) for u in group.units]

    def _positions(self, j: int) -> np.ndarray:
        return np.flatnonzero(np.isin(self.kept, self.unit_cols[j]))

    def costs(self) -> np.ndarray:
        per_col = np.sum(self.b * self.b, axis=1) / np.maximum(np.diag(self.p), 1e-30)
        out = np.zeros(len(self.unit_cols))
        where = {col: i for i, col in enumerate(self.kept)}
        for j, cols in enumerate(self.unit_cols):
            idx = [where[c] for c in cols if c in where]
            out[j] = float(per_col[idx].sum()) if idx else 0.0
        return out

    def drop(self, j: int) -> None:
        pos = self._positions(j)
        if len(pos) == 0:
            return
        rest = np.setdiff1d(np.arange(len(self.kept)), pos)
        p_jj = self.p[np.ix_(pos, pos)]
        p_rj = self.p[np.ix_(rest, pos)]
        # removing variables from a ridge fit: B' = B_r - P_rj P_jj^-1 B_j, same for P
        self.b = self.b[rest] - p_rj @ np.linalg.solve(p_jj, self.b[pos])
        self.p = self.p[np.ix_(rest, rest)] - p_rj @ np.linalg.solve(p_jj, p_rj.T)
        self.kept = self.kept[rest]


def _dummy_output(c: Consumer, x: np.ndarray) -> np.ndarray:
    """`_design` wants an output array too; the probe only needs its input columns."""
    if c.op == "Conv":
        geometry = c.target.attrs["geometry"]
        n = x.shape[0]
        ho = (x.shape[2] + geometry[2][0] + geometry[2][2]
              - ((geometry[0][0] - 1) * geometry[3][0] + 1)) // geometry[1][0] + 1
        wo = (x.shape[3] + geometry[2][1] + geometry[2][3]
              - ((geometry[0][1] - 1) * geometry[3][1] + 1)) // geometry[1][1] + 1
        return np.zeros((n, len(c.target.kept_out), ho, wo), np.float32)
    rows = x.reshape(-1, x.shape[-1]).shape[0] if c.op == "MatMul" else x.shape[0]
    return np.zeros((rows, len(c.target.kept_out)), np.float32)


def _columns(c: Consumer, channels: np.ndarray) -> np.ndarray:
    """Input columns (im2col order for a conv) of these input channels."""
    k = c.per_channel
    return (np.asarray(channels)[:, None] * k + np.arange(k)[None, :]).ravel()


def _zeroed(c: Consumer, channels: np.ndarray) -> np.ndarray:
    m = c.matrix()
    m[_columns(c, channels)] = 0.0
    return m


def _refit(c: Consumer, channels: np.ndarray) -> np.ndarray:
    """The consumer's weight matrix without `channels`, the kept columns refit."""
    m = c.matrix()
    removed = _columns(c, channels)
    n = len(m)
    kept = np.setdiff1d(np.arange(n), removed)
    out = m.copy()
    out[removed] = 0.0
    if c.gram is None or len(kept) == 0:
        return out
    g = c.gram
    if c.rows < MIN_ROWS_PER_INPUT * n or n > MAX_REFIT_COLUMNS:
        # like the recovery: too few rows for a full refit (it would memorize the
        # data), so only the bias absorbs the removed channels' mean contribution
        if c.bias is not None:
            mean = g[-1, removed] / max(float(g[-1, -1]), 1.0)
            out[-1] = m[-1] + mean @ m[removed]
        return out
    g_kk = g[np.ix_(kept, kept)]
    reg = PROBE_RIDGE * float(np.mean(np.diag(g_kk))) + 1e-12
    lhs = g_kk + reg * np.eye(len(kept))
    rhs = g[np.ix_(kept, removed)] @ m[removed]
    try:
        out[kept] = m[kept] + np.linalg.solve(lhs, rhs)
    except np.linalg.LinAlgError:
        pass
    return out


def _find_value(model: ir.Model, name: str) -> ir.Value | None:
    for v in model.graph.inputs:
        if v.name == name:
            return v
    for node in model.graph:
        for v in node.outputs:
            if v.name == name:
                return v
    return None


def _make_consumer(probe: ir.Model, node: ir.Node | None, work_node: ir.Node,
                   nid: int) -> Consumer | None:
    """Make the weight (and bias) of `node` overridable graph inputs of the probe copy."""
    if node is None:
        return None
    w = constant_array(node.inputs[1])
    if w is None or w.dtype != np.float32:
        return None
    op = node.op_type
    attrs: dict = {}
    if op == "Conv":
        # shapes from the analysed model (a copy drops annotations that lack a type)
        xs, ys = work_node.inputs[0].shape, work_node.outputs[0].shape
        if w.ndim != 4 or xs is None or ys is None or not all(isinstance(d, int) for d in xs) \
                or not all(isinstance(d, int) for d in ys):
            return None
        attrs["geometry"] = conv_geometry(node, tuple(xs), w.shape, tuple(ys))
        n_out, per_channel = w.shape[0], w.shape[2] * w.shape[3]
    elif op == "Gemm":
        if float(attr(node, "alpha", 1.0)) != 1.0 or float(attr(node, "beta", 1.0)) != 1.0 \
                or int(attr(node, "transA", 0)):
            return None
        attrs["transB"] = int(attr(node, "transB", 0))
        n_out, per_channel = w.shape[0] if attrs["transB"] else w.shape[1], 1
    else:
        if w.ndim != 2:
            return None
        n_out, per_channel = w.shape[1], 1
    graph = probe.graph
    prefix = f"sens::{node.name}"
    w_in = add_initializer(graph, f"{prefix}::w", w)
    graph.inputs.append(w_in)
    node.replace_input_with(1, w_in)
    bias, b_name = None, None
    if op in ("Conv", "Gemm"):
        old = node.inputs[2] if len(node.inputs) > 2 else None
        b = constant_array(old) if old is not None else np.zeros(n_out, np.float32)
        if b is not None and b.ndim == 1 and b.shape[0] == n_out:
            bias = b
            b_in = add_initializer(graph, f"{prefix}::b", b.astype(np.float32))
            graph.inputs.append(b_in)
            if len(node.inputs) < 3:
                node.resize_inputs(3)
            node.replace_input_with(2, b_in)
            b_name = b_in.name
    target = RefitTarget(node, np.arange(n_out), attrs)
    return Consumer(node.name, op, nid, w, bias, w_in.name, b_name, per_channel, target)


# ---------------------------------------------------------------- allocation


def candidate_counts(n_units: int, max_ratio: float, rounded) -> list[int]:
    """Units removed at ratios 0, 10 %, 20 %, ... max_ratio, after `rounded`, deduplicated."""
    ks = {0}
    steps = int(np.floor(max_ratio * 10 + 1e-9))
    for s in range(1, steps + 1):
        ks.add(rounded(int(np.floor(s / 10 * n_units))))
    return sorted(ks)


def measure(probe: SensitivityProbe, groups: list[Group], orders: list[list],
            counts: list[list[int]]) -> tuple[list[list[float]], float]:
    """Output error of every (group, candidate count); and the sweep's seconds."""
    start = time.perf_counter()
    table = []
    for g, order, ks in zip(groups, orders, counts):
        if not probe.consumers.get(g.id):
            # nothing to measure it with (no layer reading it could be probed): kept whole
            table.append([0.0] + [float("inf")] * (len(ks) - 1))
            continue
        row = []
        for k in ks:
            row.append(0.0 if k == 0 else probe.error(probe.removal_feeds(g, order[:k])))
        table.append(row)
    return table, time.perf_counter() - start


def allocate(counts: list[list[int]], errors: list[list[float]], removed_fraction,
             target: float) -> list[int]:
    """Index of the chosen candidate per group: least added error per unit of cost removed.

    `removed_fraction(choice)` gives the fraction of MACs (or params) removed by a
    list of candidate indices. Each step moves one group to any larger candidate,
    the one with the smallest (error increase) / (cost removed by that move alone);
    it stops when the exact removed fraction reaches the target or nothing is left.
    The per-move gains are measured once with every other group whole (a layer that
    loses inputs and outputs saves less than the sum; the stop test is exact).
    A group's moves past its first one that reaches the target are not considered:
    when the error grows slower than linearly in the units removed, the largest cut
    has the best error per cost, and taking it overshot a 20 % MACs target to 75 %
    (fuzzer: one conv group of 16 channels).
    """
    zero = [0] * len(counts)
    base = removed_fraction(zero)
    alone = []
    for gi, ks in enumerate(counts):
        row = []
        for j in range(len(ks)):
            trial = list(zero)
            trial[gi] = j
            row.append(removed_fraction(trial) - base if j else 0.0)
        alone.append(row)
    choice = list(zero)
    current = base
    while current < target:
        best = None
        for gi, ks in enumerate(counts):
            for j in range(choice[gi] + 1, len(ks)):
                gain = alone[gi][j] - alone[gi][choice[gi]]
                added = errors[gi][j] - errors[gi][choice[gi]]
                if gain <= 0 or not np.isfinite(added):
                    continue
                cost = max(added, 0.0) / gain
                if best is None or cost < best[0]:
                    best = (cost, gi, j)
                if current + gain >= target:
                    break  # larger moves of this group only overshoot
        if best is None:
            break
        choice[best[1]] = best[2]
        current = removed_fraction(choice)
    return choice
