"""The `onnxforge` command end to end, run as a user would (a subprocess)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from builders import conv_relu_gemm
from onnxforge.backends.ort import run_model
from onnxforge.ir import load_model


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "onnxforge.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300, check=False)


@pytest.fixture
def small_model(tmp_path):
    path = tmp_path / "small.onnx"
    onnx.save(conv_relu_gemm(batch="N"), path)
    return path


def test_inspect_json_counts_params_and_macs(small_model):
    result = cli("inspect", small_model, "--json", "--input-shape", "x:2,3,8,8")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["params"] == 8 * 3 * 3 * 3 + 8 + 10 * 512 + 10
    # conv: N * Cout * H * W * Cin * kh * kw; gemm: N * out * in
    assert info["macs"] == 2 * 8 * 8 * 8 * 3 * 9 + 2 * 10 * 512
    assert info["inputs"][0]["shape"] == ["N", 3, 8, 8]


def test_inspect_without_shapes_says_macs_need_them(small_model):
    result = cli("inspect", small_model, "--json")
    info = json.loads(result.stdout)
    assert info["macs"] is None and "--input-shape x:1,3,8,8" in info["macs_note"]


def test_optimize_example_writes_model_and_report(tmp_path):
    out, report = tmp_path / "digits_opt.onnx", tmp_path / "r.json"
    result = cli("optimize", "--example", "-p", "cleanup", "-o", out, "--report", report)
    assert result.returncode == 0, result.stderr
    data = json.loads(report.read_text())
    assert data["pipeline"] == "cleanup"
    assert data["error"]["max_rel_l2"] < 1e-5
    assert data["error"]["reference_accuracy"] == data["error"]["candidate_accuracy"] > 0.9
    assert data["error"]["samples"] == 360  # the whole labelled test set
    assert data["latency"]["before_ms"] > 0
    test = np.load(load_example_data())
    x = test["input"][:1]
    ref = run_model(load_model(onnx_example()), {"input": x})["logits"]
    np.testing.assert_allclose(run_model(load_model(out), {"input": x})["logits"], ref,
                               rtol=1e-5, atol=1e-6)


def onnx_example():
    from onnxforge.api import EXAMPLE_MODEL

    return EXAMPLE_MODEL


def load_example_data():
    from onnxforge.api import EXAMPLE_TEST_DATA

    return EXAMPLE_TEST_DATA


@pytest.mark.parametrize("content, fragment", [
    (b"garbage" * 20, "not a readable ONNX protobuf"),
    (None, "no such model file"),
])
def test_bad_input_exits_nonzero_and_writes_nothing(tmp_path, content, fragment):
    src = tmp_path / "bad.onnx"
    if content is not None:
        src.write_bytes(content)
    out = tmp_path / "out.onnx"
    result = cli("optimize", src, "-o", out, "-p", "cleanup")
    assert result.returncode != 0
    assert fragment in result.stderr and "bad.onnx" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_unknown_pass_lists_available(small_model, tmp_path):
    out = tmp_path / "out.onnx"
    result = cli("optimize", small_model, "-o", out, "-p", "cleanup,nosuch", "-s", "x:1,3,8,8")
    assert result.returncode == 3
    assert "unknown pass 'nosuch'" in result.stderr and "cleanup" in result.stderr
    assert not out.exists()


def test_dynamic_dims_need_input_shape(small_model, tmp_path):
    result = cli("optimize", small_model, "-o", tmp_path / "o.onnx", "-p", "cleanup")
    assert result.returncode == 7
    assert "--input-shape x:1,3,8,8" in result.stderr


def test_input_file_never_modified(small_model, tmp_path):
    before = small_model.read_bytes()
    result = cli("optimize", small_model, "-o", tmp_path / "o.onnx", "-p", "cleanup",
                 "-s", "x:1,3,8,8", "--no-latency")
    assert result.returncode == 0, result.stderr
    assert small_model.read_bytes() == before
    refused = cli("optimize", small_model, "-o", small_model, "-p", "cleanup", "-s", "x:1,3,8,8")
    assert refused.returncode != 0 and small_model.read_bytes() == before


def test_bench_prints_both_models_and_ratio(small_model, tmp_path):
    result = cli("bench", small_model, small_model, "-s", "x:1,3,8,8", "--repeat", "10",
                 "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    rows = json.loads((tmp_path / "b.json").read_text())
    assert len(rows) == 2 and rows[0]["ratio"] == 1.0
    assert all(r["median_ms"] > 0 and r["repeat"] == 10 for r in rows)
    assert "small.onnx" in result.stdout


def test_debug_shows_traceback(tmp_path):
    result = cli("--debug", "inspect", tmp_path / "missing.onnx")
    assert result.returncode != 0 and "Traceback" in result.stderr


def test_bench_tvm_compares_against_ort_on_the_same_model(small_model, tmp_path):
    pytest.importorskip("tvm")
    result = cli("bench", small_model, "-s", "x:1,3,8,8", "--backend", "tvm", "--repeat", "10",
                 "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stderr
    ort_row, tvm_row = json.loads((tmp_path / "b.json").read_text())
    assert (ort_row["backend"], tvm_row["backend"]) == ("ort", "tvm")
    assert tvm_row["baseline"] == ort_row["label"]
    assert tvm_row["ratio"] == pytest.approx(tvm_row["median_ms"] / ort_row["median_ms"])


def test_slower_warning_only_past_the_noise_margin():
    """The 'output runs slower' warning fires for a real slowdown, not for the few percent
    one interleaved measurement moves by (the digits example's exact run: 0.019 -> 0.020)."""
    import io

    from onnxforge.report import SLOWER_WARNING, render_steps
    from rich.console import Console

    def printed(speedup):
        out = io.StringIO()
        report = {"pipeline": "cleanup", "steps": [], "latency": {"threads": 1, "before_ms": 1.0,
                                           "after_ms": 1.0 / speedup, "speedup": speedup}}
        render_steps(report, Console(file=out, width=200))
        return out.getvalue()

    assert "runs slower" not in printed(0.97)
    assert "runs slower" in printed(SLOWER_WARNING - 0.1)
