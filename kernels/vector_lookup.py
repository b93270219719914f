"""256-entry byte-table lookups as vector permutes (AVX-512 VBMI ``vpermi2b``).

``backends/tvm/lookup_tables`` turns a quantized activation between two int8 tensors
(SiLU, Sigmoid, Tanh, GELU) into a 256-entry byte table, fused into the producing
kernel's epilogue. Written as a load ``table[int32(x) + 128]``, TVM vectorizes the
epilogue, but a vector load whose index is not a ramp is a gather and LLVM does it one
lane at a time: a ``vpextrb``/``vpinsrb`` pair per byte, 240 of them in efficientnet_b0's
16->96 1x1 conv.

On a CPU with AVX-512 VBMI (Ice Lake, Zen 4, ...) a 128-byte table fits in two zmm
registers and ``vpermi2b`` looks up 64 bytes in one instruction, with the low 7 bits of
each index; two of them and a blend on the index's top bit cover 256 entries. TIR has
no Python mutator to rewrite the gather after vectorization, so the lookup is an
intrinsic of its own instead: ``byte_lookup(index, table)`` is a call of the TIR op
``onnxforge.byte_lookup`` with the index and the table's 256 bytes as 32 int64
immediates. The op is registered here as pure and vectorizable, so ``VectorizeLoop``
gives it a vector of indices (the immediates broadcast), and its LLVM lowering
(``LowerIntrin``) builds the permutes: indices truncated to bytes (an index in [0, 256)
is its low byte) and spread over 64 lanes, the table as four 64-byte constant vectors,
two ``vpermi2b``, a select, the lanes wanted. Wider vectors go 64 lanes at a time; a
scalar call does one vector lookup. The result is the table's bytes, exactly.

Use it only where ``vector_lookup_available(target)``: the lowering emits VBMI code.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx

OP = "onnxforge.byte_lookup"
_PERMUTE = "llvm.x86.avx512.vpermi2var.qi.512"  # vpermi2b zmm: (table_a, index, table_b)
_ZMM = 64  # bytes in one zmm register
TABLE_SIZE = 256
_PURE = 1  # TVM's CallEffectKind kPure


def vector_lookup_available(target: tvm.target.Target) -> bool:
    """The target is LLVM x86 with AVX-512 VBMI and BW."""
    if target.kind.name != "llvm":
        return False
    has = tvm.target.codegen.target_has_features
    try:
        return bool(has("avx512vbmi", target)) and bool(has("avx512bw", target))
    except Exception:  # noqa: BLE001 - a target LLVM does not know
        return False


def byte_lookup(index: tirx.PrimExpr, table: np.ndarray) -> tirx.PrimExpr:
    """``table[index]`` for a 256-entry int8/uint8 ``table`` and an int32 ``index`` in
    [0, 256), as the vectorizable op (for a TE compute)."""
    if table.shape != (TABLE_SIZE,) or table.dtype not in (np.int8, np.uint8):
        raise ValueError(f"a byte lookup needs 256 int8/uint8 entries, not {table.shape} "
                         f"{table.dtype}")
    words = np.ascontiguousarray(table).view(np.int64)
    return tirx.call_intrin(str(table.dtype), OP, index,
                            *[tirx.IntImm("int64", int(w)) for w in words])


def _table(call) -> np.ndarray:
    words = []
    for arg in call.args[1:]:
        arg = arg.value if isinstance(arg, tirx.Broadcast) else arg
        words.append(int(arg.value))
    return np.array(words, dtype=np.int64).view(np.uint8)


def _lookup64(index: tirx.PrimExpr, lanes: int, quarters: list, dtype: str) -> tirx.PrimExpr:
    """Lanes ``[0, lanes)`` (at most 64) of ``index`` looked up."""
    vector = f"{dtype}x{_ZMM}"
    if lanes == 1:
        spread = tirx.Broadcast(tirx.Cast("int8", index), _ZMM)
    else:
        copies = -(-_ZMM // lanes)  # a Shuffle picks among its inputs' lanes only
        spread = tirx.Shuffle([tirx.Cast(f"int8x{lanes}", index)] * copies, list(range(_ZMM)))
    low = tirx.call_llvm_pure_intrin(vector, _PERMUTE, quarters[0], spread, quarters[1])
    high = tirx.call_llvm_pure_intrin(vector, _PERMUTE, quarters[2], spread, quarters[3])
    negative = tirx.LT(spread, tirx.Broadcast(tirx.IntImm("int8", 0), _ZMM))
    chosen = tirx.Select(negative, high, low)
    return chosen if lanes == _ZMM else tirx.Shuffle([chosen], list(range(lanes)))


def _lower(call) -> tirx.PrimExpr:
    index = call.args[0]
    lanes = int(index.ty.dtype.lanes)
    dtype = str(call.ty.dtype).split("x")[0]
    table = _table(call).astype(dtype)
    quarters = [tirx.Shuffle([tirx.IntImm(dtype, int(b)) for b in table[q:q + _ZMM]],
                             list(range(_ZMM))) for q in range(0, TABLE_SIZE, _ZMM)]
    if lanes <= _ZMM:
        return _lookup64(index, lanes, quarters, dtype)
    parts = []
    for start in range(0, lanes, _ZMM):
        size = min(_ZMM, lanes - start)
        part = tirx.Shuffle([index], list(range(start, start + size)))
        parts.append(_lookup64(part, size, quarters, dtype))
    return tirx.Shuffle(parts, list(range(lanes)))


def _registered() -> bool:
    try:
        return tvm.ir.Op.get(OP).get_attr("TVectorizable") is not None
    except Exception:  # noqa: BLE001 - TVM raises when no such op exists yet
        return False


# Registered on import (once per process): the op must exist before a module calling it
# is built, also in the tuning workers, which import this package.
if not _registered():
    tvm.ir.register_op_attr(OP, "TCallEffectKind", _PURE)
    tvm.ir.register_op_attr(OP, "TVectorizable", True)
    tvm.tirx.op.register_intrin_lowering(OP, "llvm", f=_lower, level=99)
