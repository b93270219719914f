"""Target presets -> TVM 0.27 JSON targets (no compilation here: fast)."""

from __future__ import annotations

import json

import pytest

tvm = pytest.importorskip("tvm")

from onnxforge.backends.targets import (
    UnavailableTargetError,
    UnknownTargetError,
    get_preset,
    list_targets,
    plain_target_dict,
    resolve_target,
    runs_on_this_machine,
    target_arch,
    target_key,
)
from onnxforge.errors import OnnxforgeError

pytestmark = pytest.mark.tvm

REQUIRED = [
    "host", "x86-64", "x86-avx2", "x86-avx512", "aarch64", "cortex-a53", "cortex-a72",
    "cortex-a76", "cuda", "cuda-sm75", "cuda-sm80", "cuda-sm86", "cuda-sm87", "cuda-sm89",
    "cuda-sm90", "opencl", "opencl-mali", "opencl-adreno", "vulkan",
]


def test_every_required_preset_is_listed_with_a_description():
    names = [p.name for p in list_targets()]
    assert names[: len(REQUIRED)] == REQUIRED or set(REQUIRED) <= set(names)
    for preset in list_targets():
        assert preset.description and preset.kind in ("llvm", "cuda", "opencl", "vulkan")


@pytest.mark.parametrize("name", [n for n in REQUIRED if n != "vulkan"])
def test_each_preset_resolves_to_a_tvm_target(name):
    target = resolve_target(name)
    assert isinstance(target, tvm.target.Target)
    assert target.kind.name == get_preset(name).kind
    # the JSON form round-trips through TVM
    again = tvm.target.Target(plain_target_dict(target))
    assert target_key(again) == target_key(target)


def test_host_uses_the_detected_cpu_not_native_and_sets_num_cores():
    from onnxforge.backends.targets import physical_cores
    from tvm.target import codegen

    target = resolve_target("host")
    assert str(target.attrs["mcpu"]) == codegen.llvm_get_system_cpu() != "native"
    assert int(target.attrs["num-cores"]) == physical_cores()
    assert runs_on_this_machine(target)


def test_arm_presets_carry_triple_cpu_and_features():
    a72 = resolve_target("cortex-a72")
    assert str(a72.attrs["mtriple"]) == "aarch64-linux-gnu"
    assert str(a72.attrs["mcpu"]) == "cortex-a72"
    assert target_arch(a72) == "aarch64"
    a76 = resolve_target("cortex-a76")
    assert "+dotprod" in [str(a) for a in a76.attrs["mattr"]]
    from tvm.target import codegen

    assert codegen.llvm_cpu_has_features("dotprod", a76)
    assert not runs_on_this_machine(a76) or target_arch(resolve_target("host")) == "aarch64"


def test_gpu_presets_have_arch_device_and_host():
    assert str(resolve_target("cuda-sm80").attrs["arch"]) == "sm_80"
    orin = resolve_target("cuda-sm87")
    assert str(orin.attrs["arch"]) == "sm_87"
    assert target_arch(orin) == "aarch64"  # Jetson: the host CPU is ARM
    assert str(resolve_target("opencl-mali").attrs["device"]) == "mali"
    assert "adreno" in list(resolve_target("opencl-adreno").keys)


def test_raw_json_dict_string_and_dict():
    text = '{"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a55", "num-cores": 8}'
    target = resolve_target(text)
    assert str(target.attrs["mcpu"]) == "cortex-a55"
    assert int(target.attrs["num-cores"]) == 8
    assert resolve_target(json.loads(text)).attrs["mcpu"] == "cortex-a55"


def test_unknown_name_lists_the_presets():
    with pytest.raises(UnknownTargetError) as info:
        resolve_target("cortex-a99")
    assert isinstance(info.value, OnnxforgeError)
    message = str(info.value)
    for name in ("host", "cortex-a72", "cuda-sm87", "opencl-mali"):
        assert name in message


def test_bad_json_and_unknown_kind_are_clear_errors():
    with pytest.raises(UnknownTargetError, match="not valid JSON"):
        resolve_target('{"kind": "llvm",')
    with pytest.raises(UnknownTargetError, match="rejected"):
        resolve_target('{"kind": "no-such-kind"}')


def test_vulkan_is_refused_clearly_when_the_wheel_lacks_it():
    has_vulkan = tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None
    preset = get_preset("vulkan")
    if has_vulkan:
        assert preset.available
        assert resolve_target("vulkan").kind.name == "vulkan"
    else:
        assert not preset.available and "Vulkan" in preset.unavailable
        with pytest.raises(UnavailableTargetError, match="no Vulkan"):
            resolve_target("vulkan")


def test_target_keys_differ_per_target_and_are_folder_safe():
    keys = {name: target_key(resolve_target(name)) for name in REQUIRED if name != "vulkan"}
    # aliases of the same target share a key, different targets never do
    assert keys["cuda"] == keys["cuda-sm75"] or "sm_75" not in keys["cuda"]
    distinct = {k for n, k in keys.items() if n not in ("x86-64", "cuda")}
    assert len(distinct) == len(keys) - 2
    for key in keys.values():
        assert "/" not in key and " " not in key
    assert keys["cortex-a72"].startswith("llvm-aarch64-cortex-a72-4c-")
