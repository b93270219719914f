"""Rank selection for the `lowrank` pass.

Three ways to pick ranks, each on the spectrum of the matrix that is actually
truncated (the whitened one in data-aware mode, so "energy" is then the share of
the layer's output energy that is kept):

- energy: per layer, the smallest rank keeping `energy` of Σ s² (per mode for Tucker-2);
- a global budget (`macs=` / `params=`): remove a fraction of the decomposable
  layers' MACs or parameters, spread over layers by a Lagrangian relaxation:
  every layer picks the candidate minimising `lost energy + λ · cost`, and λ is
  bisected until the budget is met; that is the global ranking of
  singular-value energy lost per MAC saved, solved exactly on the convex hull;
- EVBMF (data-free, per layer and per mode).

Ranks are rounded up to multiples of `round_to` (capped at the full rank) since
GEMM kernels run best on multiples of their vector width.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .linalg import energy_kept

# Most candidate ranks tried per mode in the global allocation (a coarser step beyond).
MAX_CANDIDATES_PER_MODE = 64


def round_rank(rank: int, full: int, round_to: int) -> int:
    """Round `rank` up to a multiple of `round_to`, within [1, full]."""
    if round_to > 1:
        rank = int(math.ceil(rank / round_to) * round_to)
    return int(max(1, min(rank, full)))


def rank_grid(full: int, round_to: int) -> list[int]:
    """Candidate ranks for one mode: multiples of `round_to` (coarser for wide layers), and full."""
    step = max(round_to, 1)
    while full / step > MAX_CANDIDATES_PER_MODE:
        step += max(round_to, 1)
    ranks = list(range(step, full, step))
    if not ranks or ranks[-1] != full:
        ranks.append(full)
    return ranks


@dataclass(frozen=True)
class Choice:
    """One option for one layer: ranks (None = leave the layer as it is), cost, lost energy."""

    ranks: tuple[int, ...] | None
    cost: float
    error: float


def layer_choices(
    spectra: Sequence[np.ndarray],
    grids: Sequence[Sequence[int]],
    cost: Callable[[tuple[int, ...]], float],
    original_cost: float,
    allowed: Callable[[tuple[int, ...]], bool],
) -> list[Choice]:
    """Keep-as-is plus every allowed rank combination; error = Σ over modes of energy lost."""
    choices = [Choice(None, float(original_cost), 0.0)]
    lost = [{r: 1.0 - energy_kept(s, r) for r in grid} for s, grid in zip(spectra, grids)]
    combos: list[tuple[int, ...]] = [()]
    for grid in grids:
        combos = [c + (r,) for c in combos for r in grid]
    for ranks in combos:
        if not allowed(ranks):
            continue
        error = sum(lost[i][r] for i, r in enumerate(ranks))
        choices.append(Choice(ranks, float(cost(ranks)), float(error)))
    return choices


def _pick(choices: list[Choice], lam: float, scale: float) -> Choice:
    return min(choices, key=lambda c: (c.error + lam * c.cost / scale, c.cost))


def allocate(layers: Sequence[list[Choice]], fraction: float) -> tuple[list[Choice], float]:
    """Choices removing at least `fraction` of the layers' total original cost.

    Returns the picks and the fraction actually removed (less than asked when even
    the cheapest allowed candidates cannot reach it).
    """
    if not layers:
        return [], 0.0
    total = sum(c[0].cost for c in layers)
    if total <= 0:
        return [c[0] for c in layers], 0.0
    target = fraction * total

    def removed(picks: list[Choice]) -> float:
        return total - sum(p.cost for p in picks)

    def solve(lam: float) -> list[Choice]:
        return [_pick(c, lam, total) for c in layers]

    lo, hi = 0.0, 1.0
    picks_hi = solve(hi)
    while removed(picks_hi) < target and hi < 1e12:
        lo, hi = hi, hi * 4
        picks_hi = solve(hi)
    if removed(picks_hi) < target:
        cheapest = [min(c, key=lambda x: (x.cost, x.error)) for c in layers]
        return cheapest, removed(cheapest) / total
    for _ in range(60):
        mid = (lo + hi) / 2
        picks = solve(mid)
        if removed(picks) >= target:
            hi, picks_hi = mid, picks
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    # The relaxation jumps between hull points and may overshoot the budget: give
    # back, greedily, the layer moves that cost the most energy per unit saved.
    picks = list(picks_hi)
    picks_lo = solve(lo)
    moves = [i for i in range(len(picks)) if picks_lo[i] != picks[i]]
    moves.sort(key=lambda i: -(picks[i].error - picks_lo[i].error)
               / max(picks_lo[i].cost - picks[i].cost, 1e-12))
    for i in moves:
        extra = picks_lo[i].cost - picks[i].cost
        if removed(picks) - extra >= target:
            picks[i] = picks_lo[i]
    return picks, removed(picks) / total
