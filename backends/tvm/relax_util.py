"""Small helpers the Relax rewrites of this backend share (qdq, layout, sparse,
conv_transpose)."""

from __future__ import annotations

import tvm
from tvm import relax


def rewrite_functions(mutator: relax.PyExprMutator, mod: tvm.IRModule) -> tvm.IRModule:
    """Every Relax function of ``mod`` through ``mutator``; the rewritten module."""
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            mutator.builder_.update_func(gvar, mutator.visit_expr(func))
    return mutator.builder_.get()


def static_shape(expr) -> list[int] | None:
    """The dims of a Relax tensor expression with a static shape, else None."""
    try:
        return [int(d) for d in expr.ty.shape.values]
    except (AttributeError, TypeError):
        return None
