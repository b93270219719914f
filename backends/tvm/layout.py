"""Channels-last (NHWC) for integer conv nets on CPU.

The int8 dot-product kernels (``kernels/rule_int8``) want NHWC: four input channels of
one pixel are one 32-bit broadcast, sixteen output channels one vector. With the model
in ONNX's NCHW every integer conv has to transpose its input into NHWC and its
accumulator back to NCHW, element by element; on layers with large feature maps and few
channels those two transposes cost more than the dot products (mobilenet_v2's 16->96
1x1 conv at 112x112: ~1 ms, of which the dot products are ~0.1 ms). onnxruntime makes
the same choice for its integer convs (its NHWC transformer).

``channels_last`` converts the whole Relax module with TVM's ``ConvertLayout``: conv2d
to NHWC/OHWI; pooling, concat, mean and the elementwise ops between them follow, so
one ``permute_dims`` is left at the model's NCHW input and one where a tensor leaves the
4-D world (a flatten, a reshape). ``ConvertLayout`` cannot see through ``dequantize`` /
``quantize``; those with one constant scale and zero point are first written as the
elementwise ops they are (``(float(x) - z) * s`` and ``clip(round(x / s) + z)`` with
round half to even, as ONNX) so the layout flows through every quantized layer.

It applies when the integer convs hold all but ``FLOAT_CONV_SHARE`` of the conv MACs: a
float conv in NHWC runs on schedules written for NCHW, which is fine for the cheap convs
``quantize`` keeps float but not for a model that is mostly float. The caller says which
in the compile report.
"""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from .qdq import constant_value, quantize_elementwise
from .relax_util import rewrite_functions, static_shape

# pooling, elementwise ops, concat and mean follow their input's layout. conv2d_transpose
# would follow too, but TVM 0.27 legalizes it in NCHW only (an NHWC one fails the build:
# found by the int8 fuzzer): it keeps NCHW, with a transpose on each side.
CHANNELS_LAST = {"relax.nn.conv2d": ["NHWC", "OHWI"],
                 "relax.nn.conv2d_transpose": ["NCHW", "IOHW"]}


def _calls(mod: tvm.IRModule, op_name: str) -> list:
    found = []

    @relax.expr_functor.visitor
    class _Find(relax.PyExprVisitor):
        def visit_call_(self, call):
            if getattr(call.op, "name", "") == op_name:
                found.append(call)
            for arg in call.args:
                self.visit_expr(arg)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            _Find().visit_expr(func)
    return found


# Float convs may hold at most this share of the conv MACs for the model to go NHWC: they
# run there too, on schedules written for NCHW. The ones `quantize` keeps float by default
# (squeeze-excite 1x1 convs, depthwise convs between HardSwish: cheap in ORT's float) are a
# few percent; PP-OCRv4 rec with its 4 such convs ran 0.79x ORT int8 in NHWC against 1.14x
# in NCHW (1 thread, one process).
FLOAT_CONV_SHARE = 0.1


def _macs(call) -> int:
    """Multiply-accumulates of an NCHW/OIHW conv2d call with static shapes (0 if not)."""
    out, weight = static_shape(call), static_shape(call.args[1])
    if out is None or weight is None:
        return 0
    return int(np.prod(out)) * int(np.prod(weight[1:]))


def _float_convs(mod: tvm.IRModule) -> tuple[list, list, float]:
    """(conv2d calls, the float ones, their share of the conv MACs)."""
    convs = _calls(mod, "relax.nn.conv2d")
    floats = [c for c in convs if str(c.attrs.out_dtype) != "int32"]
    total = sum(_macs(c) for c in convs)
    share = sum(_macs(c) for c in floats) / total if total else float(bool(floats))
    return convs, floats, share


def layout_decision(mod: tvm.IRModule) -> tuple[bool, str]:
    """(go NHWC?, the layout as compile's report states it)."""
    convs = _calls(mod, "relax.nn.conv2d")
    if not convs:
        return False, "NCHW (no conv2d)"
    if any(c.attrs.data_layout != "NCHW" for c in convs):
        return False, "NCHW (a conv2d is not NCHW)"
    floats = [c for c in convs if str(c.attrs.out_dtype) != "int32"]
    if not floats:
        return True, "NHWC"
    total = sum(_macs(c) for c in convs)
    share = sum(_macs(c) for c in floats) / total if total else 1.0
    if len(floats) == len(convs) or share > FLOAT_CONV_SHARE:
        return False, (f"NCHW ({len(floats)} of {len(convs)} conv2d compute in float, "
                       f"{share:.0%} of the conv MACs)")
    return True, f"NHWC ({len(floats)} float conv2d, {share:.0%} of the conv MACs, run NHWC too)"


def _per_tensor(call) -> tuple[float, float] | None:
    """(scale, zero point) of a (de)quantize with one constant scale and zero point."""
    scale, zero = constant_value(call.args[1]), constant_value(call.args[2])
    if scale is None or zero is None or scale.size != 1 or zero.size != 1:
        return None
    return float(scale.reshape(())), float(zero.reshape(()))


@relax.expr_functor.mutator
class _ElementwiseQDQ(relax.PyExprMutator):
    """Per-tensor (de)quantize -> the elementwise ops ConvertLayout can move through."""

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        name = getattr(call.op, "name", "")
        if name not in ("relax.dequantize", "relax.quantize"):
            return call
        found = _per_tensor(call)
        if found is None:
            return call
        scale, zero = found
        x = call.args[0]
        if name == "relax.dequantize":
            if str(call.attrs.out_dtype) != "float32":
                return call
            value = relax.op.astype(x, "float32")
            if zero != 0:
                value = relax.op.subtract(value, relax.const(zero, "float32"))
            return relax.op.multiply(value, relax.const(scale, "float32"))
        dtype = str(call.attrs.out_dtype)
        if dtype not in ("uint8", "int8") or str(x.ty.dtype) != "float32":
            return call
        return quantize_elementwise(x, scale, zero, dtype)


def elementwise_qdq(mod: tvm.IRModule) -> tvm.IRModule:
    mutator = _ElementwiseQDQ(mod)
    return rewrite_functions(mutator, mod)


def channels_last(mod: tvm.IRModule) -> tuple[tvm.IRModule, str]:
    """(module converted to NHWC, or unchanged; the layout as the report states it, with
    the reason when it stays NCHW)."""
    nhwc, layout = layout_decision(mod)
    if not nhwc:
        return mod, layout
    mod = elementwise_qdq(mod)
    mod = relax.transform.ConvertLayout(CHANNELS_LAST)(mod)
    # the weights and per-channel constants permuted to OHWI / [1,1,1,C] are constants
    mod = relax.transform.FoldConstant()(mod)
    return mod, layout
