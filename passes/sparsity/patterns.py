"""Sparsity patterns on a weight's 2-D view [outputs, inputs], and the masks that realise them.

The view has the reduction (input) axis last; `layers` defines it per op (a Conv weight
[O, I/g, kh, kw] is viewed as [O, I/g*kh*kw], columns in the weight's own (c, kh, kw)
order). Masks are boolean arrays of the view's shape, True where a weight is kept.

Patterns (pipeline text -> meaning):
- `unstructured`: any element; a layer at ratio r gets exactly floor(r * size) zeros.
- `block(RxC)`: the view is tiled from (0, 0) by blocks of R outputs x C inputs; a block is
  zero or kept whole; exactly floor(r * blocks) blocks are zeroed. R must divide the
  outputs and C the inputs (no partial blocks): a layer where they do not is skipped, with
  the reason in the report.
- `N:M`: every run of M consecutive inputs of one output row keeps its N highest-scored
  weights (M - N zeros), so the sparsity is 1 - N/M whatever the ratio; M must divide the
  inputs, else the layer is skipped.

A selection unit is one element, one block, or (for N:M) one group; units are ranked by
the sum of their elements' scores, ties by position (a stable sort), so the same weights
and data always give the same mask.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Pattern:
    kind: str  # "unstructured" | "block" | "nm"
    rows: int = 1  # block: R (outputs); n:m: 1
    cols: int = 1  # block: C (inputs); n:m: M
    keep: int = 0  # n:m: N, the weights kept per group

    @property
    def text(self) -> str:
        """The pattern as written in the pipeline and in the model metadata."""
        if self.kind == "block":
            return f"block({self.rows}x{self.cols})"
        if self.kind == "nm":
            return f"{self.keep}:{self.cols}"
        return "unstructured"

    @property
    def fixed_ratio(self) -> float | None:
        """The sparsity the pattern itself fixes (N:M), else None (the ratio decides)."""
        return 1.0 - self.keep / self.cols if self.kind == "nm" else None

    def unfit_reason(self, shape: tuple[int, int]) -> str | None:
        """Why a view of `shape` cannot take this pattern, or None when it can."""
        out, inp = shape
        if self.kind == "block" and (out % self.rows or inp % self.cols):
            return (f"block({self.rows}x{self.cols}) does not tile the [{out}, {inp}] weight "
                    "view (no partial blocks)")
        if self.kind == "nm" and inp % self.cols:
            return f"{self.text}: {inp} inputs are not a multiple of {self.cols}"
        return None


_BLOCK = re.compile(r"block\(\s*(\d+)\s*[x×]\s*(\d+)\s*\)")
_NM = re.compile(r"(\d+)\s*:\s*(\d+)")


def parse_pattern(text: str) -> Pattern:
    """`unstructured`, `block(RxC)` or `N:M`; ValueError with the accepted forms otherwise."""
    t = str(text).strip().lower()
    if t == "unstructured":
        return Pattern("unstructured")
    if m := _BLOCK.fullmatch(t):
        rows, cols = int(m.group(1)), int(m.group(2))
        if rows >= 1 and cols >= 1 and rows * cols > 1:
            return Pattern("block", rows, cols)
    if m := _NM.fullmatch(t):
        n, size = int(m.group(1)), int(m.group(2))
        if 1 <= n < size:
            return Pattern("nm", 1, size, n)
    raise ValueError(f"pattern={text!r}: use unstructured, block(RxC) with R*C > 1 "
                     "(e.g. block(1x8)) or N:M with 1 <= N < M (e.g. 2:4)")


def unit_scores(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """Scores summed over each selection unit: [out/R, in/C] for blocks and N:M groups."""
    if pattern.kind == "unstructured":
        return scores
    out, inp = scores.shape
    r, c = pattern.rows, pattern.cols
    return scores.reshape(out // r, r, inp // c, c).sum(axis=(1, 3))


def expand_units(unit_mask: np.ndarray, pattern: Pattern) -> np.ndarray:
    """A per-unit mask spread back to the view's elements."""
    if pattern.kind == "unstructured":
        return unit_mask
    return np.repeat(np.repeat(unit_mask, pattern.rows, axis=0), pattern.cols, axis=1)


def lowest(scores: np.ndarray, count: int) -> np.ndarray:
    """Boolean mask (scores' shape), False at the `count` lowest scores, ties by position."""
    keep = np.ones(scores.size, dtype=bool)
    keep[np.argsort(scores, axis=None, kind="stable")[:count]] = False
    return keep.reshape(scores.shape)


def zero_count(units: int, ratio: float) -> int:
    """Units to zero for `ratio` (floor, so never more than asked)."""
    return min(units, math.floor(ratio * units + 1e-9))


def nm_mask(scores: np.ndarray, pattern: Pattern) -> np.ndarray:
    """N:M mask: in each group of M consecutive inputs of a row, the N best kept."""
    out, inp = scores.shape
    m, n = pattern.cols, pattern.keep
    groups = scores.reshape(out, inp // m, m)
    order = np.argsort(groups, axis=-1, kind="stable")
    keep = np.ones_like(groups, dtype=bool)
    np.put_along_axis(keep, order[..., : m - n], False, axis=-1)
    return keep.reshape(out, inp)


def layer_mask(scores: np.ndarray, pattern: Pattern, ratio: float) -> np.ndarray:
    """The mask of one layer on its own: N:M groups, or floor(ratio * units) lowest units."""
    if pattern.kind == "nm":
        return nm_mask(scores, pattern)
    units = unit_scores(scores, pattern)
    return expand_units(lowest(units, zero_count(units.size, ratio)), pattern)


def global_masks(scores: dict[str, np.ndarray], pattern: Pattern, ratio: float
                 ) -> dict[str, np.ndarray]:
    """Masks of several layers ranked together: the floor(ratio * all units) lowest units
    over all the layers are zeroed (unstructured or block patterns)."""
    if pattern.kind == "nm":
        raise ValueError("N:M fixes the sparsity of every group: a global ranking does not apply")
    keys = list(scores)
    units = [unit_scores(scores[k], pattern) for k in keys]
    flat = np.concatenate([u.ravel() for u in units]) if units else np.zeros(0)
    keep = lowest(flat, zero_count(flat.size, ratio))
    masks, start = {}, 0
    for key, u in zip(keys, units):
        masks[key] = expand_units(keep[start:start + u.size].reshape(u.shape), pattern)
        start += u.size
    return masks
