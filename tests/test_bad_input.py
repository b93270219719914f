"""Bad data and bad options are refused with one line and the right exit code.

Run as a user would (a subprocess of the `onnxforge` command) wherever the exit code
and the printed message are the behaviour under test; in-process for the metrics.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import onnx
import onnx_ir
import pytest
from builders import conv_relu_gemm, make_model
from onnx import TensorProto, helper, numpy_helper
from onnxforge import api
from onnxforge import ir as forge_ir
from onnxforge.errors import (
    BackendError,
    BudgetExceededError,
    InputSpecError,
    InvalidModelError,
    PipelineError,
    VerificationError,
)
from onnxforge.metrics import compute_metrics
from onnxforge.passes.base import load_builtin_passes
from onnxforge.verify import compare_outputs

USAGE = 2  # click's exit status for usage errors


def cli(*args, hide_tvm: bool = False):
    """Run `onnxforge ARGS`; with hide_tvm, as on an install without the tvm extra
    (`import tvm` raises ImportError, exactly what Python does for a missing package)."""
    prelude = "import sys; sys.modules['tvm'] = None; " if hide_tvm else "import sys; "
    code = prelude + "sys.argv[0] = 'onnxforge'; from onnxforge.cli import main; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=300, check=False)


def assert_one_line_error(result, code: int, *fragments: str) -> str:
    """Exit `code`, one non-empty stderr line naming `fragments`, no traceback."""
    err = result.stderr.strip()
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], err)
    assert "Traceback" not in result.stderr and "internal error" not in err, err
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, (fragment, err)
    return err


def assert_usage_error(result, *fragments: str) -> None:
    """click's usage error message, exit 2, no traceback."""
    assert result.returncode == USAGE, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr
    assert "Error" in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture
def model(tmp_path):
    """x[1,3,8,8] -> Conv -> Relu -> Flatten -> Gemm -> y[1,10]."""
    path = tmp_path / "model.onnx"
    onnx.save(conv_relu_gemm(), path)
    return path


def _samples(n: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 1, 3, 8, 8)).astype(np.float32)


# ------------------------------------------------------------ 1. NaN / Inf data


def test_nan_in_calibration_data_is_refused_naming_input_and_sample(model, tmp_path):
    x = _samples()
    x[2, 0, 1, 4, 4] = np.nan
    np.savez(tmp_path / "calib.npz", x=x)
    out = tmp_path / "q.onnx"
    result = cli("optimize", model, "-o", out, "-p", "quantize(int8)", "--calib",
                 tmp_path / "calib.npz", "--max-error", "0.05", "--no-latency")
    assert_one_line_error(result, InputSpecError.exit_code, "'x'", "sample 2", "NaN")
    assert not out.exists()


def test_inf_in_verification_data_is_refused(model, tmp_path):
    x = _samples(6)
    x[5, 0, 0, 0, 0] = -np.inf
    np.savez(tmp_path / "verify.npz", x=x)
    out = tmp_path / "o.onnx"
    result = cli("optimize", model, "-o", out, "-p", "cleanup", "--verify-data",
                 tmp_path / "verify.npz", "--no-latency")
    assert_one_line_error(result, InputSpecError.exit_code, "'x'", "sample 5", "Inf")
    assert not out.exists()


def test_nan_error_measurement_is_never_within_budget():
    ref = {"y": np.ones((2, 10), np.float32), "z": np.ones((2, 3), np.float32)}
    got = {"y": np.full((2, 10), np.nan, np.float32), "z": np.ones((2, 3), np.float32)}
    comparison = compare_outputs(ref, got)
    y = comparison.outputs[0]
    assert math.isnan(y.rel_l2) and math.isnan(y.max_abs)  # NaN is kept, not dropped by max()
    assert not y.within(1e-3)
    assert not comparison.within(1e-3)
    assert math.isnan(comparison.max_rel_l2)
    # the NaN output listed last still makes the summary NaN
    assert math.isnan(compare_outputs({"z": ref["z"], "y": ref["y"]},
                                      {"z": got["z"], "y": got["y"]}).max_rel_l2)
    result = api.OptimizeResult(None, [], {"budget": {}}, error=comparison)
    with pytest.raises(BudgetExceededError, match="relative L2 error nan"):
        api._enforce_budget(result, 0.05, None, force=False)


@pytest.mark.parametrize("value", ["nan", "-1", "inf"])
def test_bad_max_error_is_a_usage_error(model, tmp_path, value):
    out = tmp_path / "o.onnx"
    result = cli("optimize", model, "-o", out, "--max-error", value, "--no-latency")
    assert_usage_error(result, "--max-error")
    assert not out.exists()


def test_bad_max_error_is_refused_by_the_api(model, tmp_path):
    for value in (float("nan"), -0.5, float("inf")):
        with pytest.raises(InputSpecError, match="max_error"):
            api.optimize(model, "cleanup", output=tmp_path / "o.onnx", max_error=value)
    assert not (tmp_path / "o.onnx").exists()


# ------------------------------------------------------------ 2. verify


def test_verify_exits_5_when_the_rtol_check_fails(model, tmp_path):
    other = tmp_path / "other.onnx"
    onnx.save(conv_relu_gemm(seed=1), other)
    result = cli("verify", model, other, "--rtol", "1e-9", "--batches", "2")
    assert result.returncode == VerificationError.exit_code, (result.stdout, result.stderr)
    assert "relative L2 error" in result.stderr and "Traceback" not in result.stderr


def test_verify_nan_output_fails_the_rtol_check(tmp_path):
    def unary(op):
        return make_model([helper.make_node(op, ["x"], ["y"], name="f")],
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])])

    onnx.save(unary("Abs"), tmp_path / "abs.onnx")
    onnx.save(unary("Sqrt"), tmp_path / "sqrt.onnx")  # NaN for the negative random inputs
    result = cli("verify", tmp_path / "abs.onnx", tmp_path / "sqrt.onnx", "--rtol", "0.5",
                 "--batches", "2")
    assert result.returncode == VerificationError.exit_code, (result.stdout, result.stderr)


def test_verify_zero_batches_is_an_error(tmp_path):
    batch4 = tmp_path / "b4.onnx"
    onnx.save(conv_relu_gemm(batch=4), batch4)
    np.savez(tmp_path / "few.npz", x=np.zeros((2, 3, 8, 8), np.float32))  # < one batch
    result = cli("verify", batch4, batch4, "--data", tmp_path / "few.npz")
    assert_one_line_error(result, VerificationError.exit_code, "no batch")
    assert_usage_error(cli("verify", batch4, batch4, "--batches", "0"), "--batches")


# ------------------------------------------------------------ 3. usage errors


@pytest.mark.parametrize("args, fragment", [
    (["inspect", "{model}", "--bogus"], "--bogus"),
    (["inspect"], "Missing argument"),
    (["optimize", "{model}", "--threads", "abc"], "--threads"),
    (["bench", "{model}", "--repeat"], "--repeat"),
    (["no-such-command"], "no-such-command"),
])
def test_usage_errors_print_usage_and_exit_2(model, args, fragment):
    result = cli(*[a.format(model=model) for a in args])
    assert_usage_error(result, fragment)
    if args[-1] == "--bogus":
        assert "Usage: onnxforge inspect [OPTIONS]" in result.stderr


# ------------------------------------------------------------ 4. refused options and models


def test_empty_pipeline_is_refused_by_optimize(model, tmp_path):
    out = tmp_path / "o.onnx"
    result = cli("optimize", model, "-o", out, "-p", "", "--no-latency")
    assert_one_line_error(result, PipelineError.exit_code, "empty")
    assert not out.exists()


@pytest.mark.parametrize("pipeline, fragment", [
    ("fuse(rounds=2,rounds=3)", "given twice"),
    ("fuse(rounds=-1)", "rounds=-1"),
    ("prune(ratio=1.5)", "ratio=1.5"),
    ("quantize(int8,percentile=nan)", "percentile"),
])
def test_bad_pass_options_are_refused(model, tmp_path, pipeline, fragment):
    out = tmp_path / "o.onnx"
    result = cli("optimize", model, "-o", out, "-p", pipeline, "--no-latency")
    assert_one_line_error(result, PipelineError.exit_code, fragment)
    assert not out.exists()


def test_option_ranges_are_checked_for_every_pass():
    from onnxforge.passes.base import check_options

    passes = load_builtin_passes()
    for name, cls in passes.items():
        check_options(name, cls.Options())  # every default is in range
    with pytest.raises(PipelineError, match="rounds=0"):
        passes["fuse"](rounds=0)  # also when built from Python, not pipeline text
    with pytest.raises(PipelineError, match="smooth"):
        passes["quantize"](smooth=2.0)
    passes["quantize"](smooth=-1.0)  # the documented 'auto' sentinel stays allowed


@pytest.mark.parametrize("threads", ["-3", "0"])
def test_bad_thread_counts_are_usage_errors(model, tmp_path, threads):
    out = tmp_path / "o.onnx"
    assert_usage_error(cli("optimize", model, "-o", out, "--threads", threads), "--threads")
    assert_usage_error(cli("bench", model, "--threads", threads), "--threads")
    assert not out.exists()


def _save(proto, path):
    onnx.save(proto, path)
    return path


def test_newer_ir_version_or_opset_than_onnx_supports_is_refused(tmp_path):
    ir99 = conv_relu_gemm()
    ir99.ir_version = 99
    opset99 = conv_relu_gemm()
    opset99.opset_import[0].version = 99
    for proto, fragment in ((ir99, "IR version 99"), (opset99, "opset 99")):
        path = _save(proto, tmp_path / "new.onnx")
        out = tmp_path / "o.onnx"
        result = cli("optimize", path, "-o", out, "--no-latency")
        assert_one_line_error(result, InvalidModelError.exit_code, fragment)
        assert not out.exists()
    with pytest.raises(InvalidModelError, match=f"supports \\(IR version {onnx.IR_VERSION}\\)"):
        forge_ir.load_model(_save(ir99, tmp_path / "ir99.onnx"))


def _duplicate_output_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    return make_model([helper.make_node("Relu", ["x"], ["y"], name="relu")], [x], [y, y])


def test_duplicate_graph_output_names_are_refused(tmp_path):
    path = _save(_duplicate_output_model(), tmp_path / "dup.onnx")
    assert_one_line_error(cli("inspect", path), InvalidModelError.exit_code, "'y'",
                          "listed twice")


def _opset99_model() -> onnx.ModelProto:
    proto = conv_relu_gemm()
    proto.opset_import[0].version = 99
    return proto


@pytest.mark.parametrize("make", [_duplicate_output_model, _opset99_model])
def test_compile_validates_the_model_before_tvm(tmp_path, make):
    """compile refuses what optimize refuses, before it needs TVM at all."""
    path = _save(make(), tmp_path / "bad.onnx")
    out = tmp_path / "m.so"
    result = cli("compile", path, "-o", out, hide_tvm=True)
    assert_one_line_error(result, InvalidModelError.exit_code, str(path))
    assert not out.exists()


# ------------------------------------------------------------ 5. input spec


def test_input_shape_contradicting_the_model_is_an_input_spec_error(model, tmp_path):
    out = tmp_path / "o.onnx"
    for command in (["optimize", model, "-o", out, "--no-latency"], ["inspect", model]):
        result = cli(*command, "--input-shape", "x:1,4,8,8")
        assert_one_line_error(result, InputSpecError.exit_code, "'x'", "[1,3,8,8]",
                              "[1,4,8,8]")
    assert not out.exists()


def test_unreadable_calibration_image_names_the_file(model, tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    out = tmp_path / "q.onnx"
    result = cli("optimize", model, "-o", out, "-p", "quantize(int8)", "--calib", folder,
                 "--no-latency")
    assert_one_line_error(result, InputSpecError.exit_code, "broken.png", "not a readable image")
    assert not out.exists()


# ------------------------------------------------------------ 6./7. MACs


def _matmul_relu(k: int = 512, n: int = 1024, rows: int = 4) -> onnx.ModelProto:
    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((k, n)).astype(np.float32), "w")
    return make_model(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
         helper.make_node("Relu", ["h"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])


def test_macs_of_a_model_over_the_protobuf_limit_with_external_data(tmp_path, monkeypatch):
    """A >1 GiB model cannot go through one protobuf for shape inference; its MACs must
    still be counted (the outside test's 2.2 GiB MatMul showed 0). The limit is lowered
    here so that a 2 MiB model with external data takes that same path."""
    path = tmp_path / "mm.onnx"
    onnx.save(_matmul_relu(), path, save_as_external_data=True, location="mm.data",
              size_threshold=0)
    monkeypatch.setattr(forge_ir, "PROTOBUF_LIMIT", 1000)
    info = api.inspect_model(path)
    assert info["macs"] == 4 * 512 * 1024
    assert info["macs_note"] is None


def test_macs_of_a_matmul_with_large_dims(tmp_path):
    a = helper.make_tensor_value_info("a", TensorProto.FLOAT, [8, 65536, 65536])
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [8, 65536, 65536])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    path = _save(make_model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                            [a, b], [y]), tmp_path / "big.onnx")
    assert api.inspect_model(path)["macs"] == 8 * 65536**3


def _minus_one_model() -> onnx.ModelProto:
    """An exporter's -1 for 'any size', plus symbolic spatial dims."""
    w = numpy_helper.from_array(np.ones((8, 3, 1, 1), np.float32), "w")
    return make_model(
        [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [-1, 3, "H", "W"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [-1, 8, "H", "W"])], [w])


def test_inspect_dynamic_dims_suggests_a_real_shape_and_no_negative_macs(tmp_path):
    path = _save(_minus_one_model(), tmp_path / "dyn.onnx")
    result = cli("inspect", path, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["macs"] is None
    assert "--input-shape x:1,3,224,224" in info["macs_note"]
    given = json.loads(cli("inspect", path, "--json", "--input-shape", "x:1,3,224,224").stdout)
    assert given["macs"] == 8 * 224 * 224 * 3


def test_shape_messages_name_the_python_option_in_the_api(tmp_path):
    """The same problems through the Python API name `input_shapes=...`, not a flag."""
    from onnxforge import api

    path = _save(_minus_one_model(), tmp_path / "dyn.onnx")
    note = api.inspect_model(path)["macs_note"]
    assert "input_shapes={'x': (1, 3, 224, 224)}" in note and "--input-shape" not in note
    with pytest.raises(InputSpecError, match=r"^input_shapes names 'y', but the model's inputs"):
        api.inspect_model(path, {"y": (1, 3, 8, 8)})
    with pytest.raises(InputSpecError, match=r"input_shapes=\{'x': \(0, 3, 8, 8\)\}: dims"):
        api.inspect_model(path, {"x": (0, 3, 8, 8)})


def test_minus_one_dims_never_give_negative_macs():
    model = forge_ir.load_model(_matmul_relu().SerializeToString())
    model.graph.inputs[0].shape = onnx_ir.Shape([-1, 512])
    metrics = compute_metrics(model)
    assert metrics.macs == 0 and metrics.node_macs == {}
    assert metrics.unknown_mac_nodes == ["mm"]
    assert "mm" in metrics.unknown_note()


def test_unknown_macs_name_the_nodes(tmp_path):
    nodes, prev = [], "x"
    for i in range(7):
        nodes.append(helper.make_node("MatMul", [prev, "w"], [f"h{i}"], name=f"mm{i}"))
        prev = f"h{i}"
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    proto = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                       [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], [w])
    model = forge_ir.load_model(proto.SerializeToString())
    note = compute_metrics(model).unknown_note()
    assert note.startswith("MACs unknown for 7 node(s)")
    assert "mm0, mm1, mm2, mm3, mm4 and 2 more" in note


# ------------------------------------------------------------ 8. no TVM


def test_compile_without_tvm_says_which_extra_to_install(model, tmp_path):
    out = tmp_path / "m.so"
    result = cli("compile", model, "-o", out, hide_tvm=True)
    assert_one_line_error(result, BackendError.exit_code, "needs `pip install onnxforge[tvm]`")
    assert not out.exists()


def test_two_nodes_writing_one_value_is_an_invalid_model(tmp_path):
    """onnx_ir refuses the graph while parsing it; that was exit 70 'internal error'."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["x"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    path = tmp_path / "dup.onnx"
    onnx.save(helper.make_model(graph), path)
    for command in (["inspect", path], ["optimize", path, "-o", tmp_path / "o.onnx"]):
        assert_one_line_error(cli(*command), 2, "dup.onnx", "'y' is redeclared")
    assert not (tmp_path / "o.onnx").exists()
