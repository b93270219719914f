"""Foundation acceptance on the real model zoo: inspect and `optimize -p cleanup`."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import zoo_input_shapes, zoo_path, zoo_sample_inputs
from onnxforge.api import inspect_model, optimize
from onnxforge.ir import load_model

ZOO_MODELS = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0",
              "squeezenet1_1", "minilm_l6", "ppocr_det", "ppocr_rec", "ppocr_cls", "digits_cnn"]


def _independent_param_count(path) -> int:
    """Initializer elements + non-scalar Constant-node elements, read with plain onnx."""
    proto = onnx.load(path)
    total = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    size = int(np.prod(attr.t.dims))
                    total += size if size > 1 else 0
    return total


@pytest.mark.parametrize("name", ZOO_MODELS)
def test_inspect_params_match_onnx(name):
    path = zoo_path(name)
    info = inspect_model(path, zoo_input_shapes(name))
    assert info["params"] == _independent_param_count(path)
    assert info["macs"] is not None and info["macs"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_cleanup_keeps_outputs(name, tmp_path):
    path = zoo_path(name)
    out = tmp_path / f"{name}.onnx"
    result = optimize(path, "cleanup", output=out, input_shapes=zoo_input_shapes(name),
                      verify_data=zoo_sample_inputs(name), verify_batches=2)
    assert out.exists()
    assert result.error is not None and result.error.within(1e-4), result.error.to_dict()
    # the written file loads again and still has the model's inputs and outputs
    written = load_model(out)
    assert [v.name for v in written.graph.outputs] == [
        v.name for v in load_model(path).graph.outputs]
