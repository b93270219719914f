"""autocompress (issue 17): budgets, refusal, --force, cache resume, determinism, the real
ORT backend end to end, the CLI. Small hand-built models; a fake latency backend (latency
from MACs and int8 layers) where the point is the search, not the timing."""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from builders import make_model
from onnx import TensorProto, helper, numpy_helper
from onnxforge.api import verify_models
from onnxforge.autocompress import autocompress
from onnxforge.cli import app, main
from onnxforge.errors import BudgetExceededError, InputSpecError
from onnxforge.ir import load_model
from onnxforge.metrics import compute_metrics
from typer.testing import CliRunner

SHAPES = {"x": (1, 3, 8, 8)}


def small_cnn(seed: int = 0) -> onnx.ModelProto:
    """x[1,3,8,8] -> Conv(16) -> Relu -> Conv(16) -> Relu -> GAP -> Flatten -> Gemm(32) -> Relu
    -> Gemm(10)."""
    rng = np.random.default_rng(seed)

    def t(name, *shape, scale=0.3):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32),
                                       name)

    inits = [t("w1", 16, 3, 3, 3), t("b1", 16), t("w2", 16, 16, 3, 3, scale=0.1), t("b2", 16),
             t("g1", 32, 16), t("c1", 32), t("g2", 10, 32), t("c2", 10)]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["ar"], name="relu1"),
        helper.make_node("Conv", ["ar", "w2", "b2"], ["b"], name="conv2", kernel_shape=[3, 3],
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b"], ["br"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["br"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "g1", "c1"], ["h"], name="fc1", transB=1),
        helper.make_node("Relu", ["h"], ["hr"], name="relu3"),
        helper.make_node("Gemm", ["hr", "g2", "c2"], ["y"], name="fc2", transB=1),
    ]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])], inits)


@pytest.fixture
def files(tmp_path):
    model = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), model)
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    verify = tmp_path / "verify.npz"
    np.savez(verify, x=rng.standard_normal((16, 3, 8, 8)).astype(np.float32))
    return model, calib, verify


class FakeLatency:
    """Latency from the model, not a clock: MACs (int8 layers count 40 %) plus 1 us per node,
    so the search's decisions are reproducible. Counts the models it timed (`timed`) and
    those besides the first of each call, the input model (`others`)."""

    name = "fake"

    def __init__(self):
        self.timed = self.others = 0

    def time(self, models, inputs):
        self.others += len(models) - 1
        out = []
        for m in models:
            self.timed += 1
            macs = compute_metrics(m, SHAPES).macs
            nodes = list(m.graph)
            compute = [n for n in nodes if n.op_type in ("Conv", "Gemm")]
            int8 = sum(1 for n in compute if n.inputs[1].producer() is not None
                       and n.inputs[1].producer().op_type == "DequantizeLinear")
            share = int8 / max(len(compute), 1)
            out.append(macs * (1 - 0.6 * share) * 1e-5 + 1e-3 * len(nodes))
        return out


def run(files, tmp_path, **kw):
    model, calib, verify = files
    options = {"verify_data": verify, "input_shapes": SHAPES, "time_budget": 120,
               "max_candidates": 4, "latency_backend": FakeLatency()}
    options.update(kw)
    return autocompress(model, calib, **options)


def test_speedup_budget_met_with_fake_backend(files, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = run(files, tmp_path, output=out, report_path=report, speedup=1.5, max_error=0.5)
    assert result.met and out.exists()
    data = json.loads(report.read_text())
    # the written model meets the budget measured independently of the search's numbers
    backend = FakeLatency()
    written = load_model(out)
    before, after = backend.time([load_model(files[0]), written], {})
    assert before / after >= 1.5
    err = verify_models(files[0], out, data=str(files[2]), input_shapes=SHAPES, batches=16)
    assert err.max_rel_l2 <= 0.5
    assert abs(err.max_rel_l2 - data["final"]["rel_l2"]) < 1e-6
    # report: policy table for every knob, the front flags, plots next to the report
    kinds = {row["kind"] for row in data["policy"]}
    assert kinds == {"prune", "rank", "bits"}
    assert any(c["on_latency_front"] for c in data["candidates"])
    assert sum(c["chosen"] for c in data["candidates"]) == 1
    assert data["original"]["latency_ms"] == pytest.approx(before)
    pngs = sorted(p.name for p in tmp_path.glob("r.*_front.png"))
    assert pngs == ["r.latency_front.png", "r.size_front.png"]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in tmp_path.glob("r.*_front.png"))


def test_html_report_page(files, tmp_path):
    page = tmp_path / "ac.html"
    result = run(files, tmp_path, report_path=page, speedup=1.5, max_candidates=2)
    text = page.read_text()
    assert "onnxforge autocompress report" in text and "chosen per-layer policy" in text
    assert text.count("data:image/png;base64,") == 2
    # one row per measured candidate in the candidates table (plus the header row)
    assert text.split("measured candidates")[1].count("<tr>") == \
        len(result.report["candidates"]) + 1


def test_budget_not_met_writes_nothing_and_names_closest(files, tmp_path):
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    with pytest.raises(BudgetExceededError, match="closest point") as info:
        run(files, tmp_path, output=out, report_path=report, macs=10, max_candidates=2)
    assert "Nothing was written" in str(info.value)
    assert not out.exists() and not report.exists()
    assert not list(tmp_path.glob("*.png"))


def test_force_writes_the_closest_point(files, tmp_path):
    out = tmp_path / "out.onnx"
    result = run(files, tmp_path, output=out, macs=10, max_candidates=2, force=True)
    assert out.exists() and not result.met
    assert any("--force" in w or "force" in w for w in result.warnings)
    # the closest point: the fewest MACs among the measured candidates
    rows = [c for c in result.report["candidates"] if "failed" not in c]
    assert result.report["final"]["macs"] == min(c["macs"] for c in rows)


def test_resume_from_cache(files, tmp_path):
    cache = tmp_path / "cache"
    first_backend = FakeLatency()
    first = run(files, tmp_path, size_mb=0.004, cache_dir=cache, max_candidates=2,
                latency_backend=first_backend, force=True)
    measured = len(first.report["candidates"])
    assert measured >= 2 and first.report["search"]["proxies_complete"]
    second_backend = FakeLatency()
    second = run(files, tmp_path, size_mb=0.004, cache_dir=cache, max_candidates=2,
                 latency_backend=second_backend, force=True)
    search = second.report["search"]
    assert search["resumed"] == measured - 1  # every measured candidate but the input model
    assert search["proxy_seconds"] == 0.0  # proxies read back, not built again
    assert second_backend.timed < first_backend.timed
    assert len(second.report["candidates"]) > measured  # and the search went on


def test_time_budget_returns_the_best_so_far(files, tmp_path):
    out = tmp_path / "out.onnx"
    # spent before the proxies: the input model is all that was measured, and it meets
    # this size budget, so it is returned (written) rather than nothing
    result = run(files, tmp_path, output=out, size_mb=1.0, time_budget=1e-3)
    assert result.met and out.exists()
    assert "time budget" in result.report["search"]["stopped"]
    assert [c.get("origin") for c in result.report["candidates"]] == [True]
    assert all(row["choice"] in ("keep", "full", "fp32") for row in result.report["policy"])


def test_techniques_restrict_the_search_and_share_the_cache(files, tmp_path):
    cache = tmp_path / "cache"
    prune_only = run(files, tmp_path, speedup=1.3, kinds=("prune",), cache_dir=cache,
                     max_candidates=3)
    knobs = prune_only.report["space"]["knobs"]
    for c in prune_only.report["candidates"]:
        assert all(not v or k["kind"] == "prune" for k, v in zip(knobs, c["policy"]))
    shared = FakeLatency()
    joint = run(files, tmp_path, speedup=1.3, cache_dir=cache, max_candidates=1,
                latency_backend=shared)
    # the prune candidates are reused, the prune proxies are not timed again
    assert joint.report["search"]["resumed"] == len(prune_only.report["candidates"]) - 1
    prune_entries = sum(len(k["choices"]) - 1 for k in knobs if k["kind"] == "prune")
    assert prune_entries >= 2
    full = FakeLatency()
    run(files, tmp_path, speedup=1.3, max_candidates=1, latency_backend=full)
    assert shared.others == full.others - prune_entries


def test_same_seed_same_search(files, tmp_path):
    a = run(files, tmp_path, speedup=1.3, seed=3)
    b = run(files, tmp_path, speedup=1.3, seed=3)
    assert [c["policy"] for c in a.report["candidates"]] == \
        [c["policy"] for c in b.report["candidates"]]
    assert a.report["policy"] == b.report["policy"]


@pytest.mark.parametrize("budget, message", [
    ({"speedup": 2, "size_mb": 1}, "one budget, got --speedup and --size-mb"),
    ({"speedup": -1}, "--speedup -1: must be a finite number > 0"),
    ({"latency_ms": float("nan")}, "must be a finite number > 0"),
    ({}, "needs one budget"),
    ({"speedup": 2, "max_error": -0.1}, "--max-error -0.1: must be a finite number >= 0"),
])
def test_bad_budgets_rejected(files, tmp_path, budget, message):
    out = tmp_path / "out.onnx"
    with pytest.raises(InputSpecError) as info:
        run(files, tmp_path, output=out, **budget)
    assert message in str(info.value)
    assert not out.exists()


def test_accuracy_drop_needs_labels(files, tmp_path):
    with pytest.raises(InputSpecError, match="labelled verify data"):
        run(files, tmp_path, speedup=1.2, max_accuracy_drop=0.01)


def test_metric_callback_gives_the_drop(files, tmp_path):
    calls = []

    def params_kept(path: str) -> float:  # higher is better; any callable of a model file
        calls.append(path)
        return float(compute_metrics(load_model(path)).params)

    result = run(files, tmp_path, speedup=1.2, max_accuracy_drop=1e9, metric=params_kept)
    reference = result.report["original"]["metric"]
    assert calls and reference == compute_metrics(load_model(files[0])).params
    for c in result.report["candidates"]:
        if "failed" not in c:
            assert c["accuracy_drop"] == pytest.approx(reference - c["metric"])


def test_real_ort_backend_end_to_end_cli(files, tmp_path):
    model, calib, verify = files
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(app, [
        "autocompress", str(model), "--calib", str(calib), "--verify-data", str(verify),
        "--size-mb", "0.008", "--max-error", "0.3", "-o", str(out), "--report", str(report),
        "--max-candidates", "3", "--time-budget", "60", "--techniques", "prune,bits"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["backend"]["name"] == "ort" and data["met"]
    assert out.stat().st_size <= 0.008e6 < files[0].stat().st_size
    assert data["final"]["latency_ms"] > 0 and data["final"]["original_latency_ms"] > 0
    assert "chosen model" in result.output
    err = verify_models(model, out, data=str(verify), input_shapes=SHAPES, batches=16)
    assert err.max_rel_l2 <= 0.3


def test_cli_bad_budget_exit_code(files, tmp_path, monkeypatch, capsys):
    model, calib, _ = files
    out = tmp_path / "out.onnx"
    monkeypatch.setattr(sys, "argv", [
        "onnxforge", "autocompress", str(model), "--calib", str(calib), "--speedup", "2",
        "--latency-ms", "1", "-o", str(out)])
    with pytest.raises(SystemExit) as info:
        main()  # the exit codes come from main(), not from the typer app
    assert info.value.code == InputSpecError.exit_code
    assert "one budget, got --latency-ms and --speedup" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------- TVM backend


def test_real_tvm_backend_end_to_end_cli(files, tmp_path):
    """--backend tvm for real: every candidate compiled, verified against ORT and timed
    against the input model compiled the same way; the written model meets the size
    budget and its outputs match the report."""
    pytest.importorskip("tvm")
    model, calib, verify = files
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    result = CliRunner().invoke(app, [
        "autocompress", str(model), "--calib", str(calib), "--verify-data", str(verify),
        "--backend", "tvm", "--target", "host", "--size-mb", "0.012", "--max-error", "0.3",
        "-o", str(out), "--report", str(report), "--max-candidates", "2",
        "--time-budget", "120", "--techniques", "bits"])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    backend = data["backend"]
    assert backend["name"] == "tvm:host" and backend["proxy_backend"] == "ort"
    # the input model and each measured candidate compiled once (the final timing reuses)
    measured = [c for c in data["candidates"] if not c.get("origin")]
    assert backend["compiled"] == 1 + len(measured) and data["rejected"] == []
    assert all(np.isfinite(c["latency_ratio"]) and c["latency_ratio"] > 0 for c in measured)
    assert data["met"] and out.stat().st_size <= 0.012e6 < model.stat().st_size
    assert data["final"]["latency_ms"] > 0 and data["final"]["speedup"] > 0
    err = verify_models(model, out, data=str(verify), input_shapes=SHAPES, batches=16)
    assert err.max_rel_l2 <= 0.3
    assert abs(err.max_rel_l2 - data["final"]["rel_l2"]) < 1e-6


def test_tvm_candidate_failing_verification_is_dropped(files, tmp_path, monkeypatch):
    """The TVM check fails (injected) for the first candidate: it is reported as rejected
    with the reason, has no latency, and is never chosen."""
    pytest.importorskip("tvm")
    import onnxforge.backends.tvm as tvm_backend

    real = tvm_backend.verify_artifact
    calls = []

    def failing_once(artifact, model, **kw):
        result = real(artifact, model, **kw)
        calls.append(model)
        if len(calls) == 2:  # the first is the input model; fail the first candidate
            result.nondeterministic = ["y"]
        return result

    monkeypatch.setattr(tvm_backend, "verify_artifact", failing_once)
    result = run(files, tmp_path, latency_backend=None, backend="tvm", size_mb=0.012,
                 max_error=0.3, kinds=("bits",), max_candidates=3)
    report = result.report
    summary = [(c["policy"], c.get("size_bytes"), c.get("failed")) for c in report["candidates"]]
    assert result.met, summary
    assert len(report["rejected"]) == 1, summary
    rejected = report["rejected"][0]
    assert "failed verification" in rejected["why"] and "changed between two runs" \
        in rejected["why"]
    row = next(c for c in report["candidates"] if c["policy"] == rejected["policy"])
    assert "latency_ratio" not in row and not row["chosen"]
    chosen = next(c for c in report["candidates"] if c["chosen"])
    assert chosen["policy"] != rejected["policy"] and np.isfinite(chosen["latency_ratio"])


@pytest.mark.parametrize("target, message", [
    ("cortex-a72", "qemu"), ("cuda-sm87", "no cuda device")])
def test_tvm_targets_that_cannot_be_timed_here_are_refused(files, tmp_path, target, message):
    pytest.importorskip("tvm")
    with pytest.raises(InputSpecError, match=message):
        run(files, tmp_path, latency_backend=None, backend="tvm", target=target,
            speedup=1.5)


def test_target_needs_the_tvm_backend(files, tmp_path):
    with pytest.raises(InputSpecError, match="--backend tvm"):
        run(files, tmp_path, latency_backend=None, target="cortex-a72", speedup=1.5)


def test_proxies_cut_by_the_time_budget_keep_what_was_built(files):
    """Models built before the time budget ran out are timed and kept in the tables (a
    prune build of PP-OCRv4 rec costs ~50 s here: a dropped chunk lost minutes)."""
    from onnxforge.autocompress.proxies import OutOfTime, ProxyTables, measure_tables
    from onnxforge.autocompress.space import discover
    from onnxforge.passes.base import PassContext

    model = load_model(files[0])
    space = discover(model, PassContext(input_shapes=SHAPES))
    tables = ProxyTables({"latency_ms": 1.0, "size_bytes": 1.0, "macs": 1.0})
    steps, timed = [], []

    def on_step(text):
        if len(steps) == 3:
            raise OutOfTime
        steps.append(text)

    def time_ratios(models):
        timed.extend(models)
        return [0.5] * len(models)

    complete = measure_tables(space, tables, lambda policy: model, lambda m: 0.1,
                              lambda m: {"size_bytes": 1.0, "macs": 1.0}, time_ratios,
                              on_step, chunk=6)
    rows = [row for entries in tables.single.values() for row in entries.values()]
    assert not complete and len(timed) == 3
    assert len(rows) == 3 and all(row["latency_ratio"] == 0.5 for row in rows)


# ------------------------------------------------------------- affordable proxy tables


def dead_channel_cnn() -> onnx.ModelProto:
    """small_cnn whose conv1 filters 0-7 (and conv2's columns reading them) are zero: half
    of conv1's channels carry nothing, so removing them changes no output."""
    model = small_cnn()
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init).copy()
        if init.name in ("w1", "b1"):
            arr[:8] = 0
        elif init.name == "w2":
            arr[:, :8] = 0
        else:
            continue
        init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return model


def test_prune_proxies_come_from_the_probe_and_candidates_are_recovered(tmp_path, monkeypatch):
    """The prune table entries are built without recovery and take their error from
    prune's sensitivity curves (removing conv1's 8 dead channels: no error; 12 of them: some);
    the candidates the search measures are built with recovery, their error that of an
    independent recovered build."""
    import onnxforge.passes.pruning.prune as prune_module
    from onnxforge.autocompress.build import build
    from onnxforge.autocompress.space import Space
    from onnxforge.calibration import open_calibration
    from onnxforge.passes.base import PassContext
    from onnxforge.verify import compare_models

    path = tmp_path / "dead.onnx"
    onnx.save(dead_channel_cnn(), path)
    rng = np.random.default_rng(1)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((24, 3, 8, 8)).astype(np.float32))
    recovered = []
    real_recover = prune_module.recover
    monkeypatch.setattr(prune_module, "recover",
                        lambda *a, **kw: recovered.append(1) or real_recover(*a, **kw))
    result = autocompress(path, calib, speedup=1.3, input_shapes=SHAPES, kinds=("prune",),
                          max_candidates=3, latency_backend=FakeLatency(), time_budget=120)
    report = result.report
    knobs = report["space"]["knobs"]
    single = report["proxies"]["single"]
    conv1 = next(f"prune:{k['key']}" for k in knobs if k["kind"] == "prune"
                 and k["key"] in ("w1", "b1", "conv1"))
    rows = single[conv1]
    assert all(r["error_source"] == "sensitivity probe" for r in rows.values())
    assert rows["2"]["error"] < 1e-6 < rows["3"]["error"]  # 50 %: the dead half; 75 %: more
    measured = [c for c in report["candidates"] if not c.get("origin") and "failed" not in c]
    # one recovery per measured candidate and one for the chosen model built again;
    # none for the 9 table entries
    assert measured and len(recovered) == len(measured) + 1
    model = load_model(path)
    source = open_calibration(str(calib), model, SHAPES, seed=0)
    space = Space([prune_module_knob(k) for k in knobs])
    context = PassContext(calibration=source, input_shapes=SHAPES, threads=1, seed=0)
    for c in measured:
        again = build(model, space, tuple(c["policy"]), context)[0]
        err = compare_models(model, again, source, limit=64, threads=1).max_rel_l2
        assert c["calib_error"] == pytest.approx(err, rel=1e-6, abs=1e-9)


def prune_module_knob(row):
    from onnxforge.autocompress.space import Knob

    return Knob(row["kind"], row["key"], tuple(row["choices"]), row["units"])


def test_int8_leave_one_out_only_for_the_large_layers(files):
    """small_cnn's conv2 and conv1 hold > 90 % of the int8 layers' MACs: they get their
    own leave-one-out, fc1 and fc2 one together, shared by MACs; int8 entries are not
    timed on their own."""
    from onnxforge.autocompress.build import build
    from onnxforge.autocompress.proxies import ProxyTables, measure_tables, predict
    from onnxforge.autocompress.space import discover
    from onnxforge.calibration import open_calibration
    from onnxforge.passes.base import PassContext

    model = load_model(files[0])
    context = PassContext(calibration=open_calibration(str(files[1]), model, SHAPES, seed=0),
                          input_shapes=SHAPES)
    space = discover(model, context, kinds=("bits",))
    macs = compute_metrics(model, SHAPES).node_macs
    tables = ProxyTables({"latency_ms": 1.0, "size_bytes": 1e4, "macs": 1.0})
    timed = []
    ratios = {"all": 0.5, "conv1": 0.6, "conv2": 0.9, "rest": 0.58}

    def time_ratios(models):
        out = []
        for m in models:
            float_layers = {n.name for n in m.graph if n.op_type in ("Conv", "Gemm")
                            and n.inputs[1].producer() is None}
            timed.append(sorted(float_layers))
            out.append(ratios["all"] if not float_layers else ratios["rest"]
                       if float_layers == {"fc1", "fc2"} else ratios[min(float_layers)])
        return out

    complete = measure_tables(
        space, tables, lambda policy: build(model, space, policy, context)[0],
        lambda m: 0.01, lambda m: {"size_bytes": 5e3, "macs": 1.0}, time_ratios,
        layer_macs=macs)
    assert complete
    assert sorted(timed) == [[], ["conv1"], ["conv2"], ["fc1", "fc2"]]
    assert sorted(tables.int8_loo) == ["bits:conv1", "bits:conv2"]
    assert sorted(tables.int8_rest) == ["bits:fc1", "bits:fc2"]
    assert tables.int8_rest_loo == 0.58
    assert all("latency_ratio" not in r["1"] for r in tables.single.values())
    weights = tables.int8_weights(space)
    by_name = {space.knobs[i].key: w for i, w in weights.items()}
    assert by_name["conv2"] == pytest.approx(0.4) and by_name["conv1"] == pytest.approx(0.1)
    assert by_name["fc1"] + by_name["fc2"] == pytest.approx(0.08)
    assert by_name["fc1"] / by_name["fc2"] == pytest.approx(macs["fc1"] / macs["fc2"])
    # every int8 knob stays usable, and the all-int8 policy predicts the measured ratio
    assert all(allowed == [0, 1] for allowed in tables.useful_choices(space))
    assert predict(tables, space, tuple(1 for _ in space.knobs)).latency_ratio == \
        pytest.approx(0.5)


def test_calib_errors_equal_compare_models(files):
    from onnxforge.autocompress.measure import CalibErrors
    from onnxforge.calibration import open_calibration
    from onnxforge.verify import compare_models

    model = load_model(files[0])
    other = load_model(onnx.load(files[0]))
    for init in other.graph.initializers.values():
        if init.name == "w2":
            init.const_value = ir.tensor(init.const_value.numpy() * 1.1)
    source = open_calibration(str(files[1]), model, SHAPES, seed=0)
    errors = CalibErrors(model, source, limit=8, threads=1)
    expected = compare_models(model, other, source, limit=8, threads=1).max_rel_l2
    assert expected > 0.01
    assert errors(other) == pytest.approx(expected, rel=1e-9)
    assert errors(model) == 0.0


def test_tvm_backend_on_a_board_through_a_loopback_rpc_tracker(files, tmp_path, monkeypatch):
    """--rpc-tracker/--rpc-key: a tracker and a server (the 'board') on this machine; every
    candidate is compiled here, run on the server, checked against onnxruntime and timed
    there; a key no board has is refused by name."""
    pytest.importorskip("tvm")
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado")
    import socket
    import time
    from dataclasses import dataclass

    import onnxforge.autocompress.run as run_module
    from onnxforge.autocompress.remote import RpcTvmLatency
    from onnxforge.errors import BackendError
    from test_tvm_tuning import _free_port, _start, _stop

    @dataclass
    class QuickRpc(RpcTvmLatency):  # fewer timing rounds: the test checks the path, not speed
        rounds: int = 3
        seconds: float = 0.02

    monkeypatch.setattr(run_module, "RpcTvmLatency", QuickRpc)

    port, server_port = _free_port(), _free_port()
    procs = [_start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                     "--port-end", str(port + 1)])]
    for _ in range(100):  # a server started before the tracker listens retries after 5 s
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.1)
    procs.append(_start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port",
                         str(server_port), "--port-end", str(server_port + 1), "--tracker",
                         f"127.0.0.1:{port}", "--key", "loopback"]))
    try:
        out = tmp_path / "out.onnx"
        result = run(files, tmp_path, output=out, latency_backend=None, backend="tvm",
                     rpc_tracker=f"127.0.0.1:{port}", rpc_key="loopback", size_mb=0.012,
                     max_error=0.3, kinds=("bits",), max_candidates=1)
        backend = result.report["backend"]
        assert backend["name"] == "tvm:host@rpc:loopback" and "RPC tracker" in backend["note"]
        measured = [c for c in result.report["candidates"] if not c.get("origin")]
        assert measured and backend["compiled"] == 1 + len(measured)
        assert all(np.isfinite(c["latency_ratio"]) and c["latency_ratio"] > 0
                   for c in measured)
        assert result.met and out.stat().st_size <= 0.012e6
        assert result.report["final"]["latency_ms"] > 0
        with pytest.raises(BackendError, match="no device with key 'nope'"):
            RpcTvmLatency("host", f"127.0.0.1:{port}", "nope", wait=2)
    finally:
        for proc in procs:
            _stop(proc)


def test_rpc_options_go_together_with_the_tvm_backend(files, tmp_path):
    for options in ({"rpc_tracker": "127.0.0.1:9190"},
                    {"rpc_tracker": "127.0.0.1:9190", "rpc_key": "board", "backend": "ort"}):
        with pytest.raises(InputSpecError, match="go together"):
            run(files, tmp_path, latency_backend=None, speedup=1.5, **options)


def test_int8_knobs_of_matmuls_with_a_bias_add(tmp_path):
    """MatMul + bias Add: quantize merges it into a Gemm `<matmul>_gemm` before it reads
    keep_float (found on MiniLM, where every int8 entry but all-int8 failed to build).
    Each int8 knob builds and puts exactly its own layer in int8."""
    from onnxforge.autocompress.build import build
    from onnxforge.autocompress.space import discover
    from onnxforge.calibration import open_calibration
    from onnxforge.passes.base import PassContext

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.3, n)
             for n, s in (("w1", (8, 16)), ("b1", (16,)), ("w2", (16, 4)), ("b2", (4,)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
             helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
             helper.make_node("Relu", ["a1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "b2"], ["y"], name="add2")]
    path = tmp_path / "mlp.onnx"
    onnx.save(make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
                         inits), path)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=rng.standard_normal((32, 8)).astype(np.float32))
    model = load_model(path)
    shapes = {"x": (4, 8)}
    context = PassContext(calibration=open_calibration(str(calib), model, shapes, seed=0),
                          input_shapes=shapes)
    space = discover(model, context, kinds=("bits",))
    assert [k.key for k in space.knobs] == ["mm1", "mm2"]
    for i, key in enumerate(["mm1", "mm2"]):
        built = build(model, space, space.single(i, 1), context)[0]
        int8 = {n.name for n in built.graph if n.op_type in ("Gemm", "MatMul")
                and n.inputs[1].producer() is not None
                and n.inputs[1].producer().op_type == "DequantizeLinear"}
        assert int8 == {f"{key}_gemm"}
    result = autocompress(path, calib, size_mb=1.0, input_shapes=shapes, kinds=("bits",),
                          max_candidates=2, latency_backend=FakeLatency(), time_budget=60)
    assert not result.report["proxies"]["failed"]


def _weakly_dominated(point, front) -> bool:
    return any(f[0] <= point[0] + 1e-12 and f[1] <= point[1] + 1e-12 for _, f in front)


def test_joint_front_dominates_each_technique_searched_alone():
    """Three techniques of 33 knobs each with additive (resource, error) trade-offs: the
    unseeded joint NSGA-II misses much of each single-technique front (measured on this
    objective and on PP-OCRv4 rec's proxy tables); seeded with those fronts it dominates
    them all and still finds combinations beyond them."""
    from onnxforge.autocompress.search import evolve, evolve_joint

    rng = np.random.default_rng(0)
    n = 99
    saving = rng.uniform(0, 0.02, (n, 3))
    error = rng.uniform(0, 0.05, (n, 3))
    saving[:, 0] = error[:, 0] = 0.0
    saving[33:66] *= 0.3
    error[66:] *= 0.1

    def objectives(policy):
        return (max(1 - sum(saving[i, c] for i, c in enumerate(policy)), 0.05),
                sum(error[i, c] for i, c in enumerate(policy)))

    choices = [[0, 1, 2]] * n
    groups = {"a": list(range(33)), "b": list(range(33, 66)), "c": list(range(66, 99))}
    origin = (0,) * n
    joint = evolve_joint(choices, groups, objectives, seed=3, start=[origin])
    alone_union = []
    for knobs in groups.values():
        alone = evolve([c if i in knobs else [0] for i, c in enumerate(choices)], objectives,
                       seed=3, start=[origin])
        assert all(_weakly_dominated(o, joint) for _, o in alone)
        alone_union += alone
    beyond = [o for _, o in joint if not _weakly_dominated(o, alone_union)]
    assert beyond, "the joint front is only the union of the single-technique fronts"
    # the policies that go beyond mix techniques
    mixed = [p for p, o in joint if not _weakly_dominated(o, alone_union)
             and sum(any(p[i] for i in knobs) for knobs in groups.values()) > 1]
    assert mixed


def test_picks_when_the_budget_is_out_of_reach_cover_the_front_below_the_limit():
    from onnxforge.autocompress.search import choose_picks

    # (policy, (latency ratio, error)); budget limit 0.1 (a 10x speedup): out of reach
    front = [((i,), (r, e)) for i, (r, e) in enumerate(
        [(0.2, 0.9), (0.3, 0.5), (0.35, 0.4), (0.5, 0.2), (0.6, 0.15), (0.8, 0.05)])]
    picks = choose_picks(front, limit=0.1, error_limit=0.45)
    errors = {p: dict(front)[p][1] for p in picks}
    assert picks[0] == (2,)  # the least latency within the quality limit
    assert all(e <= 0.45 for e in errors.values())  # nothing past the quality limit
    assert any(e <= 0.4 / 2 for e in errors.values())  # a safer point below the limit
    assert (0,) not in picks  # not the most aggressive point past the quality limit


def test_picks_when_the_budget_is_in_reach_learn_the_boundary():
    from onnxforge.autocompress.search import choose_picks

    front = [((i,), (r, e)) for i, (r, e) in enumerate(
        [(0.2, 0.9), (0.3, 0.5), (0.35, 0.4), (0.5, 0.2), (0.6, 0.15), (0.8, 0.05)])]
    picks = choose_picks(front, limit=0.55, error_limit=0.45)
    # within the budget least error; within the quality limit least latency; the point
    # within the quality limit just past the budget
    assert picks == [(3,), (2,), (4,)]


def test_latency_of_prune_entries_modelled_from_macs_until_candidates_trust_their_timing():
    """A prune entry that removes no MACs but was timed 40 % faster (noise under load)
    must not make the search believe in free speed; once candidates measured whole show
    that the entries' own timings were right, they are trusted."""
    from onnxforge.autocompress.proxies import Correction, ProxyTables, latency_slopes
    from onnxforge.autocompress.space import Knob, Space

    space = Space([Knob("prune", f"g{i}", (0.0, 0.5), 8) for i in range(4)])
    base = {"latency_ms": 10.0, "size_bytes": 1000.0, "macs": 1000.0}
    tables = ProxyTables(dict(base))
    # g0..g2: latency follows MACs (half a MAC's share saved); g3: no MACs, timed 0.6x
    for i, (macs, lat) in enumerate([(800, 0.9), (900, 0.95), (600, 0.8), (1000, 0.6)]):
        tables.single[f"prune:g{i}"] = {"1": {"error": 0.01, "size_bytes": 900.0,
                                              "macs": float(macs), "latency_ratio": lat}}
    slopes = latency_slopes(tables, space)
    assert slopes["prune"] == pytest.approx(0.5, abs=0.06)
    noisy = (0, 0, 0, 1)
    start = Correction.fit(tables, space, [], base["size_bytes"])
    assert start.trust == 0.0
    assert start.predict(tables, space, noisy).latency_ratio == pytest.approx(1.0)

    def record(policy, ratio):
        return {"policy": list(policy), "latency_ratio": ratio, "size_bytes": 900.0,
                "calib_error": 0.01}

    # candidates measured whole where g3 really is 0.6x: its timing gets trusted
    real = [record((1, 0, 0, 1), 0.5), record((0, 1, 0, 1), 0.55), record((0, 0, 0, 1), 0.6),
            record((1, 1, 0, 0), 0.85)]
    fitted = Correction.fit(tables, space, real, base["size_bytes"])
    assert fitted.trust == 1.0
    assert fitted.predict(tables, space, noisy).latency_ratio == pytest.approx(0.6, abs=0.05)
    # ... and where it was noise (no change), the MACs model stays
    noise = [record((1, 0, 0, 1), 0.9), record((0, 1, 0, 1), 0.95), record((0, 0, 0, 1), 1.0),
             record((1, 1, 0, 0), 0.85)]
    assert Correction.fit(tables, space, noise, base["size_bytes"]).trust == 0.0


def test_first_round_measures_what_each_technique_alone_measures_first(files, tmp_path):
    """The joint search's first round includes each single-technique search's first
    candidate (same seed, same proxies), so no technique alone gets ahead in round 1."""
    firsts = []
    for kind in ("prune", "rank", "bits"):
        alone = run(files, tmp_path, speedup=3.0, max_error=0.5, kinds=(kind,),
                    max_candidates=1, force=True)
        measured = [c["policy"] for c in alone.report["candidates"] if any(c["policy"])]
        firsts += measured[:1]
    assert len(firsts) == 3
    joint = run(files, tmp_path, speedup=3.0, max_error=0.5, max_candidates=6, force=True)
    rounds = joint.report["search"]["rounds"]
    joint_policies = [c["policy"] for c in joint.report["candidates"]]
    assert all(first in joint_policies for first in firsts), (firsts, rounds)
