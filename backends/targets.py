"""Named compilation targets: preset name -> TVM 0.27 JSON target dict.

    from onnxforge.backends.targets import resolve_target, list_targets
    target = resolve_target("cortex-a72")            # a tvm.target.Target
    target = resolve_target('{"kind": "llvm", "mcpu": "skylake-avx512", "num-cores": 4}')

TVM 0.27 accepts only JSON-dict targets (the old "llvm -mcpu=..." strings are refused).
`"mcpu": "native"` silently falls back to a generic CPU, so the `host` preset asks LLVM
for the real CPU name (`tvm.target.codegen.llvm_get_system_cpu()`) and sets
`num-cores` (MetaSchedule needs it for its parallel rules).

GPU presets carry a `host` target: the CPU that launches kernels (x86 for desktop CUDA
and generic OpenCL, AArch64 for Jetson Orin, Mali and Adreno SoCs).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import BackendError, OnnxforgeError


class UnknownTargetError(OnnxforgeError):
    """The target name is not a preset and not a valid JSON target dict."""

    exit_code = 3


class UnavailableTargetError(BackendError):
    """The preset exists but this TVM wheel cannot generate code for it (e.g. Vulkan)."""


@dataclass(frozen=True)
class TargetPreset:
    """One named target.

    Attributes:
        name: preset name used on the command line (`--target cortex-a72`).
        description: one line for `onnxforge targets`.
        kind: TVM target kind: "llvm", "cuda", "opencl" or "vulkan".
        family: "x86", "aarch64", "hexagon", "cuda", "opencl" or "vulkan".
        config: the JSON target dict, or a function building it (host detection).
        aliases: other names accepted for this preset.
        unavailable: why this wheel cannot build for it (None when it can).
    """

    name: str
    description: str
    kind: str
    family: str
    config: dict[str, Any] | Callable[[], dict[str, Any]] = field(repr=False)
    aliases: tuple[str, ...] = ()
    unavailable: str | None = None

    def target_dict(self) -> dict[str, Any]:
        """The TVM JSON target dict (a fresh copy)."""
        config = self.config() if callable(self.config) else self.config
        return json.loads(json.dumps(config))

    @property
    def is_gpu(self) -> bool:
        return self.kind in GPU_KINDS

    @property
    def available(self) -> bool:
        return self.unavailable is None


GPU_KINDS = ("cuda", "opencl", "vulkan", "metal", "rocm", "webgpu")


# ---------------------------------------------------------------------------------------
# Host detection
# ---------------------------------------------------------------------------------------

def physical_cores() -> int:
    """Physical cores of this machine (MetaSchedule's and the thread pool's default)."""
    try:
        import psutil

        count = psutil.cpu_count(logical=False)
    except ImportError:  # psutil is a MetaSchedule dependency, but stay usable without it
        count = None
    return int(count or os.cpu_count() or 1)


# Features LLVM infers from the CPU name that a hypervisor may still mask: if
# /proc/cpuinfo lacks them they are switched off explicitly ("-feature").
_X86_MASKABLE = {
    "avx2": "avx2",
    "avx512f": "avx512f",
    "avx512bw": "avx512bw",
    "avx512vl": "avx512vl",
    "avx512vnni": "avx512_vnni",
    "amx-tile": "amx_tile",
    "amx-int8": "amx_int8",
}
_INTERESTING_FEATURES = (
    "avx2", "fma", "avx512f", "avx512bw", "avx512vnni", "avxvnni", "amx-tile", "amx-int8",
    "neon", "dotprod", "i8mm", "fullfp16", "sve",
)


def _cpuinfo_flags() -> set[str] | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        return None
    return None


@functools.lru_cache(maxsize=1)
def host_target_dict() -> dict[str, Any]:
    """The JSON target of this machine: LLVM-detected CPU, masked features, num-cores."""
    import tvm
    from tvm.target import codegen

    cpu = codegen.llvm_get_system_cpu()
    config: dict[str, Any] = {"kind": "llvm", "mcpu": cpu, "num-cores": physical_cores()}
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        config["mtriple"] = "aarch64-linux-gnu"
    elif machine in ("x86_64", "amd64"):
        flags = _cpuinfo_flags()
        if flags is not None:
            probe = tvm.target.Target(config)
            masked = [
                f"-{feature}"
                for feature, flag in _X86_MASKABLE.items()
                if codegen.llvm_cpu_has_features(feature, probe) and flag not in flags
            ]
            if masked:
                config["mattr"] = masked
    return config


def host_features(target_dict: dict[str, Any] | None = None) -> list[str]:
    """The vector features (AVX-512, VNNI, NEON, dotprod, ...) LLVM sees for a CPU target."""
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target(target_dict or host_target_dict())
    return [f for f in _INTERESTING_FEATURES if codegen.llvm_cpu_has_features(f, target)]


def _host_llvm() -> dict[str, Any]:
    """Host part of a GPU target running on this machine (no num-cores: not tuned)."""
    config = dict(host_target_dict())
    config.pop("num-cores", None)
    return config


def _x86_or_host() -> dict[str, Any]:
    machine = platform.machine().lower()
    if machine in ("x86_64", "amd64"):
        return host_target_dict()
    return {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "x86-64", "num-cores": 4}


def _cuda_default() -> dict[str, Any]:
    """`cuda`: the arch of the local GPU when there is one, else sm_75 (CUDA 13's minimum)."""
    arch = "sm_75"
    try:
        import tvm

        dev = tvm.cuda(0)
        if dev.exist:
            arch = "sm_" + str(dev.compute_version).replace(".", "")
    except Exception as exc:  # noqa: BLE001 - no CUDA runtime: keep the documented default
        logging.getLogger(__name__).debug("no CUDA device to detect: %s", exc)
    return _cuda(arch)()


def _vulkan_unavailable() -> str | None:
    try:
        import tvm

        if tvm.get_global_func("target.build.vulkan", allow_missing=True) is None:
            return ("this apache-tvm wheel has no Vulkan/SPIR-V code generator "
                    "(target.build.vulkan is missing); build TVM with USE_VULKAN=ON")
    except ImportError:
        return "apache-tvm is not installed"
    return None


# ---------------------------------------------------------------------------------------
# Presets
# ---------------------------------------------------------------------------------------

_AARCH64 = {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}
_ARM_HOST = {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55",
             "mattr": ["+neon"]}


def _cuda(arch: str, host: dict[str, Any] | None = None) -> Callable[[], dict[str, Any]]:
    # 48 KiB: the static shared memory a block gets without an opt-in on every arch
    return lambda: {"kind": "cuda", "arch": arch, "max_num_threads": 1024,
                    "thread_warp_size": 32, "max_shared_memory_per_block": 49152,
                    "host": host or _host_llvm()}


def _hexagon(version: str) -> dict[str, Any]:
    return {"kind": "llvm", "mtriple": "hexagon", "mcpu": f"hexagon{version}",
            "mattr": [f"+hvx{version}", "+hvx-length128b"], "num-cores": 4}


def _presets() -> list[TargetPreset]:
    presets = [
        TargetPreset("host", "this machine: LLVM-detected CPU and features, physical cores",
                     "llvm", "x86" if platform.machine().lower() in ("x86_64", "amd64")
                     else "aarch64", host_target_dict),
        TargetPreset("x86-64", "x86-64 = this machine's CPU when it is x86 (else generic x86-64)",
                     "llvm", "x86", _x86_or_host),
        TargetPreset("x86-avx2", "x86-64 with AVX2 + FMA (Haswell and newer, Zen 1-3)", "llvm",
                     "x86", {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "haswell",
                             "num-cores": physical_cores()}),
        TargetPreset("x86-avx512", "x86-64 with AVX-512 + VNNI (Cascade Lake and newer)", "llvm",
                     "x86", {"kind": "llvm", "mtriple": "x86_64-linux-gnu",
                             "mcpu": "cascadelake", "num-cores": physical_cores()}),
        TargetPreset("aarch64", "generic ARMv8-A with NEON (4 cores)", "llvm", "aarch64",
                     {**_AARCH64, "mcpu": "generic", "mattr": ["+neon"], "num-cores": 4},
                     aliases=("arm64",)),
        TargetPreset("cortex-a53", "Cortex-A53 (Raspberry Pi 3, many SBCs), NEON, 4 cores",
                     "llvm", "aarch64",
                     {**_AARCH64, "mcpu": "cortex-a53", "mattr": ["+neon"], "num-cores": 4}),
        TargetPreset("cortex-a72", "Cortex-A72 (Raspberry Pi 4), NEON, 4 cores", "llvm",
                     "aarch64",
                     {**_AARCH64, "mcpu": "cortex-a72", "mattr": ["+neon"], "num-cores": 4}),
        TargetPreset("cortex-a76", "Cortex-A76 (Raspberry Pi 5), NEON + dot-product, 4 cores",
                     "llvm", "aarch64",
                     {**_AARCH64, "mcpu": "cortex-a76", "mattr": ["+neon", "+dotprod"],
                      "num-cores": 4}),
        # Hexagon DSP through TVM's LLVM backend (kind llvm: the wheel's `hexagon` kind fails
        # in its TIR lowering); builds and assembly here, no simulator or device to run on
        TargetPreset("hexagon-v68", "Qualcomm Hexagon v68 DSP, HVX 128-byte (compile only)",
                     "llvm", "hexagon", _hexagon("v68")),
        TargetPreset("hexagon-v73", "Qualcomm Hexagon v73 DSP, HVX 128-byte (compile only)",
                     "llvm", "hexagon", _hexagon("v73")),
        TargetPreset("cuda", "NVIDIA GPU: the local GPU's arch, else sm_75", "cuda", "cuda",
                     _cuda_default),
        TargetPreset("cuda-sm75", "NVIDIA Turing (T4, RTX 20xx)", "cuda", "cuda", _cuda("sm_75")),
        TargetPreset("cuda-sm80", "NVIDIA Ampere A100", "cuda", "cuda", _cuda("sm_80"),
                     aliases=("sm80",)),
        TargetPreset("cuda-sm86", "NVIDIA Ampere RTX 30xx / A10", "cuda", "cuda", _cuda("sm_86"),
                     aliases=("sm86",)),
        TargetPreset("cuda-sm87", "NVIDIA Jetson Orin (host: Cortex-A78AE)", "cuda", "cuda",
                     _cuda("sm_87", {**_AARCH64, "mcpu": "cortex-a78", "mattr": ["+neon"]}),
                     aliases=("sm87", "jetson-orin")),
        TargetPreset("cuda-sm89", "NVIDIA Ada (L4, RTX 40xx)", "cuda", "cuda", _cuda("sm_89"),
                     aliases=("sm89",)),
        TargetPreset("cuda-sm90", "NVIDIA Hopper H100", "cuda", "cuda", _cuda("sm_90"),
                     aliases=("sm90",)),
        TargetPreset("opencl", "generic OpenCL GPU (host: this machine)", "opencl", "opencl",
                     lambda: {"kind": "opencl", "host": _host_llvm()}),
        TargetPreset("opencl-mali", "ARM Mali GPU over OpenCL (host: AArch64 SoC)", "opencl",
                     "opencl", {"kind": "opencl", "device": "mali", "host": _ARM_HOST},
                     aliases=("mali",)),
        TargetPreset("opencl-adreno", "Qualcomm Adreno GPU over OpenCL (host: AArch64 SoC)",
                     "opencl", "opencl",
                     {"kind": "opencl", "device": "adreno", "host": _ARM_HOST},
                     aliases=("adreno",)),
        TargetPreset("vulkan", "Vulkan GPU (SPIR-V)", "vulkan", "vulkan",
                     lambda: {"kind": "vulkan", "host": _host_llvm()},
                     unavailable=_vulkan_unavailable()),
    ]
    return presets


@functools.lru_cache(maxsize=1)
def _preset_table() -> dict[str, TargetPreset]:
    table: dict[str, TargetPreset] = {}
    for preset in _presets():
        table[preset.name] = preset
        for alias in preset.aliases:
            table[alias] = preset
    return table


def list_targets() -> list[TargetPreset]:
    """All presets, in display order (aliases not repeated)."""
    seen: list[TargetPreset] = []
    for preset in _preset_table().values():
        if preset not in seen:
            seen.append(preset)
    return seen


def get_preset(name: str) -> TargetPreset:
    """The preset named `name` (or an alias), else UnknownTargetError listing them all."""
    table = _preset_table()
    key = name.strip().lower()
    if key in table:
        return table[key]
    names = ", ".join(p.name for p in list_targets())
    raise UnknownTargetError(
        f"unknown target {name!r}. Presets: {names}. Or give a TVM JSON target dict, e.g. "
        '\'{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a72"}\''
    )


def target_dict(spec: str | dict[str, Any]) -> dict[str, Any]:
    """Preset name, JSON string or dict -> JSON target dict (not yet validated by TVM)."""
    if isinstance(spec, dict):
        return json.loads(json.dumps(spec))
    text = spec.strip()
    if text.startswith("{"):
        try:
            config = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UnknownTargetError(f"target {spec!r} is not valid JSON: {exc}") from None
        if not isinstance(config, dict) or "kind" not in config:
            raise UnknownTargetError(f"target JSON {spec!r} must be an object with a 'kind'")
        return config
    preset = get_preset(text)
    if preset.unavailable:
        raise UnavailableTargetError(f"target {preset.name!r} is unavailable: {preset.unavailable}")
    return preset.target_dict()


def resolve_target(spec: Any) -> Any:
    """A preset name, a raw JSON dict string (or dict), or a Target -> `tvm.target.Target`."""
    import tvm

    if isinstance(spec, tvm.target.Target):
        return spec
    config = target_dict(spec)
    if config.get("kind") == "vulkan":
        reason = _vulkan_unavailable()
        if reason:
            raise UnavailableTargetError(f"target 'vulkan' is unavailable: {reason}")
    try:
        return tvm.target.Target(config)
    except Exception as exc:  # noqa: BLE001 - TVM raises several error types here
        raise UnknownTargetError(f"TVM rejected target {json.dumps(config)}: {exc}") from None


def preset_name(spec: Any) -> str | None:
    """The preset name for a spec string, or None for raw JSON / Target objects."""
    if isinstance(spec, str) and not spec.strip().startswith("{"):
        try:
            return get_preset(spec).name
        except UnknownTargetError:
            return None
    return None


# ---------------------------------------------------------------------------------------
# Target properties used by the backend and the tuner
# ---------------------------------------------------------------------------------------

def canonical_json(target: Any) -> str:
    """A stable JSON text of a Target (sorted keys), the basis of `target_key`."""
    exported = target.export()

    def _plain(value: Any) -> Any:
        if isinstance(value, (str, int, float, bool)) or value is None:
            return value
        if hasattr(value, "items"):  # dict or TVM Map
            return {str(k): _plain(v) for k, v in value.items()}
        if hasattr(value, "__iter__"):  # list, tuple or TVM Array
            return [_plain(v) for v in value]
        if hasattr(value, "export"):  # a nested Target (e.g. "host")
            return _plain(value.export())
        return str(value)

    return json.dumps(_plain(exported), sort_keys=True)


def plain_target_dict(target: Any) -> dict[str, Any]:
    """`target.export()` as plain JSON types (TVM arrays become lists)."""
    return json.loads(canonical_json(target))


def target_key(target: Any) -> str:
    """A folder-safe name that differs for every different target.

    Example: `llvm-aarch64-cortex-a72-4c-1a2b3c4d`; the hash covers the whole target
    (features, host, arch), the readable part is for humans.
    """
    target = resolve_target(target)
    kind = target.kind.name
    attrs = target.attrs
    parts = [kind]
    if kind == "llvm":
        triple = str(attrs.get("mtriple", "") or "")
        parts.append(triple.split("-")[0] if triple else platform.machine().lower())
        parts.append(str(attrs.get("mcpu", "") or "generic"))
        if attrs.get("num-cores"):
            parts.append(f"{int(attrs['num-cores'])}c")
    elif kind == "cuda":
        parts.append(str(attrs.get("arch", "") or "sm"))
    elif kind == "opencl":
        parts.append(str(attrs.get("device", "") or "generic"))
    digest = hashlib.sha256(canonical_json(target).encode()).hexdigest()[:8]
    parts.append(digest)
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", "-".join(p for p in parts if p))


def is_gpu_target(target: Any) -> bool:
    return target.kind.name in GPU_KINDS


def target_arch(target: Any) -> str:
    """CPU architecture code runs on: "x86_64", "aarch64", ... (GPU: its host's)."""
    cpu = target.host if is_gpu_target(target) and target.host is not None else target
    triple = str(cpu.attrs.get("mtriple", "") or "")
    if triple:
        return triple.split("-")[0].replace("arm64", "aarch64")
    return platform.machine().lower().replace("amd64", "x86_64").replace("arm64", "aarch64")


def runs_on_this_machine(target: Any) -> bool:
    """True when an llvm target's code can run in this process."""
    if target.kind.name != "llvm":
        return False
    return target_arch(target) == target_arch(resolve_target(host_target_dict()))
