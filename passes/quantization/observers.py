"""Calibration observers: streaming statistics of activations -> quantization ranges.

Observers see one batch of a tensor at a time and keep bounded state (a running
min/max, or a fixed-size histogram), never the activations themselves, so
calibrating over many batches costs memory proportional to the number of
tensors, not to the data.

Range methods (`choose_range`):
  minmax      the observed [min, max].
  percentile  the p-th percentile of the values (and 100-p for the low end of
              signed tensors); default p = 99.99.
  entropy     TensorRT-style: the clipping threshold whose quantized distribution
              has the smallest KL divergence to the clipped reference histogram.
  mse         the clipping range that minimizes the expected squared error of
              quantize-dequantize (rounding + clipping) under the histogram.

Histograms are aligned at zero with bin width `w`; when new data fall outside,
the histogram grows, and when it would exceed `max_bins` it doubles `w` by
summing bin pairs (exact merge, no re-binning error).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

DEFAULT_BINS = 2048


@dataclass
class QuantRange:
    """A calibrated range plus the integer grid chosen for it."""

    lo: float
    hi: float
    scale: float
    zero_point: int
    qmin: int
    qmax: int

    def fake_quant(self, x: np.ndarray) -> np.ndarray:
        q = np.clip(np.round(x / self.scale) + self.zero_point, self.qmin, self.qmax)
        return ((q - self.zero_point) * self.scale).astype(np.float32)


class Histogram:
    """Zero-aligned streaming histogram with exact bin merging."""

    def __init__(self, max_bins: int = DEFAULT_BINS):
        self.max_bins = max_bins
        self.width = 0.0
        self.kmin = 0  # index of the first bin: bin k covers [k*w, (k+1)*w)
        self.counts = np.zeros(0, dtype=np.int64)
        self.min = math.inf
        self.max = -math.inf
        self.total = 0
        self.sum = 0.0
        self.exact_zeros = 0  # post-Relu tensors are half zeros; entropy calibration ignores them

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32).ravel()
        x = x[np.isfinite(x)]
        if x.size == 0:
            return
        lo, hi = float(x.min()), float(x.max())
        self.min, self.max = min(self.min, lo), max(self.max, hi)
        self.total += x.size
        self.sum += float(x.sum(dtype=np.float64))
        self.exact_zeros += int(np.count_nonzero(x == 0))
        if self.width == 0.0:
            span = max(abs(lo), abs(hi))
            if span == 0.0:
                # All zeros so far: count them in a lazily-sized bin later.
                self._zeros = getattr(self, "_zeros", 0) + x.size
                return
            self.width = span / (self.max_bins // 2)
            self.kmin = 0
            self.counts = np.zeros(0, dtype=np.int64)
        kl = math.floor(lo / self.width)
        kh = math.floor(hi / self.width)
        new_kmin, new_kmax = self._span(kl, kh)
        while new_kmax - new_kmin + 1 > self.max_bins:
            self._merge_pairs()
            new_kmin, new_kmax = self._span(math.floor(lo / self.width),
                                            math.floor(hi / self.width))
        self._extend(new_kmin, new_kmax)
        idx = np.floor(x / self.width).astype(np.int64) - self.kmin
        np.clip(idx, 0, self.counts.size - 1, out=idx)
        self.counts += np.bincount(idx, minlength=self.counts.size)
        zeros = getattr(self, "_zeros", 0)
        if zeros:
            self.counts[-self.kmin] += zeros
            self._zeros = 0

    def _span(self, kl: int, kh: int) -> tuple[int, int]:
        """Bin index range covering the current bins, [kl, kh] and zero."""
        lo, hi = min(kl, 0), max(kh, 0)
        if self.counts.size:
            lo, hi = min(lo, self.kmin), max(hi, self.kmin + self.counts.size - 1)
        return lo, hi

    def _extend(self, kmin: int, kmax: int) -> None:
        if not self.counts.size:
            self.kmin = kmin
            self.counts = np.zeros(kmax - kmin + 1, dtype=np.int64)
        else:
            cur_max = self.kmin + self.counts.size - 1
            if kmin < self.kmin or kmax > cur_max:
                grown = np.zeros(kmax - kmin + 1, dtype=np.int64)
                grown[self.kmin - kmin : self.kmin - kmin + self.counts.size] = self.counts
                self.counts, self.kmin = grown, kmin

    def _merge_pairs(self) -> None:
        """Double the bin width: new bin j = old bins 2j and 2j+1 (floor division)."""
        if self.counts.size:
            kmin, counts = self.kmin, self.counts
            if kmin % 2:  # align so pairs are (even, odd)
                counts = np.concatenate([[0], counts])
                kmin -= 1
            if counts.size % 2:
                counts = np.concatenate([counts, [0]])
            self.counts = counts.reshape(-1, 2).sum(1)
            self.kmin = kmin // 2
        self.width *= 2.0

    # ---------------------------------------------------------------- views

    @property
    def edges(self) -> np.ndarray:
        return (self.kmin + np.arange(self.counts.size + 1)) * self.width

    @property
    def centers(self) -> np.ndarray:
        return (self.kmin + np.arange(self.counts.size) + 0.5) * self.width

    @property
    def mean(self) -> float:
        return self.sum / self.total if self.total else 0.0


class TensorObserver:
    """Min/max always; a histogram too when the range method needs one."""

    def __init__(self, method: str = "minmax", bins: int = DEFAULT_BINS):
        self.method = method
        self.hist = Histogram(bins) if method != "minmax" else None
        self.min = math.inf
        self.max = -math.inf

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.size == 0 or not np.issubdtype(x.dtype, np.floating):
            return
        self.min = min(self.min, float(np.nanmin(x)))
        self.max = max(self.max, float(np.nanmax(x)))
        if self.hist is not None:
            self.hist.add(x)

    @property
    def seen(self) -> bool:
        return math.isfinite(self.min)


class ChannelMeanObserver:
    """Per-channel mean (and max |x|) along one axis, for bias correction / SmoothQuant."""

    def __init__(self, axis: int):
        self.axis = axis
        self.sum: np.ndarray | None = None
        self.absmax: np.ndarray | None = None
        self.count = 0

    def add(self, x: np.ndarray) -> None:
        x = np.asarray(x, dtype=np.float32)
        axis = self.axis % x.ndim
        moved = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
        s = moved.sum(0, dtype=np.float64)
        m = np.abs(moved).max(0)
        if self.sum is None:
            self.sum, self.absmax = s, m
        else:
            self.sum += s
            self.absmax = np.maximum(self.absmax, m)
        self.count += moved.shape[0]

    @property
    def mean(self) -> np.ndarray:
        assert self.sum is not None
        return (self.sum / max(self.count, 1)).astype(np.float32)


# ---------------------------------------------------------------- grids


def integer_grid(dtype: str) -> tuple[int, int]:
    return (0, 255) if dtype == "u8" else (-128, 127)


def make_range(lo: float, hi: float, dtype: str, *, symmetric: bool,
               one_sided: bool = False) -> QuantRange:
    """Scale/zero point for [lo, hi] (always widened to contain 0).

    u8: asymmetric, zero point in [0, 255]; one-sided tensors get zero point 0.
    s8 symmetric: zero point 0, scale = max|x| / 127; a one-sided (post-Relu)
    tensor instead uses zero point -128 so all 256 levels cover [0, hi].
    """
    qmin, qmax = integer_grid(dtype)
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if one_sided:
        lo = 0.0
    if hi - lo < 1e-12:
        hi = lo + 1e-6 if lo >= 0 else hi
        if hi - lo < 1e-12:
            hi = 1e-6
    if one_sided:
        scale = hi / (qmax - qmin)
        return QuantRange(0.0, hi, scale, qmin, qmin, qmax)
    if symmetric:
        bound = max(abs(lo), abs(hi))
        # s8 symmetric uses [-127, 127] (ORT convention) so the grid is balanced.
        scale = bound / 127.0 if dtype == "s8" else bound / 127.5
        zp = 0 if dtype == "s8" else 128
        return QuantRange(-bound, bound, scale, zp, qmin, qmax)
    scale = (hi - lo) / (qmax - qmin)
    zp = round(qmin - lo / scale)
    zp = max(qmin, min(qmax, zp))
    return QuantRange(lo, hi, scale, zp, qmin, qmax)


# ---------------------------------------------------------------- range choice


def choose_range(obs: TensorObserver, dtype: str, *, symmetric: bool, one_sided: bool = False,
                 percentile: float = 99.99) -> QuantRange:
    """Pick the quantization range for one observed tensor (see module docstring)."""
    lo, hi = obs.min, obs.max
    if not obs.seen:
        return make_range(0.0, 1.0, dtype, symmetric=symmetric, one_sided=one_sided)
    if one_sided:
        lo = 0.0
    method = obs.method
    hist = obs.hist
    if method == "minmax" or hist is None or hist.counts.size == 0 or hist.total == 0:
        return make_range(lo, hi, dtype, symmetric=symmetric, one_sided=one_sided)
    counts = hist.counts.astype(np.float64)
    edges = hist.edges
    if one_sided:
        counts = np.where(edges[1:] <= 0, 0.0, counts)
    if method == "percentile":
        return _percentile_range(counts, edges, lo, hi, dtype, symmetric, one_sided, percentile)
    if method == "entropy":
        return _entropy_range(counts, edges, lo, hi, dtype, symmetric, one_sided, hist.exact_zeros)
    if method == "mse":
        return _mse_range(counts, hist.centers, lo, hi, dtype, symmetric, one_sided)
    raise ValueError(f"unknown calibration method {method!r}")


def _percentile_range(counts, edges, lo, hi, dtype, symmetric, one_sided, p):
    cdf = np.cumsum(counts)
    total = cdf[-1]
    if total <= 0:
        return make_range(lo, hi, dtype, symmetric=symmetric, one_sided=one_sided)
    frac = p / 100.0
    hi_p = float(edges[1:][np.searchsorted(cdf, frac * total)]) if hi > 0 else 0.0
    lo_p = float(edges[:-1][np.searchsorted(cdf, (1 - frac) * total)]) if lo < 0 else 0.0
    hi_p, lo_p = min(hi_p, hi), max(lo_p, lo)
    if symmetric and not one_sided:
        # Percentile of |x| for a symmetric grid.
        centers = (edges[:-1] + edges[1:]) / 2
        order = np.argsort(np.abs(centers))
        c = np.cumsum(counts[order])
        t = float(np.abs(edges[1:])[order][min(np.searchsorted(c, frac * c[-1]), len(c) - 1)])
        t = min(t, max(abs(lo), abs(hi)))
        return make_range(-t, t, dtype, symmetric=True)
    return make_range(lo_p, hi_p, dtype, symmetric=symmetric, one_sided=one_sided)


def _abs_histogram(counts: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, float]:
    """Fold a zero-aligned histogram onto |x|: bins [k w, (k+1) w) for k >= 0."""
    w = edges[1] - edges[0]
    kmin = round(edges[0] / w)
    k = kmin + np.arange(counts.size)
    absk = np.where(k >= 0, k, -k - 1)
    folded = np.bincount(absk, weights=counts)
    return folded, w


def _entropy_range(counts, edges, lo, hi, dtype, symmetric, one_sided, zeros: int = 0):
    folded, w = _abs_histogram(counts, edges)
    # Exact zeros (Relu outputs, padding) are represented exactly at any threshold; left
    # in, their spike dominates the KL divergence and drives the threshold far too low.
    folded[0] = max(folded[0] - zeros, 0.0)
    levels = 128 if (symmetric and not one_sided) or (lo < 0 and not one_sided) else 256
    threshold = kl_threshold(folded, levels) * w
    threshold = min(threshold, max(abs(lo), abs(hi)))
    if one_sided:
        return make_range(0.0, min(threshold, hi), dtype, symmetric=symmetric, one_sided=True)
    if symmetric:
        return make_range(-threshold, threshold, dtype, symmetric=True)
    return make_range(max(lo, -threshold), min(hi, threshold), dtype, symmetric=False)


def kl_threshold(hist: np.ndarray, levels: int = 128) -> int:
    """TensorRT's entropy calibration on a histogram of |x|: best number of bins to keep."""
    hist = np.asarray(hist, dtype=np.float64)
    nbins = hist.size
    nz = np.nonzero(hist)[0]
    if nz.size == 0:
        return nbins
    last = int(nz[-1]) + 1
    if last <= levels:
        return last
    best_i, best_kl = last, math.inf
    # Candidate thresholds; stride keeps the search ~O(256) evaluations.
    stride = max(1, (last - levels) // 256)
    for i in range(levels, last + 1, stride):
        ref = hist[:i].copy()
        ref[i - 1] += hist[i:].sum()  # clipped outliers pile into the last bin
        # Quantize the first i bins into `levels` groups, expand back uniformly
        # over the non-empty bins of each group.
        idx = (np.arange(i) * levels) // i
        src = hist[:i]
        nonzero = src > 0
        q_sum = np.bincount(idx, weights=src, minlength=levels)
        q_cnt = np.bincount(idx, weights=nonzero.astype(np.float64), minlength=levels)
        expanded = np.where(nonzero, q_sum[idx] / np.maximum(q_cnt[idx], 1), 0.0)
        p = ref / ref.sum()
        q_total = expanded.sum()
        if q_total <= 0:
            continue
        q = expanded / q_total
        mask = p > 0
        q_safe = np.where(q > 0, q, 1e-12)
        kl = float(np.sum(p[mask] * np.log(p[mask] / q_safe[mask])))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return best_i


def _mse_range(counts, centers, lo, hi, dtype, symmetric, one_sided, steps: int = 200):
    """Search a clipping threshold T (range = [max(lo,-T), min(hi,T)]) minimizing the
    histogram-weighted squared error of quantize-dequantize (rounding + clipping)."""
    weights = counts / max(counts.sum(), 1.0)
    keep = weights > 0
    c, wts = centers[keep], weights[keep]
    bound = max(abs(lo), abs(hi))
    best, best_err = None, math.inf
    for t in np.linspace(bound / steps, bound, steps):
        r = make_range(max(lo, -t), min(hi, t), dtype, symmetric=symmetric, one_sided=one_sided)
        err = float(np.sum(wts * (r.fake_quant(c) - c) ** 2))
        if best is None or err < best_err:
            best, best_err = r, err
    assert best is not None
    return best


def weight_scales(w: np.ndarray, axis: int | None, *, bits: int = 8,
                  method: str = "minmax") -> np.ndarray:
    """Symmetric per-channel (or per-tensor, axis=None) scales for a weight tensor.

    method=mse searches a per-channel clipping factor minimizing the weight MSE
    (useful at 4 bits; at 8 bits max|w| is usually already best).
    """
    qmax = 2 ** (bits - 1) - 1
    if axis is None:
        amax = np.array([np.abs(w).max()], dtype=np.float64)
        flat = w.reshape(1, -1).astype(np.float64)
    else:
        moved = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1).astype(np.float64)
        amax, flat = np.abs(moved).max(1), moved
    scale = np.where(amax > 0, amax / qmax, 1.0)
    if method == "mse":
        best_err = np.full(scale.shape, np.inf)
        best = scale.copy()
        for alpha in np.linspace(0.5, 1.0, 26):
            s = scale * alpha
            q = np.clip(np.round(flat / s[:, None]), -qmax, qmax) * s[:, None]
            err = ((q - flat) ** 2).sum(1)
            better = err < best_err
            best[better], best_err[better] = s[better], err[better]
        scale = best
    return scale.astype(np.float32)


def quantize_weight(w: np.ndarray, axis: int | None, *, bits: int = 8,
                    method: str = "minmax") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Symmetric weight quantization: (int8 values, scales, dequantized float32 weight)."""
    qmax = 2 ** (bits - 1) - 1
    scales = weight_scales(w, axis, bits=bits, method=method)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    s = scales.reshape(shape)
    q = np.clip(np.round(w / s), -qmax, qmax)
    return q.astype(np.int8), scales, (q * s).astype(np.float32)
