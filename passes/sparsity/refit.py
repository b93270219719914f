"""`recover=true`: least-squares refit of the weights a mask kept, on calibration data.

For each sparsified layer and each output row o with kept inputs K_o (its mask):

    min_{w, b}  || [X_K, 1] [w; b] - y_o ||^2 + lam ||w - w_orig,K||^2

X is what the layer reads in the *sparse* model (im2col patches for a Conv), y_o the
*original* model's output at that layer; the bias (a Conv's or Gemm's constant bias, the
constant vector of the Add after a MatMul) is refit too and not regularized; lam is
`ridge` times the mean input energy (diagonal of X^T X). Weights outside the mask are
not unknowns, so the zeros stay zero. Rows with the same mask share one factorization.

Layers are refit in waves of increasing depth (`pruning.recover`'s waves): a wave reads
the sparse model as already refit by the waves before it, so a refit also compensates
what the upstream layers lost. The design rows (`pruning.recover`'s `_design`, at most
`max_rows` per batch), the bias slot and the write-back are those of the pruning
recovery. Batches alternate between two folds; three candidates are fitted on one and
compared on the other, and the best is fitted on both: the masked weights as they are
(`none`), the masked weights with a refit bias (`bias`, the mean output the zeros took
away), and the full refit (`weights`, only with at least 2 calibration rows per unknown of
the widest row: with fewer it memorizes the calibration data).

Refused (listed with the reason): grouped or non-2-D convs, Gemm with alpha/beta != 1 or
transA, and a Conv/Gemm bias that is not a constant vector.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx_ir as ir

from ...activations import ActivationReader
from ...ir import constant_array
from ..graph import attr
from ..pruning.recover import (
    MIN_ROWS_PER_INPUT,
    RefitTarget,
    _bias_slot,
    _design,
    _token_mask,
    _waves,
    _write_solution,
    conv_geometry,
)
from .layers import SparseLayer

logger = logging.getLogger(__name__)

Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


def refit_refusal(layer: SparseLayer) -> str | None:
    """Why the layer cannot be refit, or None."""
    node = layer.node
    if layer.op == "Conv" and (layer.group != 1 or layer.array.ndim != 4):
        return "refit covers 2-D convs with group 1 only"
    if layer.op == "Gemm" and (float(attr(node, "alpha", 1.0)) != 1.0
                               or float(attr(node, "beta", 1.0)) != 1.0
                               or int(attr(node, "transA", 0))):
        return "refit covers Gemm with alpha = beta = 1 and transA = 0 only"
    kind, _ = _bias_slot(_target(layer))
    if kind == "none" and layer.op in ("Conv", "Gemm") and len(node.inputs) > 2 \
            and node.inputs[2] is not None:
        return "bias is not a constant vector"
    return None


def _target(layer: SparseLayer) -> RefitTarget:
    out = layer.view().shape[0]
    attrs: dict[str, Any] = {}
    if layer.op == "Gemm":
        attrs["transB"] = int(attr(layer.node, "transB", 0))
    return RefitTarget(layer.node, np.arange(out), attrs)


class _Layer:
    """One layer's refit: its mask, prior weights and the statistics of both folds."""

    def __init__(self, layer: SparseLayer, mask: np.ndarray):
        self.layer, self.mask = layer, mask
        self.target = _target(layer)
        self.kind, self.bias_value = _bias_slot(self.target)
        self.use_bias = self.kind != "none"
        masked = layer.view() * mask
        rows = [masked.T]
        if self.use_bias:
            bias = constant_array(self.bias_value) if self.kind == "input" else None
            rows.append(np.zeros((1, masked.shape[0])) if bias is None
                        else bias.astype(np.float64).reshape(1, -1))
        self.prior = np.vstack(rows)  # [inputs (+ bias), outputs]: the masked layer
        self.free = np.vstack([mask.T] + ([np.ones((1, mask.shape[0]), bool)]
                                          if self.use_bias else []))
        self.folds: list[list] = [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]  # gram, cross, |y|^2
        self.rows = 0

    def add(self, fold: int, cols: np.ndarray, ys: np.ndarray) -> None:
        a = np.hstack([cols, np.ones((len(cols), 1))]) if self.use_bias else cols
        f = self.folds[fold]
        f[0] = f[0] + a.T @ a
        f[1] = f[1] + a.T @ ys
        f[2] = f[2] + float(np.sum(ys * ys))
        self.rows += len(cols)

    def fit(self, gram: np.ndarray, cross: np.ndarray, ridge: float) -> np.ndarray:
        """Masked ridge solution (zeros outside the mask), rows with one mask solved together."""
        m = self.mask.shape[1]
        reg = np.full(len(gram), ridge * (float(np.mean(np.diag(gram)[:m])) + 1e-12))
        if self.use_bias:
            reg[-1] = 0.0
        sol = np.zeros_like(self.prior)
        keys = np.packbits(self.free, axis=0).T
        _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
        for g, col in enumerate(first):
            rows = np.flatnonzero(inverse.reshape(-1) == g)
            idx = np.flatnonzero(self.free[:, col])
            if idx.size == 0:
                continue
            lhs = gram[np.ix_(idx, idx)]
            lhs[np.diag_indices_from(lhs)] += reg[idx]
            rhs = cross[np.ix_(idx, rows)] + reg[idx, None] * self.prior[np.ix_(idx, rows)]
            try:
                sol[np.ix_(idx, rows)] = np.linalg.solve(lhs, rhs)
            except np.linalg.LinAlgError:
                sol[np.ix_(idx, rows)] = np.linalg.lstsq(lhs, rhs, rcond=None)[0]
        return sol

    @staticmethod
    def error(sol: np.ndarray, fold: list) -> float:
        """||A W - Y||^2 of a fold's statistics."""
        gram, cross, yy = fold
        return float(np.sum(sol * (gram @ sol)) - 2 * np.sum(sol * cross) + yy)

    def bias_only(self, fold: list) -> np.ndarray:
        """The masked weights with the least-squares bias for them (absorbs the mean output
        the zeroed weights contributed)."""
        gram, cross, _ = fold
        sol = self.prior.copy()
        sol[-1] = (cross[-1] - gram[-1, :-1] @ self.prior[:-1]) / max(float(gram[-1, -1]), 1.0)
        return sol

    def solve(self, ridge: float, graph: ir.Graph) -> dict[str, Any]:
        """Choose the masked weights, a bias-only refit or the full refit by their error on
        the held-out fold (fitted on the other); write the choice fitted on both folds.

        A full refit is a candidate only with at least MIN_ROWS_PER_INPUT calibration rows
        per unknown of the widest row (else it memorizes the calibration data)."""
        used = [f for f in self.folds if not isinstance(f[0], float)]
        total = [sum(f[i] for f in used) for i in range(3)]
        widest = int(self.free.sum(axis=0).max())
        fitters: dict[str, Callable[[list], np.ndarray]] = {"none": lambda fold: self.prior}
        if self.use_bias:
            fitters["bias"] = self.bias_only
        if self.rows >= MIN_ROWS_PER_INPUT * widest:
            fitters["weights"] = lambda fold: self.fit(fold[0], fold[1], ridge)
        if len(used) == 2:
            held = {k: self.error(fit(used[0]), used[1]) for k, fit in fitters.items()}
            choice = min(held, key=held.get)
        else:
            choice = "weights" if "weights" in fitters else "bias" if self.use_bias else "none"
        sol = fitters[choice](total)
        record: dict[str, Any] = {
            "rows": self.rows, "refit": choice != "none", "method": choice,
            "rel_error_masked": _rel(self.error(self.prior, total), total[2]),
            "rel_error": _rel(self.error(sol, total), total[2])}
        if "weights" not in fitters:
            record["note"] = (f"{self.rows} calibration rows < {MIN_ROWS_PER_INPUT} x {widest} "
                              "unknowns of the widest row: no full refit")
        if choice != "none":
            m = self.mask.shape[1]
            _write_solution(self.target, sol[:m].T, sol[m] if self.use_bias else None,
                            self.kind, self.bias_value, graph)
        return record


def _rel(err: float, yy: float) -> float:
    """Relative L2 error of a layer's output from a squared error and ||Y||^2."""
    return round(float(np.sqrt(max(err, 0.0) / yy)) if yy > 0 else 0.0, 6)


def refit(original: ir.Model, sparse: ir.Model, masks: dict[str, tuple[SparseLayer, np.ndarray]],
          batches: Batches, *, threads: int | None = None, max_rows: int = 2048,
          ridge: float = 0.1, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Refit the kept weights of the layers in `masks` (key -> (layer of `sparse`, mask)) in
    place, wave by wave; returns a record per layer key (refit or not, layer output error
    relative to the original layer's on the calibration data)."""
    items = {id(layer.node): _Layer(layer, mask) for layer, mask in masks.values()}
    rng = np.random.default_rng(seed)
    wanted = sorted({it.layer.node.outputs[0].name for it in items.values()})
    reference = ActivationReader(original, wanted, threads=threads)
    records: dict[str, dict[str, Any]] = {}
    for wave in _waves(sparse.graph, [it.layer.node for it in items.values()]):
        todo = [items[id(node)] for node in wave]
        x_names = sorted({it.layer.node.inputs[0].name for it in todo})
        y_names = sorted({it.layer.node.outputs[0].name for it in todo})
        probe = ActivationReader(sparse, x_names, threads=threads)
        for step, batch in enumerate(batches()):
            ys_all, xs_all = reference.read(batch, y_names), probe.read(batch, x_names)
            token_mask = _token_mask(batch)
            for it in todo:
                node = it.layer.node
                x, y = xs_all[node.inputs[0].name], ys_all[node.outputs[0].name]
                if it.layer.op == "Conv" and "geometry" not in it.target.attrs:
                    it.target.attrs["geometry"] = conv_geometry(node, x.shape, it.layer.array.shape,
                                                                y.shape)
                cols, ys = _design(it.target, x, y, rng, max_rows, token_mask)
                it.add(step % 2, cols, ys)
        for it in todo:
            records[it.layer.key] = it.solve(ridge, sparse.graph)
    logger.info("sparsify: %d of %d layers refit", sum(r["refit"] for r in records.values()),
                len(records))
    return records
