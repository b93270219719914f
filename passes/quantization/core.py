"""The plan/apply core of `quantize`, below its modes: options, which tensors get a
Q -> DQ pair (`make_plan`), calibration (`calibrate`, `resolve_ranges`) and the QDQ
rewrite (`apply_plan`). Static int8 (static.py) and mixed precision (mixed.py) build on
it; dynamic (dynamic.py) uses `quantize_embeddings`. It imports none of them (bias
correction, from repair.py, is part of `apply_calibrated`).

INT8 QDQ rewrite rules:
  * Conv / ConvTranspose / Gemm / MatMul ("compute ops") get
      activation inputs   Q -> DQ, per-tensor: u8 asymmetric or s8 symmetric
      constant weights    int8 initializer -> DQ, symmetric, per output channel
                          (Conv axis 0, ConvTranspose axis 1, Gemm transB=1 axis 0,
                          Gemm transB=0 / MatMul axis 1)
      bias (Conv, Gemm C) int32 initializer -> DQ with scale s_in * s_w, zero point 0
      output              Q -> DQ (always for Conv/ConvTranspose so onnxruntime
                          fuses QLinearConv; for Gemm/MatMul only when a consumer
                          is quantized, else the fused kernel writes float)
  * Relu (and Clip(0, c)) directly after a quantized op whose output feeds only it is
    removed: the producer's output is quantized on [0, max] with the zero point at the
    grid minimum, so the Q itself clamps (exactly Relu).
  * Data-movement ops (MaxPool, Reshape, Flatten, Transpose, Squeeze, Unsqueeze,
    Identity, Slice, Resize, Pad, Gather, Expand, Tile, Depth/SpaceToDepth) and Concat
    share one scale with their inputs, so onnxruntime runs them on int8 without
    requantizing (no Q/DQ pair is needed between them).
  * Add, Mul, AveragePool, GlobalAveragePool, Sigmoid, LeakyRelu whose activation inputs
    are all quantized get their output quantized too (QLinearAdd, QLinearGlobalAveragePool...).
  * Each quantized tensor gets exactly one Q -> DQ pair, shared by all its consumers;
    graph outputs keep their float value (never re-quantized under their name).
  * Embedding tables (Gather of a constant matrix) become int8 rows dequantized after
    the Gather (`embeddings=true`).
  Preconditions / refusals: weights must be constant (initializer or Constant node);
  Gemm with transA=1 and MatMul with a constant first input stay float; opset < 13
  falls back to per-tensor weights (< 10: no quantization). Nodes named in
  `keep_float` (or "first"/"last" compute op) stay float.

Calibration streams `context.calibration_batches()` through the float model once,
feeding bounded observers (observers.py); each scale group gets one range.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from ...activations import iter_activations
from ...errors import InputSpecError
from ...ir import constant_array
from ..base import option
from ..graph import (
    attr,
    bypass,
    output_channels,
    remove_unused,
    sole_consumer,
    weight_axis,
)
from ..naming import NameAllocator
from .observers import (
    ChannelMeanObserver,
    QuantRange,
    TensorObserver,
    choose_range,
    make_range,
    quantize_weight,
)
from .prepare import ensure_node_names, is_float
from .repair import analytic_bias_shifts

logger = logging.getLogger(__name__)

COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
PASSTHROUGH_OPS = {
    "MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity",
    "Slice", "Resize", "Pad", "Gather", "Expand", "Tile", "DepthToSpace", "SpaceToDepth",
}
INT8_OPS = {"Add", "Mul", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}


@dataclass
class QuantizeOptions:
    mode: Literal["int8", "int4", "dynamic", "fp16", "mixed"] = "int8"
    # auto: the method with the smallest output error on held-out calibration batches
    # (auto_calibration.py)
    calibration: Literal["minmax", "percentile", "entropy", "mse", "auto"] = "minmax"
    # what calibration=auto compares on the held-out batches: the relative L2 of the
    # outputs, or the share of argmax (last axis) changes, ties broken by relative L2
    auto_error: Literal["rel_l2", "top1"] = "rel_l2"
    percentile: float = option(99.99, gt=0.0, le=100.0)
    activations: Literal["u8", "s8"] = "u8"
    per_channel: bool = True
    keep_float: str = ""
    ops: str = "Conv,ConvTranspose,Gemm,MatMul"
    # Quantize MatMul of two activations (attention) too.
    matmul_activations: bool = True
    # Quantize the int8-capable elementwise ops (Add, Mul, pooling, Sigmoid...).
    elementwise: bool = True
    fold_relu: bool = True
    # Embedding tables (Gather of a constant float matrix): int8 rows, dequantized after the Gather.
    embeddings: bool = True
    # Quantize graph outputs produced by Conv/int8 ops too (so they fuse to QLinearConv...).
    quantize_outputs: bool = True
    # Keep float the cheap convs (depthwise, 1x1-spatial input, few MACs per output) next
    # to float-only ops (HardSwish...): ORT runs them no faster in int8 (core.py rules).
    keep_cheap_convs_float: bool = True
    bias_correction: bool = True
    equalize: bool = False
    # SmoothQuant alpha; -1 = auto (0.5 when a LayerNormalization feeds MatMul/Gemm layers).
    smooth: float = option(-1.0, ge=0.0, le=1.0, also=(-1.0,))
    # SmoothQuant also for activations not produced by a LayerNorm (inserts a Mul).
    smooth_insert: bool = False
    calib_batches: int = option(0, ge=0)  # 0: the context's default
    weight_calibration: Literal["minmax", "mse"] = "minmax"
    # LSTM -> DynamicQuantizeLSTM ("lstm"); also weight-only int8 GRU ("all"); "none".
    recurrent: Literal["lstm", "all", "none"] = "lstm"
    # Weight rounding (mode=int8/int4): nearest, or GPTQ error compensation (gptq.py).
    rounding: Literal["nearest", "gptq"] = "nearest"
    gptq_damp: float = option(0.01, gt=0.0)
    act_order: bool = False
    # mode=int4 (int4.py): MatMulNBits block size, symmetric blocks (no zero points),
    # onnxruntime accuracy_level (4: int8 compute), the other ops int8 QDQ or float.
    block: int = option(32, ge=16)
    int4_symmetric: bool = False
    accuracy_level: int = option(4, ge=0, le=4)
    rest: Literal["int8", "float"] = "int8"
    # mode=int4: embedding tables in 4-bit blocks too (GatherBlockQuantized), else int8 rows.
    int4_embeddings: bool = True
    # mode=int4: Conv weights as 4-bit codes in the file, run by int8 kernels (int4.py).
    convs: Literal["int8", "int4"] = "int8"
    # mode=mixed
    # lowest weight precision offered per layer: 8 (int8 / fp16 / fp32) or 4 (also 4-bit)
    bits: Literal[8, 4] = 8
    max_error: float = option(0.01, ge=0.0)
    max_accuracy_drop: float = -1.0
    max_size_ratio: float = -1.0
    fp16_fallback: bool = True
    metric: Callable[..., float] | None = None
    fp16_keep_fp32: str = ""


@dataclass
class TensorQuant:
    """One tensor to quantize: the value, its scale group and where its data comes from."""

    value: ir.Value
    data_name: str  # tensor read during calibration (the Relu output for a folded Relu)
    one_sided: bool = False


@dataclass
class QuantPlan:
    compute: list[ir.Node] = field(default_factory=list)
    int8_ops: list[ir.Node] = field(default_factory=list)
    shared: list[ir.Node] = field(default_factory=list)
    folded: list[ir.Node] = field(default_factory=list)  # Relu/Clip nodes to remove
    const_inputs: list[tuple[ir.Node, int]] = field(default_factory=list)  # int8-op constants
    tensors: dict[str, TensorQuant] = field(default_factory=dict)
    parent: dict[str, str] = field(default_factory=dict)  # union-find of scale groups
    skipped: dict[str, str] = field(default_factory=dict)  # node -> reason

    def find(self, name: str) -> str:
        root = name
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while self.parent.get(name, name) != root:
            self.parent[name], name = root, self.parent[name]
        return root

    def union(self, a: str, b: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra

    def groups(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name in self.tensors:
            out.setdefault(self.find(name), []).append(name)
        return out


# ---------------------------------------------------------------- planning


def _is_activation(v: ir.Value | None) -> bool:
    return v is not None and constant_array(v) is None and is_float(v)


def compute_eligibility(node: ir.Node, opts: QuantizeOptions, allowed: set[str]) -> str | None:
    """None if `node` can be quantized as a compute op, else the reason it cannot."""
    op = node.op_type
    if node.domain not in ("", "ai.onnx") or op not in allowed:
        return "not a quantized op type"
    x = node.inputs[0]
    if not _is_activation(x):
        return "first input is constant or not float32"
    if op in ("Conv", "ConvTranspose"):
        w = constant_array(node.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim < 3:
            return "weight is not a constant float32 tensor"
        return None
    if op == "Gemm":
        if int(attr(node, "transA", 0)):
            return "Gemm transA=1 is not supported"
        w = constant_array(node.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim != 2:
            return "Gemm B is not a constant 2-D float32 tensor"
        if float(attr(node, "alpha", 1.0)) != 1.0 or float(attr(node, "beta", 1.0)) != 1.0:
            return "Gemm alpha/beta != 1 with non-constant operands"
        return None
    if op == "MatMul":
        w = constant_array(node.inputs[1])
        if w is None:
            if not opts.matmul_activations:
                return "MatMul of two activations (matmul_activations=false)"
            return None if _is_activation(node.inputs[1]) else "second input not float32"
        if w.dtype != np.float32 or w.ndim < 2:
            return "MatMul weight is not a float32 matrix"
        return None
    return "unsupported"


def _keep_float_set(graph: ir.Graph, spec: str, eligible: list[ir.Node]) -> set[str]:
    names: set[str] = set()
    known = {n.name for n in ir.traversal.RecursiveGraphIterator(graph)}  # bodies too
    for token in (t.strip() for t in spec.split(",")):
        if not token:
            continue
        if token == "first" and eligible:
            names.add(eligible[0].name)
        elif token == "last" and eligible:
            names.add(eligible[-1].name)
        elif token in known:
            names.add(token)
        else:
            raise InputSpecError(
                f"quantize: keep_float names {token!r}, which is neither 'first', 'last' nor "
                f"a node of the model (node names look like {sorted(known)[:3]})"
            )
    return names


def make_plan(model: ir.Model, opts: QuantizeOptions,
              only: set[str] | None = None) -> QuantPlan:
    """Decide which nodes run in int8 and which tensors get a Q/DQ pair.

    `only` (node names) restricts the compute ops quantized (used by mixed precision).
    """
    graph = model.graph
    plan = QuantPlan()
    ensure_node_names(graph)
    nodes = list(graph)
    compute_set = _select_compute(graph, nodes, opts, only, plan)
    flow = _Int8Flow(plan, opts, in_n=set(compute_set))
    for n in nodes:
        if n in compute_set and opts.keep_cheap_convs_float and _cheap_float_fed_conv(n, flow):
            compute_set.discard(n)
            flow.in_n.discard(n)
            plan.skipped[n.name] = ("kept float: cheap conv (depthwise, 1x1-spatial or few MACs "
                                    "per output) next to float-only ops: onnxruntime runs it no "
                                    "faster in int8 and the Q/DQ pair would cost more")
        flow.visit(n, n in compute_set)
    plan.compute = [n for n in nodes if n in compute_set]
    needs = _needs_qdq(nodes, compute_set, opts, plan)
    _add_tensors(graph, nodes, needs, flow, plan)
    # Groups may span values without Q/DQ (pass-through outputs); keep union info only.
    return plan


def _select_compute(graph: ir.Graph, nodes: list[ir.Node], opts: QuantizeOptions,
                    only: set[str] | None, plan: QuantPlan) -> set[ir.Node]:
    """The compute ops to quantize; why the others stay float goes to `plan.skipped`."""
    allowed = {o.strip() for o in opts.ops.split(",") if o.strip()}
    eligible = []
    for n in nodes:
        if n.op_type in COMPUTE_OPS:
            reason = compute_eligibility(n, opts, allowed)
            if reason is None:
                eligible.append(n)
            else:
                plan.skipped[n.name] = reason
    keep = _keep_float_set(graph, opts.keep_float, eligible)
    compute_set: set[ir.Node] = set()
    for n in eligible:
        if n.name in keep:
            plan.skipped[n.name] = "kept float (keep_float)"
        elif only is not None and n.name not in only:
            continue
        else:
            compute_set.add(n)
    return compute_set


# Below this many MACs per output element (Cin/group * kh * kw) an int8 Conv whose
# output only feeds float-only ops gains less in onnxruntime than its Q/DQ pass, layout
# transposes and the activation ORT no longer fuses cost (measured, ORT 1.31, 1 thread,
# int8 vs fp32: MobileNetV3-small 0.93-1.04x -> 0.82-0.91x, PP-OCR cls 0.79x -> 0.63x
# with such convs float; PP-OCR rec's, 64-480 MACs per element, are faster in int8).
CHEAP_CONV_MACS_PER_OUTPUT = 64


def _cheap_float_fed_conv(n: ir.Node, flow: _Int8Flow) -> bool:
    """A Conv that onnxruntime runs no faster in int8 once its float neighbours are paid:
    (a) a 1x1-spatial input (squeeze-excite) produced in float; (b) a depthwise conv
    between float-only ops (HardSwish in and out); (c) a conv with under
    CHEAP_CONV_MACS_PER_OUTPUT MACs per output element whose output only feeds float-only
    ops. Measured on PP-OCR cls (1 thread): int8 QLinearConv depthwise runs in NHWC no
    faster than the fp32 NCHWc kernel, and the Q/DQ around such convs made the int8
    model 1.15-1.35x slower than fp32. Depthwise convs inside int8 chains (MobileNetV2,
    Relu6 folded) stay int8 (0.54x vs 0.60x float). Convs reading a float Add/Mul (PP-OCR
    rec's learnable affine after HardSwish) stay int8: kept float they made rec's CER
    worse (0.74 % -> 2.3-2.5 % on 64 rendered lines) for no speed; why is not known."""
    x = n.inputs[0]
    if n.op_type != "Conv" or x is None:
        return False
    shape = x.shape
    if x.name not in flow.avail and shape is not None and len(shape) >= 3 \
            and all(d == 1 for d in list(shape)[2:]):
        return True
    if not _feeds_only_float_ops(n.outputs[0]):
        return False
    group = n.attributes.get("group")
    group = group.value if group is not None else 1
    channels = shape[1] if shape is not None and len(shape) >= 2 else None
    producer = x.producer()
    if producer is not None and producer.op_type in ("Add", "Mul") and x.name not in flow.avail:
        return False  # PP-OCR rec: see the docstring
    if group > 1 and group == channels:
        return x.name not in flow.avail and producer is not None and _float_only(producer)
    weight = constant_array(n.inputs[1]) if len(n.inputs) > 1 else None
    return weight is not None and int(np.prod(weight.shape[1:])) < CHEAP_CONV_MACS_PER_OUTPUT


def _float_only(node: ir.Node) -> bool:
    """An op that onnxruntime has no int8 kernel or QDQ fusion for (HardSwish,
    HardSigmoid, Div...), as opposed to one that is float here only by position."""
    return not (node.op_type in COMPUTE_OPS or node.op_type in INT8_OPS
                or node.op_type in PASSTHROUGH_OPS or node.op_type in ("Relu", "Clip", "Concat"))


def _feeds_only_float_ops(value: ir.Value) -> bool:
    """Every reader of `value` (looking through Relu/Clip, which fold into a range) is a
    float-only op: an int8 output would only be dequantized again."""
    readers = list(value.uses())
    if not readers:
        return False
    for use in readers:
        node = use.node
        if node.op_type in ("Relu", "Clip"):
            if not _feeds_only_float_ops(node.outputs[0]):
                return False
        elif not _float_only(node):
            return False
    return True


@dataclass
class _Int8Flow:
    """The forward walk of `make_plan`: which values can be produced in int8 (`avail`),
    which of them are quantized on a one-sided range, which nodes run in int8 (`in_n`),
    and the folded Relu outputs (-> the quantized pre-Relu value)."""

    plan: QuantPlan
    opts: QuantizeOptions
    avail: set[str] = field(default_factory=set)
    one_sided: set[str] = field(default_factory=set)
    in_n: set[ir.Node] = field(default_factory=set)
    folded_alias: dict[str, str] = field(default_factory=dict)

    def visit(self, n: ir.Node, compute: bool) -> None:
        if compute:
            self.avail.update(o.name for o in n.outputs)
            return
        acts = [v for v in n.inputs if _is_activation(v)]
        if not acts:
            return
        if n.op_type in ("Relu", "Clip") and self.opts.fold_relu \
                and _foldable_relu(n, self.avail, self.in_n):
            self._fold_relu(n)
        elif n.op_type in PASSTHROUGH_OPS and n.inputs[0] is not None \
                and n.inputs[0].name in self.avail \
                and all(not _is_activation(v) for v in n.inputs[1:]):
            self._pass_through(n)
        elif n.op_type == "Concat" and all(v.name in self.avail for v in acts) \
                and len(acts) == len(n.inputs):
            self._concat(n, acts)
        elif self.opts.elementwise and n.op_type in INT8_OPS \
                and all(v.name in self.avail for v in acts):
            self._int8_op(n)

    def _fold_relu(self, n: ir.Node) -> None:
        x, y = n.inputs[0], n.outputs[0]
        self.plan.folded.append(n)
        self.folded_alias[y.name] = x.name
        self.one_sided.update((x.name, y.name))
        self.avail.add(y.name)
        self.plan.union(x.name, y.name)

    def _pass_through(self, n: ir.Node) -> None:
        self.in_n.add(n)
        self.plan.shared.append(n)
        for o in n.outputs:
            self.avail.add(o.name)
            self.plan.union(n.inputs[0].name, o.name)
            if n.inputs[0].name in self.one_sided and n.op_type != "Pad":
                self.one_sided.add(o.name)

    def _concat(self, n: ir.Node, acts: list[ir.Value]) -> None:
        self.in_n.add(n)
        self.plan.shared.append(n)
        sides = {v.name in self.one_sided for v in acts}
        out = n.outputs[0]
        self.avail.add(out.name)
        if len(sides) == 1:  # mixed one-sided / signed inputs keep separate scales
            for v in acts:
                self.plan.union(v.name, out.name)
            if True in sides:
                self.one_sided.add(out.name)

    def _int8_op(self, n: ir.Node) -> None:
        consts = [i for i, v in enumerate(n.inputs) if v is not None and not _is_activation(v)]
        if n.op_type in ("Add", "Mul") and consts:
            arr = constant_array(n.inputs[consts[0]])
            # A constant operand (e.g. a MatMul's bias) becomes a per-tensor
            # quantized initializer so the op still runs as QLinearAdd/QLinearMul.
            if len(consts) != 1 or arr is None or arr.dtype != np.float32 \
                    or not _const_fits_u8(arr):
                return
            self.plan.const_inputs.append((n, consts[0]))
        elif consts and n.op_type not in ("AveragePool", "GlobalAveragePool", "Sigmoid",
                                          "LeakyRelu"):
            return
        self.in_n.add(n)
        self.plan.int8_ops.append(n)
        self.avail.update(o.name for o in n.outputs)


def _needs_qdq(nodes: list[ir.Node], compute_set: set[ir.Node], opts: QuantizeOptions,
               plan: QuantPlan) -> set[str]:
    """The backward walk of `make_plan`: the values that need a Q/DQ pair."""
    needs: set[str] = set()
    folded_set = set(plan.folded)
    for n in reversed(nodes):
        if n in folded_set:
            needs.add(n.inputs[0].name)  # the Q of the pre-Relu value implements the Relu
            continue
        if n in compute_set or n in plan.int8_ops or (n in plan.shared and n.op_type == "Concat"):
            for v in n.inputs:
                if _is_activation(v):
                    needs.add(v.name)
            if n.op_type in ("Conv", "ConvTranspose") or n in plan.int8_ops:
                for o in n.outputs:
                    if not o.is_graph_output() or opts.quantize_outputs:
                        needs.add(o.name)
            continue
        if n in plan.shared and any(o.name in needs for o in n.outputs):
            needs.add(n.inputs[0].name)
    return needs


def _add_tensors(graph: ir.Graph, nodes: list[ir.Node], needs: set[str], flow: _Int8Flow,
                 plan: QuantPlan) -> None:
    """A `TensorQuant` in `plan.tensors` for every float value in `needs`."""
    values = {v.name: v for v in graph.inputs}
    for n in nodes:
        for o in n.outputs:
            values[o.name] = o
    for name in needs:
        if name in flow.folded_alias:  # quantized through its pre-relu value
            continue
        v = values.get(name)
        if v is None or not is_float(v):
            continue
        data = name
        # a folded relu's input is read after the relu (its quantized range is one-sided)
        for relu in plan.folded:
            if relu.inputs[0].name == name:
                data = relu.outputs[0].name
        plan.tensors[name] = TensorQuant(v, data, one_sided=name in flow.one_sided)


def _const_fits_u8(arr: np.ndarray, tol: float = 0.01) -> bool:
    """Whether a constant operand survives per-tensor 8-bit quantization (rel. L2 <= tol).

    A bias vector does; a per-channel scaling vector with a wide dynamic range (an
    inserted SmoothQuant Mul) does not, and then the op stays in float.
    """
    r = make_range(float(arr.min()), float(arr.max()), "u8", symmetric=False)
    norm = float(np.linalg.norm(arr))
    return norm == 0.0 or float(np.linalg.norm(r.fake_quant(arr) - arr)) <= tol * norm


def _clip_bound(n: ir.Node, index: int, attribute: str):
    """A Clip's bound: its input `index` when present, else the attribute (opset < 11)."""
    return (constant_array(n.inputs[index]) if len(n.inputs) > index and n.inputs[index] is not None
            else attr(n, attribute))


def _foldable_relu(n: ir.Node, avail: set[str], in_n: set[ir.Node]) -> bool:
    x, y = n.inputs[0], n.outputs[0]
    if x is None or x.name not in avail or y.is_graph_output() or x.is_graph_output():
        return False
    producer = x.producer()
    if producer is None or producer not in in_n or sole_consumer(x) is not n:
        return False
    if producer.op_type not in COMPUTE_OPS and producer.op_type not in INT8_OPS:
        return False
    if n.op_type == "Clip":
        lo = _clip_bound(n, 1, "min")
        if lo is None or float(np.asarray(lo)) != 0.0:
            return False
        # Clip(0, c) folds only if the calibrated max stays <= c (checked after calibration).
    return True


# ---------------------------------------------------------------- calibration


@dataclass
class Calibration:
    observers: dict[str, TensorObserver]  # by data tensor name
    channel: dict[str, ChannelMeanObserver]  # compute-node input stats (by value name)
    batches: int = 0
    seconds: float = 0.0


def _progress_batches(batches: Iterable[dict[str, np.ndarray]], total: int, label: str):
    """Yield batches; after 2 s a rich progress bar appears on stderr."""
    start = time.perf_counter()
    bar = None
    task = None
    try:
        for i, b in enumerate(batches):
            if bar is None and time.perf_counter() - start > 2.0:
                from rich.console import Console
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

                bar = Progress(label, BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                               console=Console(stderr=True), transient=True)
                bar.start()
                task = bar.add_task(label, total=total, completed=i)
            yield b
            if bar is not None:
                bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()


def calibrate(model: ir.Model, context: Any, names: Iterable[str], *, method: str,
              channel_inputs: dict[str, int] | None = None,
              limit: int | None = None) -> Calibration:
    """One streaming pass over the calibration data, filling observers."""
    names = sorted(set(names))
    channel_inputs = channel_inputs or {}
    all_names = sorted(set(names) | set(channel_inputs))
    observers = {n: TensorObserver(method) for n in names}
    channel: dict[str, ChannelMeanObserver] = {n: ChannelMeanObserver(a)
                                               for n, a in channel_inputs.items()}
    start = time.perf_counter()
    count = 0
    limit = limit or context.max_calibration_batches
    batches = _progress_batches(context.calibration_batches(limit), limit, "calibrating")
    if all_names:
        for acts in iter_activations(model, all_names, batches, threads=context.threads):
            for n in names:
                observers[n].add(acts[n])
            for n, obs in channel.items():
                obs.add(acts[n])
            count += 1
    else:
        for _ in batches:
            count += 1
    if count == 0:
        raise InputSpecError("quantize: the calibration source yielded no batches")
    return Calibration(observers, channel, count, time.perf_counter() - start)


def channel_axis_of_input(node: ir.Node) -> int:
    """Axis of the reduction (input-channel) dimension of a compute node's data input."""
    return 1 if node.op_type in ("Conv", "ConvTranspose") else -1


def bias_correction_inputs(plan: QuantPlan, opts: QuantizeOptions) -> dict[str, int]:
    """The compute-node inputs whose per-channel means bias correction needs (value name
    -> channel axis); none without `bias_correction`. A MatMul of two activations has no
    weight to correct."""
    inputs: dict[str, int] = {}
    if opts.bias_correction:
        for n in plan.compute:
            if n.op_type != "MatMul" or constant_array(n.inputs[1]) is not None:
                inputs[n.inputs[0].name] = channel_axis_of_input(n)
    return inputs


def resolve_ranges(plan: QuantPlan, calib: Calibration,
                   opts: QuantizeOptions) -> dict[str, QuantRange]:
    """Ranges per scale group (union of members' observed ranges), keyed by tensor name."""
    symmetric = opts.activations == "s8"
    out: dict[str, QuantRange] = {}
    for members in plan.groups().values():
        obs_list = [calib.observers[plan.tensors[m].data_name] for m in members
                    if plan.tensors[m].data_name in calib.observers]
        one_sided = any(plan.tensors[m].one_sided for m in members)
        merged = _merge_observers(obs_list, opts.calibration)
        if any(plan.tensors[m].value.is_graph_output() for m in members):
            # Never clip what the user reads: graph outputs use their full observed range.
            plain = TensorObserver("minmax")
            plain.min, plain.max = merged.min, merged.max
            merged = plain
        r = choose_range(merged, opts.activations, symmetric=symmetric, one_sided=one_sided,
                         percentile=opts.percentile)
        for m in members:
            out[m] = r
    return out


def _merge_observers(obs_list: list[TensorObserver], method: str) -> TensorObserver:
    if len(obs_list) == 1:
        return obs_list[0]
    merged = TensorObserver("minmax")
    for o in obs_list:
        merged.min, merged.max = min(merged.min, o.min), max(merged.max, o.max)
    if method != "minmax":
        # Union of histograms: take the observer with the widest span as the basis.
        base = max(obs_list, key=lambda o: (o.max - o.min) if o.seen else -1)
        merged.method, merged.hist = method, base.hist
    return merged


# ---------------------------------------------------------------- rewrite


class _Builder:
    """Creates Q/DQ nodes and quantized initializers on one graph."""

    def __init__(self, model: ir.Model, opts: QuantizeOptions):
        self.model = model
        self.graph = model.graph
        self.opts = opts
        self.opset = model.opset_imports.get("", 13)
        self.weight_cache: dict[tuple[int, int | None], tuple[ir.Value, np.ndarray]] = {}
        self.scale_cache: dict[tuple[float, int, str], tuple[ir.Value, ir.Value]] = {}
        self.qdq_pairs = 0
        self.dq_of: dict[str, ir.Value] = {}
        # names and new weights from the main graph (a BodyModel's graph is an If/Loop body)
        self.names = NameAllocator(getattr(model, "root_graph", self.graph))
        # node name -> (int8 codes, scales, dequantized) chosen by rounding=gptq
        self.rounded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def const(self, base: str, array: np.ndarray) -> ir.Value:
        return self.names.initializer(base, array)

    def dequantize(self, inputs: list[ir.Value], base: str,
                   attrs: dict[str, Any] | None = None) -> ir.Node:
        """DequantizeLinear `<base>_DequantizeLinear` -> `<base>_dequantized` (free names)."""
        dq = self.names.make_node("DequantizeLinear", inputs, attrs,
                                  name=f"{base}_DequantizeLinear",
                                  output_names=[f"{base}_dequantized"])
        dq.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        return dq

    def qparams(self, r: QuantRange) -> tuple[ir.Value, ir.Value]:
        key = (float(np.float32(r.scale)), int(r.zero_point), self.opts.activations)
        if key not in self.scale_cache:
            scale = self.const("qscale", np.array(r.scale, dtype=np.float32))
            zp_dtype = np.uint8 if self.opts.activations == "u8" else np.int8
            zp = self.const("qzp", np.array(r.zero_point, dtype=zp_dtype))
            self.scale_cache[key] = (scale, zp)
        return self.scale_cache[key]

    def quantize_tensor(self, value: ir.Value, r: QuantRange, replaces: list[ir.Value]) -> ir.Value:
        """Insert Q -> DQ after `value`; uses of `value` and of `replaces` read the DQ."""
        scale, zp = self.qparams(r)
        base = value.name
        q = self.names.make_node("QuantizeLinear", [value, scale, zp],
                                 name=f"{base}_QuantizeLinear",
                                 output_names=[f"{base}_quantized"])
        dq = self.dequantize([q.outputs[0], scale, zp], base)
        out = dq.outputs[0]
        out.shape = value.shape
        producer = value.producer()
        if producer is not None:
            self.graph.insert_after(producer, [q, dq])
        else:
            first = next(iter(self.graph), None)
            if first is None:
                self.graph.append(q)
                self.graph.append(dq)
            else:
                self.graph.insert_before(first, [q, dq])
        for v in [value, *replaces]:
            for use in v.uses():
                if use.node is q:
                    continue
                use.node.replace_input_with(use.idx, out)
        if value.is_graph_output():
            # The graph output keeps its name and now carries the dequantized value.
            for i, o in enumerate(self.graph.outputs):
                if o is value:
                    name = value.name
                    self.names.name_value(value, f"{name}_prequant")
                    out.name = name
                    self.graph.outputs[i] = out
        self.qdq_pairs += 1
        self.dq_of[value.name] = out
        return out

    def weight_dq(self, node: ir.Node, index: int, w: np.ndarray,
                  axis: int | None) -> tuple[ir.Value, np.ndarray]:
        """int8 symmetric weight + DQ before `node`; returns (DQ output, scales)."""
        if not self.opts.per_channel or self.opset < 13:
            axis = None
        src = node.inputs[index]
        key = (id(src), axis)
        if key in self.weight_cache and node.name not in self.rounded:
            return self.weight_cache[key]
        if node.name in self.rounded:
            q, scales, _ = self.rounded[node.name]
            src = None  # rounded for this node's inputs: not shared through the cache
        else:
            q, scales, _ = quantize_weight(w, axis, method=self.opts.weight_calibration)
        base = (src.name if src is not None else node.name) or node.name
        wq = self.const(f"{base}_quantized", q)
        if axis is None:
            s_val = self.const(f"{base}_scale", np.array(scales[0], dtype=np.float32))
            z_val = self.const(f"{base}_zero_point", np.array(0, dtype=np.int8))
            attrs: dict[str, Any] = {}
        else:
            s_val = self.const(f"{base}_scale", scales)
            z_val = self.const(f"{base}_zero_point", np.zeros(scales.size, dtype=np.int8))
            attrs = {"axis": axis}
        dq = self.dequantize([wq, s_val, z_val], base, attrs)
        self.graph.insert_before(node, dq)
        result = (dq.outputs[0], scales)
        if src is not None:
            self.weight_cache[key] = result
        return result

    def constant_dq(self, node: ir.Node, index: int, arr: np.ndarray, r: QuantRange) -> ir.Value:
        """A float constant operand of an int8 op as a per-tensor quantized initializer + DQ."""
        dtype = np.uint8 if self.opts.activations == "u8" else np.int8
        q = np.clip(np.round(arr / r.scale) + r.zero_point, r.qmin, r.qmax).astype(dtype)
        base = node.inputs[index].name or f"{node.name}_const"
        qv = self.const(f"{base}_quantized", q)
        scale, zp = self.qparams(r)
        dq = self.dequantize([qv, scale, zp], base)
        self.graph.insert_before(node, dq)
        return dq.outputs[0]

    def bias_dq(self, node: ir.Node, index: int, b: np.ndarray, bias_scale: np.ndarray) -> ir.Value:
        bias_scale = bias_scale.astype(np.float32)
        if bias_scale.size == 1 and b.size > 1:
            bias_scale = np.full(b.size, bias_scale.item(), dtype=np.float32)
        q = np.clip(np.round(b.astype(np.float64) / bias_scale.astype(np.float64)),
                    -(2**31 - 1), 2**31 - 1)
        src = node.inputs[index] if len(node.inputs) > index else None
        base = (src.name if src is not None else "") or f"{node.name}_bias"
        bq = self.const(f"{base}_quantized", q.astype(np.int32))
        if self.opset >= 13:
            s_val = self.const(f"{base}_scale", bias_scale)
            z_val = self.const(f"{base}_zero_point", np.zeros(b.size, dtype=np.int32))
            attrs = {"axis": 0}
        else:
            s_val = self.const(f"{base}_scale", np.array(bias_scale[0], np.float32))
            z_val = self.const(f"{base}_zero_point", np.array(0, dtype=np.int32))
            attrs = {}
        dq = self.dequantize([bq, s_val, z_val], base, attrs)
        self.graph.insert_before(node, dq)
        return dq.outputs[0]


@dataclass
class WeightRecord:
    """What was done to a compute node's weight (for bias correction and reports)."""

    node: ir.Node
    w: np.ndarray
    w_deq: np.ndarray
    axis: int | None
    input_scale: float | None


def apply_calibrated(model: ir.Model, plan: QuantPlan, calib: Calibration,
                     opts: QuantizeOptions, *,
                     rounded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                     ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """The calibrated ranges of `plan`, bias correction (when on) and the QDQ rewrite:
    (`apply_plan`'s counters, the bias shift per corrected node). `rounded` holds the
    weights rounding=gptq chose (node name -> int8 codes, scales, dequantized)."""
    ranges = resolve_ranges(plan, calib, opts)
    shifts: dict[str, np.ndarray] = {}
    rounded = rounded or {}
    if opts.bias_correction:
        shifts = analytic_bias_shifts(plan.compute, calib.channel, per_channel=opts.per_channel,
                                      method=opts.weight_calibration,
                                      dequantized={k: v[2] for k, v in rounded.items()})
    return apply_plan(model, plan, ranges, opts, bias_shift=shifts, rounded=rounded), shifts


def _clamp_folded_clips(plan: QuantPlan, ranges: dict[str, QuantRange],
                        opts: QuantizeOptions) -> None:
    """Folded Clip(0, c) whose calibrated max exceeds c: its scale group's range (in
    `ranges`, for every member) becomes [0, c]."""
    for n in list(plan.folded):
        if n.op_type == "Clip":
            hi = _clip_bound(n, 2, "max")
            r = ranges.get(n.inputs[0].name)
            if (r is not None and hi is not None
                    and r.scale * (r.qmax - r.zero_point) > float(np.asarray(hi)) + 1e-6):
                # Quantize on [0, c] exactly: the Q clamp at the grid top is then the clip.
                c = float(np.asarray(hi))
                new = make_range(0.0, c, opts.activations, symmetric=opts.activations == "s8",
                                 one_sided=True)
                for name, rr in list(ranges.items()):
                    if rr is r:
                        ranges[name] = new


def apply_plan(model: ir.Model, plan: QuantPlan, ranges: dict[str, QuantRange],
               opts: QuantizeOptions, *,
               bias_shift: dict[str, np.ndarray] | None = None,
               rounded: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
               ) -> dict[str, Any]:
    """Rewrite the graph per `plan` with calibrated `ranges`; returns counters."""
    graph = model.graph
    if model.opset_imports.get("", 13) < 10:
        raise InputSpecError("quantize: the model's opset is < 10 (no QuantizeLinear); "
                             "convert it first")
    builder = _Builder(model, opts)
    builder.rounded = rounded or {}
    bias_shift = bias_shift or {}
    stats: dict[str, Any] = {"weights_quantized": 0, "bias_int32": 0}
    _clamp_folded_clips(plan, ranges, opts)
    # Remove folded relus: their outputs become aliases of the pre-relu value.
    relu_alias: dict[str, list[ir.Value]] = {}
    for n in plan.folded:
        relu_alias.setdefault(n.inputs[0].name, []).append(n.outputs[0])
    for n in plan.folded:
        if n.inputs[0].name in ranges:
            ranges.setdefault(n.outputs[0].name, ranges[n.inputs[0].name])
    # Input scale of each compute node (needed for bias) before rewiring.
    input_range = {}
    for n in plan.compute:
        x = n.inputs[0]
        input_range[n.name] = ranges.get(x.name) if x is not None else None
    for name, tq in plan.tensors.items():
        builder.quantize_tensor(tq.value, ranges[name], relu_alias.get(name, []))
    for n in plan.folded:
        graph.remove(n, safe=True)
    for n, idx in plan.const_inputs:
        arr = constant_array(n.inputs[idx])
        r = make_range(float(arr.min()), float(arr.max()), opts.activations,
                       symmetric=opts.activations == "s8")
        n.replace_input_with(idx, builder.constant_dq(n, idx, arr, r))
    records = []
    for n in plan.compute:
        rec = _quantize_compute(builder, n, input_range.get(n.name), bias_shift.get(n.name), stats)
        if rec is not None:
            records.append(rec)
    remove_unused(model)
    stats["qdq_pairs"] = builder.qdq_pairs
    stats["records"] = records
    return stats


def _quantize_compute(builder: _Builder, n: ir.Node, r_in: QuantRange | None,
                      shift: np.ndarray | None, stats: dict[str, Any]) -> WeightRecord | None:
    if n.op_type == "MatMul" and constant_array(n.inputs[1]) is None:
        return None  # two activations: both inputs were quantized as tensors
    w = constant_array(n.inputs[1])
    assert w is not None
    axis = weight_axis(n, w)
    dq, scales = builder.weight_dq(n, 1, w, axis)
    n.replace_input_with(1, dq)
    stats["weights_quantized"] += 1
    eff_axis = axis if builder.opts.per_channel and builder.opset >= 13 else None
    if n.name in builder.rounded:
        w_deq = builder.rounded[n.name][2]
    else:
        _, _, w_deq = quantize_weight(w, eff_axis, method=builder.opts.weight_calibration)
    if n.op_type in ("Conv", "ConvTranspose", "Gemm"):
        cout = output_channels(n, w)
        has_bias = len(n.inputs) > 2 and n.inputs[2] is not None
        b = constant_array(n.inputs[2]) if has_bias else np.zeros(cout, dtype=np.float32)
        if b is not None and b.dtype == np.float32 and b.size == cout and r_in is not None \
                and (b.ndim == 1 or (b.ndim == 2 and b.shape[0] == 1)):
            b = b.reshape(-1).astype(np.float64)
            if shift is not None:
                b = b - shift
            s_w = scales if scales.size == cout else np.full(cout, scales[0], dtype=np.float32)
            bias_scale = np.float32(r_in.scale) * s_w.astype(np.float32)
            if len(n.inputs) < 3:
                n.resize_inputs(3)
            n.replace_input_with(2, builder.bias_dq(n, 2, b, bias_scale))
            stats["bias_int32"] += 1
        elif b is not None and has_bias and shift is not None and b.size == cout:
            new_b = (b.reshape(-1) - shift).astype(np.float32).reshape(b.shape)
            n.replace_input_with(2, builder.const(f"{n.name}_bias_corrected", new_b))
    return WeightRecord(n, w, w_deq, eff_axis, r_in.scale if r_in is not None else None)


# ---------------------------------------------------------------- shared by the modes


def quantize_embeddings(model: ir.Model, keep: set[str] | None = None, *,
                        min_size: int = 4096) -> int:
    """Gather(table, ids) with a constant float32 2-D table (axis 0) ==>
    Cast<float>(Gather(table_int8, ids)) * Unsqueeze(Gather(row_scales, ids), -1).

    Symmetric int8 per row; dequantizing after the Gather keeps the run-time cost at
    the gathered rows (an embedding table is read a few rows at a time). Exact with
    respect to DequantizeLinear(table) -> Gather. Tables under `min_size` elements stay.
    """
    graph = model.graph
    keep = keep or set()
    count = 0
    cache: dict[int, tuple[ir.Value, ir.Value]] = {}
    names = NameAllocator(graph)
    for n in list(graph):
        if n.op_type != "Gather" or n.name in keep or int(attr(n, "axis", 0)) != 0:
            continue
        table = constant_array(n.inputs[0])
        if table is None or table.dtype != np.float32 or table.ndim != 2 or table.size < min_size:
            continue
        key = id(n.inputs[0])
        if key not in cache:
            q, scales, _ = quantize_weight(table, 0)
            base = n.inputs[0].name or n.name
            cache[key] = (names.initializer(f"{base}_quantized", q),
                          names.initializer(f"{base}_row_scale", scales))
        qv, sv = cache[key]
        ids = n.inputs[1]
        g_rows = names.make_node("Gather", [qv, ids], {"axis": 0}, name=f"{n.name}_int8")
        cast = names.make_node("Cast", [g_rows.outputs[0]], {"to": int(ir.DataType.FLOAT)},
                               name=f"{n.name}_cast")
        g_scale = names.make_node("Gather", [sv, ids], {"axis": 0}, name=f"{n.name}_scales")
        axes = names.initializer(f"{n.name}_axes", np.array([-1], dtype=np.int64))
        unsq = names.make_node("Unsqueeze", [g_scale.outputs[0], axes],
                               name=f"{n.name}_scales_unsq")
        mul = names.make_node("Mul", [cast.outputs[0], unsq.outputs[0]], name=f"{n.name}_dequant")
        cast.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        y = n.outputs[0]
        out = mul.outputs[0]
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), y.shape
        graph.insert_before(n, [g_rows, cast, g_scale, unsq, mul])
        bypass(y, out)
        graph.remove(n, safe=True)
        count += 1
    if count:
        remove_unused(model)
    return count


def weight_bytes(model: ir.Model) -> int:
    """Bytes of the initializers and Constant-node values, subgraphs included."""
    total = 0
    graphs = [model.graph, *(g for n in ir.traversal.RecursiveGraphIterator(model.graph)
                             for a in n.attributes.values() if isinstance(a, ir.Attr)
                             for g in ([a.value] if a.type == ir.AttributeType.GRAPH else
                                       a.value if a.type == ir.AttributeType.GRAPHS else []))]
    for v in (v for g in graphs for v in g.initializers.values()):
        if v.const_value is not None:
            total += int(v.const_value.nbytes)
    for n in ir.traversal.RecursiveGraphIterator(model.graph):
        if n.op_type == "Constant":
            arr = constant_array(n.outputs[0])
            if arr is not None:
                total += int(arr.nbytes)
    return total

