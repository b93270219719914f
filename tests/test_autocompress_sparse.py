"""autocompress's `sparse` knobs (issue 17): which layers get one and why not, the build
(sparsify with per-layer overrides, the sparsity record), the int8 + sparse rule (sparse
wins), sparse proxy entries timed on the backend, ORT not offering it, and one real
`--backend tvm` run on a tiny CNN."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from builders import make_model
from onnx import TensorProto, helper, numpy_helper
from onnxforge.api import verify_models
from onnxforge.autocompress import autocompress
from onnxforge.autocompress.build import build
from onnxforge.autocompress.proxies import ProxyTables, knob_id, measure_tables, predict
from onnxforge.autocompress.space import discover, sparse_support
from onnxforge.calibration import open_calibration
from onnxforge.cli import app
from onnxforge.ir import constant_array, load_model
from onnxforge.metrics import compute_metrics
from onnxforge.passes.base import PassContext
from onnxforge.passes.sparsity.metadata import read_sparsity
from typer.testing import CliRunner

# a break-even table like the shipped one (kind -> pattern -> largest nonzero-block share)
TABLE = {"conv": {"block(16x1)": 0.7}, "conv1x1": {"block(16x1)": 0.9},
         "gemv": {"block(16x1)": 0.4}, "matmul": {"block(16x1)": 0.2}}


def _t(rng, name, *shape, scale=0.2):
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def zoo_cnn() -> onnx.ModelProto:
    """x[N,16,8,8]: one layer of each case the sparse knobs tell apart."""
    rng = np.random.default_rng(0)
    inits = [_t(rng, "wa", 16, 16, 3, 3), _t(rng, "wb", 32, 16, 3, 3),
             _t(rng, "ws", 32, 32, 3, 3), _t(rng, "wdw", 32, 1, 3, 3),
             _t(rng, "wc", 24, 32, 1, 1), _t(rng, "wd", 32, 24, 1, 1),
             _t(rng, "g1", 32, 32), _t(rng, "g2", 10, 32)]
    conv = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("Conv", ["x", "wa"], ["a"], name="first", **conv),
        helper.make_node("Conv", ["a", "wb"], ["b"], name="conv3x3", **conv),
        helper.make_node("Conv", ["b", "ws"], ["s"], name="strided", strides=[2, 2], **conv),
        helper.make_node("Conv", ["s", "wdw"], ["dw"], name="depthwise", group=32, **conv),
        helper.make_node("Conv", ["dw", "wc"], ["c"], name="untiled", kernel_shape=[1, 1]),
        helper.make_node("Conv", ["c", "wd"], ["d"], name="pointwise", kernel_shape=[1, 1]),
        helper.make_node("GlobalAveragePool", ["d"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g1"], ["h"], name="fc1", transB=1),
        helper.make_node("Gemm", ["h", "g2"], ["y"], name="fc2", transB=1),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                            ["N", 16, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], inits)


def _context(model, shapes, n=8, seed=1):
    rng = np.random.default_rng(seed)
    name, shape = next(iter(shapes.items()))
    data = {name: rng.standard_normal((n * shape[0], *shape[1:])).astype(np.float32)}
    calib = open_calibration(data, model, shapes, seed=0)
    return PassContext(calibration=calib, input_shapes=shapes, threads=1, seed=0)


def test_sparse_knobs_which_layers_and_why_not():
    model = load_model(zoo_cnn())
    space = discover(model, _context(model, {"x": (1, 16, 8, 8)}), sparse=TABLE)
    knobs = {k.key: k.choices for k in space.knobs if k.kind == "sparse"}
    # kxk conv: break-even 0.7 nonzero blocks, all three; 1x1: 0.9, all three;
    # a Gemm on one activation row (gemv): 0.4, so 0.7 and 0.9 only
    assert knobs == {"conv3x3": (0.0, 0.5, 0.7, 0.9), "pointwise": (0.0, 0.5, 0.7, 0.9),
                     "fc1": (0.0, 0.7, 0.9)}
    why = {k.split(":", 1)[1]: v for k, v in space.skipped.items() if k.startswith("sparse:")}
    assert "keep=first" in why["first"] and "keep=last" in why["fc2"]
    assert "keep=depthwise" in why["depthwise"]
    assert "strided" in why["strided"]
    assert "does not tile" in why["untiled"]  # 24 outputs, blocks of 16
    # at 32 activation rows a Gemm is the matmul kernel (break-even 0.2): 0.9 only;
    # at 20 rows (not a multiple of 16) no sparse kernel
    for batch, expected in ((32, (0.0, 0.9)), (20, None)):
        space = discover(model, _context(model, {"x": (batch, 16, 8, 8)}, n=1), sparse=TABLE)
        fc1 = [k.choices for k in space.knobs if k.kind == "sparse" and k.key == "fc1"]
        assert fc1 == ([expected] if expected else [])
        if expected is None:
            assert "not a multiple of 16" in space.skipped["sparse:fc1"]
    # no table (onnxruntime, or a target without a measured break-even): no sparse knob
    assert not [k for k in discover(model, _context(model, {"x": (1, 16, 8, 8)})).knobs
                if k.kind == "sparse"]
    table, reason = sparse_support("ort")
    assert table is None and "dense speed" in reason


def _small(tmp_path):
    """test_autocompress's small CNN: conv1 (first) -> conv2 [16, 16*9] -> fc1 [32, 16] -> fc2."""
    from test_autocompress import small_cnn

    path = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), path)
    rng = np.random.default_rng(1)
    calib, verify = tmp_path / "calib.npz", tmp_path / "verify.npz"
    np.savez(calib, x=rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    np.savez(verify, x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    return path, calib, verify


def test_build_sparse_policy_and_the_int8_rule(tmp_path):
    path, calib, _ = _small(tmp_path)
    model = load_model(path)
    shapes = {"x": (1, 3, 8, 8)}
    context = PassContext(calibration=open_calibration(str(calib), model, shapes, seed=0),
                          input_shapes=shapes, threads=1, seed=0)
    space = discover(model, context, sparse=TABLE)
    index = {(k.kind, k.key): i for i, k in enumerate(space.knobs)}
    policy = [0] * len(space.knobs)
    sparse_conv2 = space.knobs[index["sparse", "conv2"]].choices.index(0.7)
    policy[index["sparse", "conv2"]] = sparse_conv2
    policy[index["bits", "conv2"]] = 1  # int8 on the sparse layer: dropped, sparse wins
    policy[index["bits", "fc2"]] = 1  # int8 elsewhere: kept
    policy[index["rank", "conv2"]] = 1  # a decomposition of the sparse layer: dropped
    policy = tuple(policy)
    built, info = build(model, space, policy, context)
    assert info["stats"]["dropped_for_sparse"] == ["rank:conv2", "bits:conv2"]
    assert info["stats"]["quantize"]["int8_layers"] == 1
    assert "lowrank" not in info["pipeline"] and "sparsify(" in info["pipeline"]
    conv2 = next(n for n in built.graph if n.name == "conv2")
    weight = constant_array(conv2.inputs[1])
    assert weight.dtype == np.float32  # still float: not quantized
    record = read_sparsity(built)
    assert list(record) == [conv2.inputs[1].name]
    assert record[conv2.inputs[1].name]["pattern"] == "block(16x1)"
    # block(16x1) on the [16, 144] view: each column of the one block row is 0 or not
    view = weight.reshape(16, -1)
    zero_cols = np.all(view == 0, axis=0)
    assert np.count_nonzero(view == 0) == 16 * zero_cols.sum()  # no zero outside a block
    assert zero_cols.sum() == int(0.7 * 144)
    assert np.count_nonzero(view[:, ~zero_cols]) > 0.9 * view[:, ~zero_cols].size
    # the other layers are untouched (dense, float or int8 as the policy says)
    assert constant_array(next(n for n in built.graph if n.name == "fc1").inputs[1]).all()
    # the policy table and the proxies see the policy as built
    rows = {(r["kind"], r["layer"]): r["choice"] for r in space.table(policy)}
    assert rows["bits", "conv2"] == "fp32 (int8 dropped: the layer is sparse)"
    assert rows["sparse", "conv2"] == "sparse 70% block(16x1)"
    assert space.repair(policy) != policy
    assert space.repair(space.repair(policy)) == space.repair(policy)
    rebuilt, _ = build(model, space, space.repair(policy), context)
    assert np.array_equal(constant_array(next(n for n in rebuilt.graph
                                              if n.name == "conv2").inputs[1]), weight)
    # pruned to 12 channels, conv2 no longer tiles by 16 outputs: left dense, and said so
    prune = next(i for i, k in enumerate(space.knobs)
                 if k.kind == "prune" and k.key in ("conv2", "w2", "b2"))
    pruned = list(space.repair(policy))
    pruned[prune] = space.knobs[prune].choices.index(0.25)
    built, info = build(model, space, tuple(pruned), context)
    assert "does not tile" in info["stats"]["sparsify"]["not_sparsified"]["conv2"]
    assert not read_sparsity(built)


def _fake_tables(space):
    tables = ProxyTables({"latency_ms": 1.0, "size_bytes": 100.0, "macs": 100.0})
    for i, knob in enumerate(space.knobs):
        tables.single[knob_id(space, i)] = {
            str(c): {"error": 0.01 * c, "size_bytes": 100.0 - c, "macs": 100.0,
                     "latency_ratio": 0.9} for c in range(1, len(knob.choices))}
    tables.int8_all = 0.5
    return tables


def test_predict_uses_the_policy_as_built(tmp_path):
    path, _calib, _ = _small(tmp_path)
    model = load_model(path)
    space = discover(model, _context(model, {"x": (1, 3, 8, 8)}), sparse=TABLE)
    tables = _fake_tables(space)
    index = {(k.kind, k.key): i for i, k in enumerate(space.knobs)}
    policy = [0] * len(space.knobs)
    policy[index["sparse", "conv2"]] = 1
    policy[index["bits", "conv2"]] = 1
    policy = tuple(policy)
    assert predict(tables, space, policy) == predict(tables, space, space.repair(policy))
    assert predict(tables, space, policy) != predict(
        tables, space, space.single(index["bits", "conv2"], 1))


def test_sparse_proxy_entries_are_timed_on_the_backend(tmp_path):
    """The other entries on the proxy timer (ORT), the sparse ones on the backend; a sparse
    choice the backend did not run faster leaves the space."""
    path, _calib, _ = _small(tmp_path)
    model = load_model(path)
    context = _context(model, {"x": (1, 3, 8, 8)})
    space = discover(model, context, sparse=TABLE)
    tables = ProxyTables({"latency_ms": 1.0, "size_bytes": 1e4, "macs": 1e4})
    calls = {"proxy": 0, "backend": 0}

    def timer(name, ratio):
        def time(models):
            calls[name] += len(models)
            return [ratio(m) for m in models]
        return time

    def backend_ratio(m):  # faster with more zeros, except fc1 at 0.9: "kept dense"
        zeros = {n.name: float(np.mean(constant_array(n.inputs[1]) == 0)) for n in m.graph
                 if n.op_type in ("Conv", "Gemm")}
        return 1.0 if zeros.get("fc1", 0) > 0.8 else 1 - 0.3 * sum(zeros.values())

    kinds = ("rank", "sparse")
    measure_tables(space, tables, lambda p: build(model, space, p, context)[0],
                   lambda m: 0.01, lambda m: {"size_bytes": 1e4, "macs": 1e4},
                   timer("proxy", lambda m: 1.0), kinds=kinds,
                   backend_ratios=timer("backend", backend_ratio))
    sparse = [i for i, k in enumerate(space.knobs) if k.kind == "sparse"]
    entries = sum(len(space.knobs[i].choices) - 1 for i in sparse)
    assert entries == 5 and calls["backend"] == entries  # conv2: 3, fc1 (gemv): 2
    assert calls["proxy"] == sum(len(tables.single[knob_id(space, i)]) for i, k in
                                 enumerate(space.knobs) if k.kind == "rank")
    rows = tables.single[knob_id(space, sparse[0])]
    assert all(r["latency_source"] == "backend" and r["latency_ratio"] < 1
               for r in rows.values())
    allowed = tables.useful_choices(space)
    fc1 = next(i for i in sparse if space.knobs[i].key == "fc1")
    assert allowed[fc1] == [0, 1]  # 0.7 kept, 0.9 ran no faster: left out
    assert allowed[sparse[0]] == [0, 1, 2, 3]


class SparseFakeLatency:
    """Latency from the nonzero weights (a sparse kernel's cost) plus 1 us per node."""

    name = "tvm:fake"

    def time(self, models, inputs):
        out = []
        for m in models:
            macs = compute_metrics(m, {"x": (1, 3, 8, 8)}).node_macs
            cost = 0.0
            for n in m.graph:
                if n.op_type in ("Conv", "Gemm"):
                    w = constant_array(n.inputs[1])
                    cost += macs.get(n.name, 0) * (np.count_nonzero(w) / w.size)
            out.append(cost * 1e-5 + 1e-3 * len(list(m.graph)))
        return out


def test_search_with_sparse_on_a_sparse_backend_and_not_on_ort(tmp_path, monkeypatch):
    import onnxforge.autocompress.run as run_module

    real = run_module.sparse_support
    # this machine's CPU class may have no measured table: the test's own for "tvm:*"
    monkeypatch.setattr(run_module, "sparse_support", lambda backend, target: (
        (TABLE, "") if backend.startswith("tvm") else real(backend, target)))
    path, calib, verify = _small(tmp_path)
    out = tmp_path / "out.onnx"
    common = {"verify_data": verify, "input_shapes": {"x": (1, 3, 8, 8)}, "time_budget": 120,
              "max_candidates": 3, "speedup": 1.3, "max_error": 0.5, "kinds": ("sparse",)}
    result = autocompress(path, calib, out, backend="tvm", latency_backend=SparseFakeLatency(),
                          **common)
    report = result.report
    assert result.met, report["candidates"]
    assert {r["kind"] for r in report["policy"]} == {"prune", "rank", "bits", "sparse"}
    chosen = {r["layer"]: r["choice"] for r in report["policy"] if r["kind"] == "sparse"}
    assert any(c.startswith("sparse") for c in chosen.values())
    written = load_model(out)
    assert read_sparsity(written)
    err = verify_models(path, out, data=str(verify), input_shapes={"x": (1, 3, 8, 8)},
                        batches=16)
    assert abs(err.max_rel_l2 - report["final"]["rel_l2"]) < 1e-6
    assert 0 < err.max_rel_l2 <= 0.5
    assert not any(n.startswith("sparse: not in the space") for n in report["notes"])
    # onnxruntime: no sparse knob, and the report (and so the terminal) says why
    ort = autocompress(path, calib, None, force=True, **common).report
    assert not [k for k in ort["space"]["knobs"] if k["kind"] == "sparse"]
    note = next(n for n in ort["notes"] if n.startswith("sparse: not in the space"))
    assert "dense speed" in note
    from io import StringIO

    from onnxforge.cli_autocompress import render_result
    from rich.console import Console

    text = StringIO()
    render_result(ort, Console(file=text, width=200))
    assert "note: sparse: not in the space" in text.getvalue()


def test_real_tvm_backend_sparse_end_to_end_cli(tmp_path):
    """--backend tvm --techniques sparse for real: the sparse proxy entries compiled and
    timed on TVM (the others would be on ORT), the candidates compiled, verified and timed;
    a written sparse model has its sparsity record and the reported error."""
    pytest.importorskip("tvm")
    path, calib, verify = _small(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(app, [
        "autocompress", str(path), "--calib", str(calib), "--verify-data", str(verify),
        "--backend", "tvm", "--target", "host", "--speedup", "1.01", "--max-error", "0.5",
        "-o", str(out), "--report", str(report), "--max-candidates", "2", "--force",
        "--time-budget", "120", "--techniques", "sparse"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    knobs = data["space"]["knobs"]
    sparse = [f"sparse:{k['key']}" for k in knobs if k["kind"] == "sparse"]
    assert sparse == ["sparse:conv2", "sparse:fc1"]  # conv1 first, fc2 last: kept dense
    entries = [r for kid in sparse for r in data["proxies"]["single"][kid].values()]
    assert len(entries) == 5 and all(r["latency_source"] == "backend" for r in entries)
    assert all(np.isfinite(r["latency_ratio"]) and r["latency_ratio"] > 0 for r in entries)
    measured = [c for c in data["candidates"] if not c.get("origin")]
    # the input model and each sparse entry compiled once; a candidate that is one of the
    # entries' models (same bytes) reuses its compile
    assert 1 + len(entries) <= data["backend"]["compiled"] <= 1 + len(entries) + len(measured)
    assert data["rejected"] == []
    chosen = next(c for c in data["candidates"] if c["chosen"])
    written = load_model(out)
    if any(chosen["policy"] or []):
        assert read_sparsity(written) and "sparsify(" in chosen["pipeline"]
    err = verify_models(path, out, data=str(verify), input_shapes={"x": (1, 3, 8, 8)},
                        batches=16)
    assert abs(err.max_rel_l2 - data["final"]["rel_l2"]) < 1e-6


def test_picks_are_policies_as_built_so_a_sparse_layer_is_not_measured_twice():
    """int8 + sparse on one layer builds the same model as sparse alone (repair): the
    search must not measure that model again under the other policy."""
    from types import SimpleNamespace

    from onnxforge.autocompress.run import _Job, policy_key
    from onnxforge.autocompress.space import Knob, Space

    space = Space([Knob("sparse", "conv2", (0.0, 0.5)), Knob("bits", "conv2", (32, 8)),
                   Knob("bits", "fc1", (32, 8))])
    measured = (1, 0, 0)  # conv2 sparse, measured already
    job = SimpleNamespace(space=space, records={policy_key(measured): {}},
                          best=lambda: None, _error_limit=lambda: float("inf"))
    front = [((1, 1, 0), (0.5, 0.1)), ((1, 1, 1), (0.4, 0.2))]
    picks = _Job._picks(job, front, limit=0.01)
    assert picks == [(1, 0, 1)]  # (1, 1, 0) is the measured (1, 0, 0) as built
