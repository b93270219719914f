"""Schedule configs: the default rules' knob settings, their search, database and CLI.

Tiny hand-built conv models keep each test to a few seconds: a regular conv (register
tile knob, output width 12 has several divisors) and a depthwise conv (row width knob).
Configs written by the tests themselves (``save_configs``) make the compile-time checks
deterministic; the search tests assert what was measured and stored, never which setting
won (that depends on the machine's load).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from builders import make_model
from onnx import TensorProto, helper, numpy_helper

tvm = pytest.importorskip("tvm")

from onnxforge.backends.targets import resolve_target, target_key
from onnxforge.backends.tvm import (
    compare_to_ort,
    compile_model,
    prepare_module,
    random_inputs,
    resolve_tuning_db,
)
from onnxforge.backends.tvm.config_tuning import search_configs
from onnxforge.backends.tvm.database import save_configs
from onnxforge.kernels import schedule_configs
from onnxforge.kernels.cpu_contraction import TileChoice, choose_tile, tile_config, tile_options
from onnxforge.kernels.cpu_target import cpu_info
from onnxforge.kernels.rule_conv2d import Conv2dRule
from onnxforge.kernels.rule_window import WindowRule, _row_width
from onnxforge.kernels.schedule_configs import (
    CONFIG_ATTR,
    CONFIG_FILE,
    load_configs,
    target_class,
    workload_key,
)
from onnxforge.kernels.schedule_pass import apply_rule, attach_layout_free_buffers
from tvm import s_tir, tirx

pytestmark = pytest.mark.tvm

HOST = resolve_target("host")
A72 = resolve_target("cortex-a72")
CONV_RULE = "conv2d-nchw-tiled"


def conv_model(channels: int = 4, filters: int = 16, size: int = 12, group: int = 1,
               seed: int = 0) -> onnx.ModelProto:
    """x[1, C, size, size] -> Conv(3x3, pad 1, group) + bias -> Relu: one fused kernel."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((filters, channels // group, 3, 3)).astype(np.float32)
    b = rng.standard_normal(filters).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=[3, 3],
                              pads=[1, 1, 1, 1], group=group),
             helper.make_node("Relu", ["c"], ["y"])]
    return make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, channels, size, size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, filters, size, size])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])


def depthwise_model() -> onnx.ModelProto:
    return conv_model(channels=8, filters=8, group=8, seed=1)


@pytest.fixture(scope="module")
def conv_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("models") / "conv.onnx"
    onnx.save(conv_model(), path)
    return path


@pytest.fixture(autouse=True)
def no_shipped_db(tmp_path, monkeypatch):
    """An empty shipped-database root, so a database shipped with onnxforge never
    changes what these tests compile (the shipped-DB test fills its own)."""
    root = tmp_path / "shipped_root"
    root.mkdir()
    monkeypatch.setattr(schedule_configs, "SHIPPED_ROOT", root)
    return root


def kernel(model, target=HOST) -> tirx.PrimFunc:
    """The model's one fused PrimFunc, weights marked layout-free as compile marks them."""
    prepared = prepare_module(model, target)
    mod = attach_layout_free_buffers(
        tvm.IRModule(dict(prepared.mod.functions_items()), attrs=prepared.mod.attrs))
    funcs = [f for _, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)]
    assert len(funcs) == 1, [gv.name_hint for gv, _ in mod.functions_items()]
    return funcs[0]


def loops(func: tirx.PrimFunc) -> list[str]:
    """The loop nest as printed: kind and extents of every `for`, in order."""
    return re.findall(r"for [^\n]* in (T\.\w+\([^\n]*\)|range\([^\n]*\)):", func.script())


def write_db(root: Path, target, entries: dict[str, dict]) -> Path:
    """A user tuning database `root/<target key>/schedule_configs.json` with `entries`."""
    db_dir = resolve_tuning_db(root, target)
    db_dir.mkdir(parents=True, exist_ok=True)
    save_configs(db_dir, entries, target_class(target))
    return db_dir


def entry(config: dict | None, rule: str = CONV_RULE) -> dict:
    return {"rule": rule, "config": config, "us": 1.0, "default_us": 2.0, "task": "t",
            "model": "test"}


def assert_matches_ort(art, model) -> None:
    for err in compare_to_ort(art, model, random_inputs(art.inputs, seed=3)):
        assert err.within(1e-4), err


# ---------------------------------------------------------------------------------------
# knobs of the rules
# ---------------------------------------------------------------------------------------

def test_conv_tile_options_list_the_heuristic_first():
    func = kernel(conv_model())
    rule = Conv2dRule()
    info = rule._analyze(s_tir.Schedule(func), func)
    cpu = cpu_info(HOST)
    options = tile_options(info, cpu, can_pad=rule.can_pad)
    assert len(options) >= 2 and len(set(options)) == len(options)
    assert options[0] == choose_tile(info, cpu, can_pad=rule.can_pad)
    # every row tile divides the output width (12): no predicated register tile
    assert all(12 % t.mb == 0 and 16 % t.nb == 0 for t in options)
    # right after the heuristic: the same tile with the epilogue storing along the other
    # axis (a 12-column row tile is not a power of two: the heuristic stores along N)
    assert options[0].mb == 12 and options[0].store == ""
    assert options[1] == TileChoice(options[0].nb, 12, options[0].n_padded, 1, "m")
    configs = rule.configs(func, HOST)
    assert configs == [tile_config(t) for t in options]
    assert configs[0] == tile_config(choose_tile(info, cpu, can_pad=rule.can_pad))
    # a listed setting is taken as is; one that is not falls back to the heuristic
    assert choose_tile(info, cpu, can_pad=False, config=configs[-1]) == options[-1]
    assert choose_tile(info, cpu, can_pad=False, config={"nb": 3, "mb": 5}) == options[0]


def test_window_rule_lists_row_widths_heuristic_first():
    func = kernel(depthwise_model())
    rule = WindowRule()
    assert Conv2dRule().configs(func, HOST) == []  # depthwise: no register tile
    configs = rule.configs(func, HOST)
    widths = [c["width"] for c in configs]
    assert len(widths) >= 2 and len(set(widths)) == len(widths)
    assert widths[0] == _row_width(12, cpu_info(HOST).lanes(32))
    assert all(12 % w == 0 for w in widths)


def test_a_config_changes_the_schedule_and_an_invalid_one_falls_back():
    func = kernel(conv_model())
    rule = Conv2dRule()
    configs = rule.configs(func, HOST)
    with HOST:
        heuristic = apply_rule(rule, func, HOST)
        other = apply_rule(rule, func, HOST, configs[-1])
        invalid = apply_rule(rule, func, HOST, {"nb": 3, "mb": 5, "n_padded": 16})
    assert CONFIG_ATTR not in heuristic.attrs
    assert json.loads(str(other.attrs[CONFIG_ATTR])) == configs[-1]
    assert loops(other) != loops(heuristic)
    # not an option of this kernel: scheduled exactly as the heuristic does, no error
    tvm.ir.assert_structural_equal(heuristic.with_attr(CONFIG_ATTR, "-"),
                                   invalid.with_attr(CONFIG_ATTR, "-"))


@pytest.mark.parametrize("which", ["conv", "depthwise"])
def test_every_setting_compiles_and_matches_ort(which, tmp_path):
    model = conv_model() if which == "conv" else depthwise_model()
    func = kernel(model)
    rule = Conv2dRule() if which == "conv" else WindowRule()
    key = workload_key(func)
    configs = rule.configs(func, HOST)
    for i, config in enumerate([configs[1], configs[-1]] if len(configs) > 2 else configs[1:]):
        root = tmp_path / f"db{i}"
        write_db(root, HOST, {key: entry(config, rule.name)})
        art = compile_model(model, "host", tuning_db=root)
        assert art.report["schedule_configs"]["applied"] == 1, config
        assert_matches_ort(art, model)


# ---------------------------------------------------------------------------------------
# search and database
# ---------------------------------------------------------------------------------------

def test_search_writes_the_database_and_skips_known_kernels(conv_path, tmp_path):
    func = kernel(conv_path)
    settings = Conv2dRule().configs(func, HOST)
    first = search_configs(conv_path, "host", tmp_path)
    db_dir = Path(first.db_dir)
    assert db_dir == tmp_path.resolve() / target_key(HOST)
    assert first.known == 0 and len(first.kernels) == 1
    row = first.kernels[0]
    assert row["rule"] == CONV_RULE and 2 <= row["settings"] <= len(settings)
    assert row["config"] is None or row["config"] in settings[1:]
    data = json.loads((db_dir / CONFIG_FILE).read_text())
    assert data["target_class"] == target_class(HOST) and data["tvm"] == tvm.__version__
    stored = load_configs(db_dir)
    assert list(stored) == [workload_key(func)]
    assert stored[workload_key(func)]["config"] == row["config"]
    assert stored[workload_key(func)]["default_us"] > 0

    before = (db_dir / CONFIG_FILE).read_text()
    second = search_configs(conv_path, "host", tmp_path)
    assert second.kernels == [] and second.known == 1
    assert json.loads((db_dir / CONFIG_FILE).read_text())["entries"] == \
        json.loads(before)["entries"]

    again = search_configs(conv_path, "host", tmp_path, retune=True)
    assert len(again.kernels) == 1 and again.kernels[0]["settings"] == row["settings"]
    assert list(load_configs(db_dir)) == [workload_key(func)]


def test_search_refuses_code_that_does_not_run_here(conv_path, tmp_path):
    from onnxforge.errors import BackendError

    with pytest.raises(BackendError, match="does not run here"):
        search_configs(conv_path, "cortex-a72", tmp_path)
    assert not (tmp_path / target_key(A72)).exists()


def test_compile_applies_the_users_entries(conv_path, tmp_path):
    func = kernel(conv_path)
    config = Conv2dRule().configs(func, HOST)[-1]
    db_dir = write_db(tmp_path, HOST, {workload_key(func): entry(config)})
    art = compile_model(conv_path, "host", tuning_db=tmp_path)
    assert art.report["schedule_configs"] == {"sources": [str(db_dir)], "entries": 1,
                                              "applied": 1}
    # a schedule-config file alone is a database in use, not an empty one
    assert not any("empty or missing" in note for note in art.report["notes"])
    assert_matches_ort(art, conv_path)

    # "config": null records that the heuristic measured fastest: nothing to apply
    write_db(tmp_path, HOST, {workload_key(func): entry(None)})
    art = compile_model(conv_path, "host", tuning_db=tmp_path)
    assert art.report["schedule_configs"]["entries"] == 1
    assert art.report["schedule_configs"]["applied"] == 0

    # a setting this kernel does not offer (e.g. from a hand-edited file): heuristic, and
    # not counted as applied
    write_db(tmp_path, HOST, {workload_key(func): entry({"nb": 3, "mb": 5, "n_padded": 16})})
    art = compile_model(conv_path, "host", tuning_db=tmp_path)
    assert art.report["schedule_configs"]["applied"] == 0
    assert_matches_ort(art, conv_path)


def test_an_entry_of_another_rule_is_not_applied_and_is_measured_again(conv_path, tmp_path):
    """After a rule change (e.g. a kernel the window rule used to take is now a tiled
    conv) an old entry must neither force the old rule nor count as measured."""
    func = kernel(conv_path)
    stale = WindowRule().configs(func, HOST)
    assert stale, "a regular conv is a sliding window too: the window rule offers widths"
    write_db(tmp_path, HOST, {workload_key(func): entry(stale[-1], WindowRule.name)})
    art = compile_model(conv_path, "host", tuning_db=tmp_path)
    assert art.report["schedule_configs"]["applied"] == 0
    assert art.report["schedule_rules"] == {CONV_RULE: 1}
    report = search_configs(conv_path, "host", tmp_path)
    assert [k["rule"] for k in report.kernels] == [CONV_RULE]
    assert load_configs(resolve_tuning_db(tmp_path, HOST))[workload_key(func)]["rule"] == CONV_RULE


def test_search_stops_at_the_deadline(conv_path, tmp_path):
    report = search_configs(conv_path, "host", tmp_path, max_seconds=0.01)
    assert report.kernels == [] and report.stopped_by == "seconds"


@pytest.mark.parametrize("break_it", ["tvm", "format", "json"])
def test_foreign_or_broken_files_are_ignored(break_it, conv_path, tmp_path, monkeypatch):
    # the warning itself, whatever logging configuration earlier tests left behind
    # (MetaSchedule's dictConfig reconfigures loggers, so caplog may see nothing)
    warnings = []
    monkeypatch.setattr(schedule_configs.logger, "warning",
                        lambda msg, *args: warnings.append(msg % args))
    func = kernel(conv_path)
    config = Conv2dRule().configs(func, HOST)[-1]
    db_dir = write_db(tmp_path, HOST, {workload_key(func): entry(config)})
    path = db_dir / CONFIG_FILE
    data = json.loads(path.read_text())
    if break_it == "tvm":
        data["tvm"] = "0.19.0"
        path.write_text(json.dumps(data))
    elif break_it == "format":
        data["format"] = 99
        path.write_text(json.dumps(data))
    else:
        path.write_text(path.read_text()[:40])
    assert load_configs(db_dir) == {}
    expected = {"tvm": "written by TVM 0.19.0", "format": "unknown format",
                "json": "unreadable"}[break_it]
    assert any(expected in w for w in warnings), warnings
    art = compile_model(conv_path, "host", tuning_db=tmp_path)
    assert art.report["schedule_configs"] == {"sources": [], "entries": 0, "applied": 0}
    assert_matches_ort(art, conv_path)


def test_shipped_database_matches_the_target_class(conv_path, tmp_path, no_shipped_db):
    func = kernel(conv_path)
    key = workload_key(func)
    host_configs = Conv2dRule().configs(func, HOST)
    shipped = no_shipped_db / target_class(HOST)
    shipped.mkdir()
    save_configs(shipped, {key: entry(host_configs[-1])}, target_class(HOST))
    assert schedule_configs.shipped_db_dir(HOST) == shipped

    art = compile_model(conv_path, "host")
    assert art.report["schedule_configs"] == {"sources": [str(shipped)], "entries": 1,
                                              "applied": 1}
    assert_matches_ort(art, conv_path)
    off = compile_model(conv_path, "host", shipped_db=False)
    assert off.report["schedule_configs"] == {"sources": [], "entries": 0, "applied": 0}

    # the user's database wins over the shipped one, entry by entry
    user_dir = write_db(tmp_path / "user", HOST, {key: entry(None)})
    both = compile_model(conv_path, "host", tuning_db=tmp_path / "user")
    assert both.report["schedule_configs"] == {"sources": [str(shipped), str(user_dir)],
                                               "entries": 1, "applied": 0}

    # an AArch64 target has another class: the x86 database is not used for it
    assert target_class(A72) == "aarch64-neon" != target_class(HOST)
    assert schedule_configs.shipped_db_dir(A72) is None
    a72 = compile_model(conv_path, "cortex-a72")
    assert a72.report["schedule_configs"] == {"sources": [], "entries": 0, "applied": 0}
    # ... but its own class's database is
    a72_func = kernel(conv_path, A72)
    a72_configs = Conv2dRule().configs(a72_func, A72)
    own = no_shipped_db / "aarch64-neon"
    own.mkdir()
    save_configs(own, {workload_key(a72_func): entry(a72_configs[-1])}, "aarch64-neon")
    a72 = compile_model(conv_path, "cortex-a72")
    assert a72.report["schedule_configs"] == {"sources": [str(own)], "entries": 1,
                                              "applied": 1}


def test_tuner_baseline_times_the_default_schedule_with_the_configs(conv_path, tmp_path):
    """MetaSchedule's default-schedule baseline uses the configs compile would apply."""
    from onnxforge.backends.tvm.database import BASELINE_FILE, read_baselines
    from onnxforge.backends.tvm.metaschedule import extract_tasks
    from onnxforge.backends.tvm.tuning_worker import measure_default_schedules
    from tvm.s_tir import meta_schedule as ms

    func = kernel(conv_path)
    config = Conv2dRule().configs(func, HOST)[-1]
    prepared = prepare_module(conv_path, HOST)
    tasks = extract_tasks(prepared.mod, HOST)

    class Builder:  # records what would be built; the "artifact" is an empty folder
        def __init__(self):
            self.mods = []

        def build(self, inputs):
            self.mods += [i.mod for i in inputs]
            out = []
            for i in range(len(inputs)):
                folder = tmp_path / f"artifact{len(self.mods)}-{i}"
                folder.mkdir()
                out.append(SimpleNamespace(error_msg=None, artifact_path=str(folder / "a.so")))
            return out

    class Runner:
        def run(self, inputs):
            done = SimpleNamespace(error_msg=None, run_secs=[2e-5, 4e-5])
            return [SimpleNamespace(result=lambda: done) for _ in inputs]

    for work, expect in (("plain", None), ("configured", config)):
        work_dir = tmp_path / work
        work_dir.mkdir()
        if expect is not None:
            save_configs(work_dir, {workload_key(func): entry(expect)}, target_class(HOST))
        builder = Builder()
        database = ms.database.JSONDatabase(
            path_workload=str(work_dir / "database_workload.json"),
            path_tuning_record=str(work_dir / "database_tuning_record.json"),
            allow_missing=True)
        measure_default_schedules(tasks, prepared.mod, HOST, builder, Runner(), database,
                                  work_dir, work_dir / "progress.jsonl")
        (built,) = [f for mod in builder.mods for _, f in mod.functions_items()]
        timed = built.attrs.get(CONFIG_ATTR)
        assert (None if timed is None else json.loads(str(timed))) == expect
        (baseline,) = read_baselines(work_dir).values()
        assert baseline["config"] == expect and baseline["us"] == pytest.approx(30.0)
        assert (work_dir / BASELINE_FILE).is_file()


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------

def cli(*args):
    """The command as a user runs it; stdout/stderr with rich's line wrapping undone."""
    result = subprocess.run([sys.executable, "-m", "onnxforge.cli", *map(str, args)],
                            capture_output=True, text=True, timeout=300, check=False)
    result.stdout = " ".join(result.stdout.split())
    result.stderr = " ".join(result.stderr.split())
    return result


def test_cli_tune_method_configs_writes_the_database(conv_path, tmp_path):
    result = cli("tune", conv_path, "-t", "host", "--tuning-db", tmp_path, "--method", "configs")
    assert result.returncode == 0, result.stdout + result.stderr
    db_dir = resolve_tuning_db(tmp_path, HOST)
    stored = load_configs(db_dir)
    assert list(stored) == [workload_key(kernel(conv_path))]
    assert "fused_conv2d" in result.stdout and CONV_RULE in result.stdout
    assert "1 kernel(s) measured" in result.stdout
    assert not list(db_dir.glob("database_*.json"))  # MetaSchedule did not run
    again = cli("tune", conv_path, "--tuning-db", tmp_path, "--method", "configs")
    assert again.returncode == 0, again.stderr
    assert "0 kernel(s) measured" in again.stdout and "1 already in the database" in again.stdout


def test_cli_seconds_budget_covers_the_whole_command(conv_path, tmp_path):
    result = cli("tune", conv_path, "--tuning-db", tmp_path, "--method", "both",
                 "--seconds", "0.01", "--trials", "4")
    assert result.returncode == 0, result.stdout + result.stderr
    # the deadline passed while the model was prepared: no kernel timed, no MetaSchedule
    assert "0 kernel(s) measured" in result.stdout
    assert "MetaSchedule skipped" in result.stderr
    assert not list(resolve_tuning_db(tmp_path, HOST).glob("database_*.json"))


def test_cli_configs_need_this_machines_cpu(conv_path, tmp_path):
    rpc = cli("tune", conv_path, "--tuning-db", tmp_path, "--method", "configs",
              "--rpc-tracker", "127.0.0.1:9", "--rpc-key", "board")
    assert rpc.returncode == 7, rpc.stdout + rpc.stderr
    assert "--method configs" in rpc.stderr and "rpc-tracker" in rpc.stderr
    foreign = cli("tune", conv_path, "-t", "cortex-a72", "--tuning-db", tmp_path,
                  "--method", "configs")
    assert foreign.returncode == 9, foreign.stdout + foreign.stderr
    assert "does not run here" in foreign.stderr
    # both: the config step is skipped with a note; MetaSchedule then needs RPC as before
    both = cli("tune", conv_path, "-t", "cortex-a72", "--tuning-db", tmp_path)
    assert "schedule-config step skipped" in both.stderr
    assert both.returncode == 9 and "over RPC" in both.stderr
    assert not (tmp_path / target_key(A72)).exists()


def test_cli_compile_reports_measured_settings_and_no_shipped_db(conv_path, tmp_path):
    func = kernel(conv_path)
    db_dir = write_db(tmp_path / "db", HOST,
                      {workload_key(func): entry(Conv2dRule().configs(func, HOST)[-1])})
    used = cli("compile", conv_path, "-o", tmp_path / "a.so", "--tuning-db", tmp_path / "db",
               "--verify", "--report", tmp_path / "a.json")
    assert used.returncode == 0, used.stdout + used.stderr
    # (a database shipped for this machine's class, if any, is listed before ours)
    note = re.search(r"(\d+) with a measured knob setting \(from ([^)]*)\)", used.stdout)
    assert note and int(note[1]) >= 1 and note[2].endswith(str(db_dir)), used.stdout
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["schedule_configs"]["sources"][-1] == str(db_dir)
    assert report["schedule_configs"]["applied"] == int(note[1])
    plain = cli("compile", conv_path, "-o", tmp_path / "b.so", "--no-shipped-db",
                "--report", tmp_path / "b.json")
    assert plain.returncode == 0, plain.stdout + plain.stderr
    assert "0 with a measured knob setting (no schedule-config database)" in \
        plain.stdout
    assert json.loads((tmp_path / "b.json").read_text())["schedule_configs"]["sources"] == []
    assert (tmp_path / "b.so").is_file()
