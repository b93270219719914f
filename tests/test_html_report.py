"""The HTML report: made from real optimize and compile reports on the shipped digits model,
with its plots and tables, hostile names escaped, tables without matplotlib, and a
`--report x.html` that never replaces a file the run reads."""

from __future__ import annotations

import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from builders import conv_relu_gemm
from onnxforge import api
from onnxforge.html_plots import PLOT_HINT
from onnxforge.html_report import load_report, render_html

PIPELINE = ("cleanup,fuse,prune(macs=0.3),lowrank(energy=0.95),"
            "quantize(mode=mixed,max_error=0.1)")
HOSTILE = "<script>alert('x')</script>$\\frac$"  # HTML, and mathtext matplotlib would parse


def cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxforge.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, check=False)


def images(page: str) -> dict[str, bytes]:
    """alt text -> PNG bytes of every embedded plot."""
    found = re.findall(r'<img class="plot" alt="([^"]*)" src="data:image/png;base64,([^"]+)"',
                       page)
    return {alt: base64.b64decode(data) for alt, data in found}


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """One real lossy run on digits: the HTML page written by --report and the JSON."""
    folder = tmp_path_factory.mktemp("report")
    page, data = folder / "r.html", folder / "r.json"
    result = api.optimize(api.EXAMPLE_MODEL, PIPELINE, output=folder / "out.onnx",
                          calibration=str(api.EXAMPLE_CALIBRATION),
                          verify_data=str(api.EXAMPLE_TEST_DATA),
                          input_shapes=dict(api.EXAMPLE_INPUT_SHAPES), measure_latency=True,
                          measure_pass_latency=True, report_path=page)
    data.write_text(json.dumps(result.report, default=str))
    return page.read_text(encoding="utf-8"), result.report


def test_optimize_page_has_the_waterfall_and_per_layer_plots(optimized):
    pytest.importorskip("matplotlib")
    page, report = optimized
    plots = images(page)
    for alt in ("per-pass waterfall", "pruning ratio per group", "parameters per layer (rank kept)",
                "quantization error per layer, colored by the bits chosen",
                "mixed-precision budget curve"):
        assert alt in plots, f"missing plot {alt!r}: {sorted(plots)}"
        assert plots[alt].startswith(b"\x89PNG") and len(plots[alt]) > 5000
    assert "<script" not in page and "http" not in page.replace("http-equiv", "")
    # one waterfall row per pass, and the reproducing command
    waterfall = page.split("rel L2 vs before the pass")[1].split("</table>")[0]
    assert waterfall.count("<tr>") == len(report["steps"])
    assert "onnxforge optimize" in page and report["pipeline"] in page
    prune = next(s for s in report["steps"] if s["pass"].startswith("prune"))
    assert prune["stats"]["per_group"], "prune reports what it removed per group"
    for group in prune["stats"]["per_group"]:
        assert f"<td>{group}</td>" in page
    mixed = report["steps"][-1]["stats"]["bits_per_layer"]
    for layer in mixed:
        assert f"<td>{layer}</td>" in page
    # the size waterfall: weight bytes after each pass are recorded and shown
    assert all(s["after"]["weight_bytes"] > 0 for s in report["steps"])
    assert "weight bytes after" in page
    # ORT latency after each pass, timed side by side, in the table
    per_pass = report["latency"]["per_pass_ms"]
    assert len(per_pass) == len(report["steps"]) and all(ms > 0 for ms in per_pass)
    assert per_pass[-1] == report["latency"]["after_ms"]
    from onnxforge.html_report import fmt
    assert "ORT ms after" in page
    for ms in per_pass:
        assert f"<td class=n>{fmt(round(ms, 4))}</td>" in waterfall


def test_compile_page_names_the_rule_and_time_of_each_kernel(tmp_path):
    pytest.importorskip("tvm")
    page = tmp_path / "c.html"
    result = api.compile(api.EXAMPLE_MODEL, "host", None, pipeline="",
                         input_shapes=dict(api.EXAMPLE_INPUT_SHAPES), verify=False,
                         report_path=page, profile=True)
    text = page.read_text(encoding="utf-8")
    profile, rules = result.report["profile"], result.report["kernel_schedules"]
    assert profile["kernels"] and {k["name"] for k in profile["kernels"]} <= set(rules)
    assert abs(sum(k["share"] for k in profile["kernels"]) - 1) < 0.01
    assert all(k["calls"] >= 1 and k["total_ms"] > 0 for k in profile["kernels"])
    assert "kernels timed over" in text
    assert "Who scheduled the kernels" in text and "Integer and sparse kernels" in text
    kernels = re.findall(r"<tr><td>([^<]+)</td><td>([^<]+)</td></tr>",
                         text.split("who scheduled each kernel")[1].split("</table>")[0])
    assert kernels and any("conv2d" in name for name, _ in kernels)
    assert all(rule for _, rule in kernels)
    if importlib.util.find_spec("matplotlib") is not None:
        assert {"kernels per schedule rule", "time per kernel"} <= set(images(text))


def test_hostile_node_names_are_escaped(tmp_path):
    model = conv_relu_gemm()
    for node in model.graph.node:
        node.name = HOSTILE + node.op_type
    path = tmp_path / "hostile.onnx"
    onnx.save(model, path)
    result = api.optimize(path, "cleanup,prune(ratio=0.5),lowrank(energy=0.9)",
                          output=tmp_path / "o.onnx", calibration="random:4",
                          report_path=tmp_path / "r.json")
    stats = result.report["steps"][-1]["stats"]
    # the name really reaches the report (as a layer key)
    assert any(HOSTILE in key for value in stats.values() if isinstance(value, dict)
               for key in value)
    page = render_html(json.loads(json.dumps(result.report, default=str)))
    assert "<script" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;$\\frac$" in page


def test_int8_page_has_the_weight_error_per_tensor(tmp_path):
    page = tmp_path / "q.html"
    result = api.optimize(api.EXAMPLE_MODEL, "cleanup,quantize(int8)", output=tmp_path / "q.onnx",
                          calibration=str(api.EXAMPLE_CALIBRATION),
                          input_shapes=dict(api.EXAMPLE_INPUT_SHAPES), report_path=page)
    errors = result.report["steps"][-1]["stats"]["weight_error"]
    stats = result.report["steps"][-1]["stats"]
    assert len(errors) == stats["weights_quantized"] > 0
    # 8-bit per-channel rounding: nonzero and small
    assert all(0 < e["rel_l2"] < 0.02 for e in errors.values())
    text = page.read_text(encoding="utf-8")
    for layer in errors:
        assert f"<td>{layer}</td>" in text
    if importlib.util.find_spec("matplotlib") is not None:
        assert "weight quantization error per tensor" in images(text)


def test_without_matplotlib_the_page_keeps_tables_and_says_how(optimized, monkeypatch):
    report = json.loads(json.dumps(optimized[1], default=str))
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    page = render_html(report)
    assert "<img" not in page
    assert PLOT_HINT.split(":")[0] in page and "onnxforge[plot]" in page
    assert page.count("<table>") >= len(report["steps"])


def test_report_html_never_replaces_what_the_run_reads(tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(api.EXAMPLE_MODEL.read_bytes())
    alias = tmp_path / "model.html"
    os.symlink(model, alias)  # the page's path is the input model under another name
    before = model.read_bytes()
    result = cli("optimize", model, "-o", tmp_path / "out.onnx", "-p", "cleanup",
                 "--report", alias, "--no-verify", "-s", "input:1,1,8,8")
    assert result.returncode != 0 and "refusing to overwrite" in result.stderr
    assert model.read_bytes() == before and not (tmp_path / "out.onnx").exists()
    # `onnxforge report` refuses to write over the model its report names
    good = tmp_path / "r.json"
    assert cli("optimize", model, "-o", tmp_path / "out.onnx", "-p", "cleanup",
               "--report", good, "--no-verify", "-s", "input:1,1,8,8").returncode == 0
    result = cli("report", good, "-o", alias)
    assert result.returncode != 0 and "refusing to overwrite" in result.stderr
    assert model.read_bytes() == before
    result = cli("report", good)
    assert result.returncode == 0, result.stderr
    assert load_report(good)["pipeline"] == "cleanup"
    assert "<table>" in (tmp_path / "r.html").read_text(encoding="utf-8")


def test_load_report_names_a_file_that_is_no_report(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rows": np.arange(2).tolist()}))
    result = cli("report", bad)
    assert result.returncode != 0 and "bad.json" in result.stderr
    assert "not an optimize (no 'steps'), compile" in " ".join(result.stderr.split())


def test_bench_page_and_json_rows_become_a_page(tmp_path):
    """`bench --report x.html` writes the page; `report` turns `bench --json` rows into
    the same page."""
    model = tmp_path / "m.onnx"
    model.write_bytes(Path(api.EXAMPLE_MODEL).read_bytes())
    page, rows = tmp_path / "b.html", tmp_path / "b.json"
    for out in (page, rows):
        done = cli("bench", model, "-s", "input:1,1,8,8", "--repeat", "5", "--report", out)
        assert done.returncode == 0, done.stderr
    text = page.read_text(encoding="utf-8")
    assert "onnxforge bench report" in text and "median ms" in text
    assert isinstance(json.loads(rows.read_text()), list)  # --json stays the rows
    assert load_report(rows)["kind"] == "bench"
    if importlib.util.find_spec("matplotlib"):
        assert "latency per model and backend" in images(text)
