"""Sparse weights in compiled code: the BSR kernels (kernels/sparse_matmul.py, sparse_gemv.py,
sparse_conv.py) and where compile uses them (backends/tvm/sparse.py), checked against numpy
and onnxruntime."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from onnxforge.backends.tvm import compare_to_ort, compile_model, random_inputs
from onnxforge.kernels.sparse_conv import bsr_rows, conv_offsets
from onnxforge.kernels.sparse_gemv import bsr_gemv
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


def test_bsr_blocks_keep_int8_weights():
    """The BSR triple carries int8 blocks unchanged (the int8 kernels' future input)."""
    weight = np.round(block_sparse(32, 24, 4, 4, 0.4, seed=2) * 20).astype(np.int8)
    data, indices, indptr = to_bsr(weight, 4, 4)
    assert data.dtype == np.int8 and len(indices) == indptr[-1]
    rebuilt = np.zeros_like(weight)
    for row in range(len(indptr) - 1):
        for b in range(indptr[row], indptr[row + 1]):
            rebuilt[row * 4:row * 4 + 4, indices[b] * 4:indices[b] * 4 + 4] = data[b]
    np.testing.assert_array_equal(rebuilt, weight)


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
    assert report == {"sparse_ops": 1, "sparse_kernels": {"matmul": 1}, "dense_ops": []}


def test_gemm_transb_with_output_blocks_uses_the_kernel():
    weight = block_sparse(64, 32, 16, 1, 0.1, seed=3)
    report = _check(sparse_model(weight, [16, 32], "block(16x1)", transposed=True))
    assert report["sparse_ops"] == 1


def test_dense_where_the_kernel_does_not_pay_or_fit():
    above = _check(sparse_model(block_sparse(48, 64, 1, 8, 0.9), [16, 64], "block(1x8)"))
    assert above["sparse_ops"] == 0
    assert "above the measured matmul break-even" in above["dense_ops"][0]["reason"]
    rows = _check(sparse_model(block_sparse(48, 64, 1, 8, 0.1), [20, 64], "block(1x8)"))
    assert rows["dense_ops"] == [
        {"reason": "activation rows not a multiple of 16 (and more than 16)", "count": 1}]
    unstructured = _check(sparse_model(block_sparse(48, 64, 1, 1, 0.1), [16, 64],
                                       "unstructured"))
    assert unstructured == {"sparse_ops": 0, "sparse_kernels": {}, "dense_ops": []}
    plain = _check(sparse_model(block_sparse(48, 64, 1, 8, 0.1), [16, 64], "block(1x8)",
                                record=False))
    assert plain == {"sparse_ops": 0, "sparse_kernels": {}, "dense_ops": []}


def test_compile_command_says_which_matmuls_are_sparse(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "s.onnx"
    onnx.save(sparse_model(block_sparse(48, 64, 1, 8, 0.1), [16, 64], "block(1x8)"), path)
    done = subprocess.run([sys.executable, "-m", "onnxforge.cli", "compile", str(path), "-t",
                           "host", "-o", str(tmp_path / "s.so")], capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr
    assert "sparse: 1 ops use BSR kernels (matmul 1)" in " ".join(done.stdout.split())


# every block pattern the sparsify pass writes that tiles these shapes, odd sizes
PATTERNS = [(1, 8), (16, 1), (4, 4), (1, 4), (2, 2), (1, 1)]
EVERY_KIND = {kind: {f"block({r}x{c})": 1.0 for r, c in PATTERNS}
              for kind in ("matmul", "gemv", "conv1x1", "conv")}


def _run_kernel(func, arrays, out_shape):
    lib = tvm.compile(tvm.IRModule({"main": func.with_attr("global_symbol", "main")}),
                      target="llvm")
    out = tvm.runtime.tensor(np.full(out_shape, np.nan, np.float32))
    lib["main"](*[tvm.runtime.tensor(a) for a in arrays], out)
    return out.numpy()


@pytest.mark.parametrize("rows,cols", PATTERNS)
def test_gemv_kernel_matches_numpy(rows, cols):
    for m in (1, 3):
        n, k = 16 * 3, 8 * 5
        weight = block_sparse(n, k, rows, cols, 0.3, seed=m, empty_rows=(1,))
        data, indices, indptr = to_bsr(weight, rows, cols)
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        got = _run_kernel(bsr_gemv(m, k, n, rows, cols, len(indices)),
                          (x, data, indices, indptr), (m, n))
        np.testing.assert_allclose(got, x @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,cols", PATTERNS)
def test_row_kernel_matches_numpy_for_1x1_and_3x3(rows, cols):
    """bsr_rows with the conv offsets: odd image sizes (a tail shorter than the tile),
    batch 2, an empty block row; 3x3 on a padded plane computes the padded width."""
    rng = np.random.default_rng(rows * 10 + cols)
    batch, cin, cout, height, width = 2, 8, 32, 5, 7
    for ksize in (1, 3):
        weight = block_sparse(cout, cin * ksize * ksize, rows, cols, 0.3, seed=ksize,
                              empty_rows=(0,))
        data, indices, indptr = to_bsr(weight, rows, cols)
        plane = (height + (ksize > 1), width)  # one extra zero row below for kxk
        x = np.zeros((batch, cin, *plane), np.float32)
        x[:, :, :height] = rng.standard_normal((batch, cin, height, width))
        out_h = height - ksize + 1
        offsets = conv_offsets(cin, (ksize, ksize), plane)
        bias = rng.standard_normal(cout).astype(np.float32)
        func = bsr_rows(batch, x[0].size, cout, out_h * width, rows, cols, len(indices),
                        len(offsets), 16, (batch, cout, out_h, width), x.shape)
        got = _run_kernel(func, (x, data, indices, indptr, offsets, bias),
                          (batch, cout, out_h, width))
        w4 = weight.reshape(cout, cin, ksize, ksize)
        want = np.zeros((batch, cout, out_h, width - ksize + 1), np.float32)
        for i in range(ksize):
            for j in range(ksize):
                patch = x[:, :, i:i + out_h, j:j + width - ksize + 1]
                want += np.einsum("oc,bchw->bohw", w4[:, :, i, j], patch)
        want += bias[None, :, None, None]
        np.testing.assert_allclose(got[..., :width - ksize + 1], want, rtol=1e-5, atol=1e-5)


def conv_model(cin, cout, ksize, size, *, stride=1, pad=0, pattern="block(1x8)", batch=1,
               density=0.2, bias=True, group=1, seed=0):
    rows, cols = (int(v) for v in pattern[6:-1].split("x"))
    weight = block_sparse(cout, cin // group * ksize * ksize, rows, cols, density, seed=seed)
    weight = weight.reshape(cout, cin // group, ksize, ksize)
    inits = [numpy_helper.from_array(weight, "w")]
    if bias:
        b = np.random.default_rng(seed + 1).standard_normal(cout).astype(np.float32)
        inits.append(numpy_helper.from_array(b, "b"))
    node = helper.make_node("Conv", ["x", "w", "b"][:len(inits) + 1], ["y"], group=group,
                            kernel_shape=[ksize, ksize], strides=[stride] * 2, pads=[pad] * 4)
    relu = helper.make_node("Relu", ["y"], ["z"])
    h, w = size
    out = [(h + 2 * pad - ksize) // stride + 1, (w + 2 * pad - ksize) // stride + 1]
    graph = helper.make_graph(
        [node, relu], "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, cin, h, w])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [batch, cout, *out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    entry = {"pattern": pattern, "sparsity": float(np.mean(weight == 0)),
             "shape": list(weight.shape)}
    helper.set_model_props(model, {"onnxforge.sparsity": json.dumps({"w": entry})})
    onnx.checker.check_model(model)
    return model


def _against_ort(model, table=None, target="host", seeds=(0, 1)):
    art = compile_model(model, target, sparse_break_even=table)
    for seed in seeds:  # several inputs: a wrong result from stale memory shows on one
        errors = compare_to_ort(art, model, random_inputs(art.inputs, seed=seed))
        assert all(e.within(1e-4) for e in errors), errors
    return art.report["sparse"]


@pytest.mark.parametrize("shape,options,kind", [
    ((16, 32, 1, (7, 9)), {}, "conv1x1"),                                   # stride 1
    ((16, 32, 1, (9, 8)), {"stride": 2, "batch": 2}, "conv1x1"),            # subsampled
    ((8, 32, 1, (5, 5)), {"stride": 2, "pad": 1, "pattern": "block(16x1)"}, "conv1x1"),
    ((8, 16, 3, (7, 10)), {"pad": 1, "pattern": "block(4x4)", "batch": 2}, "conv"),
    ((8, 16, 5, (11, 6)), {"pad": 2, "bias": False}, "conv"),
    ((8, 16, 3, (6, 6)), {"pattern": "block(2x2)"}, "conv"),                # no padding
])
def test_sparse_convs_match_onnxruntime(shape, options, kind):
    report = _against_ort(conv_model(*shape, **options), EVERY_KIND)
    assert report["sparse_kernels"] == {kind: 1}, report


def test_convs_without_a_sparse_kernel_stay_dense_with_the_reason():
    strided = _against_ort(conv_model(8, 16, 3, (9, 9), stride=2, pad=1), EVERY_KIND)
    assert strided["dense_ops"] == [
        {"reason": "strided 3x3 conv (stride 2x2: no sparse kernel)", "count": 1}]
    grouped = _against_ort(conv_model(16, 16, 3, (6, 6), pad=1, group=2), EVERY_KIND)
    assert grouped["dense_ops"] == [{"reason": "grouped conv (no sparse kernel)", "count": 1}]


@pytest.mark.parametrize("x_shape,kind", [([1, 64], "gemv"), ([3, 64], "gemv"),
                                          ([1, 5, 64], "gemv"), ([2, 16, 64], "matmul")])
def test_small_batch_matmuls_use_the_gemv_kernel(x_shape, kind):
    for pattern, (rows, cols) in (("block(1x8)", (1, 8)), ("block(16x1)", (16, 1))):
        model = sparse_model(block_sparse(48, 64, rows, cols, 0.3), x_shape, pattern)
        report = _against_ort(model, EVERY_KIND, seeds=(0,))
        assert report["sparse_kernels"] == {kind: 1}, report


def test_compile_selects_sparse_or_dense_by_the_measured_table():
    """The shipped x86 table: 5 % nonzero blocks runs sparse, all blocks nonzero (one zero
    element: still a sparse layer) dense, above every measured break-even, per kind; a
    table without the kind keeps the op dense and says so."""
    from onnxforge.backends.targets import resolve_target
    from onnxforge.kernels.schedule_configs import target_class
    from onnxforge.kernels.sparse_matmul import break_even

    table = break_even(target_class(resolve_target("host")))
    if not {"gemv", "conv1x1", "conv"} <= set(table):
        pytest.skip("no measured sparse break-even for this CPU class")
    for density, sparse in ((0.05, 1), (1.0, 0)):
        for model in (conv_model(64, 64, 3, (8, 8), pad=1, pattern="block(16x1)",
                                 density=density),
                      conv_model(64, 64, 1, (8, 8), pattern="block(16x1)", density=density),
                      sparse_model(block_sparse(64, 128, 1, 8, density), [1, 128],
                                   "block(1x8)")):
            weight = next(i for i in model.graph.initializer if i.name == "w")
            array = numpy_helper.to_array(weight).copy()
            array.flat[0] = 0
            weight.CopyFrom(numpy_helper.from_array(array, "w"))
            report = _against_ort(model, seeds=(0,))
            assert report["sparse_ops"] == sparse, report
            if not sparse:
                assert "above the measured" in report["dense_ops"][0]["reason"]
    no_conv = _against_ort(conv_model(16, 16, 1, (4, 4)), {"matmul": table["matmul"]},
                           seeds=(0,))
    assert no_conv["dense_ops"] == [
        {"reason": "no measured break-even for conv1x1 block(1x8) on this target", "count": 1}]


def test_sparse_conv_next_to_a_dense_conv_with_packed_weights():
    """A dense strided conv (its weights pre-packed by the default schedules, which runs
    Relax's layout-rewrite split over every function) next to a sparse conv; the dense
    weight, with no zeros, is not counted as a sparse layer left dense."""
    rng = np.random.default_rng(3)
    dense_w = rng.standard_normal((32, 16, 3, 3)).astype(np.float32)
    sparse = conv_model(32, 32, 3, (8, 8), pad=1, pattern="block(16x1)", density=0.3)
    nodes = [helper.make_node("Conv", ["x", "wd"], ["h"], kernel_shape=[3, 3], strides=[2, 2],
                              pads=[1, 1, 1, 1])]
    for node in sparse.graph.node:
        node.input[:] = ["h" if i == "x" else i for i in node.input]
        nodes.append(node)
    graph = helper.make_graph(
        nodes, "mixed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 16, 16])],
        list(sparse.graph.output),
        [numpy_helper.from_array(dense_w, "wd"), *sparse.graph.initializer])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, {p.key: p.value for p in sparse.metadata_props})
    report = _against_ort(model, EVERY_KIND)
    assert report == {"sparse_ops": 1, "sparse_kernels": {"conv": 1}, "dense_ops": []}


def test_compile_verify_on_a_sparse_conv_model(tmp_path):
    """`onnxforge compile --verify` on a model whose 3x3 and 1x1 convs run sparse."""
    import subprocess
    import sys

    first = conv_model(16, 32, 3, (10, 10), pad=1, pattern="block(16x1)", density=0.05)
    second = conv_model(32, 32, 1, (10, 10), pattern="block(16x1)", density=0.05, seed=5)
    nodes = list(first.graph.node) + [
        helper.make_node("Conv", ["z", "w2", "b2"], ["y2"], kernel_shape=[1, 1])]
    inits = list(first.graph.initializer) + [
        numpy_helper.from_array(numpy_helper.to_array(second.graph.initializer[0]), "w2"),
        numpy_helper.from_array(numpy_helper.to_array(second.graph.initializer[1]), "b2")]
    graph = helper.make_graph(nodes, "two", list(first.graph.input),
                              [helper.make_tensor_value_info("y2", TensorProto.FLOAT,
                                                             [1, 32, 10, 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    record = {name: {"pattern": "block(16x1)", "sparsity": 0.95, "shape": []}
              for name in ("w", "w2")}
    helper.set_model_props(model, {"onnxforge.sparsity": json.dumps(record)})
    path = tmp_path / "s.onnx"
    onnx.save(model, path)
    done = subprocess.run([sys.executable, "-m", "onnxforge.cli", "compile", str(path), "-t",
                           "host", "-o", str(tmp_path / "s.so"), "--verify"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    text = " ".join(done.stdout.split())
    assert "sparse: 2 ops use BSR kernels (conv 1, conv1x1 1)" in text, text
    assert (tmp_path / "s.so").stat().st_size > 0


@pytest.mark.parametrize("target", ["cortex-a72", "cortex-a76"])
def test_sparse_kernels_on_aarch64(target):
    """No break-even is measured for AArch64, so compile keeps dense there; forced, the
    kernels (4-lane NEON tiles) build for both presets and run right under qemu."""
    from conftest import need_qemu
    from onnxforge.backends.tvm import run_under_qemu

    conv = conv_model(8, 32, 3, (6, 7), pad=1, pattern="block(16x1)", batch=2)
    assert compile_model(conv, target).report["sparse"]["dense_ops"][0]["reason"].startswith(
        "no measured break-even")
    models = [conv, conv_model(8, 32, 1, (9, 9), stride=2, pattern="block(1x8)"),
              sparse_model(block_sparse(48, 64, 1, 8, 0.3), [1, 64], "block(1x8)"),
              sparse_model(block_sparse(48, 64, 16, 1, 0.3), [16, 64], "block(16x1)")]
    arts = [compile_model(m, target, sparse_break_even=EVERY_KIND) for m in models]
    assert all(a.report["sparse"]["sparse_ops"] == 1 for a in arts)
    need_qemu()
    import onnx_ir as ir
    from onnxforge.backends.ort import OrtArtifact

    for model, art in zip(models, arts):
        feeds = random_inputs(art.inputs, seed=0)
        got = run_under_qemu(art, feeds)
        want = OrtArtifact(ir.from_proto(model), threads=1).run(feeds)
        for name, value in want.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-4, atol=1e-4)
