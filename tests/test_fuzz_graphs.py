"""Differential fuzzing (`onnxforge.fuzz`): seeded random graphs vs onnxruntime.

The fast tests check the generator (valid models, one model per seed and index, the
family filter), the comparison and error classification, and the shrinker. The CI
sample runs FUZZ_COUNT graphs of FUZZ_SEED through cleanup,fuse and the TVM host
compile (defaults) in one worker process and requires no wrong result and no crash;
`python tools/fuzz_graphs.py --seed 0 --count 200` is the bigger run.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter

import numpy as np
import onnx
import pytest
from onnxforge import fuzz
from onnxforge.errors import BackendError, PassFailedError, UnsupportedOpError
from onnxforge.random_graphs import (
    FAMILIES,
    OPT_IN_FAMILIES,
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
    assert parse_families("") == [f for f in FAMILIES if f not in OPT_IN_FAMILIES]
    assert "prunable" in OPT_IN_FAMILIES and parse_families("prunable") == ["prunable"]
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


def _off_by_five_percent(real_compile, when=lambda kwargs: True):
    """compile_model whose artifacts (those `when` its keyword arguments say) return
    outputs 5 % too large."""
    def compile_model(*args, **kwargs):
        artifact = real_compile(*args, **kwargs)
        if when(kwargs):
            run = artifact.run
            artifact.run = lambda feed, **kw: {k: v * np.float32(1.05) for k, v in
                                               run(feed, **kw).items()}
        return artifact

    return compile_model


INT8_FAMILIES = ["conv", "act", "residual", "concat", "pool", "gap", "gemm", "matmul", "pad",
                 "upsample"]


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

    monkeypatch.setattr(tvm_backend, "compile_model", _off_by_five_percent(
        tvm_backend.compile_model))
    case = fuzz.valid_case(FUZZ_SEED, 0, ["conv"])
    result = fuzz.run_int8_stage(case.graph.model, case.inputs)
    assert result.status == "wrong", result
    assert "differs from onnxruntime" in result.detail


# ---------------------------------------------------------------------- lossy stages

NEEDS_TVM = pytest.mark.skipif(importlib.util.find_spec("tvm") is None,
                               reason="apache-tvm is not installed (pip install -e '.[tvm]')")
LOSSY_FAMILIES = ["prunable", "prunable", "conv", "act", "residual", "concat", "gemm",
                  "matmul", "batchnorm", "pool"]
LOSSY_COUNT = 14


def _lossy_case(index: int = 0, monkeypatch=None):
    """A graph with prunable layers (conv -> act -> conv or an MLP) and its base; with
    `monkeypatch`, the stages skip their TVM compiles (tests of the pass-side checks)."""
    from onnxforge.fuzz_lossy import LossyCase

    if monkeypatch is not None:
        monkeypatch.setattr(LossyCase, "check_compiled", lambda self, *args: {})

    for i in range(index, index + 40):
        case = fuzz.valid_case(FUZZ_SEED, i, ["prunable"])
        if case is not None and sum(n.op_type == "Conv" for n in case.graph.model.graph.node) >= 2:
            return LossyCase(case.graph.model, case.inputs)
    raise AssertionError("no conv -> conv graph drawn")


def test_lossy_stage_options_are_kept_for_the_shrinker(monkeypatch):
    """A shrunk graph has other bytes, so other drawn options: the shrinker passes the
    failing graph's options (the front of its detail) back to the stage."""
    from onnxforge import fuzz_lossy
    from onnxforge.fuzz_lossy import lossy_options

    case = _lossy_case(monkeypatch=monkeypatch)
    text = "prune(ratio=0.5,criterion=l1,recover=false,round_to=1)"
    result = fuzz.run_lossy_stage("prune", case.base_proto, case.inputs, options=text)
    assert result.status == "correct" and lossy_options(result.detail) == text, result
    assert fuzz_lossy.prune_options(fuzz_lossy.graph_rng(case.base_proto, "prune")) != text
    assert lossy_options("ValueError: boom") is None


def test_sparsity_record_check_catches_changed_weights():
    """Without recover, a weight sparsify touched must be the original with zeros only."""
    from onnx import numpy_helper
    from onnxforge.fuzz_lossy import Wrong, check_sparsity_record
    from onnxforge.passes.sparsity.metadata import SPARSITY_KEY

    base = _lossy_case().base_proto
    name = next(t.name for t in base.graph.initializer if t.dims and len(t.dims) == 4)
    w = numpy_helper.to_array(next(t for t in base.graph.initializer if t.name == name)).copy()
    w.reshape(w.shape[0], -1)[:, :1] = 0  # one zero column
    sparse = onnx.ModelProto()
    sparse.CopyFrom(base)
    entry = {"pattern": "unstructured", "sparsity": float(np.mean(w == 0)), "shape": list(w.shape)}
    onnx.helper.set_model_props(sparse, {SPARSITY_KEY: json.dumps({name: entry})})

    def with_weight(array):
        for t in sparse.graph.initializer:
            if t.name == name:
                t.CopyFrom(numpy_helper.from_array(array, name))
        return sparse

    assert check_sparsity_record(base, with_weight(w), recover=False)
    changed = w.copy()
    changed.flat[-1] *= 1.5  # a kept weight moved
    with pytest.raises(Wrong, match="changed beyond the zeros"):
        check_sparsity_record(base, with_weight(changed), recover=False)
    assert check_sparsity_record(base, with_weight(changed), recover=True)  # a refit may
    entry["sparsity"] = 0.9
    onnx.helper.set_model_props(sparse, {SPARSITY_KEY: json.dumps({name: entry})})
    with pytest.raises(Wrong, match="sparsity record"):
        check_sparsity_record(base, with_weight(w), recover=True)


def test_prune_check_catches_corrupted_pruned_weights(monkeypatch):
    """The prune stage can fail: a pruned conv weight off by 10 % no longer equals the
    original with the removed channels masked, and a misreported error is caught."""
    import onnxforge.passes.pruning.prune as prune_module
    from onnxforge import pass_manager
    from onnxforge.fuzz_lossy import Wrong, run_prune_check
    from onnxforge.ir import constant_array
    from onnxforge.passes.pruning.apply import set_constant

    case = _lossy_case(monkeypatch=monkeypatch)
    text = "prune(ratio=0.5,criterion=l2,recover=false,round_to=1)"
    detail, _ = run_prune_check(case, text)  # the real pass passes
    assert "units removed" in detail and not detail.startswith("0 ")

    real_apply = prune_module.apply_plan

    def corrupting_apply(work, analysis, removed):
        stats = real_apply(work, analysis, removed)
        conv = next(n for n in reversed(list(work.graph)) if n.op_type == "Conv")
        set_constant(conv.inputs[1], constant_array(conv.inputs[1]) * np.float32(1.1))
        return stats

    monkeypatch.setattr(prune_module, "apply_plan", corrupting_apply)
    with pytest.raises(Wrong, match="removed channels masked"):
        run_prune_check(case, text)
    monkeypatch.setattr(prune_module, "apply_plan", real_apply)

    real_compare = pass_manager.compare_models

    def halved(*args, **kwargs):
        comparison = real_compare(*args, **kwargs)
        for output in comparison.outputs:
            output.rel_l2 *= 0.5
        return comparison

    monkeypatch.setattr(pass_manager, "compare_models", halved)
    with pytest.raises(Wrong, match="reported error"):
        run_prune_check(case, text)


def test_lowrank_checks_catch_a_wrong_factor(monkeypatch):
    """A full-rank decomposition must equal the original, a truncated one the original
    with the reconstructed weights: factors off by 1 % are caught by both."""
    from onnxforge.fuzz_lossy import Wrong, run_lowrank_check
    from onnxforge.passes.lowrank.lowrank import LowRankPass

    case = _lossy_case(monkeypatch=monkeypatch)
    text = "lowrank(rank=full,margin=-100,round_to=1,data_aware=false,guard=false)"
    assert "layers decomposed (= original)" in run_lowrank_check(case, text, exact=True)[0]
    truncated = "lowrank(rank=0.5,margin=-1,round_to=1,data_aware=false,guard=false)"
    detail = run_lowrank_check(case, truncated, exact=False)[0]
    assert "(= original with the reconstructed weights)" in detail, detail
    real_factors = LowRankPass._factors

    def off(self, layer, plan, ranks):
        factors, approx = real_factors(self, layer, plan, ranks)
        factors = list(factors)
        k = next(i for i, f in enumerate(factors) if f is not None)  # a merged mode is None
        factors[k] = factors[k] * np.float32(1.01)
        return tuple(factors), approx

    monkeypatch.setattr(LowRankPass, "_factors", off)
    with pytest.raises(Wrong, match="full-rank decomposition"):
        run_lowrank_check(case, text, exact=True)
    with pytest.raises(Wrong, match="replaced by its reconstruction"):
        run_lowrank_check(case, truncated, exact=False)


@pytest.mark.tvm
@NEEDS_TVM
def test_sparse_stage_reports_wrong_sparse_code(monkeypatch):
    """The sparse stage can fail: sparse-compiled outputs off by 5 % are `wrong`."""
    import onnxforge.backends.tvm as tvm_backend
    from onnxforge.fuzz_lossy import FORCE_SPARSE, Wrong, run_sparse_check

    case = _lossy_case()
    text = "sparsify(0.7,pattern=block(1x4),keep=none,recover=false)"
    detail, extra = run_sparse_check(case, text, recover=False)
    assert extra["sparse_ops"] >= 1, detail
    monkeypatch.setattr(tvm_backend, "compile_model", _off_by_five_percent(
        tvm_backend.compile_model, lambda kw: kw.get("sparse_break_even") is FORCE_SPARSE))
    with pytest.raises(Wrong, match="sparse kernels forced"):
        run_sparse_check(case, text, recover=False)


@pytest.mark.tvm
@NEEDS_TVM
def test_lossy_stages_on_a_sample(tmp_path):
    """Random graphs with prunable layers through prune, lowrank and sparsify (options drawn
    per graph), each checked by its oracle and compiled; the sparse kernels must run."""
    pytest.importorskip("onnxforge.backends.tvm", reason="the TVM backend does not import")
    summary = fuzz.run_fuzz(FUZZ_SEED, LOSSY_COUNT, families=LOSSY_FAMILIES, compile=False,
                            lossy=True, timeout=GRAPH_TIMEOUT * 4, out_dir=tmp_path,
                            time_budget=RUN_BUDGET)
    assert not summary.failures, "\n".join(r.line() for r in summary.failures)
    details = {s: [r.stages[s].detail for r in summary.results] for s in fuzz.LOSSY_STAGES}
    assert sum("units removed" in d for d in details["prune"]) >= 3, details["prune"]
    assert any("recover=false" in d and "units removed" in d
               for d in details["prune"]), details["prune"]  # the masked oracle ran
    assert sum("layers decomposed" in d for d in details["lowrank"]) >= 3, details["lowrank"]
    assert any("rank=full" in d and "layers decomposed" in d for d in details["lowrank"])
    sparse_ops = [r.stages["sparse"].extra.get("sparse_ops", 0) for r in summary.results]
    assert sum(n > 0 for n in sparse_ops) >= 3, details["sparse"]  # the sparse kernels ran
