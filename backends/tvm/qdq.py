"""QDQ -> integer compute: quantized convolutions and matmuls run on int8 data.

TVM's ONNX importer turns a QDQ model into float fake-quantization: every quantized
conv reads ``dequantize(x_q)`` and ``dequantize(W_q)`` and computes in float. This
Relax rewrite (run on the imported module, before legalization) makes the contraction
itself integer, for each ``conv2d`` (NCHW/OIHW, any groups) and ``matmul`` with a 2-D
weight whose operands are

- the activation: ``dequantize(x_q, s_x, z_x)`` with one scale and zero point (u8 or s8);
- the weight: a constant ``dequantize(W_q, s_w, 0)`` in int8, per-tensor or per output
  channel (a ``permute_dims`` of it for Gemm's ``transB``), with zero point 0.

Rewrite (exact in integers, float only in the scale)::

    acc = conv2d(x_q', W_q, out_dtype=int32)        # u8/s8 x s8, int32 accumulation
    acc = acc - z_x * sum(W_q over each output channel's window)   # when z_x != 0
    y   = float(acc) * (s_x * s_w[oc])

``x_q'`` is ``x_q`` padded with ``z_x`` (the quantized zero) when the conv pads and
``z_x != 0``, so the border terms cancel exactly; a conv whose input channels are not a
multiple of 4 (an RGB stem) gets zero weights and a padded channel so that the dot-
product kernels take it; on a target with a dot-product instruction, output channels
above one vector are padded with zero weights to a multiple of its lanes (16 for VNNI)
and the accumulator sliced back, so 24-channel layers run on the dot kernel too.
Everything after the contraction (bias, activation, the next ``quantize``) is left as it
is: FuseOps folds the cast, scale, bias, activation and quantize into the contraction's
epilogue, so each layer is one kernel that reads int8 and writes int8 ("requantize with
a float scale"), and the next layer reads that int8 tensor directly. Chains stay int8
between layers; only the model's float inputs/outputs and float islands convert.

``quantize`` with one constant scale is rewritten too: multiply by ``1/scale`` instead
of a divide (round half to even, clip, cast), the cheapest form of the requantize that
ends every quantized layer.

Results agree with onnxruntime on the same QDQ file to within one quantization step
per element: the integer sum is exact; float rounding of the scale and bias can move a
value that lies on a rounding boundary by one step.

What stays float is counted with its reason (``IntegerReport``): weights with a
non-zero zero point (the correction would need a data-dependent window sum), uint8 or
non-constant weights, activations quantized per channel, other layouts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import ir, relax

from .relax_util import rewrite_functions

_CONTRACTIONS = {"relax.nn.conv2d": "conv2d", "relax.matmul": "matmul"}
DOT_REDUCE = 4  # int8 products one dot-product instruction sums (VNNI, ARM sdot/udot)


@dataclass
class IntegerReport:
    """What the rewrite made integer and what stayed float, and why."""

    integer: Counter = field(default_factory=Counter)  # op -> count
    float_ops: Counter = field(default_factory=Counter)  # (op, reason) -> count

    def as_dict(self) -> dict:
        return {
            "integer_ops": dict(self.integer),
            "integer_total": sum(self.integer.values()),
            "float_ops": [
                {"op": op, "reason": reason, "count": n}
                for (op, reason), n in sorted(self.float_ops.items())
            ],
            "float_total": sum(self.float_ops.values()),
        }


def quantize_elementwise(x, scale: float, zero: float, dtype: str) -> relax.Expr:
    """``QuantizeLinear`` with one scale as elementwise Relax ops (they fuse into the
    producing kernel's epilogue, and layout conversion moves through them): multiply by
    1/scale instead of a divide (the divide is the slowest instruction of every
    requantizing epilogue; efficientnet_b0's depthwise+SiLU kernels ~25 % faster), round
    half to even as ONNX does, add the zero point, clip, cast."""
    info = np.iinfo(dtype)
    inverse = float(np.float32(1) / np.float32(scale))
    value = relax.op.round(relax.op.multiply(x, relax.const(inverse, "float32")))
    if zero != 0:
        value = relax.op.add(value, relax.const(zero, "float32"))
    value = relax.op.minimum(value, relax.const(float(info.max), "float32"))
    return relax.op.astype(relax.op.maximum(value, relax.const(float(info.min), "float32")),
                           dtype)


class _StaysFloat(Exception):
    """Raised with the reason a quantized contraction keeps its float form."""


def constant_value(expr) -> np.ndarray | None:
    """The value of a Relax constant, or None for anything else."""
    if isinstance(expr, ir.expr.Constant):
        return expr.value.numpy()
    return None


def _scalar(values: np.ndarray | None, what: str):
    if values is None:
        raise _StaysFloat(f"{what} is not a constant")
    if values.size != 1:
        raise _StaysFloat(f"{what} is per channel")
    return values.reshape(())


@relax.expr_functor.mutator
class _IntegerContractions(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule, signed_activations: bool, channel_multiple: int):
        super().__init__(mod)
        self.report = IntegerReport()
        self.signed_activations = signed_activations
        self.channel_multiple = channel_multiple

    def _binding(self, expr):
        """The call a dataflow var is bound to (or the expression itself)."""
        if isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is not None:
                return bound
        return expr

    def _dequantize(self, expr):
        call = self._binding(expr)
        if isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.dequantize":
            return call
        return None

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if getattr(call.op, "name", "") == "relax.quantize":
            return self._quantize(call)
        op = _CONTRACTIONS.get(getattr(call.op, "name", ""))
        if op is None or len(call.args) < 2:
            return call
        x_dq = self._dequantize(call.args[0])
        if x_dq is None and self._weight_dequantize(call.args[1]) is None:
            return call  # a float contraction: not quantized, not counted
        try:
            if x_dq is None:
                raise _StaysFloat("the activation is not dequantized int8")
            new = (self._conv2d if op == "conv2d" else self._matmul)(call, x_dq)
        except _StaysFloat as why:
            self.report.float_ops[(op, str(why))] += 1
            return call
        self.report.integer[op] += 1
        return new

    def _quantize(self, call):
        """quantize with one constant scale -> ``quantize_elementwise``."""
        scale, zero = constant_value(call.args[1]), constant_value(call.args[2])
        dtype = str(call.attrs.out_dtype)
        if scale is None or zero is None or scale.size != 1 or zero.size != 1 \
                or dtype not in ("uint8", "int8") or str(call.args[0].ty.dtype) != "float32":
            return call
        return quantize_elementwise(call.args[0], float(scale.reshape(())),
                                    float(zero.reshape(())), dtype)

    def _weight_dequantize(self, expr):
        """dequantize(W) or permute_dims(dequantize(W)) -> (dequantize call, axes or None)."""
        dq = self._dequantize(expr)
        if dq is not None:
            return dq, None
        call = self._binding(expr)
        if isinstance(call, relax.Call) and getattr(call.op, "name", "") == "relax.permute_dims":
            dq = self._dequantize(call.args[0])
            if dq is not None:
                axes = call.attrs.axes
                return dq, None if axes is None else [int(a) for a in axes]
        return None

    def _activation(self, x_dq) -> tuple[relax.Expr, float, int]:
        x_q = x_dq.args[0]
        dtype = str(x_q.ty.dtype)
        if dtype not in ("uint8", "int8"):
            raise _StaysFloat(f"the activation is {dtype}, not 8-bit")
        scale = float(_scalar(constant_value(x_dq.args[1]), "the activation scale"))
        zero = int(_scalar(constant_value(x_dq.args[2]), "the activation zero point"))
        if self.signed_activations and dtype == "uint8":
            # x - 128 in int8, zero point - 128: the same real values (ARM sdot is s8 x s8)
            shifted = relax.op.subtract(relax.op.astype(x_q, "int32"), relax.const(128, "int32"))
            x_q = self.builder_.emit(relax.op.astype(shifted, "int8"))
            zero -= 128
        return x_q, scale, zero

    def _weight(self, w_expr) -> tuple[np.ndarray, np.ndarray, list[int] | None, int]:
        """(W_q int8, scale per element of the quantization axis or scalar, axes, axis)."""
        found = self._weight_dequantize(w_expr)
        if found is None:
            raise _StaysFloat("the weight is not a dequantized constant")
        dq, axes = found
        w_q = constant_value(dq.args[0])
        if w_q is None:
            raise _StaysFloat("the weight is not a constant")
        if w_q.dtype != np.int8:
            raise _StaysFloat(f"the weight is {w_q.dtype}, not int8")
        zero = constant_value(dq.args[2])
        if zero is None or np.any(zero != 0):
            raise _StaysFloat("the weight has a non-zero zero point")
        scale = constant_value(dq.args[1])
        if scale is None:
            raise _StaysFloat("the weight scale is not a constant")
        axis = int(dq.attrs.axis) % max(w_q.ndim, 1)
        return w_q, scale.astype(np.float32).reshape(-1), axes, axis

    def _conv2d(self, call, x_dq):
        attrs = call.attrs
        if (attrs.data_layout, attrs.kernel_layout) != ("NCHW", "OIHW"):
            raise _StaysFloat(f"layout {attrs.data_layout}/{attrs.kernel_layout}")
        if attrs.out_layout not in (None, "", "NCHW"):
            raise _StaysFloat(f"output layout {attrs.out_layout}")
        x_q, s_x, z_x = self._activation(x_dq)
        w_q, s_w, axes, axis = self._weight(call.args[1])
        if axes is not None or w_q.ndim != 4:
            raise _StaysFloat("the weight is transposed")
        out_channels = w_q.shape[0]
        if s_w.size not in (1, out_channels) or (s_w.size > 1 and axis != 0):
            raise _StaysFloat("the weight is quantized along an input axis")
        padding = [int(p) for p in attrs.padding]
        bb = self.builder_
        # a dot-product instruction sums 4 input channels: pad a stem's 3 channels to 4
        # (zero weights, so the padded channel's value does not matter)
        extra = (-w_q.shape[1]) % DOT_REDUCE if int(attrs.groups) == 1 else 0
        if extra:
            w_q = np.pad(w_q, [(0, 0), (0, extra), (0, 0), (0, 0)])
        # the dot-product kernels compute whole vectors of output channels: pad a layer
        # with, say, 24 (zero weights), compute 32, and slice the 24 off the accumulator.
        # Not below one vector: mostly padding, and a 1-channel slice with a 1-pixel
        # row tile failed TVM's vectorizer (fuzzer find)
        more = (-out_channels) % self.channel_multiple \
            if int(attrs.groups) == 1 and out_channels > self.channel_multiple else 0
        if more:
            w_q = np.pad(w_q, [(0, more), (0, 0), (0, 0), (0, 0)])
        if extra or (z_x != 0 and any(padding)):
            top, left, bottom, right = padding if z_x != 0 else (0, 0, 0, 0)
            x_q = bb.emit(relax.op.nn.pad(
                x_q, [0, 0, 0, extra, top, bottom, left, right], pad_value=float(z_x)))
            padding = [0, 0, 0, 0] if z_x != 0 else padding
        acc = bb.emit(relax.op.nn.conv2d(
            x_q, relax.const(w_q), strides=attrs.strides, padding=padding,
            dilation=attrs.dilation, groups=int(attrs.groups), out_dtype="int32"))
        if more:
            acc = bb.emit(relax.op.strided_slice(acc, axes=[1], begin=[0], end=[out_channels]))
            w_q = w_q[:out_channels]
        channel = (1, out_channels, 1, 1)
        if z_x != 0:
            sums = w_q.astype(np.int64).reshape(out_channels, -1).sum(axis=1)
            acc = bb.emit(relax.op.subtract(
                acc, relax.const((z_x * sums).astype(np.int32).reshape(channel))))
        scale = np.broadcast_to(np.float32(s_x) * s_w, (out_channels,)).reshape(channel)
        return relax.op.multiply(relax.op.astype(acc, "float32"),
                                 relax.const(scale.astype(np.float32)))

    def _matmul(self, call, x_dq):
        if call.attrs.out_dtype not in (None, "", "float32", "void"):
            raise _StaysFloat(f"output dtype {call.attrs.out_dtype}")
        x_q, s_x, z_x = self._activation(x_dq)
        w_q, s_w, axes, axis = self._weight(call.args[1])
        if w_q.ndim != 2:
            raise _StaysFloat(f"the weight has rank {w_q.ndim}")
        if axes not in (None, [1, 0]):
            raise _StaysFloat(f"the weight is permuted by {axes}")
        # the effective (K, N) weight and which of its axes carries the scale
        w_kn = w_q.T if axes == [1, 0] else w_q
        scale_axis = 1 - axis if axes == [1, 0] else axis
        columns = w_kn.shape[1]
        if s_w.size > 1 and scale_axis != 1:
            raise _StaysFloat("the weight is quantized along the reduction axis")
        bb = self.builder_
        acc = bb.emit(relax.op.matmul(
            x_q, relax.const(np.ascontiguousarray(w_kn)), out_dtype="int32"))
        if z_x != 0:
            sums = w_kn.astype(np.int64).sum(axis=0)
            acc = bb.emit(relax.op.subtract(acc, relax.const((z_x * sums).astype(np.int32))))
        scale = np.broadcast_to(np.float32(s_x) * s_w, (columns,)).astype(np.float32)
        return relax.op.multiply(relax.op.astype(acc, "float32"), relax.const(scale))


def integer_contractions(mod: tvm.IRModule, signed_activations: bool = False,
                         channel_multiple: int = 1) -> tuple[tvm.IRModule, IntegerReport]:
    """Rewrite the quantized conv2d/matmul calls of every Relax function to integer
    compute; returns the module and what was rewritten or left float.
    `signed_activations`: give the contractions s8 activations (u8 ones shifted by -128),
    for dot-product instructions that multiply s8 x s8. `channel_multiple`: pad a
    one-group conv's output channels to a multiple of it (the dot instruction's lanes)."""
    mutator = _IntegerContractions(mod, signed_activations, channel_multiple)
    mod = rewrite_functions(mutator, mod)
    # the float dequantize of an int8 weight is dead once its only user is integer
    mod = relax.transform.DeadCodeElimination()(mod)
    return mod, mutator.report
