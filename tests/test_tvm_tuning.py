"""MetaSchedule tuning: budget, persistent per-target database, reuse, crash safety, RPC.

Tiny one-task models and a handful of trials keep each tuning run around a minute on a
2-core machine (most of it is process start-up: TVM imports in the worker and its pools).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")
pytest.importorskip("xgboost")

from builders import make_model
from onnxforge.backends.targets import resolve_target, target_key
from onnxforge.backends.tvm import (
    compare_to_ort,
    compile_model,
    open_database,
    random_inputs,
    resolve_tuning_db,
)
from onnxforge.backends.tvm.database import RECORD_FILE, WORKLOAD_FILE, count_records
from onnxforge.backends.tvm.tuning import tune
from onnxforge.errors import BackendError, InputSpecError

pytestmark = [pytest.mark.tvm, pytest.mark.slow]


def dense_model(n: int = 64, seed: int = 0) -> onnx.ModelProto:
    """y = relu(x @ W + b): one fused task (matmul + add + relu)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.standard_normal((n, n)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["a"], name="add"),
             helper.make_node("Relu", ["a"], ["y"], name="relu")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, n])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, n])], inits)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tune") / "dense.onnx"
    onnx.save(dense_model(), path)
    return path


def write_schedule_configs(model_path: Path, work: Path) -> dict:
    """A schedule-config database in `work` giving each kernel with knobs its last listed
    (non-heuristic) setting, as `search_configs` would have written it; {key: entry}."""
    from onnxforge.backends.tvm import prepare_module
    from onnxforge.backends.tvm.database import save_configs
    from onnxforge.kernels.cpu_rules import default_rules
    from onnxforge.kernels.schedule_configs import target_class, workload_key
    from onnxforge.kernels.schedule_pass import attach_layout_free_buffers, matching_rule

    target = resolve_target("host")
    prepared = prepare_module(model_path, target)
    mod = attach_layout_free_buffers(
        tvm.IRModule(dict(prepared.mod.functions_items()), attrs=prepared.mod.attrs))
    entries = {}
    for gvar, func in mod.functions_items():
        if isinstance(func, tvm.tirx.PrimFunc):
            with target:
                rule, _ = matching_rule(func, target, default_rules())
            configs = rule.configs(func, target) if rule is not None else []
            if len(configs) >= 2:
                entries[workload_key(func)] = {"rule": rule.name, "config": configs[-1],
                                               "us": 1.0, "default_us": 2.0,
                                               "task": gvar.name_hint, "model": "dense"}
    assert entries, "the dense model's matmul has no knob settings"
    db_dir = resolve_tuning_db(work, target)
    db_dir.mkdir(parents=True, exist_ok=True)
    save_configs(db_dir, entries, target_class(target))
    return entries


@pytest.fixture(scope="module")
def tuned(model_path, tmp_path_factory):
    """One real tuning run shared by the tests that only read its database; the database
    holds schedule configs first (`tune --method both` order), so the tuner's
    default-schedule baseline must be timed with them."""
    work = tmp_path_factory.mktemp("db")
    write_schedule_configs(model_path, work)
    start = time.monotonic()
    report = tune(model_path, "host", work, max_trials=6, progress=False)
    return work, report, time.monotonic() - start


def test_tuning_measures_and_persists_per_target(tuned):
    work, report, _ = tuned
    assert report.stopped_by in ("trials", "all tasks done"), report.errors
    assert report.trials >= 6
    db_dir = Path(report.db_dir)
    assert db_dir == work.resolve() / target_key(resolve_target("host"))
    assert count_records(db_dir) == report.records_after >= 6
    task = next(t for t in report.tasks if t.status.startswith("tuned"))
    assert "matmul" in task.name and task.best_us is not None and task.best_us > 0
    assert task.share > 0.5
    open_database(db_dir)  # loads
    assert not list(db_dir.glob(".staging-*"))  # staging cleaned up
    assert (db_dir / "logs").is_dir()


def test_baseline_is_timed_with_the_schedule_configs(tuned):
    """The default schedule the tuner times is the one compile builds: with the database's
    measured knob settings; the tuner leaves the config file itself alone."""
    from onnxforge.backends.tvm.database import read_baselines
    from onnxforge.kernels.schedule_configs import CONFIG_FILE, load_configs

    _, report, _ = tuned
    db_dir = Path(report.db_dir)
    (entry,) = load_configs(db_dir).values()
    baselines = read_baselines(db_dir)
    if not baselines:
        pytest.skip("onnxforge.kernels default schedules unavailable")
    assert [b["config"] for b in baselines.values()] == [entry["config"]]
    assert json.loads((db_dir / CONFIG_FILE).read_text())["entries"]  # still there, whole


def _from_db(report: dict) -> int:
    """Functions the database decided: applied, or the default kept as measured faster."""
    return report["scheduled_by_database"] + len(report.get("default_kept_over_database", []))


def test_compile_applies_the_database_and_matches_ort(tuned, model_path):
    work, report, _ = tuned
    art = compile_model(model_path, "host", tuning_db=work)
    assert _from_db(art.report) >= 1
    task = next(t for t in report.tasks if t.status.startswith("tuned"))
    if art.report["default_rules"] == "onnxforge.kernels":
        # the tuner timed the default schedule too; compile kept whichever was faster
        assert task.default_us is not None and task.default_us > 0
        kept = bool(art.report["default_kept_over_database"])
        assert kept == (task.default_us <= task.best_us) or abs(
            task.default_us - task.best_us) < 0.1 * task.best_us  # mean vs median noise
    assert art.report["tuning_db"] == str(resolve_tuning_db(work, resolve_target("host")))
    for err in compare_to_ort(art, model_path, random_inputs(art.inputs, seed=1)):
        assert err.within(1e-4), err


def test_second_tune_reuses_the_database_without_tuning(tuned, model_path):
    work, first, _ = tuned
    db_dir = Path(first.db_dir)
    before = (db_dir / RECORD_FILE).read_bytes()
    start = time.monotonic()
    again = tune(model_path, "host", work, max_trials=6, progress=False)
    assert again.reused and again.trials == 0 and "covers every task" in again.stopped_by
    assert time.monotonic() - start < 60  # no worker, no search
    assert (db_dir / RECORD_FILE).read_bytes() == before


def test_other_targets_get_their_own_folder(tuned):
    work, _, _ = tuned
    host_dir = resolve_tuning_db(work, resolve_target("host"))
    avx2_dir = resolve_tuning_db(work, resolve_target("x86-avx2"))
    a72_dir = resolve_tuning_db(work, resolve_target("cortex-a72"))
    assert len({host_dir, avx2_dir, a72_dir}) == 3
    # an explicit database folder is used as-is (e.g. an x86 DB applied to ARM on purpose)
    assert resolve_tuning_db(host_dir, resolve_target("cortex-a72")) == host_dir


def test_default_schedule_baseline_decides_per_function(tuned, model_path, tmp_path):
    """A tuning record is applied only when it beats the default schedule's measured time."""
    import shutil

    from onnxforge.backends.tvm.database import BASELINE_FILE

    _, report, _ = tuned
    db_dir = Path(report.db_dir)
    for fast_default, expect_db in ((0.0, 0), (1e12, 1)):
        copy = tmp_path / f"db{expect_db}"
        shutil.copytree(db_dir, copy, ignore=shutil.ignore_patterns("logs", ".lock"))
        hashes = [json.loads(line)[0] for line in (copy / WORKLOAD_FILE).read_text().splitlines()]
        (copy / BASELINE_FILE).write_text(json.dumps(
            {h: {"us": fast_default, "task": "t"} for h in hashes}))
        art = compile_model(model_path, "host", tuning_db=copy)
        if art.report["default_rules"] is None:
            pytest.skip("onnxforge.kernels default schedules unavailable")
        assert art.report["scheduled_by_database"] == expect_db * len(
            [t for t in report.tasks if t.status.startswith("tuned")])
        assert bool(art.report["default_kept_over_database"]) == (expect_db == 0)
        for err in compare_to_ort(art, model_path, random_inputs(art.inputs)):
            assert err.within(1e-4)


def test_compile_with_an_empty_database_notes_it(model_path, tmp_path):
    art = compile_model(model_path, "host", tuning_db=tmp_path / "empty")
    assert art.report["scheduled_by_database"] == 0
    assert any("empty or missing" in note for note in art.report["notes"])


def test_time_budget_stops_tuning_and_keeps_what_was_measured(model_path, tmp_path):
    model = tmp_path / "dense2.onnx"
    onnx.save(dense_model(48, seed=2), model)
    budget = 75.0
    start = time.monotonic()
    report = tune(model, "host", tmp_path / "db", max_trials=100_000, max_seconds=budget,
                  progress=False)
    elapsed = time.monotonic() - start
    assert report.stopped_by.startswith("seconds"), (report.stopped_by, report.errors)
    assert elapsed < budget + max(15.0, 0.1 * budget) + 15
    assert 0 < report.trials < 100_000
    assert report.records_after == count_records(Path(report.db_dir)) > 0


def test_worker_crash_keeps_the_database_valid(model_path, tmp_path, monkeypatch):
    model = tmp_path / "dense3.onnx"
    onnx.save(dense_model(32, seed=3), model)
    monkeypatch.setenv("ONNXFORGE_TUNE_FAULT", "crash-after:1")
    report = tune(model, "host", tmp_path / "db", max_trials=20, progress=False)
    assert report.stopped_by.startswith("crash"), report.stopped_by
    db_dir = Path(report.db_dir)
    records = (db_dir / RECORD_FILE).read_text().splitlines()
    assert records and all(json.loads(line) for line in records)  # torn line dropped
    assert len((db_dir / WORKLOAD_FILE).read_text().splitlines()) >= 1
    open_database(db_dir)
    art = compile_model(model, "host", tuning_db=tmp_path / "db")
    assert _from_db(art.report) >= 1
    for err in compare_to_ort(art, model, random_inputs(art.inputs)):
        assert err.within(1e-4)


def test_cannot_tune_foreign_targets_without_rpc(model_path, tmp_path):
    with pytest.raises(BackendError, match="over RPC"):
        tune(model_path, "cortex-a72", tmp_path, max_trials=4, progress=False)
    with pytest.raises(InputSpecError, match="go together"):
        tune(model_path, "host", tmp_path, max_trials=4, rpc_tracker="127.0.0.1:9190",
             progress=False)


def test_api_tune_runs_the_tune_recipe(model_path, tmp_path):
    """api.tune, the `tune` command's recipe for Python callers: the default cleanup, the
    schedule configs, then MetaSchedule (2 trials), each step reported as it ends; compile
    applies what was measured."""
    from onnxforge import api

    steps = []
    result = api.tune(model_path, "host", tmp_path / "db", trials=2,
                      on_step=lambda step, value: steps.append(step))
    assert steps == ["pipeline", "configs", "metaschedule"] and not result.notes
    assert result.pipeline == "cleanup"
    db_dir = Path(result.metaschedule.db_dir)
    assert Path(result.configs.db_dir) == db_dir == resolve_tuning_db(
        (tmp_path / "db").resolve(), resolve_target("host"))
    assert result.metaschedule.trials >= 2, result.metaschedule.errors
    assert result.metaschedule.records_after == count_records(db_dir) >= 1
    built = api.compile(model_path, "host", tuning_db=tmp_path / "db")
    assert built.verification.ok and _from_db(built.report) >= 1


def test_api_tune_errors_name_options_the_cli_its_flags(model_path, tmp_path):
    from onnxforge import api
    from onnxforge.cli_flags import cli_text

    with pytest.raises(InputSpecError) as info:
        api.tune(model_path, "host", tmp_path, method="configs", rpc_tracker="127.0.0.1:9",
                 rpc_key="board")
    assert str(info.value).startswith("method='configs': ") and "method='metaschedule'" in str(
        info.value)
    assert cli_text(info.value).startswith("--method configs: ")
    assert "not on an --rpc-tracker device" in cli_text(info.value)
    with pytest.raises(InputSpecError, match="unknown tuning method"):
        api.tune(model_path, "host", tmp_path, method="autotvm")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start(args) -> subprocess.Popen:
    # own process group: TVM's tracker/server start helper processes that must go too
    return subprocess.Popen([sys.executable, "-m", *args], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def test_rpc_tuning_through_a_loopback_tracker(model_path, tmp_path):
    pytest.importorskip("tornado", reason="TVM's RPC tracker needs tornado (pip install tornado)")
    port, server_port = _free_port(), _free_port()
    tracker = _start(["tvm.exec.rpc_tracker", "--host", "127.0.0.1", "--port", str(port),
                      "--port-end", str(port + 1)])
    server = _start(["tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(server_port),
                     "--port-end", str(server_port + 1), "--tracker", f"127.0.0.1:{port}",
                     "--key", "loopback"])
    try:
        report = tune(model_path, "host", tmp_path / "db", max_trials=4, max_seconds=400,
                      rpc_tracker=f"127.0.0.1:{port}", rpc_key="loopback", progress=False)
        assert report.rpc == f"loopback@127.0.0.1:{port}"
        tuned = [t for t in report.tasks if t.status.startswith("tuned")]
        assert tuned and tuned[0].best_us > 0, (report.stopped_by, report.errors)
        assert report.records_after >= 1
        art = compile_model(model_path, "host", tuning_db=tmp_path / "db")
        assert _from_db(art.report) >= 1
        for err in compare_to_ort(art, model_path, random_inputs(art.inputs)):
            assert err.within(1e-4)
        with pytest.raises(BackendError, match="no device with key 'nope'"):
            from onnxforge.backends.tvm.metaschedule import check_rpc_device

            check_rpc_device(f"127.0.0.1:{port}", "nope", wait=2)
    finally:
        _stop(server)
        _stop(tracker)


def test_cli_tune_then_compile_reuses_the_database(tuned, model_path, tmp_path):
    work, _, _ = tuned
    page = tmp_path / "tune.html"
    tune_cli = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "tune", str(model_path), "--target", "host",
         "--tuning-db", str(work), "--trials", "6", "--report", str(page)],
        check=False, capture_output=True, text=True, timeout=300)
    assert tune_cli.returncode == 0, tune_cli.stderr
    # a reused database: the page has the task table and says nothing was measured
    text = page.read_text(encoding="utf-8")
    assert "onnxforge tune report" in text and "no task measured in this run" in text
    out = " ".join(tune_cli.stdout.split())
    # --method both (the default): schedule configs first (known: nothing measured), then
    # MetaSchedule (covered: nothing tuned)
    assert "0 kernel(s) measured" in out and "1 already in the database" in out
    assert "reused, nothing tuned" in out
    out = tmp_path / "dense.so"
    compiled = subprocess.run(
        [sys.executable, "-m", "onnxforge.cli", "compile", str(model_path), "--target", "host",
         "-o", str(out), "--tuning-db", str(work), "--tune-trials", "6", "--verify"],
        check=False, capture_output=True, text=True, timeout=300)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert "from the tuning database" in compiled.stdout and out.is_file()
    # the matmul got the measured setting unless its tuning record beat that schedule
    note = re.search(r"with a measured knob setting \(from ([^)]*)\)",
                     " ".join(compiled.stdout.split()))
    assert note and str(work) in note[1], compiled.stdout
    assert "yes" in compiled.stdout  # --verify passed
    assert "0 trials" in compiled.stdout and "nothing to tune" in compiled.stdout


def test_tune_report_has_each_task_best_so_far(tuned):
    """The tuner's rounds are kept per task (trials, best µs): trials grow, the best only
    improves and ends at the task's best; the tune page plots them."""
    from onnxforge.api import TuneResult
    from onnxforge.html_report import render_html

    _, report, _ = tuned
    measured = [t for t in report.tasks if t.history]
    assert measured, [t.status for t in report.tasks]
    for task in measured:
        trials = [h[0] for h in task.history]
        best = [h[1] for h in task.history]
        assert trials == sorted(trials) and trials[-1] <= task.trials
        assert all(b <= a for a, b in itertools.pairwise(best))
        assert best[-1] == task.best_us
    page = render_html(TuneResult(metaschedule=report).to_dict())
    assert all(t.name in page for t in report.tasks)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert 'alt="best-so-far per task"' in page


def test_tuning_builds_kernels_with_a_table_lookup(tmp_path):
    """A quantized SiLU becomes a table lookup (backends/tvm/lookup_tables), a TIR op of
    onnxforge's own: the builder pool's processes must register it before they unpickle
    a candidate (without that, every build of the task failed)."""
    from test_lookup_tables import qdq_activation

    path = tmp_path / "silu.onnx"
    onnx.save(qdq_activation("silu", channels=32, size=16), path)
    report = tune(path, "host", tmp_path / "db", max_trials=4, progress=False)
    task = next(t for t in report.tasks if "byte_lookup" in t.name)
    assert task.status.startswith("tuned"), task.status
    assert task.best_us is not None and task.best_us > 0
