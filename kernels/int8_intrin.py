"""INT8 dot-product tensor intrinsics for the int8 schedule rule (``rule_int8``).

One intrinsic computes ``C[i] += sum_k A[k] * B[i, k]`` for ``i < lanes`` and ``k < 4``
(u8 activations x s8 weights, int32 accumulation): four consecutive activations are
broadcast to every lane, and each lane reads its own four weights, which is why the
weights are packed to ``[.., lanes, 4]`` ahead of time.

- x86 AVX-512 VNNI: ``vpdpbusd`` (16 lanes, u8 activations). TVM ships this intrinsic
  in ``tvm.s_tir.tensor_intrin.x86``, but with the signature of older LLVMs
  (``<16 x i32>`` operands); the LLVM bundled with TVM 0.27 declares
  ``llvm.x86.avx512.vpdpbusd.512`` on ``<64 x i8>``, so it is written here again.
- AArch64 with the dot-product extension (ARMv8.2+dotprod: Cortex-A55/A76 and later):
  ``sdot`` (4 lanes, s8 x s8), TVM's own description and implementation. Its
  activations are signed, so ``backends.tvm.qdq`` shifts u8 activations to s8 (-128,
  zero point -128) for these targets (``DotIntrinsic.data_dtype``). Importing TVM's
  ``arm_cpu`` / ``hexagon`` intrinsics loads its whole ``tensor_intrin`` package (~36 s,
  once per process): only compiles for those targets pay it.
- Hexagon HVX (128-byte vectors, an ``llvm`` target with a ``hexagon`` triple):
  ``vrmpy`` (32 lanes, u8 x s8), TVM's own description and implementation.

``intrinsic_for(target)`` names the one the target can run, or None (no dot-product
instruction: the rule declines and the plain widening-multiply schedule runs instead).
"""

from __future__ import annotations

from dataclasses import dataclass

import tvm
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T


@dataclass(frozen=True)
class DotIntrinsic:
    name: str  # registered TensorIntrin name
    lanes: int  # int32 accumulators per instruction (the packed weight's inner N)
    reduce: int  # int8 products summed per lane (the packed weight's inner K)
    instruction: str  # what the assembly shows
    data_dtype: str  # the activations' type the instruction multiplies


# The description is TVM's (tensor_intrin.x86); importing that module would load the whole
# tensor_intrin package, CUDA included: ~36 s per process, so it is written here.
@T.prim_func(s_tir=True)
def _dot_16x4_desc(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for i in T.serial(0, 16):
            for k in T.serial(0, 4):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(a_i32, 16), dtype="int8x64"),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


VNNI_16X4 = DotIntrinsic("onnxforge_vnni_u8s8_16x4", 16, 4, "vpdpbusd", "uint8")
SDOT_4X4 = DotIntrinsic("onnxforge_sdot_s8s8_4x4", 4, 4, "sdot", "int8")
VRMPY_32X4 = DotIntrinsic("onnxforge_vrmpy_u8s8_32x4", 32, 4, "vrmpy", "uint8")

_REGISTERED: set[str] = set()


def _register(intrinsic: DotIntrinsic, desc, impl) -> DotIntrinsic:
    if intrinsic.name not in _REGISTERED:
        try:
            TensorIntrin.register(intrinsic.name, desc, impl)
        except (ValueError, tvm.error.TVMError):  # already registered in this process
            pass
        _REGISTERED.add(intrinsic.name)
    return intrinsic


def _has(feature: str, target: tvm.target.Target) -> bool:
    try:
        return bool(tvm.target.codegen.target_has_features(feature, target))
    except Exception:  # noqa: BLE001 - targets LLVM does not know answer "no"
        return False


def intrinsic_for(target: tvm.target.Target) -> DotIntrinsic | None:
    """The int8 dot-product intrinsic the target's CPU executes, or None."""
    if target.kind.name != "llvm":
        return None
    if _has("avx512vnni", target) and _has("avx512bw", target):
        return _register(VNNI_16X4, _dot_16x4_desc, _dot_16x4_vnni)
    if _has("dotprod", target) and "aarch64" in str(target.attrs.get("mtriple", "")):
        from tvm.s_tir.tensor_intrin.arm_cpu import get_dotprod_intrin

        return _register(SDOT_4X4, *get_dotprod_intrin("int8", "int32"))
    if str(target.attrs.get("mtriple", "")).startswith("hexagon") and _has(
            "hvx-length128b", target):
        from tvm.s_tir.tensor_intrin.hexagon import generate_dot_product_32x4_u8i8i32

        return _register(VRMPY_32X4, *generate_dot_product_32x4_u8i8i32())
    return None
