"""Sparse weights in compiled code: the BSR kernel (kernels/sparse_matmul.py) and where
compile uses it (backends/tvm/sparse.py), checked against numpy and onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from onnxforge.backends.tvm import compare_to_ort, compile_model, random_inputs
from onnxforge.kernels.sparse_matmul import bsr_matmul, to_bsr

pytestmark = pytest.mark.tvm


def block_sparse(n, k, rows, cols, density, seed=0, empty_rows=()):
    rng = np.random.default_rng(seed)
    mask = rng.random((n // rows, k // cols)) < density
    for r in empty_rows:
        mask[r] = False
    weight = rng.standard_normal((n, k)).astype(np.float32)
    return weight * np.repeat(np.repeat(mask, rows, 0), cols, 1)


@pytest.mark.parametrize("m,k,n,rows,cols", [(16, 32, 48, 1, 8), (32, 64, 16, 16, 1),
                                             (16, 24, 12, 4, 4), (48, 8, 8, 1, 1)])
def test_bsr_kernel_matches_numpy(m, k, n, rows, cols):
    weight = block_sparse(n, k, rows, cols, 0.3, empty_rows=(0,))
    data, indices, indptr = to_bsr(weight, rows, cols)
    func = bsr_matmul(m, k, n, rows, cols, len(indices)).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target="llvm")
    x = np.random.default_rng(1).standard_normal((m, k)).astype(np.float32)
    out = tvm.runtime.tensor(np.full((m, n), np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in (x, data, indices, indptr)], out)
    np.testing.assert_allclose(out.numpy(), x @ weight.T, rtol=1e-5, atol=1e-5)


def sparse_model(weight_nk, x_shape, pattern, transposed=False, record=True):
    """MatMul (or Gemm transB) with a sparse weight and the sparsify pass's record."""
    n = weight_nk.shape[0]
    w = weight_nk if transposed else np.ascontiguousarray(weight_nk.T)
    node = (helper.make_node("Gemm", ["x", "w"], ["y"], transB=1) if transposed
            else helper.make_node("MatMul", ["x", "w"], ["y"]))
    graph = helper.make_graph(
        [node], "sparse", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*x_shape[:-1], n])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if record:
        entry = {"pattern": pattern, "sparsity": float(np.mean(w == 0)), "shape": list(w.shape)}
        helper.set_model_props(model, {"onnxforge.sparsity": json.dumps({"w": entry})})
    onnx.checker.check_model(model)
    return model


def _check(model):
    art = compile_model(model, "host")
    errors = compare_to_ort(art, model, random_inputs(art.inputs, seed=0))
    assert all(e.within(1e-4) for e in errors), errors
    return art.report["sparse"]


def test_block_sparse_matmul_below_break_even_uses_the_kernel():
    weight = block_sparse(48, 64, 1, 8, 0.1)
    report = _check(sparse_model(weight, [2, 16, 64], "block(1x8)"))
    assert report == {"sparse_ops": 1, "dense_ops": []}


def test_gemm_transb_with_output_blocks_uses_the_kernel():
    weight = block_sparse(64, 32, 16, 1, 0.1, seed=3)
    report = _check(sparse_model(weight, [16, 32], "block(16x1)", transposed=True))
    assert report["sparse_ops"] == 1


def test_dense_where_the_kernel_does_not_pay_or_fit():
    above = _check(sparse_model(block_sparse(48, 64, 1, 8, 0.9), [16, 64], "block(1x8)"))
    assert above["sparse_ops"] == 0
    assert "above the measured break-even" in above["dense_ops"][0]["reason"]
    rows = _check(sparse_model(block_sparse(48, 64, 1, 8, 0.1), [3, 64], "block(1x8)"))
    assert rows["dense_ops"] == [{"reason": "activation rows not a multiple of 16", "count": 1}]
    unstructured = _check(sparse_model(block_sparse(48, 64, 1, 1, 0.1), [16, 64],
                                       "unstructured"))
    assert unstructured == {"sparse_ops": 0, "dense_ops": []}
    plain = _check(sparse_model(block_sparse(48, 64, 1, 8, 0.1), [16, 64], "block(1x8)",
                                record=False))
    assert plain == {"sparse_ops": 0, "dense_ops": []}


def test_compile_command_says_which_matmuls_are_sparse(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s.onnx"
    onnx.save(sparse_model(block_sparse(48, 64, 1, 8, 0.1), [16, 64], "block(1x8)"), path)
    done = subprocess.run([sys.executable, "-m", "onnxforge.cli", "compile", str(path), "-t",
                           "host", "-o", str(tmp_path / "s.so")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "sparse: 1 matmuls use the BSR kernel" in " ".join(done.stdout.split())
