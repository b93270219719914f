"""Compiled code that must not be wrong: regressions for miscompiles in the default CPU
schedules, the strength of `compile --verify`, and `bench --backend tvm` refusing to
time a wrong build (issues 12 and 19)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from conftest import zoo_path
from onnxforge.api import benchmark_models
from onnxforge.backends.targets import resolve_target
from onnxforge.backends.tvm import (
    TVMArtifact,
    compile_model,
    prepare_module,
    verify_artifact,
)
from onnxforge.cli import app
from onnxforge.errors import UnsupportedOpError, VerificationError
from onnxforge.kernels import sched_common
from onnxforge.kernels.kernel_check import check_kernels
from typer.testing import CliRunner

pytestmark = pytest.mark.tvm


def _model(nodes, x_shape, inits, outputs, opset=18) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9 if opset >= 18 else 6
    return model


PAD_SHAPES = {  # [n0, c0, h0, w0, n1, c1, h1, w1]
    "end_only": [0, 0, 0, 0, 0, 0, 1, 2],
    "begin_only": [0, 0, 1, 2, 0, 0, 0, 0],
    "symmetric": [0, 0, 1, 1, 0, 0, 1, 1],
    "uneven": [0, 0, 2, 0, 0, 0, 1, 3],
}


def conv_pad_conv(group: int, mode: str, values=(0.0, 1.5)) -> onnx.ModelProto:
    """Conv(group) -> Pad -> Conv for every pad shape (and value, constant mode): one
    branch and one output per combination, all reading the same input."""
    rng = np.random.default_rng(0)
    channels = 8
    inits = [
        numpy_helper.from_array(rng.standard_normal((channels, channels // group, 3, 3))
                                .astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(channels).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((channels, channels, 3, 3))
                                .astype(np.float32), "w2"),
    ]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], group=group, pads=[1, 1, 1, 1])]
    outputs = []
    for shape_name, pads in PAD_SHAPES.items():
        inits.append(numpy_helper.from_array(np.array(pads, np.int64), f"pads_{shape_name}"))
        for k, value in enumerate(values if mode == "constant" else (None,)):
            tag = f"{shape_name}_{k}"
            pad_inputs = ["a", f"pads_{shape_name}"]
            if value is not None:
                inits.append(numpy_helper.from_array(np.array(value, np.float32), f"v_{tag}"))
                pad_inputs.append(f"v_{tag}")
            nodes.append(helper.make_node("Pad", pad_inputs, [f"p_{tag}"], mode=mode))
            nodes.append(helper.make_node("Conv", [f"p_{tag}", "w2"], [f"y_{tag}"]))
            outputs.append(f"y_{tag}")
    return _model(nodes, [1, channels, 10, 10], inits, outputs)


@pytest.mark.parametrize("group", [1, 2, 8])
def test_conv_pad_conv_compiles_correctly(group):
    """The border of a Pad fused after a conv was never written (values up to 1e31 that
    changed from call to call) for end-only and asymmetric pads, grouped convs too."""
    model = conv_pad_conv(group, "constant")
    artifact = compile_model(model, "host")
    result = verify_artifact(artifact, model, raise_on_failure=False)
    assert result.ok, result.problem()
    assert len(result.comparison.outputs) == 2 * len(PAD_SHAPES)


@pytest.mark.parametrize("mode", ["reflect", "edge"])
def test_conv_pad_conv_other_modes(mode):
    model = conv_pad_conv(2, mode)
    result = verify_artifact(compile_model(model, "host"), model, raise_on_failure=False)
    assert result.ok, result.problem()


def stem_with_same_upper_conv() -> onnx.ModelProto:
    """The PP-OCRv6 stem: Conv 3x3 -> Relu -> Conv 2x2 with auto_pad SAME_UPPER (an even
    kernel pads one more at the end), which TVM imports as an explicit end-only Pad that
    FuseOps puts after the first conv: the miscompile seen on the real detector and
    recognizer, which have no Pad node of their own."""
    rng = np.random.default_rng(1)
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.standard_normal(16).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((8, 16, 2, 2)).astype(np.float32), "w2"),
        numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], kernel_shape=[2, 2],
                         auto_pad="SAME_UPPER"),
    ]
    return _model(nodes, [1, 3, 48, 80], inits, ["y"], opset=11)


def test_same_upper_conv_stem_kernel_by_kernel():
    """The kernel-level bisection finds no wrong kernel in the stem (before the fix it
    reported `fused_conv2d_add_relu_pad` wrong, rel error ~5e-2)."""
    model = stem_with_same_upper_conv()
    target = resolve_target("host")
    checks = check_kernels(prepare_module(model, target).mod, target)
    assert any("pad" in c.name for c in checks), [c.name for c in checks]
    assert all(c.ok for c in checks), [(c.name, c.rule, c.rel_error) for c in checks if not c.ok]
    result = verify_artifact(compile_model(model, "host"), model, raise_on_failure=False)
    assert result.ok, result.problem()


def test_kernel_check_catches_a_wrong_schedule(monkeypatch):
    """The bisection can fail: with the epilogue forced into the conv tile (the old
    behaviour) the Conv->Pad kernel is reported wrong."""
    from onnxforge.kernels import cpu_contraction

    def old_tile_epilogue(sch, anchor, blocks):
        rest = sched_common.inline_epilogue_chain(sch, blocks)
        return (rest[0] if rest else sch.cache_write(anchor, 0, "global")), []

    monkeypatch.setattr(cpu_contraction, "tile_epilogue", old_tile_epilogue)
    model = stem_with_same_upper_conv()
    target = resolve_target("host")
    checks = check_kernels(prepare_module(model, target).mod, target)
    assert any(not c.ok and "pad" in c.name for c in checks), \
        [(c.name, c.rel_error) for c in checks]


def _largest_scheduled_expression(ops: list[str], length: int) -> int:
    nodes, prev = [], "x"
    for i in range(length):
        nodes.append(helper.make_node(ops[i % len(ops)], [prev], [f"t{i}"]))
        prev = f"t{i}"
    model = _model(nodes, [1, 4, 8, 8], [], [prev])
    target = resolve_target("host")
    from onnxforge.kernels import default_schedule_pass

    with target:
        mod = default_schedule_pass(target)(prepare_module(model, target).mod)
    sizes = [sched_common._count_nodes(f.body) for _, f in mod.functions_items()
             if isinstance(f, tvm.tirx.PrimFunc)]
    return max(sizes)


@pytest.mark.parametrize("ops", [["Tanh"], ["Sigmoid"], ["Sigmoid", "Tanh"]])
def test_activation_chains_grow_linearly(ops):
    """Inlining a fast-math activation into the next one copied it ~29 times per step:
    4 Tanh took 22 s and 740 MiB to compile, 5 over 5 GiB. The scheduled code must now
    grow linearly with the chain (counted in TIR nodes, not seconds)."""
    short, long = (_largest_scheduled_expression(ops, n) for n in (3, 6))
    assert long <= 2.5 * short, (short, long)


class _Flaky:
    """An artifact's run that returns different numbers on every call."""

    def __init__(self, real):
        self.real = real
        self.calls = 0

    def __call__(self, inputs, **kwargs):
        self.calls += 1
        out = self.real(inputs, **kwargs)
        return {k: v + np.float32(self.calls * 1e-3) for k, v in out.items()}


def _tiny_model() -> onnx.ModelProto:
    rng = np.random.default_rng(2)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    return _model([helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
                  [1, 3, 8, 8], [w], ["y"])


def test_verify_artifact_catches_nondeterminism(monkeypatch):
    """Outputs that change between two runs on one input fail, even when every single
    run is within tolerance of ORT."""
    model = _tiny_model()
    artifact = compile_model(model, "host")
    assert verify_artifact(artifact, model).ok
    flaky = _Flaky(artifact.run)
    monkeypatch.setattr(artifact, "run", flaky)
    result = verify_artifact(artifact, model, rtol=1.0, raise_on_failure=False)
    assert not result.ok and result.nondeterministic == ["y"]
    assert flaky.calls == 4  # three inputs, the first one twice
    with pytest.raises(VerificationError, match="changed between two runs"):
        verify_artifact(artifact, model, rtol=1.0)


def test_compile_verify_failure_leaves_no_library(tmp_path, monkeypatch):
    model_path = tmp_path / "m.onnx"
    onnx.save(_tiny_model(), model_path)
    out = tmp_path / "m.so"
    real_run = TVMArtifact.run

    def wrong(self, inputs, **kwargs):
        return {k: v * 2 for k, v in real_run(self, inputs, **kwargs).items()}

    monkeypatch.setattr(TVMArtifact, "run", wrong)
    result = CliRunner().invoke(app, ["compile", str(model_path), "-t", "host", "-o", str(out),
                                      "--verify", "--report", str(tmp_path / "r.json")])
    # in-process, so the patch applies: the exception `main()` turns into exit code 5
    assert isinstance(result.exception, VerificationError), result.output
    assert result.exception.exit_code == 5
    assert "nothing was written" in str(result.exception)
    assert not out.exists() and not (tmp_path / "r.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]

    # host code runs here, so compile verifies it without being asked
    result = CliRunner().invoke(app, ["compile", str(model_path), "-t", "host", "-o", str(out)])
    assert isinstance(result.exception, VerificationError), result.output
    assert not out.exists()
    unchecked = CliRunner().invoke(app, ["compile", str(model_path), "-t", "host", "-o",
                                         str(out), "--no-verify"])
    assert unchecked.exit_code == 0 and out.is_file(), unchecked.output  # as asked
    out.unlink()

    monkeypatch.setattr(TVMArtifact, "run", real_run)
    result = CliRunner().invoke(app, ["compile", str(model_path), "-t", "host", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "same twice" in result.output and out.is_file()


def test_bench_refuses_to_time_a_wrong_build(tmp_path, monkeypatch):
    model_path = tmp_path / "m.onnx"
    onnx.save(_tiny_model(), model_path)
    real_run = TVMArtifact.run
    monkeypatch.setattr(TVMArtifact, "run",
                        lambda self, inputs, **kw: {k: v + 1 for k, v in
                                                    real_run(self, inputs, **kw).items()})
    with pytest.raises(VerificationError, match="differs from onnxruntime"):
        benchmark_models([model_path], backend="tvm", repeat=2, warmup=1)


def _onnxforge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxforge.cli", *map(str, args)],
                          check=False, capture_output=True, text=True, timeout=600)


def test_compile_runs_cleanup_by_default(tmp_path):
    """PP-OCR's direction classifier computes a Reshape's shape at run time, which TVM's
    importer refuses; with fixed shapes compile runs `cleanup` itself (and says so)."""
    model = zoo_path("ppocr_cls")
    out = tmp_path / "cls.so"
    args = ["compile", model, "-t", "host", "-o", out, "--input-shape", "x:1,3,48,192"]
    plain = _onnxforge(*args, "-p", "")
    assert plain.returncode == 8, plain.stderr  # unsupported: the Reshape's shape input
    assert "Reshape" in plain.stderr and "Traceback" not in plain.stderr
    assert not out.exists()
    result = _onnxforge(*args, "--verify")
    assert result.returncode == 0, result.stderr
    assert "the default before compiling" in result.stderr
    assert out.is_file()


def resize_model(scale: float, mode: str, transform: str) -> onnx.ModelProto:
    scales = numpy_helper.from_array(np.array([1, 1, scale, scale], np.float32), "scales")
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode=mode,
                            coordinate_transformation_mode=transform)
    return _model([node], [1, 4, 20, 13], [scales], ["y"], opset=19)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_resize_with_fractional_sizes_is_refused(mode):
    """Found by the fuzzer: 13 x 1.5 = 19.5 -> TVM maps coordinates with 19/13, ONNX with
    1.5 (rel error 0.4-1.2, default schedules or not). Refused, naming the node."""
    with pytest.raises(UnsupportedOpError, match="'up' .*Resize.*not whole"):
        compile_model(resize_model(1.5, mode, "half_pixel"), "host")
    # the Resize input is also a graph output (its shape is only declared there)
    scales = numpy_helper.from_array(np.array([1, 1, 1.5, 1.5], np.float32), "scales")
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Resize", ["r", "", "scales"], ["y"], name="up", mode=mode)]
    with pytest.raises(UnsupportedOpError, match="'up' .*Resize.*not whole"):
        compile_model(_model(nodes, [1, 4, 19, 11], [scales], ["y", "r"], opset=19), "host")
    for scale, transform in ((2.0, "half_pixel"), (1.5, "align_corners")):
        model = resize_model(scale, mode, transform)
        result = verify_artifact(compile_model(model, "host"), model, raise_on_failure=False)
        assert result.ok, (scale, transform, result.problem())


def test_api_compile_verifies_then_writes(tmp_path, monkeypatch):
    """`onnxforge.api.compile` is the recipe the CLI runs: verified before anything is
    written, nothing written when the check fails."""
    from onnxforge import api

    model_path = tmp_path / "m.onnx"
    onnx.save(_tiny_model(), model_path)
    out, report = tmp_path / "m.so", tmp_path / "m.json"
    built = api.compile(model_path, "host", out, report_path=report)
    assert built.verification is not None and built.verification.ok
    assert built.written == [str(out)] and out.is_file() and report.is_file()
    assert built.pipeline == "cleanup"  # fixed shapes: the default pipeline ran
    out.unlink()
    report.unlink()

    real_run = TVMArtifact.run
    monkeypatch.setattr(TVMArtifact, "run",
                        lambda self, inputs, **kw: {k: -v for k, v in
                                                    real_run(self, inputs, **kw).items()})
    with pytest.raises(VerificationError) as failed:
        api.compile(model_path, "host", out, report_path=report)
    assert not failed.value.verification.ok and failed.value.report["target"] == "host"
    assert not out.exists() and not report.exists()


def test_errors_after_the_default_cleanup_name_the_file(tmp_path):
    """compile runs `cleanup` on the loaded model first; a refusal afterwards still
    names the user's file, not '<in-memory model>'."""
    from onnxforge import api

    path = tmp_path / "upsample.onnx"
    onnx.save(resize_model(1.5, "linear", "half_pixel"), path)
    with pytest.raises(UnsupportedOpError, match=r"upsample\.onnx \(after cleanup\).*'up'"):
        api.compile(path, "host", tmp_path / "u.so")
    assert not (tmp_path / "u.so").exists()


def test_resize_align_corners_to_one_pixel_is_refused():
    """Found by the fuzzer (seed 9, graph 114): TVM's legalization divides by
    (output size - 1) and fails with an internal error; refused naming the node."""
    model = resize_model(0.5, "nearest", "align_corners")
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 3  # 3 x 0.5 -> 1 row
    with pytest.raises(UnsupportedOpError, match="'up' .*align_corners.*resized to 1"):
        compile_model(model, "host")
