"""quantize rounding=gptq (GPTQ error-compensating rounding) and mode=int4 (MatMulNBits).

Hand-built hard cases: Gemm transB=1 with alpha/beta and a bias, MatMul on 3-D inputs,
K not a multiple of the block, grouped/strided/padded Conv (the im2col behind the Conv
Hessian is checked against onnxruntime's Conv). Properties that can fail: GPTQ's output
error is at most round-to-nearest's on correlated held-out inputs (per layer and end to
end); onnxruntime's MatMulNBits equals A @ (its weights decoded from the packed bytes)
within float tolerance, and those weights are within half a step of the float weights
(RTN). Real model: the digits CNN in int4 + int8 keeps its test accuracy.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import DATA
from onnx import TensorProto, helper, numpy_helper
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import ArraySource
from onnxforge.errors import InputSpecError
from onnxforge.ir import constant_array, load_model
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.passes.quantization.gptq import (
    block_grid,
    output_error,
    round_gptq,
    round_nearest,
    symmetric_grid,
)
from onnxforge.passes.quantization.hessian import layer_inputs, weight_rows
from onnxforge.shapes import input_dtypes


def _model(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    m = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, inits),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _mixer(k: int, seed: int = 7) -> np.ndarray:
    """A fixed feature mixing: inputs x = z @ mix have strongly correlated features (where
    GPTQ has something to use); calibration and held-out data share it."""
    return np.random.default_rng(seed).standard_normal((k, k)) * 0.4 + np.eye(k)


def _correlated(rng, rows: int, k: int) -> np.ndarray:
    return (rng.standard_normal((rows, k)) @ _mixer(k)).astype(np.float32)


def _dense_model(seed: int = 0, k: int = 100) -> onnx.ModelProto:
    """x[2, 5, k] -> MatMul(W1[k, 48]) + b1 -> Relu -> Reshape[10, 48] -> Gemm(transB,
    alpha 0.5, beta 2, C[24]) -> y[10, 24]; k is not a multiple of 32."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((k, 48)) / np.sqrt(k)).astype(np.float32)
    b1 = rng.standard_normal(48).astype(np.float32)
    w2 = (rng.standard_normal((24, 48)) / np.sqrt(48)).astype(np.float32)
    c = rng.standard_normal(24).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm"),
        helper.make_node("Add", ["m", "b1"], ["a"], name="add"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "shape"], ["f"], name="flat"),
        helper.make_node("Gemm", ["f", "w2", "c"], ["y"], name="gemm", transB=1, alpha=0.5,
                         beta=2.0),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("w1", w1), ("b1", b1), ("w2", w2), ("c", c),
        ("shape", np.array([10, 48], np.int64)))]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [10, 24])], inits)


def _run(proto: onnx.ModelProto, pipeline: str, calib: dict[str, np.ndarray],
         shapes: dict[str, tuple[int, ...]]):
    model = load_model(proto)
    src = ArraySource(calib, shapes, input_dtypes(model))
    ctx = PassContext(calibration=src, input_shapes=shapes, threads=1,
                      max_calibration_batches=64)
    model, steps = PassManager(pipeline, ctx).run(model)
    return model, steps[-1].stats


def _decode_matmulnbits(model, node) -> tuple[np.ndarray, np.ndarray | None]:
    """The float weight [K, N] a MatMulNBits node stands for, from its packed bytes, and
    its bias."""
    attrs = {a.name: a.value for a in node.attributes.values()}
    k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
    packed = constant_array(node.inputs[1])
    scales = constant_array(node.inputs[2]).reshape(n, -1)
    blocks = scales.shape[1]
    codes = np.stack([packed & 15, packed >> 4], -1).reshape(n, blocks * block).astype(float)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zp = constant_array(node.inputs[3]).reshape(n, -1)
        zeros = np.stack([zp & 15, zp >> 4], -1).reshape(n, -1)[:, :blocks].astype(float)
    else:
        zeros = np.full((n, blocks), 8.0)
    deq = (codes - np.repeat(zeros, block, 1)) * np.repeat(scales, block, 1)
    bias = constant_array(node.inputs[5]) if len(node.inputs) > 5 and node.inputs[5] else None
    return deq[:, :k].T, bias


# ---------------------------------------------------------------- the algorithm


@pytest.mark.parametrize("bits,block", [(8, None), (4, 32), (4, 128)])
def test_gptq_beats_nearest_on_held_out_correlated_inputs(bits, block):
    rng = np.random.default_rng(bits + (block or 0))
    k, n = 96, 40
    x_fit, x_eval = _correlated(rng, 600, k), _correlated(rng, 300, k)
    w = rng.standard_normal((n, k))
    grid = (symmetric_grid(np.abs(w).max(1) / 127, k, 8) if bits == 8
            else block_grid(w, block, bits, symmetric=False))
    _, w_rtn = round_nearest(w, grid)
    h_eval = x_eval.T.astype(float) @ x_eval
    rtn = output_error(w, w_rtn, h_eval)
    for act_order in (False, True):
        q, w_gptq = round_gptq(w, x_fit.T.astype(float) @ x_fit, grid, act_order=act_order)
        assert q.min() >= grid.qmin and q.max() <= grid.qmax
        np.testing.assert_allclose(grid.dequantize(q), w_gptq)  # codes and values agree
        assert output_error(w, w_gptq, h_eval) < rtn


def test_conv_patches_reproduce_onnxruntime_conv():
    """The Conv Hessian's rows (im2col, per group) times the weight rows is the Conv."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 2, 3, 2)).astype(np.float32)
    node_proto = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", group=2,
                                  strides=[2, 1], pads=[1, 0, 1, 1], dilations=[1, 2])
    proto = _model([node_proto], [helper.make_tensor_value_info("x", 1, [2, 4, 7, 9])],
                   [helper.make_tensor_value_info("y", 1, [2, 6, 5, 6])],
                   [numpy_helper.from_array(w, "w")])
    x = rng.standard_normal((2, 4, 7, 9)).astype(np.float32)
    y = OrtArtifact(load_model(proto)).run({"x": x})["y"]
    node = next(iter(load_model(proto).graph))
    rows = layer_inputs(node, x, w)  # [N * positions, groups, d]
    wr = weight_rows(node, w.astype(np.float64))  # [groups, cout/groups, d]
    out = np.einsum("mgd,gcd->mgc", rows, wr).reshape(2, y.shape[2], y.shape[3], 6)
    np.testing.assert_allclose(out.transpose(0, 3, 1, 2), y, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- the pass


def test_int4_matmulnbits_matches_decoded_weights():
    rng = np.random.default_rng(1)
    proto = _dense_model()
    ref_model = load_model(proto)
    calib = {"x": _correlated(rng, 100, 100).reshape(20, 5, 100)}
    for opts in ("block=32", "block=128,int4_symmetric=true", "block=16,rounding=gptq"):
        model, stats = _run(proto, f"quantize(int4,rest=float,accuracy_level=0,{opts})", calib,
                            {"x": (2, 5, 100)})
        nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
        assert len(nbits) == 2 and stats["int4_matmuls"] == 2
        assert stats["int4_bias_adds_folded"] == 1  # the MatMul's Add became its bias
        assert not any(n.op_type in ("MatMul", "Gemm", "Add") for n in model.graph)
        # MatMulNBits MACs are counted (metrics): the same products as the float model.
        from onnxforge.metrics import compute_metrics
        counted = compute_metrics(model, {"x": (2, 5, 100)})
        assert not counted.unknown_mac_nodes
        assert counted.macs == compute_metrics(ref_model, {"x": (2, 5, 100)}).macs
        x = rng.standard_normal((2, 5, 100)).astype(np.float32)
        # Reference: the float graph with the decoded 4-bit weights, in numpy.
        w1, b1 = _decode_matmulnbits(model, nbits[0])
        w2, c = _decode_matmulnbits(model, nbits[1])
        h = np.maximum(x @ w1 + b1, 0).reshape(10, 48)
        expect = h @ w2 + c
        got = OrtArtifact(model).run({"x": x})["y"]
        np.testing.assert_allclose(got, expect, rtol=1e-4, atol=1e-4)
        # The decoded weights are the float ones (alpha folded into the scales), each
        # within one step of its block's grid (half a step for round-to-nearest).
        orig = {n.name: constant_array(n.inputs[1]) for n in ref_model.graph
                if n.op_type in ("MatMul", "Gemm")}
        step = np.abs(orig["mm"]).max() / 7
        assert np.abs(w1 - orig["mm"]).max() <= step
        np.testing.assert_allclose(c, 2.0 * constant_array(ref_model.graph.initializers["c"]),
                                   rtol=1e-6)
        assert np.abs(w2 - 0.5 * orig["gemm"].T).max() <= 0.5 * np.abs(orig["gemm"]).max() / 7


def test_int4_embedding_table_and_legalized_float_form():
    """Gather of a [256, 64] table -> GatherBlockQuantized (4-bit blocks of 32 along the
    rows); the decoded table reproduces it within half a step; the float form written for
    backends without com.microsoft ops (TVM) gives the same outputs in onnxruntime."""
    from onnxforge.ir import to_proto
    from onnxforge.passes.quantization.int4 import legalize_matmulnbits, matmulnbits_weight

    rng = np.random.default_rng(6)
    table = rng.standard_normal((256, 64)).astype(np.float32)
    w = (rng.standard_normal((64, 40)) / 8).astype(np.float32)
    proto = _model(
        [helper.make_node("Gather", ["table", "ids"], ["e"], name="embed", axis=0),
         helper.make_node("MatMul", ["e", "w"], ["y"], name="mm")],
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 7, 40])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    ids = rng.integers(0, 256, (8, 7)).astype(np.int64)
    for sym in ("false", "true"):
        model, stats = _run(proto, f"quantize(int4,rest=float,accuracy_level=0,"
                            f"int4_symmetric={sym})", {"ids": ids}, {"ids": (2, 7)})
        assert stats["int4_embeddings"] == 1 and stats["int4_matmuls"] == 1
        gbq = next(n for n in model.graph if n.op_type == "GatherBlockQuantized")
        zp = gbq.inputs[3] if len(gbq.inputs) > 3 else None
        decoded = matmulnbits_weight(
            {"K": 64, "N": 256, "block_size": 32}, constant_array(gbq.inputs[0]),
            constant_array(gbq.inputs[2]), None if zp is None else constant_array(zp)).T
        step = np.abs(table).reshape(256, 2, 32).max(-1) / (7 if sym == "true" else 7.5)
        assert np.all(np.abs(decoded - table).reshape(256, 2, 32).max(-1) <= step / 2 + 1e-6)
        x = {"ids": np.array([[0, 255, 3, 3, 17, 100, 9]] * 2, np.int64)}
        got = OrtArtifact(model).run(x)["y"]
        w_dec, _ = _decode_matmulnbits(model, next(n for n in model.graph
                                                   if n.op_type == "MatMulNBits"))
        np.testing.assert_allclose(got, decoded[x["ids"]] @ w_dec, rtol=1e-4, atol=1e-4)
        legal, count = legalize_matmulnbits(to_proto(model))
        assert count == 2 and not any(n.domain == "com.microsoft" for n in legal.graph.node)
        np.testing.assert_allclose(OrtArtifact(load_model(legal)).run(x)["y"], got,
                                   rtol=1e-5, atol=1e-5)


def test_gptq_lowers_end_to_end_error_int4_and_int8():
    rng = np.random.default_rng(2)
    proto = _dense_model(seed=5)
    calib = {"x": _correlated(rng, 64 * 5, 100).reshape(64, 5, 100)}
    held = _correlated(np.random.default_rng(9), 16 * 5, 100).reshape(16, 5, 100)
    ref = OrtArtifact(load_model(proto))
    errors = {}
    for mode in ("int4,rest=float,accuracy_level=0,block=32", "int8"):
        for rounding in ("nearest", "gptq"):
            model, stats = _run(proto, f"quantize({mode},rounding={rounding})", calib,
                                {"x": (2, 5, 100)})
            art = OrtArtifact(model)
            err = sum(float(np.sum((art.run({"x": held[i:i + 2]})["y"]
                                    - ref.run({"x": held[i:i + 2]})["y"]) ** 2))
                      for i in range(0, 16, 2))
            errors[mode, rounding] = err
            if rounding == "gptq":
                prefix = "int4_" if mode.startswith("int4") else ""
                assert stats[f"{prefix}gptq_layers"] == 2
                assert stats[f"{prefix}gptq_held_out_batches"] > 0
                for rtn, gptq in stats[f"{prefix}gptq_per_layer"].values():
                    assert gptq <= rtn
    for mode in ("int4,rest=float,accuracy_level=0,block=32", "int8"):
        assert errors[mode, "gptq"] < errors[mode, "nearest"], errors


def _conv_chain() -> onnx.ModelProto:
    """x[1,8,10,10] -> Conv 3x3 (16, pad 1) -> Relu -> depthwise Conv 3x3 -> Relu ->
    Conv 1x1 (5 out: an odd weight count, 80) -> y."""
    rng = np.random.default_rng(11)
    w1 = (rng.standard_normal((16, 8, 3, 3)) / 8).astype(np.float32)
    wd = (rng.standard_normal((16, 1, 3, 3)) / 3).astype(np.float32)
    w2 = (rng.standard_normal((5, 16, 1, 1)) / 4).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "wd"], ["c2"], name="dw", pads=[1, 1, 1, 1],
                              group=16),
             helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
             helper.make_node("Conv", ["r2", "w2"], ["y"], name="conv2")]
    return _model(nodes, [helper.make_tensor_value_info("x", 1, [1, 8, 10, 10])],
                  [helper.make_tensor_value_info("y", 1, [1, 5, 10, 10])],
                  [numpy_helper.from_array(a, n) for n, a in (("w1", w1), ("wd", wd),
                                                               ("w2", w2))])


@pytest.mark.parametrize("rounding", ["nearest", "gptq"])
def test_int4_conv_codes_packed_and_run_as_qlinearconv(tmp_path, rounding):
    """convs=int4: 4-bit codes packed two per byte in the file; onnxruntime folds the
    unpacking and still runs QLinearConv; the weights it computes with are the 4-bit grid
    (RTN: within half a step of the float weights); depthwise convs keep 8 bits."""
    import onnxruntime as ort
    from onnxforge.ir import to_proto

    rng = np.random.default_rng(12)
    proto = _conv_chain()
    calib = {"x": rng.standard_normal((16, 8, 10, 10)).astype(np.float32)}
    model, stats = _run(proto, f"quantize(int4,convs=int4,rounding={rounding})", calib,
                        {"x": (1, 8, 10, 10)})
    assert stats["int4_codes"] == ["conv1", "conv2"] and stats["int4_codes_packed"] == 2
    # One packed initializer for both weights: (80 + 1152) / 2 bytes, unpacked by one
    # shared chain (a Split into the two weights, one Reshape each).
    packed = [constant_array(v) for k, v in model.graph.initializers.items()
              if k.startswith("int4_codes")]
    assert [a.size for a in packed] == [616]
    ops = [n.op_type for n in model.graph]
    assert ops.count("Split") == 1 and ops.count("Mod") == 1 and ops.count("BitShift") == 1
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(tmp_path / "opt.onnx")
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), opts,
                                providers=["CPUExecutionProvider"])
    fused = [n.op_type for n in onnx.load(str(tmp_path / "opt.onnx")).graph.node]
    assert fused.count("QLinearConv") == 3, fused
    x = rng.standard_normal((1, 8, 10, 10)).astype(np.float32)
    y = sess.run(None, {"x": x})[0]
    ref = OrtArtifact(load_model(proto)).run({"x": x})["y"]
    assert np.linalg.norm(y - ref) < 0.25 * np.linalg.norm(ref)
    # The weight DequantizeLinear of conv1 computes on the 4-bit grid.
    legal, _ = _legal_weights(model)
    w1 = constant_array(load_model(proto).graph.initializers["w1"])
    w1_hat = legal["conv1"]
    step = np.abs(w1).reshape(16, -1).max(1) / 7
    codes = w1_hat.reshape(16, -1) / step[:, None]
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
    if rounding == "nearest":
        assert np.all(np.abs(w1_hat - w1).reshape(16, -1).max(1) <= step / 2 + 1e-6)


@pytest.mark.parametrize("opset", [11, 17])
def test_int4_conv_codes_shared_unpack_odd_count_and_old_opset(opset):
    """Two convs with 135 + 20 = 155 4-bit codes (odd: one padding code) share one packed
    initializer and one unpack chain (Split by attribute before opset 13, by input after);
    onnxruntime decodes every weight to the 4-bit grid within half a step of the float
    weight (rounding to nearest): per channel at opset 17, per tensor at opset 11
    (per_channel=false keeps the opset; per-channel scales would upgrade it to 13+)."""
    rng = np.random.default_rng(5)
    wa = (rng.standard_normal((5, 3, 3, 3)) / 4).astype(np.float32)
    wb = (rng.standard_normal((4, 5, 1, 1)) / 2).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "wa"], ["ca"], name="conva", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["ca"], ["ra"], name="relua"),
             helper.make_node("Conv", ["ra", "wb"], ["y"], name="convb")]
    proto = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", 1, [1, 4, 8, 8])],
        [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb")]),
        opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 7
    calib = {"x": rng.standard_normal((8, 3, 8, 8)).astype(np.float32)}
    per_channel = "true" if opset >= 13 else "false"
    model, stats = _run(proto, f"quantize(int4,convs=int4,per_channel={per_channel})", calib,
                        {"x": (1, 3, 8, 8)})
    assert stats["int4_codes_packed"] == 2 and model.opset_imports[""] == opset
    ops = [n.op_type for n in model.graph]
    assert ops.count("Mod") == 1 and ops.count("Split") == 1, ops
    split = next(n for n in model.graph if n.op_type == "Split")
    assert len(split.outputs) == 3  # the two weights and the padding code
    assert ("split" in split.attributes) == (opset < 13)
    from onnxforge.activations import ActivationReader

    convs = {n.name: n for n in model.graph if n.op_type == "Conv"}
    names = [convs[c].inputs[1].name for c in ("conva", "convb")]
    decoded = ActivationReader(model, names).read(
        {"x": np.zeros((1, 3, 8, 8), np.float32)}, names)
    for w, name in ((wa, names[0]), (wb, names[1])):
        w_hat = decoded[name]
        rows = w.reshape(w.shape[0], -1)
        step = (np.abs(rows).max(1, keepdims=True) if opset >= 13
                else np.abs(rows).max(keepdims=True)) / 7
        codes = w_hat.reshape(rows.shape) / step
        np.testing.assert_allclose(codes, np.round(codes), atol=1e-3)
        assert np.abs(codes).max() <= 7 + 1e-3
        assert np.all(np.abs(w_hat.reshape(rows.shape) - rows) <= step / 2 + 1e-6)


def test_quantize_drops_only_value_info_inference_finds_again():
    """The file keeps no value_info that ONNX shape inference recomputes (int8 conv chain:
    none at all, but the one the user wrote), and keeps what it cannot (the output of a
    com.microsoft MatMulNBits and what depends on it), so the MACs are still counted."""
    from onnxforge.ir import to_proto
    from onnxforge.metrics import compute_metrics

    rng = np.random.default_rng(3)
    proto = _conv_chain()
    proto.graph.value_info.append(helper.make_tensor_value_info("c1", 1, [1, 16, 10, 10]))
    calib = {"x": rng.standard_normal((8, 8, 10, 10)).astype(np.float32)}
    model, stats = _run(proto, "quantize(int8)", calib, {"x": (1, 8, 10, 10)})
    assert stats["value_info_dropped"] > 5
    assert [v.name for v in to_proto(model).graph.value_info] == ["c1"]
    dense = _dense_model()
    calib = {"x": _correlated(rng, 40, 100).reshape(8, 5, 100)}
    model, _ = _run(dense, "quantize(int4,block=32)", calib, {"x": (2, 5, 100)})
    kept = {v.name for v in to_proto(model).graph.value_info}
    nbits = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert nbits and all(n.outputs[0].name in kept for n in nbits if n.outputs[0].name != "y")
    counted = compute_metrics(model, {"x": (2, 5, 100)})
    assert not counted.unknown_mac_nodes and counted.macs == 2 * 5 * 100 * 48 + 10 * 48 * 24


def _legal_weights(model) -> tuple[dict[str, np.ndarray], int]:
    """The float weight each Conv reads, evaluated with onnxruntime (weight DQ outputs)."""
    from onnxforge.activations import ActivationReader

    convs = [n for n in model.graph if n.op_type == "Conv"]
    names = [n.inputs[1].name for n in convs]
    values = ActivationReader(model, names).read(
        {"x": np.zeros((1, 8, 10, 10), np.float32)}, names)
    return {n.name: values[n.inputs[1].name] for n in convs}, len(convs)


def test_int4_and_gptq_refusals():
    proto = _dense_model()
    calib = {"x": np.ones((4, 5, 100), np.float32)}
    with pytest.raises(InputSpecError, match="power of two"):
        _run(proto, "quantize(int4,block=48)", calib, {"x": (2, 5, 100)})
    with pytest.raises(InputSpecError, match="rounding=gptq applies to mode=int8"):
        _run(proto, "quantize(dynamic,rounding=gptq)", calib, {"x": (2, 5, 100)})
    with pytest.raises(InputSpecError, match="convs=int4 needs mode=int4 with rest=int8"):
        _run(proto, "quantize(int4,rest=float,convs=int4)", calib, {"x": (2, 5, 100)})
    with pytest.raises(InputSpecError, match="keep_float names 'nope'"):
        _run(proto, "quantize(int4,keep_float=nope)", calib, {"x": (2, 5, 100)})
    model, stats = _run(proto, "quantize(int4,rest=float,keep_float=gemm)", calib,
                        {"x": (2, 5, 100)})
    assert stats["int4_kept_float"] == {"gemm": "kept float (keep_float)"}
    assert [n.op_type for n in model.graph].count("Gemm") == 1


# ---------------------------------------------------------------- real model


@pytest.mark.parametrize("convs", ["int8", "int4"])
def test_digits_int4_weights_int8_rest_keeps_accuracy(digits_model, convs):
    """Also with 4-bit conv codes (convs=int4): the three convs share one unpack chain."""
    calib = np.load(DATA / "digits_calib.npz")["input"].astype(np.float32)[:128]
    test = np.load(DATA / "digits_test.npz")
    x, labels = test["input"].astype(np.float32)[:400], test["labels"][:400]
    proto = onnx.load(str(digits_model))
    shapes = {"input": (8, *calib.shape[1:])}
    fp32 = OrtArtifact(load_model(proto))
    model, stats = _run(proto, f"quantize(int4,rounding=gptq,convs={convs})", {"input": calib},
                        shapes)
    assert stats["int4_matmuls"] == 2 and stats["compute_quantized"] == 3  # Gemms / Convs
    ops = [n.op_type for n in model.graph]
    if convs == "int4":
        assert stats["int4_codes_packed"] == 3 and ops.count("BitShift") == 1, ops
        assert ops.count("Reshape") - [n.op_type for n in proto.graph.node].count("Reshape") == 3
    assert stats["int4_gptq_worse_layers"] == 0 and stats["gptq_worse_layers"] == 0
    assert stats["size_ratio"] > 3.0
    art = OrtArtifact(model)

    def accuracy(a):
        return float(np.mean(np.concatenate(
            [a.run({"input": x[i:i + 8]})["logits"].argmax(-1) for i in range(0, 400, 8)])
            == labels))

    assert accuracy(art) >= accuracy(fp32) - 0.01


# ---------------------------------------------------------------- TVM


def test_tvm_compiles_matmulnbits_as_its_dequantized_matmul():
    pytest.importorskip("tvm")
    from onnxforge import api
    from onnxforge.ir import to_proto

    rng = np.random.default_rng(4)
    proto = _dense_model()
    calib = {"x": _correlated(rng, 100, 100).reshape(20, 5, 100)}
    model, _ = _run(proto, "quantize(int4,rest=float,accuracy_level=0,block=32)", calib,
                    {"x": (2, 5, 100)})
    result = api.compile(to_proto(model), "host", input_shapes={"x": (2, 5, 100)},
                         verify=False)
    x = {"x": rng.standard_normal((2, 5, 100)).astype(np.float32)}
    got = result.artifact.run(x)["y"]
    int4 = OrtArtifact(model).run(x)["y"]
    fp32 = OrtArtifact(load_model(proto)).run(x)["y"]
    np.testing.assert_allclose(got, int4, rtol=1e-4, atol=1e-4)
    # it is the 4-bit weights that were compiled, not float ones
    assert np.abs(got - fp32).max() > 100 * np.abs(got - int4).max()
