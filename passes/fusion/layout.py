"""`fuse-transpose` and `fuse-reshape`: cancel or merge consecutive layout ops.

Rewrite rules:

- `Transpose(perm=p1) -> Transpose(perm=p2)`  =>  `Transpose(perm=p1[p2])`, and nothing at
  all when that composition is the identity; a single Transpose whose perm is the
  identity is removed.
- `Reshape(x, s1) -> Reshape(_, s2)`  =>  `Reshape(x, s2)`; a `Flatten` followed by a
  Reshape is treated as the first Reshape.

Preconditions: the intermediate value (output of the first op) has exactly one
consumer and is not a graph output; a missing `perm` (reverse the axes) needs the
rank from shape inference; `s2` is a constant with no 0 entry unless the second
Reshape has `allowzero=1` (0 means "copy that dimension of the intermediate
tensor", which would change meaning once the intermediate is gone); an identity
Transpose whose output is a graph output and whose input is a graph input is kept.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from ..base import register
from ..graph import (
    attr,
    bypass,
    can_take_output_name,
    const,
    is_op,
    remove_nodes,
    set_attr,
    sole_consumer,
)
from .common import RewritePass, rank

logger = logging.getLogger(__name__)


def _perm(node: ir.Node) -> list[int] | None:
    perm = attr(node, "perm")
    if perm is not None:
        return [int(p) for p in perm]
    r = rank(node.inputs[0])
    return list(range(r - 1, -1, -1)) if r is not None else None


def fuse_transpose(model: ir.Model, node: ir.Node) -> bool:
    """Merge `node` (a Transpose) with the Transpose producing its input, or drop it."""
    if not is_op(node, "Transpose"):
        return False
    p2 = _perm(node)
    if p2 is None:
        return False
    x = node.inputs[0]
    first = x.producer() if x is not None else None
    if is_op(first, "Transpose") and sole_consumer(x) is node:
        p1 = _perm(first)
        if p1 is None or len(p1) != len(p2):
            return False
        combined = [p1[i] for i in p2]
        if combined == sorted(combined):
            return _drop(node, first.inputs[0], [node, first])
        node.replace_input_with(0, first.inputs[0])
        set_attr(node, "perm", combined)
        remove_nodes([first])
        return True
    if p2 == list(range(len(p2))):
        return _drop(node, x, [node])
    return False


def _drop(node: ir.Node, source: ir.Value, nodes: list[ir.Node]) -> bool:
    """Remove `nodes` (ending in `node`) so that `node`'s readers read `source`."""
    out = node.outputs[0]
    output = out.is_graph_output()
    if output and not can_take_output_name(source, node.graph):
        return False
    bypass(out, source, rename=False, annotate=output)
    remove_nodes(nodes)
    return True


def fuse_reshape(model: ir.Model, node: ir.Node) -> bool:
    """Make a Reshape read the input of the Reshape/Flatten before it."""
    if not is_op(node, "Reshape") or len(node.inputs) < 2:
        return False
    x = node.inputs[0]
    first = x.producer() if x is not None else None
    if not is_op(first, "Reshape", "Flatten") or sole_consumer(x) is not node:
        return False
    shape = const(node.inputs[1])
    if shape is None or shape.dtype != np.int64:
        return False
    if not int(attr(node, "allowzero", 0)) and np.any(shape == 0):
        return False
    node.replace_input_with(0, first.inputs[0])
    remove_nodes([first])
    return True


@register
class FuseTransposePass(RewritePass):
    """Cancel or merge consecutive Transpose nodes."""

    name = "fuse-transpose"
    summary = "merge Transpose pairs into one (or none) and drop identity Transposes"
    stat = "transposes_fused"
    rule = staticmethod(fuse_transpose)


@register
class FuseReshapePass(RewritePass):
    """Merge consecutive Reshape (or Flatten -> Reshape) nodes."""

    name = "fuse-reshape"
    summary = "Reshape(Reshape(x)) / Reshape(Flatten(x)) -> Reshape(x)"
    stat = "reshapes_fused"
    rule = staticmethod(fuse_reshape)
