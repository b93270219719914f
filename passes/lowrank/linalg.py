"""Linear algebra behind the `lowrank` pass: (whitened) truncated SVD, Tucker-2, spatial SVD.

Everything here is numpy on float64 and knows nothing about ONNX. Conventions:

- A linear layer is `y = W x + b` with `W` of shape (out, in). A rank-r factorization
  is `W ≈ B @ A` with `A` (r, in) applied first and `B` (out, r) second; the singular
  values are split evenly (`sqrt(s)` on each side) so neither factor's range explodes
  in float32.
- Weight-only decomposition minimises ||W - Ŵ||_F (Eckart–Young: truncated SVD).
- Data-aware decomposition minimises the layer's output error on calibration data,
  E||(W - Ŵ)(x - μ)||², whose optimum is: whiten with the input covariance
  Σ = L Lᵀ, truncate the SVD of `W L`, un-whiten with `L⁻¹`. The mean part of the
  error, (W - Ŵ)μ, is moved into the bias (bias correction), which is why the
  centred covariance is used whenever the layer has (or can get) a bias. Σ is
  damped by `damp · mean eigenvalue` so directions the calibration set never
  excites keep some weight-space fidelity, and so `L⁻¹` stays bounded.
- Conv weights are (C_out, C_in, kh, kw).
  * Tucker-2 (input/output channel modes): W ≈ core ×₀ U_out ×₁ U_in, run as
    1×1 conv (C_in→r_in) → kh×kw core (r_in→r_out) → 1×1 conv (r_out→C_out).
    The input factor is the (whitened) truncated SVD of the mode-1 view (rows =
    (o, y, x), columns = input channels) with the input-channel covariance; the
    output factor is the top eigenvectors of the output-channel covariance (data)
    or of W₍₀₎W₍₀₎ᵀ (weights only: HOSVD). Sequentially truncated, so the core is
    computed from the already input-truncated tensor.
  * Spatial SVD: kh×kw → (kh×1, C_in→r) then (1×kw, r→C_out), i.e. the truncated SVD
    of the matrix with rows (o, x) and columns (c, y), whitened with the covariance
    of vertical input patches (c, y) in data-aware mode.
- EVBMF (Nakajima et al., "Global analytic solution of fully-observed variational
  Bayesian matrix factorization", JMLR 2013) estimates a rank from the spectrum
  alone, with the noise variance found by minimising the free energy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

DEFAULT_DAMP = 0.1


# ---------------------------------------------------------------- statistics


@dataclass
class MomentStats:
    """Running first and second moments of row vectors (samples × dim), in float64."""

    dim: int
    count: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[assignment]
    outer: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = np.zeros(self.dim)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim))

    def add(self, rows: np.ndarray) -> None:
        """Accumulate `rows` of shape (n, dim)."""
        rows = np.asarray(rows, dtype=np.float64).reshape(-1, self.dim)
        self.count += rows.shape[0]
        self.total += rows.sum(axis=0)
        self.outer += rows.T @ rows

    @property
    def mean(self) -> np.ndarray:
        return self.total / max(self.count, 1)

    def matrix(self, centered: bool) -> np.ndarray:
        """Covariance (centred) or raw second moment E[x xᵀ]."""
        second = self.outer / max(self.count, 1)
        if centered:
            mu = self.mean
            second = second - np.outer(mu, mu)
        return (second + second.T) / 2

    def whitener(self, centered: bool, damp: float) -> tuple[np.ndarray, np.ndarray]:
        """`whitener` of `matrix(centered)`, cached (layers reading one tensor share it)."""
        cache = self.__dict__.setdefault("_whiteners", {})
        if (centered, damp) not in cache:
            cache[centered, damp] = whitener(self.matrix(centered), damp)
        return cache[centered, damp]


def whitener(sigma: np.ndarray, damp: float = DEFAULT_DAMP) -> tuple[np.ndarray, np.ndarray]:
    """(L, L⁻¹) with L Lᵀ = Σ + damp·mean(eig Σ)·I (Cholesky; eigendecomposition fallback)."""
    sigma = (sigma + sigma.T) / 2
    n = sigma.shape[0]
    mean = float(np.trace(sigma)) / n if n else 0.0
    if mean <= 0.0:
        eye = np.eye(n)
        return eye, eye
    if damp > 0:
        try:
            low = np.linalg.cholesky(sigma + damp * mean * np.eye(n))
            return low, np.linalg.inv(low)
        except np.linalg.LinAlgError:
            pass
    lam, q = np.linalg.eigh(sigma)
    lam = np.clip(lam, 0.0, None)
    mean = float(lam.mean()) if lam.size else 0.0
    if mean <= 0.0:
        eye = np.eye(sigma.shape[0])
        return eye, eye
    lam = np.maximum(lam + damp * mean, mean * 1e-10)
    root = np.sqrt(lam)
    return q * root, (q / root).T


# ---------------------------------------------------------------- matrices


@dataclass
class LowRankSVD:
    """SVD of `W L` (L = whitening, identity for weight-only): W ≈ B @ A at any rank."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    l_inv: np.ndarray | None
    shape: tuple[int, int]
    out_scale_inv: np.ndarray | None = None  # 1 / output-row weights (see svd_factorize)

    @property
    def full_rank(self) -> int:
        return int(min(self.shape))

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(A, B): A (rank, in) first, B (out, rank) second."""
        root = np.sqrt(self.s[:rank])
        a = root[:, None] * self.vt[:rank]
        if self.l_inv is not None:
            a = a @ self.l_inv
        b = self.u[:, :rank] * root
        if self.out_scale_inv is not None:
            b = b * self.out_scale_inv[:, None]
        return a, b

    def reconstruct(self, rank: int) -> np.ndarray:
        a, b = self.factors(rank)
        return b @ a


def svd_factorize(w: np.ndarray, cov: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None,
                  damp: float = DEFAULT_DAMP, out_scale: np.ndarray | None = None) -> LowRankSVD:
    """Truncatable SVD of `w` (out, in); with `cov` (in, in) the data-aware (whitened) one.

    `cov` may also be a precomputed `(L, L⁻¹)` pair from `whitener`. `out_scale` (out,)
    weights the error of each output row (e.g. the per-channel scale of a following
    BatchNormalization): the SVD is of `diag(out_scale)·W·L`, undone on the factors.
    """
    w = np.asarray(w, dtype=np.float64)
    l_inv = None
    target = w
    if cov is not None:
        low, l_inv = cov if isinstance(cov, tuple) else whitener(cov, damp)
        target = w @ low
    scale_inv = None
    if out_scale is not None:
        scale = _safe_scale(out_scale)
        target = scale[:, None] * target
        scale_inv = 1.0 / scale
    u, s, vt = np.linalg.svd(target, full_matrices=False)
    return LowRankSVD(u, s, vt, l_inv, (w.shape[0], w.shape[1]), scale_inv)


def _safe_scale(scale: np.ndarray) -> np.ndarray:
    scale = np.abs(np.asarray(scale, dtype=np.float64))
    top = float(scale.max()) if scale.size else 0.0
    return np.maximum(scale, 1e-4 * top) if top > 0 else np.ones_like(scale)


# ---------------------------------------------------------------- convolutions


def tucker_mode1_matrix(w: np.ndarray) -> np.ndarray:
    """Rows (o, y, x), columns input channels: the view the first 1×1 conv compresses."""
    co, ci, kh, kw = w.shape
    return w.transpose(0, 2, 3, 1).reshape(co * kh * kw, ci)


@dataclass
class Tucker2:
    """Tucker-2 decomposition of a conv weight at any (r_in, r_out)."""

    weight: np.ndarray
    in_svd: LowRankSVD
    out_basis: np.ndarray  # (C_out, C_out), columns sorted by decreasing energy
    out_spectrum: np.ndarray  # singular values of the output mode
    out_scale: np.ndarray | None = None  # output-channel error weights (see tucker2_factorize)

    @property
    def full_ranks(self) -> tuple[int, int]:
        return self.weight.shape[1], self.weight.shape[0]

    @property
    def in_spectrum(self) -> np.ndarray:
        return self.in_svd.s

    def factors(self, r_in: int, r_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(first (r_in, C_in, 1, 1), core (r_out, r_in, kh, kw), last (C_out, r_out, 1, 1))."""
        co, _, kh, kw = self.weight.shape
        a, b = self.in_svd.factors(r_in)  # a (r_in, C_in); b (C_out·kh·kw, r_in)
        g1 = b.reshape(co, kh, kw, r_in).transpose(0, 3, 1, 2)  # (C_out, r_in, kh, kw)
        u = self.out_basis[:, :r_out]
        if self.out_scale is None:
            left, right = u, u
        else:  # project in the weighted space: Ŵ = S⁻¹ U Uᵀ S W
            left, right = u / self.out_scale[:, None], u * self.out_scale[:, None]
        core = np.einsum("or,oikl->rikl", right, g1, optimize=True)
        return a[:, :, None, None], core, np.ascontiguousarray(left[:, :, None, None])

    def reconstruct(self, r_in: int, r_out: int) -> np.ndarray:
        first, core, last = self.factors(r_in, r_out)
        inner = np.einsum("rikl,ic->rckl", core, first[:, :, 0, 0], optimize=True)
        return np.einsum("or,rckl->ockl", last[:, :, 0, 0], inner, optimize=True)


def tucker2_factorize(w: np.ndarray, in_cov: np.ndarray | None = None,
                      out_cov: np.ndarray | None = None,
                      damp: float = DEFAULT_DAMP,
                      in_whitener: tuple[np.ndarray, np.ndarray] | None = None,
                      out_scale: np.ndarray | None = None) -> Tucker2:
    """Tucker-2 of a conv weight; data-aware when the channel covariances are given.

    `in_cov` (C_in × C_in) is the covariance of the conv's input channels, `out_cov`
    (C_out × C_out) that of its output channels (both over all positions and samples);
    `in_whitener` optionally gives `whitener(in_cov, damp)` precomputed; `out_scale`
    (C_out,) weights each output channel's error (a following BatchNormalization).
    """
    w = np.asarray(w, dtype=np.float64)
    co, _, kh, kw = w.shape
    scale = _safe_scale(out_scale) if out_scale is not None else None
    in_svd = svd_factorize(tucker_mode1_matrix(w),
                           in_whitener if in_whitener is not None else in_cov, damp,
                           None if scale is None else np.repeat(scale, kh * kw))
    w0 = w.reshape(co, -1)
    gram = w0 @ w0.T
    if out_cov is not None:
        # Output measure under the same damping as the input whitening:
        # W (Σ_col + δ I) Wᵀ = Σ_out + δ W Wᵀ, δ = damp · mean input variance.
        delta = damp * float(np.trace(in_cov)) / in_cov.shape[0] if in_cov is not None else 0.0
        gram = (out_cov + out_cov.T) / 2 + delta * gram
    if scale is not None:
        gram = scale[:, None] * gram * scale[None, :]
    lam, q = np.linalg.eigh(gram)
    order = np.argsort(lam)[::-1]
    lam, q = np.clip(lam[order], 0.0, None), q[:, order]
    return Tucker2(w, in_svd, q, np.sqrt(lam), scale)


def spatial_matrix(w: np.ndarray) -> np.ndarray:
    """Rows (o, x), columns (c, y): the matrix whose rank-r SVD is kh×1 then 1×kw."""
    co, ci, kh, kw = w.shape
    return w.transpose(0, 3, 1, 2).reshape(co * kw, ci * kh)


@dataclass
class SpatialSVD:
    """kh×kw conv → (kh×1, C_in→r) then (1×kw, r→C_out) at any r."""

    weight: np.ndarray
    svd: LowRankSVD

    @property
    def full_rank(self) -> int:
        return self.svd.full_rank

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """(vertical (r, C_in, kh, 1), horizontal (C_out, r, 1, kw))."""
        co, ci, kh, kw = self.weight.shape
        a, b = self.svd.factors(rank)  # a (r, C_in·kh); b (C_out·kw, r)
        vertical = a.reshape(rank, ci, kh, 1)
        horizontal = b.reshape(co, kw, rank).transpose(0, 2, 1)[:, :, None, :]
        return vertical, np.ascontiguousarray(horizontal)

    def reconstruct(self, rank: int) -> np.ndarray:
        vertical, horizontal = self.factors(rank)
        return np.einsum("orx,rcy->ocyx", horizontal[:, :, 0, :], vertical[:, :, :, 0],
                         optimize=True)


def spatial_factorize(w: np.ndarray,
                      patch_cov: np.ndarray | tuple[np.ndarray, np.ndarray] | None = None,
                      damp: float = DEFAULT_DAMP, out_scale: np.ndarray | None = None
                      ) -> SpatialSVD:
    """Spatial SVD; `patch_cov` is the covariance of vertical input patches ordered (c, y)."""
    w = np.asarray(w, dtype=np.float64)
    rows = None if out_scale is None else np.repeat(np.asarray(out_scale), w.shape[3])
    return SpatialSVD(w, svd_factorize(spatial_matrix(w), patch_cov, damp, rows))


def vertical_patches(x: np.ndarray, kh: int, stride: int, dilation: int,
                     pad_top: int, pad_bottom: int) -> np.ndarray:
    """Rows (samples) × (c, y) columns of the kh×1 patches a vertical conv reads."""
    c, h = x.shape[1], x.shape[2]
    xp = np.pad(x, ((0, 0), (0, 0), (pad_top, pad_bottom), (0, 0)))
    h_out = (h + pad_top + pad_bottom - dilation * (kh - 1) - 1) // stride + 1
    if h_out <= 0:
        return np.zeros((0, c * kh))
    taps = [xp[:, :, y * dilation: y * dilation + (h_out - 1) * stride + 1: stride, :]
            for y in range(kh)]
    patches = np.stack(taps, axis=2)  # (n, c, kh, h_out, w)
    return patches.transpose(0, 3, 4, 1, 2).reshape(-1, c * kh)


def channel_rows(x: np.ndarray) -> np.ndarray:
    """(N, C, *spatial) → rows (N·spatial, C)."""
    c = x.shape[1]
    return np.moveaxis(x, 1, -1).reshape(-1, c)


# ---------------------------------------------------------------- rank estimation


def energy_kept(s: np.ndarray, rank: int) -> float:
    """Fraction of Σ s² kept by the first `rank` singular values."""
    total = float(np.sum(np.square(s)))
    if total <= 0.0:
        return 1.0
    return float(np.sum(np.square(s[:rank])) / total)


def energy_rank(s: np.ndarray, energy: float) -> int:
    """Smallest r with Σ_{i<r} s_i² ≥ energy · Σ s_i² (at least 1)."""
    sq = np.square(np.asarray(s, dtype=np.float64))
    total = float(sq.sum())
    if total <= 0.0:
        return 1
    cumulative = np.cumsum(sq) / total
    return int(min(np.searchsorted(cumulative, energy - 1e-12) + 1, len(sq)))


def _evb_tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))


def _evb_free_energy(sigma2: float, rows: int, cols: int, s: np.ndarray, residual: float,
                     xubar: float) -> float:
    h = len(s)
    alpha = rows / cols
    x = s**2 / (cols * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _evb_tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return float(term1 + term2 + term3 + term4 + residual / (cols * sigma2)
                 + (rows - h) * np.log(sigma2))


def _minimize_bounded(fn, lo: float, hi: float, iterations: int = 100) -> float:
    """Golden-section search for a minimum of `fn` on [lo, hi] (in log space when lo > 0)."""
    use_log = lo > 0
    a, b = (np.log(lo), np.log(hi)) if use_log else (lo, hi)

    def f(u: float) -> float:
        return fn(float(np.exp(u)) if use_log else u)

    ratio = (np.sqrt(5.0) - 1) / 2
    c, d = b - ratio * (b - a), a + ratio * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iterations):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - ratio * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + ratio * (b - a)
            fd = f(d)
        if abs(b - a) < 1e-10 * max(1.0, abs(a)):
            break
    u = (a + b) / 2
    return float(np.exp(u)) if use_log else u


def evbmf_rank(s: np.ndarray, shape: tuple[int, int], residual: float = 0.0) -> int:
    """Rank that empirical VBMF keeps for a matrix of `shape` with singular values `s`."""
    rows, cols = sorted(int(d) for d in shape)
    s = np.sort(np.asarray(s, dtype=np.float64))[::-1][:rows]
    s = s[s > 0]
    h = len(s)
    if h <= 1:
        return max(h, 1)
    alpha = rows / cols
    tauubar = 2.5129 * np.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    eh_ub = int(min(np.ceil(rows / (1 + alpha)) - 1, h)) - 1
    tail = min(max(eh_ub + 1, 0), h - 1)
    upper = (np.sum(s**2) + residual) / (rows * cols)
    lower = max(s[tail] ** 2 / (cols * xubar), np.mean(s[tail:] ** 2) / cols)
    if not lower < upper:
        sigma2 = upper
    else:
        sigma2 = _minimize_bounded(
            lambda v: _evb_free_energy(v, rows, cols, s, residual, xubar), lower, upper)
    threshold = np.sqrt(cols * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return max(int(np.sum(s > threshold)), 1)
