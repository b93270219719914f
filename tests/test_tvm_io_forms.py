"""TVM artifacts take and return every tensor form ONNX models use (regressions from the
node suite): Shape outputs as one int64 tensor, 0-d scalar inputs, and TopK (needs the
sort/scan dispatch before legalization)."""

from __future__ import annotations

import numpy as np
import pytest
from builders import make_model
from onnx import TensorProto, helper, numpy_helper
from onnxforge.backends.ort import run_model
from onnxforge.ir import load_model

pytest.importorskip("tvm")
from onnxforge.backends.tvm import compile_model


def _check_against_ort(proto, inputs):
    got = compile_model(proto, "host").run(inputs)
    want = run_model(load_model(proto), inputs)
    assert set(got) == set(want)
    for name, value in want.items():
        assert got[name].shape == value.shape and got[name].dtype == value.dtype, name
        np.testing.assert_allclose(got[name], value, rtol=1e-6)


def test_shape_output_is_one_int64_tensor():
    proto = make_model([helper.make_node("Shape", ["x"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4, 5])],
                       [helper.make_tensor_value_info("y", TensorProto.INT64, [3])])
    _check_against_ort(proto, {"x": np.zeros((3, 4, 5), np.float32)})


def test_scalar_input_stays_0d():
    proto = make_model([helper.make_node("Trilu", ["x", "k"], ["y"])],
                       [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5]),
                        helper.make_tensor_value_info("k", TensorProto.INT64, [])],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])])
    x = np.random.default_rng(0).standard_normal((4, 5)).astype(np.float32)
    _check_against_ort(proto, {"x": x, "k": np.array(1, np.int64)})


def test_topk_builds_and_matches():
    proto = make_model(
        [helper.make_node("TopK", ["x", "k"], ["v", "i"], axis=1)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 7])],
        [helper.make_tensor_value_info("v", TensorProto.FLOAT, [3, 2]),
         helper.make_tensor_value_info("i", TensorProto.INT64, [3, 2])],
        [numpy_helper.from_array(np.array([2], np.int64), "k")])
    x = np.random.default_rng(1).permutation(21).reshape(3, 7).astype(np.float32)
    _check_against_ort(proto, {"x": x})
