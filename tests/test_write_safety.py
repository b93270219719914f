"""Writes never destroy what a run reads, never follow links, never replace devices, and
external data never escapes the model's folder (issue 12 "Trust"; issue 20 one writer)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_relu_gemm, make_model
from onnx import TensorProto, helper, numpy_helper
from onnxforge.backends.ort import run_model
from onnxforge.errors import ModelLoadError, OnnxforgeError
from onnxforge.ir import load_model, save_model

X = {"x": np.linspace(-1, 1, 3 * 8 * 8, dtype=np.float32).reshape(1, 3, 8, 8)}


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "onnxforge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, check=False)


def snapshot(folder):
    """{name: (kind, bytes or link target)} of everything in `folder` (links not followed)."""
    out = {}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.is_symlink():
            out[entry.name] = ("link", os.readlink(entry.path))
        elif entry.is_file():
            with open(entry.path, "rb") as handle:
                out[entry.name] = ("file", handle.read())
        else:
            out[entry.name] = ("other", stat.S_IFMT(os.lstat(entry.path).st_mode))
    return out


def temp_leftovers(folder):
    return [p.name for p in folder.iterdir() if "onnxforge-tmp" in p.name or p.suffix == ".tmp"]


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_relu_gemm(), path)
    return path


@pytest.fixture
def external_model(tmp_path):
    """m.onnx with every weight in m.onnx.data."""
    folder = tmp_path / "ext"
    folder.mkdir()
    path = folder / "m.onnx"
    onnx.save(conv_relu_gemm(), path, save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    return path


def optimize_args(model, *extra):
    return ("optimize", model, "-p", "cleanup", "--no-latency", "--no-verify", *extra)


# ------------------------------------------------------------- written vs read paths


@pytest.mark.parametrize("link", ["same", "symlink", "hardlink"])
def test_optimize_report_over_the_input_is_refused(model_path, tmp_path, link):
    target = model_path
    if link == "symlink":
        target = tmp_path / "alias.onnx"
        target.symlink_to(model_path)
    elif link == "hardlink":
        target = tmp_path / "alias.onnx"
        os.link(model_path, target)
    before = snapshot(tmp_path)
    result = cli(*optimize_args(model_path, "-o", tmp_path / "out.onnx", "--report", target))
    assert result.returncode != 0
    message = " ".join(result.stderr.split())
    assert str(target) in message and str(model_path) in message, result.stderr
    assert snapshot(tmp_path) == before  # input intact, no output, no temp files


def test_optimize_output_over_the_inputs_external_data_is_refused(external_model):
    folder = external_model.parent
    before = snapshot(folder)
    data = folder / "m.onnx.data"
    result = cli(*optimize_args(external_model, "-o", data))
    assert result.returncode != 0
    assert str(data) in " ".join(result.stderr.split())
    assert snapshot(folder) == before
    np.testing.assert_allclose(run_model(load_model(external_model), X)["y"],
                               run_model(load_model(conv_relu_gemm()), X)["y"], rtol=1e-6)


def test_optimize_report_over_a_calibration_file_is_refused(model_path, tmp_path):
    calib = tmp_path / "calib"
    calib.mkdir()
    np.save(calib / "x.npy", np.ones((2, 1, 3, 8, 8), np.float32))
    before = snapshot(calib)
    result = cli("optimize", model_path, "-p", "cleanup", "--no-latency", "--calib", calib,
                 "-o", tmp_path / "out.onnx", "--report", calib / "x.npy")
    assert result.returncode != 0
    assert "calibration data" in result.stderr
    assert snapshot(calib) == before
    assert not (tmp_path / "out.onnx").exists()


def test_bench_json_over_a_model_is_refused(model_path, tmp_path):
    other = tmp_path / "other.onnx"
    onnx.save(conv_relu_gemm(seed=1), other)
    before = snapshot(tmp_path)
    result = cli("bench", model_path, other, "--repeat", "5", "--warmup", "1", "--json", other)
    assert result.returncode != 0
    assert str(other) in " ".join(result.stderr.split())
    assert snapshot(tmp_path) == before


def test_bench_json_is_written_elsewhere(model_path, tmp_path):
    out = tmp_path / "bench.json"
    result = cli("bench", model_path, "--repeat", "5", "--warmup", "1", "--json", out)
    assert result.returncode == 0, result.stderr
    assert json.loads(out.read_text())[0]["repeat"] >= 1


def test_compile_report_over_the_input_is_refused(model_path, tmp_path):
    pytest.importorskip("tvm")
    before = snapshot(tmp_path)
    result = cli("compile", model_path, "-t", "host", "-o", tmp_path / "m.so",
                 "--report", model_path)
    assert result.returncode != 0
    assert str(model_path) in " ".join(result.stderr.split()), result.stderr
    assert snapshot(tmp_path) == before


def test_python_api_refuses_too(model_path, tmp_path):
    from onnxforge.api import benchmark_models, optimize
    from onnxforge.errors import UnsafeWriteError

    before = snapshot(tmp_path)
    with pytest.raises(UnsafeWriteError, match="same file"):
        optimize(model_path, "cleanup", output=tmp_path / "o.onnx", report_path=model_path,
                 verify=False)
    with pytest.raises(UnsafeWriteError):
        optimize(model_path, "cleanup", output=model_path, verify=False)
    with pytest.raises(UnsafeWriteError):
        benchmark_models([model_path], repeat=2, warmup=0, report_path=model_path)
    assert snapshot(tmp_path) == before


def test_save_model_never_writes_over_the_data_it_reads(tmp_path):
    """The sidecar `<output>.data` is a written path too."""
    from onnxforge.errors import UnsafeWriteError

    src = tmp_path / "a.onnx"
    onnx.save(conv_relu_gemm(), src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="b.onnx.data", size_threshold=0)
    model = load_model(src)
    before = snapshot(tmp_path)
    with pytest.raises(UnsafeWriteError, match="b.onnx.data"):
        save_model(model, tmp_path / "b.onnx", external_data=True)
    assert snapshot(tmp_path) == before
    np.testing.assert_allclose(run_model(load_model(src), X)["y"],
                               run_model(load_model(conv_relu_gemm()), X)["y"], rtol=1e-6)


def test_guarded_reads_cover_the_sidecar(tmp_path):
    from onnxforge.errors import UnsafeWriteError
    from onnxforge.safe_write import reading

    precious = tmp_path / "out.onnx.data"
    precious.write_bytes(b"calibration bytes")
    with reading([("calibration data", precious)]), pytest.raises(UnsafeWriteError):
        save_model(load_model(conv_relu_gemm()), tmp_path / "out.onnx", external_data=True)
    assert precious.read_bytes() == b"calibration bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx.data"]


# ------------------------------------------------------------- links, devices, modes


def test_symlinked_data_file_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim.bin"
    victim.write_bytes(b"do not touch")
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "o.onnx.data").symlink_to(victim)
    (folder / "o.onnx").symlink_to(outside / "victim2.onnx")
    (outside / "victim2.onnx").write_bytes(b"nor this")
    save_model(load_model(conv_relu_gemm()), folder / "o.onnx", external_data=True)
    assert victim.read_bytes() == b"do not touch"
    assert (outside / "victim2.onnx").read_bytes() == b"nor this"
    for name in ("o.onnx", "o.onnx.data"):
        assert not (folder / name).is_symlink() and (folder / name).is_file()
    np.testing.assert_allclose(run_model(load_model(folder / "o.onnx"), X)["y"],
                               run_model(load_model(conv_relu_gemm()), X)["y"], rtol=1e-6)
    assert temp_leftovers(folder) == []


@pytest.mark.parametrize("kind", ["fifo", "directory"])
def test_non_regular_output_is_refused(model_path, tmp_path, kind):
    target = tmp_path / "target"
    os.mkfifo(target) if kind == "fifo" else target.mkdir()
    mode = os.lstat(target).st_mode
    result = cli(*optimize_args(model_path, "-o", target))
    assert result.returncode != 0
    assert f"is a {kind}" in result.stderr
    assert os.lstat(target).st_mode == mode
    assert temp_leftovers(tmp_path) == []
    report = cli(*optimize_args(model_path, "-o", tmp_path / "o.onnx", "--report", target))
    assert report.returncode != 0 and os.lstat(target).st_mode == mode
    assert not (tmp_path / "o.onnx").exists()


def test_fifo_as_data_sidecar_is_refused(tmp_path):
    from onnxforge.errors import UnsafeWriteError

    os.mkfifo(tmp_path / "o.onnx.data")
    with pytest.raises(UnsafeWriteError, match="fifo"):
        save_model(load_model(conv_relu_gemm()), tmp_path / "o.onnx", external_data=True)
    assert stat.S_ISFIFO(os.lstat(tmp_path / "o.onnx.data").st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx.data"]


def test_outputs_follow_the_umask(tmp_path):
    from onnxforge.report import write_json

    old = os.umask(0o027)
    try:
        model = load_model(conv_relu_gemm())
        save_model(model, tmp_path / "a.onnx")
        save_model(model, tmp_path / "b.onnx", external_data=True)
        write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    for name in ("a.onnx", "b.onnx", "b.onnx.data", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640, name


# ------------------------------------------------------------- temp files


def test_temp_files_of_a_killed_writer_are_cleaned_on_the_next_write(tmp_path):
    script = (
        "import sys, time\n"
        "from onnxforge.safe_write import atomic_path\n"
        "with atomic_path(sys.argv[1]) as tmp:\n"
        "    tmp.write_bytes(b'x' * 1000)\n"
        "    print(tmp, flush=True)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "o.onnx")],
                            stdout=subprocess.PIPE, text=True)
    left = proc.stdout.readline().strip()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert os.path.exists(left) and f".onnxforge-tmp-{proc.pid}-" in left
    # a temp of a live process (this one) must survive
    from onnxforge.safe_write import temp_name

    alive = temp_name(tmp_path / "other.onnx")
    alive.write_bytes(b"in progress")
    save_model(load_model(conv_relu_gemm()), tmp_path / "o.onnx")
    assert not os.path.exists(left)
    assert alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["o.onnx", alive.name])


def test_failed_write_leaves_no_temp_and_keeps_the_old_file(tmp_path, monkeypatch):
    import onnx_ir as ir

    out = tmp_path / "o.onnx"
    out.write_bytes(b"previous")

    def boom(model, where, *args, **kwargs):  # half a file, then the disk is full
        Path(where).write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(ir, "save", boom)  # writes external data
    monkeypatch.setattr(onnx, "save", boom)  # writes the rest
    for external in (False, True):
        with pytest.raises(RuntimeError):
            save_model(load_model(conv_relu_gemm()), out, external_data=external)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]
    assert out.read_bytes() == b"previous"


# ------------------------------------------------------------- external data escapes


def external_constant_model(folder, location, *, where="main", offset=0):
    """y = x + Constant c (c's bytes in external file `location`); where: main/if/sparse."""
    values = np.arange(4, dtype=np.float32) + 1
    tensor = numpy_helper.from_array(values.reshape(1, 4), "c")
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(offset)),
                       ("length", str(values.nbytes))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    const = helper.make_node("Constant", [], ["c"], name="const_c", value=tensor)
    add = helper.make_node("Add", ["x", "c"], ["y"], name="add")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    if where == "main":
        model = make_model([const, add], [x], [y])
    elif where == "if":
        branch = helper.make_graph([const, add], "branch", [], [y])
        other = helper.make_graph([helper.make_node("Identity", ["x"], ["y"], name="id")],
                                  "other", [], [y])
        cond = numpy_helper.from_array(np.array(True), "cond")
        node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch,
                                else_branch=other)
        model = make_model([node], [x], [y], [cond])
    else:  # a sparse initializer whose values are external
        dense_values = tensor
        dense_values.name = "s"
        dense_values.dims[:] = [4]
        indices = numpy_helper.from_array(np.arange(4, dtype=np.int64), "s_idx")
        sparse = helper.make_sparse_tensor(dense_values, indices, [1, 4])
        model = make_model([helper.make_node("Add", ["x", "x"], ["y"], name="add")], [x], [y])
        model.graph.sparse_initializer.append(sparse)
    path = folder / "m.onnx"
    onnx.save(model, path)
    return path, values


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.bin"
    path.write_bytes((np.arange(4, dtype=np.float32) + 100).tobytes())
    return path


@pytest.mark.parametrize("where", ["main", "if", "sparse"])
@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink"])
def test_external_data_of_any_tensor_cannot_escape(tmp_path, secret, where, how):
    folder = tmp_path / "models"
    folder.mkdir()
    if how == "symlink":
        (folder / "inside.bin").symlink_to(secret)
        location = "inside.bin"
    else:
        location = "../secret.bin" if how == "dotdot" else str(secret)
    path, _ = external_constant_model(folder, location, where=where)
    with pytest.raises(ModelLoadError, match="outside the model's folder") as err:
        load_model(path)
    message = str(err.value)
    assert str(path) in message and location in message
    assert ("const_c" in message) if where != "sparse" else ("sparse initializer" in message)
    for command in (("inspect", path), optimize_args(path, "-o", tmp_path / "o.onnx")):
        result = cli(*command)
        assert result.returncode == 2, result.stderr
        text = " ".join(result.stderr.split())
        assert location in text and str(path) in text
    assert not (tmp_path / "o.onnx").exists()


def test_external_data_is_checked_before_any_file_is_opened(tmp_path, monkeypatch):
    """A refused location is never opened, even when another tensor's file is fine."""
    import builtins

    folder = tmp_path / "models"
    folder.mkdir()
    path, _ = external_constant_model(folder, "../secret.bin")
    opened = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):
        opened.append(os.fspath(file) if isinstance(file, (str, os.PathLike)) else file)
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    with pytest.raises(ModelLoadError):
        load_model(path)
    assert not any("secret" in str(f) for f in opened)


def test_constant_external_data_inside_the_folder_loads_and_runs(tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "c.bin").write_bytes(b"\0" * 8 + (np.arange(4, dtype=np.float32) + 1).tobytes())
    path, values = external_constant_model(folder, "c.bin", offset=8)
    x = {"x": np.ones((1, 4), np.float32)}
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    cwd = os.getcwd()
    os.chdir(elsewhere)  # the location is relative to the model's folder, not the cwd
    try:
        model = load_model(path)
    finally:
        os.chdir(cwd)
    np.testing.assert_allclose(run_model(model, x)["y"], 1 + values[None])
    out = save_model(model, tmp_path / "copy.onnx")
    np.testing.assert_allclose(run_model(load_model(out), x)["y"], 1 + values[None])


def test_unsafe_write_error_is_an_onnxforge_error():
    from onnxforge.errors import UnsafeWriteError

    assert issubclass(UnsafeWriteError, OnnxforgeError) and UnsafeWriteError.exit_code != 0


def test_no_temp_files_after_successful_cli_run(model_path, tmp_path):
    out = tmp_path / "out"
    result = cli(*optimize_args(model_path, "-o", out / "o.onnx", "--report", out / "r.json"))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["o.onnx", "r.json"]
    assert time.time() - (out / "o.onnx").stat().st_mtime < 600
