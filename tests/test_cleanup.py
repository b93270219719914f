"""Tests of the `cleanup` pass: hand-built hard cases, Silero VAD (onnxsim fails), digits."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxforge.calibration import open_calibration
from onnxforge.ir import load_model, model_bytes
from onnxforge.pass_manager import PassManager
from onnxforge.passes import cleanup as cleanup_module
from onnxforge.passes.base import PassContext


def _run(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes(model), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _cleanup(proto_or_path, pipeline: str = "cleanup", shapes=None):
    model = load_model(proto_or_path)
    model, steps = PassManager(pipeline, PassContext(input_shapes=shapes or {})).run(model)
    return model, steps[0]


def _assert_same(ref, got, feeds, rtol=1e-5):
    a, b = _run(ref, feeds), _run(got, feeds)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.shape == y.shape
        np.testing.assert_allclose(y, x, rtol=rtol, atol=rtol * (np.abs(x).max() + 1e-12))


def _ops(model) -> list[str]:
    return [n.op_type for n in model.graph]


def _make(nodes, inputs, outputs, inits=(), opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
FEEDS = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}


def _const(name: str, array: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(array, name))


def _hand_model(opset: int = 17) -> onnx.ModelProto:
    """Identity chain, inference Dropout, a Constant-only subgraph, a dead branch and
    two identical initializers used by different nodes."""
    w = np.arange(4, dtype=np.float32).reshape(1, 4)
    nodes = [
        helper.make_node("Identity", ["x"], ["i1"]),
        helper.make_node("Identity", ["i1"], ["i2"]),
        helper.make_node("Dropout", ["i2"], ["d", "mask_unused"]),
        _const("c1", np.full((1, 4), 2.0, np.float32)),
        _const("c2", np.full((1, 4), 3.0, np.float32)),
        helper.make_node("Add", ["c1", "c2"], ["c3"]),      # constant-only: folds to 5
        helper.make_node("Mul", ["d", "c3"], ["m"]),
        helper.make_node("Add", ["m", "w1"], ["a1"]),
        helper.make_node("Add", ["a1", "w2"], ["y"]),       # w2 == w1
        helper.make_node("Relu", ["x"], ["dead"]),          # unused
    ]
    inits = [numpy_helper.from_array(w, "w1"), numpy_helper.from_array(w.copy(), "w2")]
    return _make(nodes, [X], [Y], inits, opset)


@pytest.mark.parametrize("use_onnxsim", [False, True])
def test_hand_built_cleanup(use_onnxsim: bool) -> None:
    proto = _hand_model()
    ref = load_model(proto)
    model, step = _cleanup(proto, f"cleanup(onnxsim={str(use_onnxsim).lower()})")
    _assert_same(ref, model, FEEDS)
    # Identity x2, Dropout, dead Relu and the Constant-only Add are gone; the
    # folded constant holds 2 + 3
    assert sorted(_ops(model)) == ["Add", "Add", "Constant", "Mul"]
    folded = next(n for n in model.graph if n.op_type == "Constant")
    np.testing.assert_array_equal(folded.attributes["value"].value.numpy(), np.full((1, 4), 5.0))
    assert step.stats["nodes_removed"] == len(ref.graph) - 4
    # w1 and w2 are identical: one initializer is left
    assert len(model.graph.initializers) == 1
    if use_onnxsim:
        assert step.stats["onnxsim"] == "applied"
    else:
        assert step.stats["constants_folded"] == 1
        assert step.stats["dropout_removed"] == 1
        assert step.stats["identity_removed"] == 3  # two Identity + the Dropout turned Identity


def test_dropout_training_mode_and_used_mask_are_kept() -> None:
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "train"], ["d", "mask"]),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["d", "maskf"], ["y"]),
    ]
    train = helper.make_tensor_value_info("train", TensorProto.BOOL, [])
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "ratio")]
    proto = _make(nodes, [X, train], [Y], inits, opset=13)
    model, step = _cleanup(proto, "cleanup(onnxsim=false)")
    assert "Dropout" in _ops(model)
    assert "dropout_removed" not in step.stats
    feeds = dict(FEEDS, train=np.array(False))
    _assert_same(load_model(proto), model, feeds)


def test_dropout_constant_false_training_mode_removed() -> None:
    nodes = [
        helper.make_node("Dropout", ["x", "ratio", "train"], ["d"]),
        helper.make_node("Relu", ["d"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
             numpy_helper.from_array(np.array(False), "train")]
    proto = _make(nodes, [X], [Y], inits, opset=13)
    model, step = _cleanup(proto, "cleanup(onnxsim=false)")
    assert _ops(model) == ["Relu"]
    assert step.stats["dropout_removed"] == 1
    _assert_same(load_model(proto), model, FEEDS)


def test_identity_feeding_graph_output_keeps_output_name() -> None:
    # y = Identity(Relu(x)) with y a graph output; z = Identity(x) with z also a graph output
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Identity", ["r"], ["y"]),
        helper.make_node("Identity", ["x"], ["z"]),
    ]
    proto = _make(nodes, [X], [Y, z])
    model, step = _cleanup(proto, "cleanup(onnxsim=false)")
    assert [v.name for v in model.graph.outputs] == ["y", "z"]
    # Relu's output takes the name y; the input->output Identity must stay
    assert sorted(_ops(model)) == ["Identity", "Relu"]
    assert step.stats["identity_removed"] == 1
    _assert_same(load_model(proto), model, FEEDS)


def test_two_outputs_from_one_identity_source_are_both_kept() -> None:
    # r is itself a graph output and also feeds Identity -> y: renaming r would lose an output
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Identity", ["r"], ["y"])]
    proto = _make(nodes, [X], [Y, r])
    model, _ = _cleanup(proto, "cleanup(onnxsim=false)")
    assert [v.name for v in model.graph.outputs] == ["y", "r"]
    _assert_same(load_model(proto), model, FEEDS)


def test_random_ops_are_not_folded() -> None:
    nodes = [
        helper.make_node("RandomUniform", [], ["u"], shape=[2, 4], seed=1.0),
        helper.make_node("Mul", ["x", "u"], ["y"]),
    ]
    proto = _make(nodes, [X], [Y])
    model, _ = _cleanup(proto, "cleanup(onnxsim=false)")
    assert "RandomUniform" in _ops(model)


def test_initializer_that_is_graph_input_is_not_folded() -> None:
    # `b` has a default value but is an input: the user may override it
    b = helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("Neg", ["b"], ["nb"]), helper.make_node("Add", ["x", "nb"], ["y"])]
    inits = [numpy_helper.from_array(np.ones((2, 4), np.float32), "b")]
    proto = _make(nodes, [X, b], [Y], inits)
    model, _ = _cleanup(proto, "cleanup(onnxsim=false)")
    assert "Neg" in _ops(model)
    feeds = dict(FEEDS, b=np.full((2, 4), 7.0, np.float32))
    _assert_same(load_model(proto), model, feeds)


def test_onnxsim_skipped_over_protobuf_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A model over the 2 GiB limit skips onnxsim with a reason; fallback still runs.

    The limit is lowered for the test (building a real 2 GiB model takes minutes)."""
    monkeypatch.setattr(cleanup_module, "PROTOBUF_LIMIT", 1024)
    monkeypatch.setattr(cleanup_module, "_PROTO_MARGIN", 0)
    w = np.random.default_rng(1).standard_normal((4, 512)).astype(np.float32)  # 8 KiB
    proto = _hand_model()
    proto.graph.initializer.append(numpy_helper.from_array(w, "big"))
    proto.graph.node.append(helper.make_node("MatMul", ["x", "big"], ["unused_mm"]))
    model, step = _cleanup(proto)
    assert step.stats["onnxsim"].startswith("skipped")
    assert "GiB" in step.stats["onnxsim"]
    assert step.stats["constants_folded"] >= 1
    assert "big" not in model.graph.initializers  # dead MatMul and its weight removed
    _assert_same(load_model(proto), model, FEEDS)


def test_static_shapes_option() -> None:
    xdyn = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])
    ydyn = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])
    nodes = [helper.make_node("Relu", ["x"], ["y"])]
    proto = _make(nodes, [xdyn], [ydyn])
    pinned, _ = _cleanup(proto, "cleanup", shapes={"x": (2, 4)})
    assert list(pinned.graph.inputs[0].shape) == [2, 4]
    dynamic, _ = _cleanup(proto, "cleanup(static_shapes=false)", shapes={"x": (2, 4)})
    assert not isinstance(dynamic.graph.inputs[0].shape[0], int)
    _assert_same(load_model(proto), dynamic, FEEDS)


# ------------------------------------------------------------------ Silero VAD


@pytest.fixture(scope="module")
def silero_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ONNX files of the PyPI `silero-vad` wheel (skip when it cannot be fetched)."""
    folder = tmp_path_factory.mktemp("silero")
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                        "silero-vad", "-d", str(folder)], check=True, timeout=180,
                       capture_output=True)
    except (subprocess.SubprocessError, OSError) as exc:
        pytest.skip(f"silero-vad wheel unavailable: {exc}")
    wheels = list(folder.glob("silero_vad-*.whl"))
    if not wheels:
        pytest.skip("silero-vad wheel unavailable")
    with zipfile.ZipFile(wheels[0]) as zf:
        for name in zf.namelist():
            if name.endswith(".onnx"):
                (folder / Path(name).name).write_bytes(zf.read(name))
    return folder


def _silero_feeds(path: Path) -> dict[str, np.ndarray]:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    rng = np.random.default_rng(0)
    feeds = {"input": rng.standard_normal((1, 512)).astype(np.float32) * 0.1}
    if "state" in names:
        feeds["state"] = rng.standard_normal((2, 1, 128)).astype(np.float32) * 0.1
    if "sr" in names:
        feeds["sr"] = np.array(16000, np.int64)
    if "input" in names and sess.get_inputs()[0].type == "tensor(float16)":
        feeds = {k: v.astype(np.float16) if v.dtype == np.float32 else v for k, v in feeds.items()}
    return feeds


@pytest.mark.parametrize("name, onnxsim_ok", [
    ("silero_vad_16k_op15.onnx", False),  # onnxsim raises on its If subgraphs
    ("silero_vad.onnx", True),
])
def test_silero_vad(silero_dir: Path, name: str, onnxsim_ok: bool) -> None:
    path = silero_dir / name
    if not path.exists():
        pytest.skip(f"{name} not in this silero-vad release")
    feeds = _silero_feeds(path)
    ref = load_model(path)
    model, step = _cleanup(path)
    if onnxsim_ok:
        assert step.stats["onnxsim"] == "applied"
    else:
        assert step.stats["onnxsim"].startswith("failed")
        assert step.stats["nodes_removed"] > 0  # the fallback steps still simplified it
    assert step.after["nodes"] < step.before["nodes"]
    _assert_same(ref, model, feeds, rtol=1e-5)


# ------------------------------------------------------------------ real models


def test_digits_cleanup_verified_by_pass_manager(digits_model: Path) -> None:
    model = load_model(digits_model)
    ref = load_model(digits_model)
    data = np.load(Path(digits_model).parent / "digits_calib.npz")
    source = open_calibration({"input": data["input"][:64]}, model, {"input": (16, 1, 8, 8)})
    model, steps = PassManager("cleanup", PassContext(), verify_source=source).run(model)
    assert steps[0].error is None or steps[0].error.within(1e-5)
    feeds = {"input": data["input"][:16].astype(np.float32)}
    _assert_same(ref, model, feeds)
    assert steps[0].after["nodes"] <= steps[0].before["nodes"]


def test_castlike_of_constant_is_folded_and_sequences_are_not() -> None:
    # CastLike(constant double, x) reads only x's type: folds to a float constant.
    # SequenceEmpty has no inputs but yields a sequence: a Constant cannot hold it.
    nodes = [
        _const("c", np.array(2.5, np.float64)),
        helper.make_node("CastLike", ["c", "x"], ["cf"]),
        helper.make_node("Mul", ["x", "cf"], ["y"]),
        helper.make_node("SequenceEmpty", [], ["seq"], dtype=TensorProto.FLOAT),
        helper.make_node("SequenceInsert", ["seq", "x"], ["s1"]),
        helper.make_node("SequenceAt", ["s1", "zero"], ["z"]),
    ]
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 4])
    inits = [numpy_helper.from_array(np.array(0, np.int64), "zero")]
    proto = _make(nodes, [X], [Y, z], inits)
    model, step = _cleanup(proto, "cleanup(onnxsim=false)")
    ops = _ops(model)
    assert "CastLike" not in ops and "SequenceEmpty" in ops
    assert step.stats["constants_folded"] == 1
    folded = next(n for n in model.graph if n.op_type == "Constant")
    assert folded.attributes["value"].value.numpy().dtype == np.float32
    _assert_same(load_model(proto), model, FEEDS)


# ------------------------------------------------------------- onnxruntime's own fusions


def _transpose_matmul_add(dims) -> onnx.ModelProto:
    """x[n,16,t] -> Transpose(0,2,1) -> MatMul(w[16,8]) -> Add(b) -> Softmax: onnxruntime
    folds the Transpose into the MatMul (com.microsoft FusedMatMul, transA)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "w")
    b = numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), "b")
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["t", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Softmax", ["a"], ["y"], axis=-1)]
    n, t = dims
    return _make(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, 16, t])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, t, 8])], [w, b],
                 opset=12)


@pytest.mark.parametrize("dims", [("n", "t"), (2, 5)])
def test_onnxsim_rewrite_that_costs_ort_a_fusion_is_not_kept(dims) -> None:
    # onnxsim makes Reshape -> Gemm -> Reshape of the 3-D MatMul + Add; ORT then runs the
    # Transpose and the reshapes instead of one FusedMatMul. The graph ORT builds from the
    # cleaned model must keep every fusion it built from the original.
    from onnxforge.ort_fusions import lost_fusions, ort_optimized_ops

    proto = _transpose_matmul_add(dims)
    model, step = _cleanup(proto, "cleanup(static_shapes=false)")
    before, after = ort_optimized_ops(proto), ort_optimized_ops(model)
    # Dynamic shapes: ORT folds the Transpose (FusedMatMul); static: ORT builds its own
    # Gemm with the Transpose folded (transA). Either way the cleaned model keeps it.
    assert before["com.microsoft:FusedMatMul"] + before["Gemm"] == 1
    assert lost_fusions(before, after) == {}
    assert step.stats["onnxsim"].startswith("applied")
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 16, 5)).astype(np.float32)}
    _assert_same(load_model(proto), model, feeds)


def test_lost_fusions_counts_what_a_rewrite_breaks() -> None:
    from onnxforge.ort_fusions import lost_fusions, ort_optimized_ops

    proto = _transpose_matmul_add(("n", "t"))
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    # An Identity between Transpose and MatMul hides the pattern only until ORT removes it;
    # a Relu does not: FusedMatMul is lost.
    broken.graph.node[1].input[0] = "tr"
    broken.graph.node.insert(1, helper.make_node("Relu", ["t"], ["tr"]))
    lost = lost_fusions(ort_optimized_ops(proto), ort_optimized_ops(broken))
    assert lost == {"com.microsoft:FusedMatMul": 1}
    # Gemms merged into one wider Gemm are not a lost fusion; Gemms left as MatMuls are.
    assert lost_fusions(Counter({"Gemm": 3}), Counter({"Gemm": 1, "Split": 1})) == {}
    assert lost_fusions(Counter({"Gemm": 3}), Counter({"Gemm": 1, "MatMul": 2})) == {"Gemm": 2}


def test_ppocr_rec_dynamic_cleanup_keeps_ort_fusions() -> None:
    from conftest import zoo_path
    from onnxforge.ort_fusions import lost_fusions, ort_optimized_ops

    path = zoo_path("ppocr_rec")
    model, step = _cleanup(path, "cleanup")  # no input shapes: dynamic dims stay
    lost = lost_fusions(ort_optimized_ops(path), ort_optimized_ops(model))
    assert lost == {}, (lost, step.stats)
    assert step.after["nodes"] < step.before["nodes"]


def test_onnxsim_import_skips_torch_and_leaves_it_importable() -> None:
    # onnxsim's package import probes PPQ by importing torch first (seconds); cleanup
    # hides torch during that import only. In a fresh process: onnxsim works, torch was
    # not loaded, and no sentinel is left that would break a later `import torch`.
    code = (
        "import sys\n"
        "from onnxforge.passes.cleanup import _import_onnxsim\n"
        "sim = _import_onnxsim()\n"
        "assert callable(sim.simplify)\n"
        "assert 'torch' not in sys.modules, 'torch loaded or sentinel left'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
