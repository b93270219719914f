"""Loading and saving: malformed input gives a clear error and writes nothing."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import conv_relu_gemm, make_model
from onnx import TensorProto, helper, numpy_helper
from onnxforge.backends.ort import run_model
from onnxforge.errors import InvalidModelError, ModelLoadError
from onnxforge.ir import (
    MAX_ORT_IR_VERSION,
    add_initializer,
    constant_array,
    load_model,
    save_model,
    to_proto,
)


def test_load_sources_agree(tmp_path):
    proto = conv_relu_gemm()
    path = tmp_path / "m.onnx"
    onnx.save(proto, path)
    x = {"x": np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)}
    outs = [run_model(load_model(src), x)["y"] for src in
            (path, str(path), proto, proto.SerializeToString(), load_model(path))]
    for out in outs[1:]:
        np.testing.assert_array_equal(outs[0], out)


def test_loading_an_ir_model_clones_it():
    model = load_model(conv_relu_gemm())
    copy = load_model(model)
    copy.graph.remove(next(iter(copy.graph)), safe=False)
    assert len(model.graph) == 4


def test_truncated_file(tmp_path):
    path = tmp_path / "t.onnx"
    data = conv_relu_gemm().SerializeToString()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ModelLoadError, match="t.onnx"):
        load_model(path)


def test_garbage_file(tmp_path):
    path = tmp_path / "g.onnx"
    path.write_bytes(b"\xff\x00 this is not a model" * 10)
    with pytest.raises(ModelLoadError, match="g.onnx"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such model file"):
        load_model(tmp_path / "nope.onnx")


def test_missing_initializer_names_node():
    model = make_model(
        [helper.make_node("Conv", ["x", "w_missing"], ["y"], name="conv0")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    with pytest.raises(InvalidModelError, match=r"conv0.*Conv.*w_missing"):
        load_model(model)


def test_cycle_is_reported():
    nodes = [
        helper.make_node("Add", ["x", "b"], ["a"], name="first"),
        helper.make_node("Relu", ["a"], ["b"], name="second"),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                       [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])])
    with pytest.raises(InvalidModelError, match="cycle"):
        load_model(model)


def test_cycle_behind_a_diamond_names_its_nodes_in_order():
    # x -> a -> {b, c} -> d (diamond, no cycle), then e -> f -> g -> e (a cycle fed by d).
    nodes = [
        helper.make_node("Relu", ["x"], ["a"], name="a"),
        helper.make_node("Relu", ["a"], ["b"], name="b"),
        helper.make_node("Neg", ["a"], ["c"], name="c"),
        helper.make_node("Add", ["b", "c"], ["d"], name="d"),
        helper.make_node("Add", ["d", "g"], ["e"], name="e"),
        helper.make_node("Relu", ["e"], ["f"], name="f"),
        helper.make_node("Neg", ["f"], ["g"], name="g"),
    ]
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                       [helper.make_tensor_value_info("g", TensorProto.FLOAT, [2])])
    with pytest.raises(InvalidModelError, match="cycle") as err:
        load_model(model)
    message = str(err.value)
    cycle = message.split("cycle: ")[1].split(" -> ")
    assert sorted(c.split(" ")[0] for c in cycle) == ["e", "f", "g"]
    # Listed in data-flow order: each node feeds the next, the last feeds the first.
    order = [c.split(" ")[0] for c in cycle]
    start = order.index("e")
    assert order[start:] + order[:start] == ["e", "f", "g"]


def test_deep_chain_of_diamonds_is_acyclic():
    # 2000 diamonds: deep enough that a recursive DFS would hit Python's recursion limit.
    nodes, prev = [], "x"
    for i in range(2000):
        nodes += [helper.make_node("Relu", [prev], [f"l{i}"], name=f"l{i}"),
                  helper.make_node("Neg", [prev], [f"r{i}"], name=f"r{i}"),
                  helper.make_node("Add", [f"l{i}", f"r{i}"], [f"j{i}"], name=f"j{i}")]
        prev = f"j{i}"
    model = make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                       [helper.make_tensor_value_info(prev, TensorProto.FLOAT, [2])])
    assert sum(1 for _ in load_model(model).graph) == 6000


def test_unsupported_opset():
    model = conv_relu_gemm()
    model.opset_import[0].version = 5
    with pytest.raises(InvalidModelError, match="opset 5"):
        load_model(model)


def test_external_data_path_traversal_refused(tmp_path):
    model = conv_relu_gemm()
    folder = tmp_path / "models"
    folder.mkdir()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(np.ones(8 * 27, np.float32).tobytes())
    weight = next(t for t in model.graph.initializer if t.name == "w")
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = TensorProto.EXTERNAL
    entry = weight.external_data.add()
    entry.key, entry.value = "location", "../secret.bin"
    path = folder / "m.onnx"
    onnx.save(model, path)
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        load_model(path)


def test_external_data_roundtrip(tmp_path):
    proto = conv_relu_gemm()
    src = tmp_path / "a" / "m.onnx"
    src.parent.mkdir()
    onnx.save(proto, src, save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.data", size_threshold=0)
    model = load_model(src)
    out = save_model(model, tmp_path / "b" / "copy.onnx", external_data=True)
    assert (tmp_path / "b" / "copy.onnx.data").exists()
    x = {"x": np.ones((1, 3, 8, 8), np.float32)}
    np.testing.assert_allclose(run_model(load_model(out), x)["y"],
                               run_model(load_model(conv_relu_gemm()), x)["y"], rtol=1e-6)


def test_save_is_atomic_and_clamps_ir_version(tmp_path, monkeypatch):
    model = load_model(conv_relu_gemm())
    model.ir_version = 14
    path = save_model(model, tmp_path / "out.onnx")
    assert onnx.load(path).ir_version == MAX_ORT_IR_VERSION

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ir, "save", boom)  # the external-data writer
    monkeypatch.setattr(onnx, "save", boom)
    with pytest.raises(RuntimeError):
        save_model(model, tmp_path / "never.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_saved_file_is_what_to_proto_measures(tmp_path):
    """No value_info for initializers in the file either, so a reported size is the file's."""
    model = load_model(conv_relu_gemm())
    path = save_model(model, tmp_path / "out.onnx")
    saved = onnx.load(path)
    inits = {t.name for t in saved.graph.initializer}
    assert inits and not any(v.name in inits for v in saved.graph.value_info)
    assert path.stat().st_size == len(to_proto(load_model(conv_relu_gemm())).SerializeToString())


def test_constant_array_reads_constant_nodes_and_initializers():
    value = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "c")
    nodes = [
        helper.make_node("Constant", [], ["k"], value=value),
        helper.make_node("Constant", [], ["s"], value_float=2.5),
        helper.make_node("Mul", ["x", "k"], ["m"]),
        helper.make_node("Mul", ["m", "s"], ["y"]),
    ]
    model = load_model(make_model(nodes, [helper.make_tensor_value_info("x", 1, [2, 3])],
                                  [helper.make_tensor_value_info("y", 1, [2, 3])]))
    by_name = {v.name: v for n in model.graph for v in n.outputs}
    np.testing.assert_array_equal(constant_array(by_name["k"]), np.arange(6).reshape(2, 3))
    assert constant_array(by_name["s"]) == np.float32(2.5)
    assert constant_array(by_name["m"]) is None
    added = add_initializer(model.graph, "k", np.zeros(3, np.float32))
    assert added.name != "k" and added.name in model.graph.initializers
    np.testing.assert_array_equal(constant_array(added), np.zeros(3))
