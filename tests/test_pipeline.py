"""Pipeline text, typed options, the pass manager's checks and per-step report."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import pytest
from builders import conv_relu_gemm
from onnxforge.calibration import open_calibration
from onnxforge.errors import PipelineError, VerificationError
from onnxforge.ir import add_initializer, constant_array, load_model
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import ForgePass, PassContext, register
from onnxforge.pipeline import Pipeline, parse_pipeline


@dataclass
class ScaleOptions:
    factor: float = 1.0
    mode: Literal["weights", "bias"] = "weights"
    enabled: bool = True
    limit: int | None = None


@register
class _ScaleConvPass(ForgePass):
    """Test pass: multiplies the first conv weight by `factor` (lossy unless factor=1)."""

    name = "test-scale"
    summary = "scale the conv weight (test only)"
    exact = False
    Options = ScaleOptions
    positional = ("factor",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.options.enabled or self.options.factor == 1.0:
            return ir.passes.PassResult(model, modified=False)
        conv = next(n for n in model.graph if n.op_type == "Conv")
        index = 1 if self.options.mode == "weights" else 2
        new = add_initializer(model.graph, "scaled",
                              constant_array(conv.inputs[index]) * self.options.factor)
        conv.replace_input_with(index, new)
        self.count("scaled")
        return ir.passes.PassResult(model, modified=True)


@register
class _WrongExactPass(_ScaleConvPass):
    name = "test-wrong-exact"
    exact = True


def test_parse_pipeline_text():
    specs = parse_pipeline('cleanup, prune(ratio=0.3,criterion=l2),quantize(int8,calib="a,b")')
    assert [s.name for s in specs] == ["cleanup", "prune", "quantize"]
    assert specs[1].kwargs == {"ratio": "0.3", "criterion": "l2"}
    assert specs[2].args == ["int8"] and specs[2].kwargs == {"calib": "a,b"}


@pytest.mark.parametrize("text", ["a(b", "a)", "a,,b", "a(x=1,2)", "bad name"])
def test_parse_errors(text):
    with pytest.raises(PipelineError):
        parse_pipeline(text)


def test_typed_options_and_canonical_text():
    pipeline = Pipeline.parse("test-scale(2.5,mode=bias,enabled=off,limit=3)")
    opts = pipeline.passes[0].options
    assert (opts.factor, opts.mode, opts.enabled, opts.limit) == (2.5, "bias", False, 3)
    assert pipeline.text == "test-scale(factor=2.5,mode=bias,enabled=false,limit=3)"
    assert Pipeline.parse(pipeline.text).text == pipeline.text


@pytest.mark.parametrize("text, message", [
    ("nosuchpass", "unknown pass 'nosuchpass'; available passes:.*test-scale"),
    ("test-scale(colour=red)", "unknown option 'colour'; options: enabled, factor, limit, mode"),
    ("test-scale(factor=big)", "factor='big' is not a valid float"),
    ("test-scale(mode=all)", "not one of weights, bias"),
    ("test-scale(1,2)", "takes 1 positional"),
])
def test_option_errors_are_clear(text, message):
    with pytest.raises(PipelineError, match=message):
        Pipeline.parse(text)


def _verify_source(model):
    return open_calibration("random:2", model, {"x": (1, 3, 8, 8)})


def test_manager_reports_lossy_error_and_stats(tmp_path):
    model = load_model(conv_relu_gemm())
    original = load_model(model)
    context = PassContext(input_shapes={"x": (1, 3, 8, 8)})
    manager = PassManager("test-scale(1.1)", context, verify_source=_verify_source(model),
                          dump_dir=tmp_path)
    model, steps = manager.run(model)
    (step,) = steps
    assert step.modified and step.stats == {"scaled": 1}
    assert step.before["nodes"] == step.after["nodes"] == 4
    assert step.before["macs"] == 1 * 8 * 8 * 8 * 27 + 10 * 512
    assert step.error is not None and step.error.max_rel_l2 > 1e-3
    assert (tmp_path / "00_test-scale.onnx").exists()
    # the input model object is untouched
    assert np.array_equal(constant_array(original.graph.initializers["w"]),
                          constant_array(next(iter(original.graph)).inputs[1]))


def test_manager_rejects_exact_pass_that_changes_outputs():
    model = load_model(conv_relu_gemm())
    manager = PassManager("test-wrong-exact(1.5)", PassContext(),
                          verify_source=_verify_source(model))
    with pytest.raises(VerificationError, match="exact pass test-wrong-exact"):
        manager.run(model)


def test_unmodified_step_has_no_error_entry():
    model = load_model(conv_relu_gemm())
    _, (step,) = PassManager("test-scale(1.0)", PassContext(),
                             verify_source=_verify_source(model)).run(model)
    assert not step.modified and step.error is None


def test_builtin_pass_list_is_complete_and_true():
    """BUILTIN_PASSES names every pass the package registers, with its defining module."""
    import importlib
    import pkgutil

    import onnxforge.passes
    from onnxforge.passes.base import BUILTIN_PASSES, PASSES

    for info in pkgutil.walk_packages(onnxforge.passes.__path__, "onnxforge.passes."):
        importlib.import_module(info.name)
    shipped = {n: c for n, c in PASSES.items() if c.__module__.startswith("onnxforge.passes.")}
    assert sorted(shipped) == sorted(BUILTIN_PASSES)
    assert {n: c.__module__ for n, c in shipped.items()} == BUILTIN_PASSES


def test_parsing_a_pipeline_imports_only_its_passes():
    import subprocess
    import sys

    code = ("import sys; from onnxforge.pipeline import Pipeline; Pipeline.parse('cleanup,fuse'); "
            "print(sorted(m for m in sys.modules if m.startswith('onnxforge.passes.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "cleanup" in out and "fuse" in out
    assert "quant" not in out and "prun" not in out and "lowrank" not in out


@pytest.mark.parametrize("pipeline, batch, python, flags", [
    ("quantize(int8)", 1, "pass calibration='data.npz'", "pass --calib data.npz"),
    ("lowrank(data_aware=true,guard=false)", 1, "calibration data (calibration)",
     "calibration data (--calib)"),
    ("lowrank(macs=0.3,guard=false)", "N", "give input_shapes, or use params=",
     "give --input-shape, or use params="),
])
def test_pass_errors_name_options_and_the_cli_writes_its_flags(pipeline, batch, python, flags):
    """A pass's error names what is missing as the Python API's option; the CLI writes
    the flag that sets it."""
    from onnxforge.cli_flags import cli_text
    from onnxforge.errors import InputSpecError

    with pytest.raises(InputSpecError) as info:
        PassManager(pipeline, PassContext()).run(load_model(conv_relu_gemm(batch=batch)))
    assert python in str(info.value) and "--" not in str(info.value)
    assert flags in cli_text(info.value)
