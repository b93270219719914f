"""`fuse-pad`: fold an explicit zero Pad into the following Conv's `pads`.

Rewrite rule:

- `Pad(x, pads=p, mode=constant, value=0) -> Conv(_, W, b)`  =>  `Conv(x, W, b)` with the
  Conv's spatial pads increased by p's spatial part.

Preconditions: mode is `constant` and the pad value is absent or 0 (the Conv's
own padding is zeros); `pads` (attribute before opset 11, constant input after,
with an optional constant `axes` input from opset 18) are non-negative and zero on
the batch and channel axes; the Pad output has exactly one consumer, the Conv's
data input, and is not a graph output; the Conv's `auto_pad` is NOTSET or VALID
(SAME_* padding depends on the input size and cannot absorb extra padding).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ..base import register
from ..graph import attr, const, is_op, opset, remove_nodes, set_attr, sole_consumer
from .common import RewritePass, rank

logger = logging.getLogger(__name__)


def _pad_amounts(model: ir.Model, pad: ir.Node, r: int) -> np.ndarray | None:
    """Pads as an array [begin_0..begin_{r-1}, end_0..end_{r-1}], or None if not usable."""
    if (attr(pad, "mode", "constant") or "constant") not in ("constant", b"constant"):
        return None
    if opset(model) < 11:
        pads = attr(pad, "pads")
        value = float(attr(pad, "value", 0.0))
        if pads is None or value != 0.0:
            return None
        return np.asarray(pads, dtype=np.int64)
    if len(pad.inputs) < 2:
        return None
    pads = const(pad.inputs[1])
    if pads is None:
        return None
    pads = pads.astype(np.int64).reshape(-1)
    if len(pad.inputs) > 2 and pad.inputs[2] is not None:
        value = const(pad.inputs[2])
        if value is None or np.any(value != 0):
            return None
    if len(pad.inputs) > 3 and pad.inputs[3] is not None:
        axes = const(pad.inputs[3])
        if axes is None:
            return None
        axes = [int(a) % r for a in axes.reshape(-1)]
        full = np.zeros(2 * r, np.int64)
        k = len(axes)
        if pads.size != 2 * k:
            return None
        for i, a in enumerate(axes):
            full[a] = pads[i]
            full[r + a] = pads[k + i]
        return full
    return pads


def fuse_pad(model: ir.Model, conv: ir.Node) -> bool:
    """Absorb the zero Pad producing `conv`'s input; False when refused."""
    if not is_op(conv, "Conv"):
        return False
    x = conv.inputs[0]
    pad = x.producer() if x is not None else None
    if not is_op(pad, "Pad") or sole_consumer(x) is not conv:
        return False
    w = conv.inputs[1]
    r = rank(w) or rank(x) or rank(pad.inputs[0])
    if r is None:
        return False
    auto_pad = attr(conv, "auto_pad", "NOTSET") or "NOTSET"
    if isinstance(auto_pad, bytes):
        auto_pad = auto_pad.decode()
    if auto_pad not in ("NOTSET", "VALID"):
        return False
    amounts = _pad_amounts(model, pad, r)
    if amounts is None or amounts.size != 2 * r or np.any(amounts < 0):
        return False
    if amounts[0] or amounts[1] or amounts[r] or amounts[r + 1]:
        return False  # batch or channel padding changes the Conv's input channels
    spatial = r - 2
    old = attr(conv, "pads") if auto_pad == "NOTSET" else None
    old = list(old) if old else [0] * (2 * spatial)
    new = [old[i] + int(amounts[2 + i]) for i in range(spatial)] + [
        old[spatial + i] + int(amounts[r + 2 + i]) for i in range(spatial)
    ]
    set_attr(conv, "pads", new)
    if "auto_pad" in conv.attributes:
        set_attr(conv, "auto_pad", "NOTSET")
    conv.replace_input_with(0, pad.inputs[0])
    remove_nodes([pad])
    return True


@register
class FusePadPass(RewritePass):
    """Fold zero constant Pad nodes into the following Conv."""

    name = "fuse-pad"
    summary = "fold a zero, spatial-only constant Pad into the following Conv's pads"
    stat = "pads_fused"
    rule = staticmethod(fuse_pad)
