"""What the CPU schedule rules need to know about an LLVM target.

The rules never hard-code a vector width or a core count: they ask `cpu_info(target)`,
which reads the target's ``mtriple`` / ``mcpu`` / ``mattr`` / ``vector-width`` /
``num-cores`` attributes. TVM's own ``llvm_get_vector_width`` answers 512 for every
x86_64 target (even ``haswell``), so x86 widths come from the CPU name and features here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import tvm

# x86 CPU names (LLVM spelling) whose vector unit is AVX-512.
_AVX512_CPUS = {
    "skylake-avx512",
    "cascadelake",
    "cooperlake",
    "cannonlake",
    "icelake-client",
    "icelake-server",
    "tigerlake",
    "rocketlake",
    "sapphirerapids",
    "emeraldrapids",
    "graniterapids",
    "graniterapids-d",
    "diamondrapids",
    "knl",
    "knm",
    "znver4",
    "znver5",
    "x86-64-v4",
}
# x86 CPU names whose widest float vector unit is AVX/AVX2 (256 bit).
_AVX2_CPUS = {
    "sandybridge",
    "ivybridge",
    "haswell",
    "broadwell",
    "skylake",
    "alderlake",
    "raptorlake",
    "meteorlake",
    "arrowlake",
    "arrowlake-s",
    "lunarlake",
    "gracemont",
    "znver1",
    "znver2",
    "znver3",
    "bdver1",
    "bdver2",
    "bdver3",
    "bdver4",
    "btver2",
    "x86-64-v3",
}


@dataclass(frozen=True)
class CpuInfo:
    """Vector and thread resources of a CPU target.

    Attributes:
        arch: ``"x86_64"``, ``"aarch64"``, ``"arm"`` or another LLVM arch name.
        vector_bits: width of one SIMD register in bits (512 AVX-512, 256 AVX2, 128 NEON/SSE).
        num_vector_regs: architectural SIMD registers (32 on AVX-512 and AArch64, else 16).
        num_cores: threads the generated code is expected to run on.
    """

    arch: str
    vector_bits: int
    num_vector_regs: int
    num_cores: int

    def lanes(self, dtype_bits: int = 32) -> int:
        """Vector lanes for elements of ``dtype_bits`` bits (at least 1)."""
        return max(self.vector_bits // max(dtype_bits, 8), 1)


def _attr(target: tvm.target.Target, key: str):
    try:
        return target.attrs.get(key)
    except Exception:  # noqa: BLE001 - attrs of unusual targets
        return None


def _arch(target: tvm.target.Target) -> str:
    triple = str(_attr(target, "mtriple") or "")
    if not triple:
        return "x86_64" if "arm_cpu" not in list(target.keys) else "aarch64"
    head = triple.split("-")[0]
    if head in ("aarch64", "arm64"):
        return "aarch64"
    if head.startswith(("arm", "thumb")):
        return "arm"
    if head in ("x86_64", "amd64", "i386", "i686", "x86"):
        return "x86_64" if head in ("x86_64", "amd64") else "x86"
    return head


def _x86_vector_bits(mcpu: str, mattr: list[str]) -> int:
    bits = 128  # generic x86-64 code is SSE2
    if mcpu in _AVX512_CPUS:
        bits = 512
    elif mcpu in _AVX2_CPUS:
        bits = 256
    enabled = {a[1:] for a in mattr if a.startswith("+")}
    disabled = {a[1:] for a in mattr if a.startswith("-")}
    if "avx512f" in enabled:
        bits = max(bits, 512)
    elif enabled & {"avx", "avx2", "fma"}:
        bits = max(bits, 256)
    if bits == 512 and "avx512f" in disabled:
        bits = 256
    if bits >= 256 and "avx" in disabled:
        bits = 128
    return bits


def cpu_info(target: tvm.target.Target) -> CpuInfo:
    """Describe the SIMD width, register count and core count of an ``llvm`` target."""
    arch = _arch(target)
    mcpu = str(_attr(target, "mcpu") or "")
    mattr = [str(a) for a in (_attr(target, "mattr") or [])]
    explicit = _attr(target, "vector-width")
    if explicit:
        bits = int(explicit)
    elif arch in ("x86_64", "x86"):
        bits = _x86_vector_bits(mcpu, mattr)
    else:  # NEON, and a safe default for other architectures
        bits = 128
    if arch in ("x86_64", "x86"):
        regs = 32 if bits >= 512 else 16
    elif arch == "aarch64":
        regs = 32
    else:
        regs = 16
    cores = _attr(target, "num-cores")
    if cores is None or int(cores) <= 0:
        cores = os.cpu_count() or 1
    return CpuInfo(arch=arch, vector_bits=bits, num_vector_regs=regs, num_cores=int(cores))
