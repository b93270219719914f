"""Differential fuzzing (`onnxforge.fuzz`): seeded random graphs vs onnxruntime.

The fast tests check the generator (valid models, one model per seed and index, the
family filter), the comparison and error classification, and the shrinker. The CI
sample runs FUZZ_COUNT graphs of FUZZ_SEED through cleanup,fuse and the TVM host
compile (defaults) in one worker process and requires no wrong result and no crash;
`python tools/fuzz_graphs.py --seed 0 --count 200` is the bigger run.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import onnx
import pytest
from onnxforge import fuzz
from onnxforge.errors import BackendError, PassFailedError, UnsupportedOpError
from onnxforge.random_graphs import (
    FAMILIES,
    describe_model,
    generate_graph,
    parse_families,
    random_inputs,
)

FUZZ_SEED = 20240
FUZZ_COUNT = 100
# A tiny graph compiles in 0.2-3 s; a graph past this is a compile-time blow-up (a crash).
GRAPH_TIMEOUT = 30.0
# The whole sample: ~100 x 1.5 s on 2 cores; past this the run stops and the test fails.
RUN_BUDGET = 600.0


def test_generator_is_valid_and_deterministic():
    sizes = []
    for index in range(40):
        graph = generate_graph(3, index)
        onnx.checker.check_model(graph.model, full_check=True)
        again = generate_graph(3, index)
        assert graph.model.SerializeToString() == again.model.SerializeToString()
        opset = graph.model.opset_import[0].version
        assert 17 <= opset <= 20
        n, c, h, w = graph.input_shape
        assert n == 1 and 1 <= c <= 16 and 3 <= h <= 20 and 3 <= w <= 20
        for shape in graph.output_shapes.values():
            assert len(shape) == 4 and all(d > 0 for d in shape)
        sizes.append(len(graph.model.graph.node))
        assert graph.describe() == describe_model(graph.model)
    assert min(sizes) >= 1 and np.median(sizes) >= 3
    other = generate_graph(4, 0).model.SerializeToString()
    assert other != generate_graph(3, 0).model.SerializeToString()
    assert generate_graph(3, 0, attempt=1).model.SerializeToString() != \
        generate_graph(3, 0).model.SerializeToString()


def test_every_family_is_drawn_and_runs_in_onnxruntime():
    discarded: Counter = Counter()
    for name in FAMILIES:
        for index in range(4):
            case = fuzz.valid_case(11, index, [name], discarded=discarded)
            assert case is not None, f"family {name}: no graph onnxruntime runs"
            assert name in case.graph.families or name in ("concat", "residual", "split")
            assert len(case.references) == 3
    assert sum(discarded.values()) <= 10, discarded


def test_family_filter():
    assert parse_families("conv, pad") == ["conv", "pad"]
    assert parse_families("") == list(FAMILIES)
    with pytest.raises(ValueError, match="unknown op families"):
        parse_families("conv,nope")
    for index in range(10):
        ops = set(generate_graph(0, index, ["pad"]).ops)
        assert "Pad" in ops and ops <= {"Pad", "Conv", "BatchNormalization", "Mul", "Add"}


def test_random_inputs_are_seeded():
    model = generate_graph(0, 1).model
    a, b = random_inputs(model, 5), random_inputs(model, 5)
    assert len(a) == 3
    for x, y in zip(a, b):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(a[0]["input"], a[1]["input"])


def test_compare_and_classify():
    ref = [{"y": np.linspace(-1, 1, 50, dtype=np.float32)}]
    assert fuzz.compare(ref, [{"y": ref[0]["y"] + 1e-7}]).status == "correct"
    bad = ref[0]["y"].copy()
    bad[3] += 0.5
    wrong = fuzz.compare(ref, [{"y": bad}])
    assert wrong.status == "wrong" and wrong.rel == pytest.approx(0.5, rel=1e-3)
    nan = ref[0]["y"].copy()
    nan[0] = np.nan
    assert fuzz.compare(ref, [{"y": nan}]).status == "wrong"
    assert fuzz.compare(ref, [{"y": bad[:10]}]).status == "wrong"  # mis-shaped
    assert fuzz.compare(ref, [{"z": bad}]).status == "wrong"  # missing

    assert fuzz.classify_exception(UnsupportedOpError("no Foo")).status == "refused"
    assert fuzz.classify_exception(BackendError("cannot export")).status == "refused"
    try:
        try:
            raise RuntimeError("InternalError: check failed")
        except RuntimeError as inner:
            raise BackendError("TVM failed to build") from inner
    except BackendError as exc:
        wrapped = fuzz.classify_exception(exc)
    assert wrapped.status == "crash" and "RuntimeError" in wrapped.detail
    assert fuzz.classify_exception(PassFailedError("x")).status == "refused"
    assert fuzz.classify_exception(KeyError("k")).status == "crash"
    assert fuzz.overall_status({"a": fuzz.StageResult("crash"),
                                "b": fuzz.StageResult("wrong")}) == "wrong"


def test_shrinker_keeps_the_failure():
    graph = next(g for g in (generate_graph(1, i) for i in range(50))
                 if "Pad" in g.ops and len(g.ops) >= 6)

    def has_pad(model: onnx.ModelProto) -> bool:
        onnx.checker.check_model(model, full_check=True)
        return any(n.op_type == "Pad" for n in model.graph.node)

    small, checks = fuzz.shrink_graph(graph.model, has_pad)
    assert has_pad(small) and 0 < checks
    assert len(small.graph.node) < len(graph.model.graph.node)
    assert len(small.graph.node) <= 3  # Pad plus what computes its constant inputs, at most


def test_worker_reports_a_timeout_as_a_crash():
    case = fuzz.valid_case(0, 0, ["act"])
    task = fuzz.make_task(case.graph.model, case.inputs, case.references, ["pipeline"])
    with fuzz.FuzzWorker(timeout=0.001, preload_tvm=False) as worker:
        result = worker.check(task)
        assert result["pipeline"].status == "crash"
        assert result["pipeline"].detail.startswith("timeout")
        worker.timeout = 120
        assert worker.check(task)["pipeline"].status == "correct"
        assert worker.restarts == 1


def test_pipeline_stage_on_a_sample():
    summary = fuzz.run_fuzz(FUZZ_SEED, 25, compile=False, timeout=120)
    assert summary.counts()["graphs"] == 25
    assert not summary.failures, "\n".join(r.line() for r in summary.failures)


@pytest.mark.tvm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("tvm") is None,
                    reason="apache-tvm is not installed (pip install -e '.[tvm]')")
def test_fuzz_pipeline_and_tvm_compile(tmp_path):
    pytest.importorskip("onnxforge.backends.tvm", reason="the TVM backend does not import")
    summary = fuzz.run_fuzz(FUZZ_SEED, FUZZ_COUNT, compile=True, timeout=GRAPH_TIMEOUT,
                            out_dir=tmp_path, time_budget=RUN_BUDGET)
    counts = summary.counts()
    lines = "\n".join(r.line() for r in summary.failures)
    assert not summary.failures, (
        f"{counts['wrong']} wrong, {counts['crash']} crash out of {counts['graphs']} graphs "
        f"(reproduce: python tools/fuzz_graphs.py --seed {FUZZ_SEED} --count {FUZZ_COUNT} "
        f"--shrink):\n{lines}")
    assert not summary.stopped_early, (
        f"the sample ran past {RUN_BUDGET:.0f} s after {counts['graphs']} graphs")
    assert counts["graphs"] == FUZZ_COUNT
    assert counts["correct"] >= 0.8 * FUZZ_COUNT, counts  # refusals stay rare


def test_shrinker_drops_a_prefix_that_restores_the_input_shape():
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Transpose", ["x"], ["t1"], perm=[0, 3, 2, 1]),
             helper.make_node("Transpose", ["t1"], ["t2"], perm=[0, 3, 2, 1]),
             helper.make_node("Relu", ["t2"], ["y"])]
    shape = [1, 2, 3, 4]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", 1, shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    small, _ = fuzz.shrink_graph(model, lambda m: any(n.op_type == "Relu" for n in m.graph.node))
    assert [n.op_type for n in small.graph.node] == ["Relu"]


INT8_FAMILIES = ["conv", "act", "residual", "concat", "pool", "gap", "gemm", "matmul", "pad"]


@pytest.mark.tvm
@pytest.mark.skipif(importlib.util.find_spec("tvm") is None,
                    reason="apache-tvm is not installed (pip install -e '.[tvm]')")
def test_int8_stage_on_a_sample(tmp_path):
    """Random conv/matmul graphs, quantized with random calibration and compiled: the
    integer code must compute what the QDQ file says (compile's QDQ tolerance)."""
    pytest.importorskip("onnxforge.backends.tvm", reason="the TVM backend does not import")
    summary = fuzz.run_fuzz(FUZZ_SEED, 16, families=INT8_FAMILIES, compile=False, int8=True,
                            timeout=GRAPH_TIMEOUT * 2, out_dir=tmp_path, time_budget=RUN_BUDGET)
    assert not summary.failures, "\n".join(r.line() for r in summary.failures)
    details = [r.stages["int8"].detail for r in summary.results]
    integer = [d for d in details if d and not d.startswith("0 integer")]
    assert len(integer) >= len(details) // 2, details  # the integer kernels ran
    assert any("layout NHWC" in d for d in details), details


@pytest.mark.tvm
@pytest.mark.skipif(importlib.util.find_spec("tvm") is None,
                    reason="apache-tvm is not installed (pip install -e '.[tvm]')")
def test_int8_stage_reports_wrong_code(monkeypatch):
    """The int8 stage can fail: an artifact whose outputs are off by 5 % is `wrong`."""
    import onnxforge.backends.tvm as tvm_backend

    real_compile = tvm_backend.compile_model

    def off_by_five_percent(*args, **kwargs):
        artifact = real_compile(*args, **kwargs)
        run = artifact.run
        artifact.run = lambda feed, **kw: {k: v * np.float32(1.05) for k, v in
                                           run(feed, **kw).items()}
        return artifact

    monkeypatch.setattr(tvm_backend, "compile_model", off_by_five_percent)
    case = fuzz.valid_case(FUZZ_SEED, 0, ["conv"])
    result = fuzz.run_int8_stage(case.graph.model, case.inputs)
    assert result.status == "wrong", result
    assert "differs from onnxruntime" in result.detail
