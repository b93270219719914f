"""TVM backend: compile for x86 / AArch64 (run under qemu) / CUDA / OpenCL; outputs vs ORT."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from conftest import need_qemu, zoo_input_shapes, zoo_path, zoo_sample_inputs
from onnxforge.backends.tvm import (
    TVMArtifact,
    compare_to_ort,
    compile_model,
    random_inputs,
)
from onnxforge.errors import BackendError, InputSpecError, UnsupportedOpError

pytestmark = pytest.mark.tvm
RTOL = 1e-4


# ---------------------------------------------------------------------------------------
# Tiny hand-built models
# ---------------------------------------------------------------------------------------

def _model(nodes, inputs, outputs, inits=(), opset=17, ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "t", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model)
    return model


def conv_relu_gemm(batch="N") -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b"),
        numpy_helper.from_array((rng.standard_normal((10, 512)) * 0.05).astype(np.float32), "g"),
        numpy_helper.from_array(rng.standard_normal(10).astype(np.float32), "gb"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g", "gb"], ["y"], name="gemm", transB=1),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits)


def matmul_3d() -> onnx.ModelProto:
    """x[2,5,16] @ W[16,24] + b, softmax, and a second output (the pre-softmax logits)."""
    rng = np.random.default_rng(1)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 24)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "bias")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="matmul"),
             helper.make_node("Add", ["m", "bias"], ["logits"], name="add"),
             helper.make_node("Softmax", ["logits"], ["probs"], name="softmax", axis=-1)]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 16])],
                  [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [2, 5, 24]),
                   helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 5, 24])], inits)


def assert_matches_ort(artifact: TVMArtifact, model, inputs=None):
    inputs = inputs if inputs is not None else random_inputs(artifact.inputs, seed=3)
    errors = compare_to_ort(artifact, model, inputs)
    assert errors, "no outputs compared"
    for err in errors:
        assert err.within(RTOL), f"{err.name}: max abs {err.max_abs:.3e}, rel {err.rel:.3e}"
    return errors


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "conv_relu_gemm.onnx"
    onnx.save(conv_relu_gemm(), path)
    return path


@pytest.fixture(scope="module")
def host_artifact(tiny) -> TVMArtifact:
    return compile_model(tiny, "host", input_shapes={"x": (2, 3, 8, 8)})


# ---------------------------------------------------------------------------------------
# x86 host
# ---------------------------------------------------------------------------------------

def test_host_outputs_equal_ort_and_report_counts(host_artifact, tiny):
    errors = assert_matches_ort(host_artifact, tiny)
    assert errors[0].shape == (2, 10)
    report = host_artifact.report
    assert report["target"] == "host"
    assert report["num_primfuncs"] >= 3
    assert (report["scheduled_by_database"] + report["scheduled_by_default"]
            + report["unscheduled"]) == report["num_primfuncs_final"]
    assert report["compile_seconds"] > 0
    assert report["pipeline"]["legalize"][:5] == [
        "LegalizeOps", "AnnotateTIROpPattern", "PresetOpPattern", "FoldConstant", "FuseOps"]
    if report["default_rules"] is None:  # kernels' default schedules not importable yet
        assert any("default CPU schedules unavailable" in n for n in report["notes"])
    else:
        assert report["scheduled_by_default"] >= 1


def _conv_transpose(k: int, s: int, bias: bool, in_channels=8, out_channels=5, size=7):
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(
        rng.standard_normal((in_channels, out_channels, k, k)).astype(np.float32), "w")]
    if bias:
        inits.append(numpy_helper.from_array(
            rng.standard_normal(out_channels).astype(np.float32), "b"))
    node = helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if bias else []), ["y"],
                            kernel_shape=[k, k], strides=[s, s])
    out = (size - 1) * s + k
    graph = helper.make_graph(
        [node], "ct", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                     [1, in_channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, out_channels, out, out])],
        inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("k,s,bias,rewritten", [
    (2, 2, True, True), (3, 3, False, True),  # kernel == stride: 1x1 conv + pixel shuffle
    (3, 2, True, False)])                      # overlapping windows: stays a transpose
def test_conv_transpose_with_kernel_equal_to_stride_runs_as_a_conv(k, s, bias, rewritten):
    from onnxforge.backends.tvm.conv_transpose import conv_transpose_as_conv
    from onnxforge.backends.tvm.importer import import_onnx, input_specs

    model = _conv_transpose(k, s, bias)
    _, count = conv_transpose_as_conv(import_onnx(model, input_specs(model, None), "ct"))
    assert count == int(rewritten)
    art = compile_model(model, "host")
    assert any("conv2d_transpose" in name for name in art.report["kernel_schedules"]) \
        != rewritten
    x = np.random.default_rng(1).standard_normal((1, 8, 7, 7)).astype(np.float32)
    ref = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(art.run({"x": x})["y"], ref, rtol=1e-5, atol=1e-5)


def test_model_inputs_as_proto_ir_and_path_give_the_same_result(tiny):
    import onnx_ir as ir

    proto = onnx.load(tiny)
    x = random_inputs(compile_model(proto, "host", input_shapes={"x": (1, 3, 8, 8)}).inputs)
    outs = []
    for source in (proto, ir.serde.deserialize_model(proto), str(tiny)):
        art = compile_model(source, "host", input_shapes={"x": (1, 3, 8, 8)})
        outs.append(art.run(x)["y"])
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])


def test_multi_output_3d_matmul(tmp_path):
    model = matmul_3d()
    art = compile_model(model, "host")
    errors = assert_matches_ort(art, model)
    assert [e.name for e in errors] == ["probs", "logits"]
    assert art.output_names == ["probs", "logits"]


def test_dynamic_dims_need_input_shapes(tiny):
    # the library names its own option; the CLI writes it as --input-shape x:1,3,8,8
    with pytest.raises(InputSpecError,
                       match=r"dynamic dimension.*input_shapes=\{'x': \(1, 3, 8, 8\)\}"):
        compile_model(tiny, "host")
    with pytest.raises(InputSpecError, match="rank"):
        compile_model(tiny, "host", input_shapes={"x": (1, 3, 8)})
    with pytest.raises(InputSpecError, match="inputs are"):
        compile_model(tiny, "host", input_shapes={"nope": (1,)})


def test_wrong_input_shape_at_run_time_is_a_clear_error(host_artifact):
    with pytest.raises(InputSpecError, match="compiled for"):
        host_artifact.run({"x": np.zeros((1, 3, 8, 8), np.float32)})


def test_unsupported_op_names_node_op_and_opset():
    model = _model([helper.make_node("Celu", ["x"], ["y"], name="my_celu")],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])])
    with pytest.raises(UnsupportedOpError) as info:
        compile_model(model, "host")
    message = str(info.value)
    assert "'my_celu'" in message and "Celu" in message and "opset 17" in message
    assert "cleanup" in message
    assert "Traceback" not in message


def test_importer_failure_inside_a_converter_names_the_node():
    scale = numpy_helper.from_array(np.ones((4, 2), np.float32), "s")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s"], ["q"], name="blocked_q", axis=1,
                              block_size=2),
             helper.make_node("DequantizeLinear", ["q", "s"], ["y"], name="dq", axis=1,
                              block_size=2)]
    model = _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])], [scale],
                   opset=21, ir_version=10)
    with pytest.raises(UnsupportedOpError, match=r"'blocked_q' \(op QuantizeLinear.*opset 21"):
        compile_model(model, "host")


def test_export_so_is_atomic_and_loads_in_a_fresh_vm(host_artifact, tmp_path):
    out = host_artifact.export(tmp_path / "sub" / "model.so")
    assert out == tmp_path / "sub" / "model.so" and out.stat().st_size > 1000
    assert [p.name for p in out.parent.iterdir()] == ["model.so"]  # no temp files left
    lib = tvm.runtime.load_module(str(out))
    vm = tvm.relax.VirtualMachine(lib, tvm.cpu())
    x = random_inputs(host_artifact.inputs, seed=5)
    got = vm["main"](tvm.runtime.tensor(x["x"])).numpy()
    np.testing.assert_allclose(got, host_artifact.run(x)["y"], rtol=0, atol=0)
    with pytest.raises(BackendError, match=r"\.so"):
        host_artifact.export(tmp_path / "model.bin")


def test_benchmark_uses_time_callable_and_threads(host_artifact):
    x = random_inputs(host_artifact.inputs)
    timing = host_artifact.benchmark(x, warmup=2, repeat=5, threads=1)
    assert timing.repeat == 5 and 0 < timing.median_ms < 1000
    assert host_artifact.report["bench_threads"] == 1


_SPIN_PROBE = """
import os, resource, sys, time
from onnxforge.backends.tvm import compile_model, random_inputs
art = compile_model(sys.argv[1], "host", input_shapes={"x": (2, 3, 8, 8)}, threads=2)
x = random_inputs(art.inputs)
for _ in range(20):
    art.run(x)
usage = resource.getrusage(resource.RUSAGE_SELF)
before = usage.ru_utime + usage.ru_stime
time.sleep(0.3)
usage = resource.getrusage(resource.RUSAGE_SELF)
print(os.environ["TVM_THREAD_POOL_SPIN_COUNT"], (usage.ru_utime + usage.ru_stime - before) * 1e3)
"""


@pytest.mark.parametrize("user_value", [None, "300000"])
def test_tvm_pool_threads_do_not_spin_after_a_run_unless_the_user_says(tiny, user_value):
    """TVM's workers spin ~0.2 s after each kernel by default, stealing a core from
    onnxruntime's turn in an interleaved benchmark; onnxforge turns that off in its
    process (a fresh one here: TVM reads the setting when its pool starts) and keeps a
    value the user set."""
    env = {k: v for k, v in os.environ.items() if k != "TVM_THREAD_POOL_SPIN_COUNT"}
    if user_value:
        env["TVM_THREAD_POOL_SPIN_COUNT"] = user_value
    done = subprocess.run([sys.executable, "-c", _SPIN_PROBE, str(tiny)], env=env,
                          capture_output=True, text=True, check=True)
    setting, cpu_ms = done.stdout.split()[-2:]
    assert setting == (user_value or "0")
    if not user_value:  # spinning burns ~100+ ms of CPU in those 300 ms
        assert float(cpu_ms) < 30, f"{cpu_ms} ms of CPU while idle"


def test_digits_model_matches_ort_on_its_test_data(digits_model, digits_test_data):
    data = np.load(digits_test_data)
    x = data["input"][:1].astype(np.float32) if "input" in data.files else None
    art = compile_model(digits_model, "host", input_shapes={"input": (1, 1, 8, 8)})
    assert_matches_ort(art, digits_model, {"input": x} if x is not None else None)


# ---------------------------------------------------------------------------------------
# AArch64: cross-compiled, run for real under qemu-aarch64
# ---------------------------------------------------------------------------------------

def test_aarch64_export_is_an_arm_shared_library(tiny, tmp_path):
    art = compile_model(tiny, "cortex-a72", input_shapes={"x": (1, 3, 8, 8)})
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        out = art.export(tmp_path / "m.so")
        assert out.suffix == ".tar"
        return
    out = art.export(tmp_path / "m.so")
    header = out.read_bytes()[:20]
    assert header[:4] == b"\x7fELF" and int.from_bytes(header[18:20], "little") == 183  # EM_AARCH64


def test_digits_cortex_a72_under_qemu_matches_ort(digits_model, digits_test_data):
    need_qemu()
    art = compile_model(digits_model, "cortex-a72", input_shapes={"input": (1, 1, 8, 8)})
    assert art.can_run()
    data = np.load(digits_test_data)
    x = {"input": data["input"][:1].astype(np.float32)} if "input" in data.files else None
    assert_matches_ort(art, digits_model, x)


def test_tiny_model_cortex_a76_dotprod_under_qemu(tiny):
    need_qemu()
    art = compile_model(tiny, "cortex-a76", input_shapes={"x": (2, 3, 8, 8)})
    assert_matches_ort(art, tiny)


@pytest.mark.slow
def test_mobilenet_v2_cortex_a72_under_qemu_matches_ort():
    need_qemu()
    path = zoo_path("mobilenet_v2")
    art = compile_model(path, "cortex-a72", input_shapes=zoo_input_shapes("mobilenet_v2"))
    assert_matches_ort(art, path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_zoo_model_uses_the_shipped_schedule_configs_and_matches_ort(name):
    """On a CPU of the shipped database's class the measured settings are applied by
    default, and the model still matches ORT; --no-shipped-db leaves the heuristics."""
    from onnxforge.backends.targets import resolve_target
    from onnxforge.kernels.schedule_configs import shipped_db_dir

    shipped = shipped_db_dir(resolve_target("host"))
    if shipped is None:
        pytest.skip("no schedule-config database shipped for this CPU class")
    path = zoo_path(name)
    art = compile_model(path, "host", input_shapes=zoo_input_shapes(name))
    found = art.report["schedule_configs"]
    assert found["sources"] == [str(shipped)] and found["applied"] >= 1, found
    assert_matches_ort(art, path)
    plain = compile_model(path, "host", input_shapes=zoo_input_shapes(name), shipped_db=False)
    assert plain.report["schedule_configs"] == {"sources": [], "entries": 0, "applied": 0}


# ---------------------------------------------------------------------------------------
# GPUs: code generation without a GPU, running only where one exists
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("target,marker,suffix", [
    ("cuda-sm80", "__global__", ".cu"),
    ("cuda-sm87", "__global__", ".cu"),
    ("opencl", "__kernel", ".cl"),
    ("opencl-mali", "__kernel", ".cl"),
    ("opencl-adreno", "__kernel", ".cl"),
])
def test_gpu_codegen_without_a_gpu(tiny, tmp_path, target, marker, suffix):
    if target == "cuda-sm87" and shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("Jetson host code needs aarch64-linux-gnu-gcc to link")
    art = compile_model(tiny, target, input_shapes={"x": (1, 3, 8, 8)})
    source = art.device_source()
    assert source.count(marker) >= 3  # conv, gemm and friends each become a kernel
    assert art.report["unscheduled"] == 0 and art.report["default_rules"] == "dlight"
    out = art.export(tmp_path / "gpu.so")
    assert out.is_file() and (tmp_path / f"gpu{suffix}").read_text() == source


def test_cuda_runs_on_a_real_gpu_when_present(tiny):
    if not tvm.cuda(0).exist:
        pytest.skip("no CUDA GPU on this machine")
    art = compile_model(tiny, "cuda", input_shapes={"x": (2, 3, 8, 8)})
    assert_matches_ort(art, tiny)


def test_gpu_artifact_refuses_to_run_without_a_device(tiny):
    if tvm.cuda(0).exist:
        pytest.skip("a CUDA GPU is present")
    art = compile_model(tiny, "cuda-sm80", input_shapes={"x": (1, 3, 8, 8)})
    with pytest.raises(BackendError, match="cannot run"):
        art.run(random_inputs(art.inputs))


def test_vulkan_is_refused_when_unsupported(tiny):
    if tvm.get_global_func("target.build.vulkan", allow_missing=True) is not None:
        pytest.skip("this TVM has Vulkan")
    from onnxforge.backends.targets import UnavailableTargetError

    with pytest.raises(UnavailableTargetError):
        compile_model(tiny, "vulkan", input_shapes={"x": (1, 3, 8, 8)})


# ---------------------------------------------------------------------------------------
# Zoo models (skip when .zoo is absent). ONNXFORGE_TVM_ZOO=all runs every model.
# ---------------------------------------------------------------------------------------

# the OCR models carry the patterns of issue 19 (ConvTranspose, Resize, HardSigmoid, layer
# norms from primitives, Softmax, AveragePool)
ZOO_DEFAULT = ["squeezenet1_1", "mobilenet_v2", "ppocr_det", "ppocr_rec"]
ZOO_ALL = ["resnet18", "mobilenet_v2", "squeezenet1_1", "efficientnet_b0", "mobilenet_v3_small",
           "minilm_l6", "ppocr_det", "ppocr_rec", "ppocr_cls"]
# shape subgraphs TVM's importer cannot take until `cleanup` folds them (fixed shapes)
NEEDS_CLEANUP = {"minilm_l6", "ppocr_rec", "ppocr_cls"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_ALL if os.environ.get("ONNXFORGE_TVM_ZOO") == "all"
                         else ZOO_DEFAULT)
def test_zoo_model_host_matches_ort(name):
    path = zoo_path(name)
    model = path
    sample = zoo_sample_inputs(name)
    if name in NEEDS_CLEANUP:
        from onnxforge.api import optimize

        model = optimize(path, "cleanup", input_shapes=zoo_input_shapes(name),
                         calibration=sample).model
    art = compile_model(model, "host", input_shapes=zoo_input_shapes(name))
    assert art.report["unscheduled"] == 0 or art.report["default_rules"] is None
    inputs = None
    if sample is not None:  # real token ids: random ones index past the embeddings
        with np.load(sample) as data:
            inputs = {spec.name: data[spec.name][:1] for spec in art.inputs}
    assert_matches_ort(art, path, inputs)


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------

def cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "onnxforge.cli", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=600,
                          env={**os.environ, **(env or {})})


def test_cli_targets_lists_presets():
    result = cli("targets")
    assert result.returncode == 0, result.stderr
    for name in ("host", "cortex-a76", "cuda-sm87", "opencl-adreno", "vulkan"):
        assert name in result.stdout


def test_cli_compile_verify_and_errors(tiny, tmp_path):
    out = tmp_path / "tiny.so"
    result = cli("compile", tiny, "--target", "host", "-o", out, "--input-shape", "x:1,3,8,8",
                 "--verify", "--report", tmp_path / "r.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert out.is_file() and "verify vs onnxruntime" in result.stdout and "yes" in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["target"] == "host" and report["exported"] == [str(out)]

    bad = cli("compile", tiny, "--target", "cortex-a99", "-o", out)
    assert bad.returncode == 3 and "unknown target" in bad.stderr and "Traceback" not in bad.stderr
    dyn = cli("compile", tiny, "-o", out)
    assert dyn.returncode == InputSpecError.exit_code and "--input-shape x:1,3,8,8" in dyn.stderr


def test_cli_compile_with_pipeline_then_verify(tmp_path):
    model = tmp_path / "mm.onnx"
    onnx.save(matmul_3d(), model)
    result = cli("compile", model, "-t", "host", "-o", tmp_path / "mm.so", "-p", "cleanup,fuse",
                 "--verify")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("yes") == 4  # both outputs: same twice, within tolerance
