"""Fold weight-packing kernels applied to constants, in numpy.

After ``SplitLayoutRewritePreproc`` every packed weight is produced at run time by a
``*_weight_prepack`` PrimFunc: one loop nest copying ``W[v...]`` to
``W_packed[f(v...)]``. Relax ``FoldConstant`` can evaluate those calls, but it compiles
each of them with LLVM first (about a second per distinct weight shape: 20 s for
mobilenet_v2). This pass evaluates the index map ``f`` directly with numpy instead and
replaces the call with the packed constant; a call it cannot read is left for
``FoldConstant``.
"""

from __future__ import annotations

import logging

import numpy as np
import tvm
from tvm import ir, relax, s_tir, tirx

from .sched_common import child_blocks, loops_bind_iters

logger = logging.getLogger(__name__)

_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


_BINARY = {
    "Add": np.add,
    "Sub": np.subtract,
    "Mul": np.multiply,
    "FloorDiv": np.floor_divide,
    "FloorMod": np.mod,
    "LT": np.less,
    "LE": np.less_equal,
    "GT": np.greater,
    "GE": np.greater_equal,
    "EQ": np.equal,
    "NE": np.not_equal,
    "And": np.logical_and,
    "Or": np.logical_or,
}


def _eval_index(expr, env: dict):
    """Evaluate an integer/boolean TIR expression over numpy index grids (None: unsupported)."""
    if isinstance(expr, tirx.IntImm):
        return int(expr.value)
    if isinstance(expr, tirx.Var):
        for var, value in env.items():
            if var.same_as(expr):
                return value
        return None
    if isinstance(expr, tirx.Cast):
        return _eval_index(expr.value, env)
    fn = _BINARY.get(type(expr).__name__)
    if fn is not None and hasattr(expr, "a") and hasattr(expr, "b"):
        a, b = _eval_index(expr.a, env), _eval_index(expr.b, env)
        if a is None or b is None:
            return None
        return fn(a, b)
    return None


def _copy_source(value):
    """(condition or None, load) of ``load`` or ``if_then_else(cond, load, 0)``."""
    if isinstance(value, ir.expr.TensorLoad):
        return None, value
    if isinstance(value, ir.expr.Call) and str(value.op.name).endswith("if_then_else"):
        cond, then, other = value.args
        is_zero = isinstance(other, tirx.FloatImm) and float(other.value) == 0.0
        if isinstance(then, ir.expr.TensorLoad) and is_zero:
            return cond, then
    return None, None


def pack_with_numpy(func: tirx.PrimFunc, weight: np.ndarray) -> np.ndarray | None:
    """Run a one-block copy kernel ``out[f(v)] = in[v]`` on ``weight`` (None if not that).

    The copy may be guarded (``if_then_else(v < n, in[v], 0)``), as the zero padding that
    ``pad_einsum`` adds in front of a packed weight.
    """
    try:
        sch = s_tir.Schedule(func)
        blocks = child_blocks(sch)
        if len(blocks) != 1 or not loops_bind_iters(sch, blocks[0]):
            return None
        stmt = sch.get(blocks[0])
    except Exception:  # noqa: BLE001 - not a schedulable copy kernel
        return None
    store = stmt.body
    if not isinstance(store, tirx.BufferStore):
        return None
    cond, load = _copy_source(store.value)
    if load is None:
        return None
    ivars = [iv.var for iv in stmt.iter_vars]
    if len(load.indices) != len(ivars) or not all(
        idx.same_as(v) for idx, v in zip(load.indices, ivars)
    ):
        return None
    extents = tuple(int(iv.dom.extent) for iv in stmt.iter_vars)
    if len(extents) != weight.ndim:
        return None
    grids = np.indices(extents, dtype=np.int64)
    env = dict(zip(ivars, grids))
    mask = np.ones(extents, dtype=bool)
    if cond is not None:
        mask = _eval_index(cond, env)
        if mask is None:
            return None
        mask = np.broadcast_to(np.asarray(mask, dtype=bool), extents)
    elif extents != tuple(weight.shape):
        return None
    inside = np.all([g < n for g, n in zip(grids, weight.shape)], axis=0)
    if np.any(mask & ~inside):
        return None  # the guard would read outside the weight: not a padding copy
    out_index = [_eval_index(e, env) for e in store.indices]
    if any(i is None for i in out_index):
        return None
    values = np.zeros(extents, dtype=weight.dtype)
    values[mask] = weight[tuple(g[mask] for g in grids)]
    out_shape = tuple(int(s) for s in func.params[-1].shape)
    out = np.zeros(out_shape, dtype=weight.dtype)
    out[tuple(np.broadcast_to(i, extents) for i in out_index)] = values
    return out


@relax.expr_functor.mutator
class _PackFolder(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.mod_ = mod
        self.folded = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if not call.op.same_as(_CALL_TIR) or not isinstance(call.args[0], ir.GlobalVar):
            return call
        func = self.mod_[call.args[0]]
        args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
        if not isinstance(func, tirx.PrimFunc) or len(args) != 1 or len(func.params) != 2:
            return call
        if not isinstance(args[0], ir.expr.Constant):
            return call
        packed = pack_with_numpy(func, args[0].value.numpy())
        if packed is None:
            return call
        self.folded += 1
        return relax.const(packed)


def fold_weight_prepack(mod: tvm.IRModule) -> tvm.IRModule:
    """Replace ``call_tir(copy_kernel, (constant,))`` by the packed constant."""
    folder = _PackFolder(mod)
    for gvar, func in mod.functions_items():
        if isinstance(func, relax.Function):
            folder.builder_.update_func(gvar, folder.visit_expr(func))
    logger.debug("weight packing folded in numpy: %d calls", folder.folded)
    return folder.builder_.get()
