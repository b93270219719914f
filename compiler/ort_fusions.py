"""What onnxruntime's graph optimizer makes of a model: the op types of its optimized graph.

onnxruntime fuses patterns at session creation (Conv+BN, Conv+Add+Relu -> FusedConv,
MatMul+Transpose -> FusedMatMul, LayerNorm, Gelu, QDQ node units -> QLinearConv ...). A
rewrite of ours that breaks such a pattern can make the model slower although it has
fewer nodes, so the exact passes and the quantizer are checked against the graph ORT
writes (`SessionOptions.optimized_model_filepath`), not only against their own output.
"""

from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from .ir import model_bytes

# What creating a session raises for a model onnxruntime refuses (none of them derives
# from a common onnxruntime base class other than Exception).
ORT_LOAD_ERRORS = (_ort_state.Fail, _ort_state.InvalidGraph, _ort_state.InvalidArgument,
                   _ort_state.InvalidProtobuf, _ort_state.NotImplemented,
                   _ort_state.RuntimeException)

# Op types that only exist because ORT fused something (its contrib kernels, plus the
# standard ops it builds from primitive patterns). A drop in any of them between a model
# and its rewrite means the rewrite cost ORT a fusion.
FUSED_OP_TYPES = frozenset({
    "FusedConv", "FusedMatMul", "FusedGemm", "Gemm", "LayerNormalization",
    "SkipLayerNormalization", "SimplifiedLayerNormalization", "Gelu", "FastGelu",
    "BiasGelu", "QuickGelu", "Attention", "MultiHeadAttention", "HardSwish",
    "QLinearConv", "QLinearMatMul", "QGemm", "QLinearAdd", "QLinearMul",
    "QLinearSigmoid", "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearConcat",
    "QLinearLeakyRelu", "QLinearSoftmax", "MatMulInteger", "DynamicQuantizeMatMul",
    "MatMulIntegerToFloat", "NhwcMaxPool", "QLinearReduceMean",
})


def _key(node: onnx.NodeProto) -> str:
    key = f"{node.domain}:{node.op_type}" if node.domain else node.op_type
    if node.op_type == "FusedConv":  # which activation was fused in matters
        act = next((a.s.decode() for a in node.attribute if a.name == "activation"), "")
        key += f"[{act}]"
    return key


def ort_optimized_ops(model: ir.Model | onnx.ModelProto | str | Path, *, threads: int = 1,
                      level: str = "extended") -> collections.Counter:
    """Op type (with domain, and FusedConv's activation) -> count in the graph onnxruntime
    runs after its optimizations. `level="extended"` stops before the NCHWc layout
    transformer (hardware-specific reorders); `"all"` includes it."""
    levels = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
    if isinstance(model, onnx.ModelProto):
        data = model.SerializeToString()
    elif isinstance(model, ir.Model):
        data = model_bytes(model)
    else:
        data = Path(model)
    with tempfile.TemporaryDirectory(prefix="onnxforge-ortopt-") as tmp:
        out = Path(tmp) / "optimized.onnx"
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        opts.graph_optimization_level = levels[level]
        opts.optimized_model_filepath = str(out)
        ort.InferenceSession(str(data) if isinstance(data, Path) else data, opts,
                             providers=["CPUExecutionProvider"])
        optimized = onnx.load(str(out), load_external_data=False)
    return collections.Counter(_key(n) for n in optimized.graph.node)


def op_total(counts: collections.Counter, op_type: str) -> int:
    """How many nodes of `op_type` in any domain (ORT's NHWC transformer moves QLinearConv
    to com.microsoft, for example), FusedConv counted whatever its activation."""
    return sum(v for k, v in counts.items() if k.split(":")[-1].split("[")[0] == op_type)


def lost_fusions(before: collections.Counter, after: collections.Counter) -> dict[str, int]:
    """Fused op types (see FUSED_OP_TYPES) of which `after` has fewer than `before`:
    name -> how many fewer."""
    lost = {}
    for key, count in before.items():
        op = key.split(":")[-1].split("[")[0]
        if op in FUSED_OP_TYPES and after.get(key, 0) < count:
            lost[key] = count - after.get(key, 0)
    if "Gemm" in lost:
        # Fewer Gemms is a lost MatMul+Add fusion only where plain MatMuls took their
        # place; sibling Gemms merged into one (fuse-horizontal's Q/K/V) are not.
        more_matmuls = max(0, after.get("MatMul", 0) - before.get("MatMul", 0))
        lost["Gemm"] = min(lost["Gemm"], more_matmuls)
        if not lost["Gemm"]:
            del lost["Gemm"]
    return lost
