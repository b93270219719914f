"""onnxruntime backend: the reference executor and the speed baseline.

Sessions are created with spinning off (the machine is shared; spinning threads
steal time from whatever runs beside them) and a settable intra-op thread count,
so a comparison against TVM uses the same number of threads on both sides.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from ..errors import BackendError
from ..ir import PROTOBUF_LIMIT, model_bytes, save_model
from .timing import Timing, time_callable


def session_options(threads: int | None = None, *, optimize: bool = True) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return opts


class OrtArtifact:
    backend = "ort"

    def __init__(self, model: ir.Model, *, threads: int | None = None, optimize: bool = True,
                 extra_outputs: list[str] | None = None):
        self.model = model
        self.threads = threads
        self._tmpdir = None
        opts = session_options(threads, optimize=optimize)
        try:
            weight_bytes = sum(
                v.const_value.nbytes for v in model.graph.initializers.values()
                if v.const_value is not None
            )
            if weight_bytes > PROTOBUF_LIMIT // 2:
                # Too big for one protobuf: go through a file with external data.
                self._tmpdir = tempfile.TemporaryDirectory(prefix="onnxforge-ort-")
                path = save_model(model, Path(self._tmpdir.name) / "model.onnx")
                self.session = ort.InferenceSession(
                    str(path), opts, providers=["CPUExecutionProvider"])
            else:
                self.session = ort.InferenceSession(
                    model_bytes(model), opts, providers=["CPUExecutionProvider"]
                )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BackendError(f"onnxruntime could not load the model: {exc}") from exc
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {name: inputs[name] for name in self.input_names}
        try:
            values = self.session.run(self.output_names, feed)
        except Exception as exc:
            raise BackendError(f"onnxruntime failed to run the model: {exc}") from exc
        return dict(zip(self.output_names, values))

    def benchmark(self, inputs: Mapping[str, np.ndarray], *, warmup: int = 5,
                  repeat: int = 30) -> Timing:
        feed = {name: inputs[name] for name in self.input_names}
        return time_callable(lambda: self.session.run(self.output_names, feed),
                             warmup=warmup, repeat=repeat)

    def export(self, path: str | os.PathLike) -> Path:
        return save_model(self.model, path)


def run_model(model: ir.Model, inputs: Mapping[str, np.ndarray], *,
              threads: int | None = None) -> dict[str, np.ndarray]:
    """One-shot convenience: compile with onnxruntime and run once."""
    return OrtArtifact(model, threads=threads).run(inputs)
