"""256-entry byte-table lookups as vector permutes: AVX-512 VBMI ``vpermi2b`` on x86,
NEON ``tbl``/``tbx`` on AArch64.

``backends/tvm/lookup_tables`` turns a quantized activation between two int8 tensors
(SiLU, Sigmoid, Tanh, GELU) into a 256-entry byte table, fused into the producing
kernel's epilogue. Written as a load ``table[int32(x) + 128]``, TVM vectorizes the
epilogue, but a vector load whose index is not a ramp is a gather and LLVM does it one
lane at a time: a ``vpextrb``/``vpinsrb`` pair per byte, 240 of them in efficientnet_b0's
16->96 1x1 conv.

Both instruction sets look bytes up in tables held in vector registers:

- x86 with AVX-512 VBMI (Ice Lake, Zen 4, ...): ``vpermi2b`` looks up 64 bytes in a
  128-byte table (two zmm registers) with the low 7 bits of each index; two of them and
  a blend on the index's top bit cover 256 entries.
- AArch64 (NEON is part of the architecture): ``tbl`` with four registers looks up 16
  bytes in a 64-byte table (0 for an index past it), and ``tbx`` fills in, from the
  next 64 bytes, the lanes whose index minus 64 falls in them; one ``tbl`` and three
  ``tbx`` cover 256 entries.

TIR has no Python mutator to rewrite a gather after vectorization, so the lookup is an
op of its own: ``byte_lookup(index, table, form)`` calls the TIR op of that form with the
index and the table's 256 bytes as 32 int64 immediates. The ops are registered here as
pure and vectorizable, so ``VectorizeLoop`` gives them a vector of indices (the
immediates broadcast), and their LLVM lowering (``LowerIntrin``) builds the permutes:
indices truncated to bytes (an index in [0, 256) is its low byte), spread over one
register's lanes, the table as constant vectors, the instructions above, the lanes
wanted. Wider vectors go one register at a time; a scalar call does one vector lookup.
The result is the table's bytes, exactly.

``lookup_form(target)`` says which form a target gets ("loads": the table read by loads).
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import tirx

from .cpu_target import cpu_info

TABLE_SIZE = 256
OPS = {"vbmi": "onnxforge.byte_lookup_vbmi", "neon": "onnxforge.byte_lookup_neon"}
_PURE = 1  # TVM's CallEffectKind kPure


def lookup_form(target: tvm.target.Target) -> str | None:
    """How ``target`` looks a byte table up: "vbmi" (x86 with AVX-512 VBMI and BW),
    "neon" (AArch64), "loads" (other x86: a load per byte), None (no tables: Hexagon's
    LLVM fails on the loads, found by a test; GPUs keep their float chain)."""
    if target.kind.name != "llvm":
        return None
    arch = cpu_info(target).arch
    if arch == "aarch64":
        return "neon"
    if arch not in ("x86_64", "x86"):
        return None
    has = tvm.target.codegen.target_has_features
    try:
        vbmi = bool(has("avx512vbmi", target)) and bool(has("avx512bw", target))
    except Exception:  # noqa: BLE001 - a target LLVM does not know
        vbmi = False
    return "vbmi" if vbmi else "loads"


def byte_lookup(index: tirx.PrimExpr, table: np.ndarray, form: str) -> tirx.PrimExpr:
    """``table[index]`` for a 256-entry int8/uint8 ``table`` and an int32 ``index`` in
    [0, 256), as the vectorizable op of ``form`` (for a TE compute)."""
    if table.shape != (TABLE_SIZE,) or table.dtype not in (np.int8, np.uint8):
        raise ValueError(f"a byte lookup needs 256 int8/uint8 entries, not {table.shape} "
                         f"{table.dtype}")
    words = np.ascontiguousarray(table).view(np.int64)
    return tirx.call_intrin(str(table.dtype), OPS[form], index,
                            *[tirx.IntImm("int64", int(w)) for w in words])


def _constant_vectors(call, dtype: str, width: int) -> list:
    """The table the call carries, as constant vectors of ``width`` bytes."""
    words = [int((a.value if isinstance(a, tirx.Broadcast) else a).value)
             for a in call.args[1:]]
    table = np.array(words, dtype=np.int64).view(np.uint8).astype(dtype)
    return [tirx.Shuffle([tirx.IntImm(dtype, int(b)) for b in table[i:i + width]],
                         list(range(width))) for i in range(0, TABLE_SIZE, width)]


def _spread(index: tirx.PrimExpr, lanes: int, dtype: str, width: int) -> tirx.PrimExpr:
    """``lanes`` int32 indices as ``width`` bytes (the first ``lanes`` are the ones)."""
    if lanes == 1:
        return tirx.Broadcast(tirx.Cast(dtype, index), width)
    copies = -(-width // lanes)  # a Shuffle picks among its inputs' lanes only
    return tirx.Shuffle([tirx.Cast(f"{dtype}x{lanes}", index)] * copies, list(range(width)))


def _vbmi(index, tables, dtype):
    """64 lookups: two vpermi2b (low / high 128 entries) and a blend on the top bit."""
    vector = f"{dtype}x64"
    permute = "llvm.x86.avx512.vpermi2var.qi.512"  # (table_a, index, table_b)
    low = tirx.call_llvm_pure_intrin(vector, permute, tables[0], index, tables[1])
    high = tirx.call_llvm_pure_intrin(vector, permute, tables[2], index, tables[3])
    negative = tirx.LT(index, tirx.Broadcast(tirx.IntImm("int8", 0), 64))
    return tirx.Select(negative, high, low)


def _neon(index, tables, dtype):
    """16 lookups: tbl over entries 0-63, then tbx over each next 64 with the index
    moved down by 64 (unsigned, so it wraps past the table and leaves the lane)."""
    vector = f"{dtype}x16"
    result = tirx.call_llvm_pure_intrin(vector, "llvm.aarch64.neon.tbl4", *tables[0:4], index)
    for part in range(1, 4):
        index = tirx.Sub(index, tirx.Broadcast(tirx.IntImm("uint8", 64), 16))
        result = tirx.call_llvm_pure_intrin(vector, "llvm.aarch64.neon.tbx4", result,
                                            *tables[4 * part:4 * part + 4], index)
    return result


_FORMS = {"vbmi": (64, "int8", _vbmi), "neon": (16, "uint8", _neon)}


def _lowering(form: str):
    width, index_dtype, lookup = _FORMS[form]

    def lower(call) -> tirx.PrimExpr:
        index = call.args[0]
        lanes = int(index.ty.dtype.lanes)
        dtype = str(call.ty.dtype).split("x")[0]
        tables = _constant_vectors(call, dtype, width)
        parts = []
        for start in range(0, lanes, width):
            size = min(width, lanes - start)
            part = index if size == lanes else tirx.Shuffle([index], list(range(start,
                                                                                start + size)))
            chosen = lookup(_spread(part, size, index_dtype, width), tables, dtype)
            parts.append(chosen if size == width else tirx.Shuffle([chosen], list(range(size))))
        return parts[0] if len(parts) == 1 else tirx.Shuffle(parts, list(range(lanes)))

    return lower


def _registered(op: str) -> bool:
    try:
        return tvm.ir.Op.get(op).get_attr("TVectorizable") is not None
    except Exception:  # noqa: BLE001 - TVM raises when no such op exists yet
        return False


# Registered on import (once per process): an op must exist before a module calling it is
# built, also in the tuning workers, which import this module.
for _form, _op in OPS.items():
    if not _registered(_op):
        tvm.ir.register_op_attr(_op, "TCallEffectKind", _PURE)
        tvm.ir.register_op_attr(_op, "TVectorizable", True)
        tvm.tirx.op.register_intrin_lowering(_op, "llvm", f=_lowering(_form), level=99)
