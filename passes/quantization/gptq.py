"""GPTQ / OBQ error-compensating rounding of a weight matrix (numpy, closed form).

Round-to-nearest (RTN) rounds every weight on its own. GPTQ (Frantar et al. 2022,
after OBQ) rounds the input columns one at a time and moves each column's rounding
error onto the columns not yet rounded, weighted by the inverse of the layer-input
Hessian H = XᵀX, so that the layer *output* XW stays close, not the weights:

    for column j (in order, or by decreasing diag(H) with act_order):
        q_j   = round(w_j) on the grid
        e     = (w_j - q_j) / U[j, j]          U = upper Cholesky factor of H⁻¹
        w_k  -= e · U[j, k]   for k > j

with H damped by λ·mean(diag H) and the updates applied lazily per block of columns
(the result is the same; only the memory traffic differs).

The grid (scale and zero point per row and column group) is fixed before rounding, from
the original weights, exactly as RTN would choose it: GPTQ changes only which grid point
each weight goes to, so the two are compared on the same grid (and act_order stays
compatible with contiguous blocks, as MatMulNBits needs).

Weights here are 2-D `[rows = output channels, columns = input features]`; the callers
(`hessian.py` for the layouts) bring Conv/Gemm/MatMul weights into that form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Grid:
    """An integer grid per weight: q = clip(round(w / scale) + zero, qmin, qmax),
    dequantized (q - zero) * scale. `scale`/`zero` are [rows, columns] (expanded from
    per-row or per-group values)."""

    scale: np.ndarray
    zero: np.ndarray
    qmin: int
    qmax: int

    def codes(self, w: np.ndarray, cols: slice | np.ndarray = slice(None)) -> np.ndarray:
        s, z = self.scale[:, cols], self.zero[:, cols]
        return np.clip(np.round(w / s) + z, self.qmin, self.qmax)

    def dequantize(self, q: np.ndarray, cols: slice | np.ndarray = slice(None)) -> np.ndarray:
        return (q - self.zero[:, cols]) * self.scale[:, cols]

    def permuted(self, perm: np.ndarray) -> Grid:
        return Grid(self.scale[:, perm], self.zero[:, perm], self.qmin, self.qmax)


def symmetric_grid(scales: np.ndarray, columns: int, bits: int) -> Grid:
    """Per-row symmetric grid (the int8 weight scheme of `quantize`): [-qmax, qmax], zero 0."""
    qmax = 2 ** (bits - 1) - 1
    s = np.repeat(np.asarray(scales, np.float64).reshape(-1, 1), columns, axis=1)
    return Grid(s, np.zeros_like(s), -qmax, qmax)


def block_grid(w: np.ndarray, block: int, bits: int, *, symmetric: bool) -> Grid:
    """Per-row grids over blocks of `block` consecutive columns (the MatMulNBits layout),
    unsigned codes 0..2^bits-1. Symmetric: zero point 2^(bits-1), scale max|w| / (2^(bits-1)-1);
    otherwise min/max of the block (with 0 inside the range), zero point rounded."""
    rows, cols = w.shape
    levels = 2 ** bits - 1
    blocks = -(-cols // block)
    padded = np.zeros((rows, blocks * block))
    padded[:, :cols] = w
    wb = padded.reshape(rows, blocks, block)
    if symmetric:
        half = 2 ** (bits - 1)
        amax = np.abs(wb).max(-1)
        scale = np.where(amax > 0, amax / (half - 1), 1.0)
        zero = np.full_like(scale, half)
    else:
        lo, hi = np.minimum(wb.min(-1), 0.0), np.maximum(wb.max(-1), 0.0)
        scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
        zero = np.clip(np.round(-lo / scale), 0, levels)
    expand = np.repeat(np.arange(blocks), block)[:cols]
    return Grid(scale[:, expand], zero[:, expand], 0, levels)


def round_nearest(w: np.ndarray, grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """RTN: (integer codes, dequantized weight)."""
    q = grid.codes(w)
    return q, grid.dequantize(q)


def round_gptq(w: np.ndarray, hessian: np.ndarray, grid: Grid, *, damp: float = 0.01,
               act_order: bool = False, block: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ rounding of `w` [rows, cols] with the input Hessian [cols, cols]:
    (integer codes, dequantized weight), both [rows, cols] in the original column order."""
    w = np.array(w, dtype=np.float64)
    h = np.array(hessian, dtype=np.float64)
    cols = w.shape[1]
    dead = np.diag(h) <= 0
    # An input that was always zero carries no information: it is rounded on its own
    # (unit curvature, no coupling), never zeroed, as held-out inputs may reach it.
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    perm = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(cols)
    w, h, grid_p = w[:, perm], h[np.ix_(perm, perm)], grid.permuted(perm)
    h[np.diag_indices(cols)] += damp * float(np.mean(np.diag(h)))
    upper = _inverse_cholesky_upper(h)
    q = np.zeros_like(w)
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        u1 = upper[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            codes = grid_p.codes(w1[:, i:i + 1], slice(col, col + 1))
            q[:, col:col + 1] = codes
            err = (w1[:, i] - grid_p.dequantize(codes, slice(col, col + 1))[:, 0]) / u1[i, i]
            w1[:, i:] -= np.outer(err, u1[i, i:])
            err1[:, i] = err
        w[:, i2:] -= err1 @ upper[i1:i2, i2:]
    inverse = np.argsort(perm)
    q = q[:, inverse]
    return q, grid.dequantize(q)


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper U with H⁻¹ = UᵀU (GPTQ's factor); more damping if H is not numerically PD."""
    eye = np.eye(h.shape[0])
    extra = 0.0
    for _ in range(6):
        try:
            # With R the order reversal, R H R = L Lᵀ gives H⁻¹ = UᵀU for U = R L⁻¹ R (upper):
            # one Cholesky and one triangular inverse instead of GPTQ's two Choleskys.
            lower = np.linalg.cholesky((h + extra * eye)[::-1, ::-1])
            return np.ascontiguousarray(np.linalg.inv(lower)[::-1, ::-1])
        except np.linalg.LinAlgError:
            extra = max(extra * 10, 1e-6 * float(np.mean(np.diag(h))) or 1e-6)
    raise np.linalg.LinAlgError("GPTQ: the layer-input Hessian is not positive definite")


def output_error(w: np.ndarray, w_hat: np.ndarray, hessian: np.ndarray) -> float:
    """Σ over samples of ||x(W - Ŵ)ᵀ||² = tr(ΔW H ΔWᵀ) with H = XᵀX of those samples."""
    d = np.asarray(w, np.float64) - np.asarray(w_hat, np.float64)
    return float(np.sum((d @ hessian) * d))  # BLAS; a three-operand einsum is not
