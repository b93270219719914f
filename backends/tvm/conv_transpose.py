"""A ConvTranspose whose kernel equals its stride is a 1x1 conv and a pixel shuffle.

With kernel == stride (and no padding, output padding, dilation or groups) the output
windows do not overlap: ``y[n, o, y*s + i, x*s + j] = sum_c x[n, c, y, x] * w[c, o, i, j]``,
a 1x1 conv to ``o*s*s + i*s + j`` channels followed by a pixel shuffle. TVM 0.27
legalizes ``conv2d_transpose`` as a convolution over the input dilated with zeros
(s*s times the multiply-adds, 3/4 of them by zero for s = 2) and has no fast schedule for
it: PP-OCRv4 det's two 2x2/stride-2 upsampling layers took 22 of its 58 ms (int8 build,
1 thread). The rewrite is exact (the same products and sums, in another order).
"""

from __future__ import annotations

import tvm
from tvm import relax

from .relax_util import rewrite_functions, static_shape


def _as_conv_and_shuffle(call) -> relax.Expr | None:
    attrs = call.attrs
    weight, data = static_shape(call.args[1]), static_shape(call.args[0])
    if weight is None or data is None or len(weight) != 4 or len(data) != 4:
        return None
    in_channels, out_channels, kh, kw = weight
    strides = [int(s) for s in attrs.strides]
    if (attrs.data_layout, attrs.kernel_layout) != ("NCHW", "IOHW") \
            or attrs.out_layout not in (None, "", "NCHW") or int(attrs.groups) != 1 \
            or any(int(p) for p in attrs.padding) or any(int(p) for p in attrs.output_padding) \
            or any(int(d) != 1 for d in attrs.dilation) or strides != [kh, kw] or kh != kw \
            or kh < 2:
        return None
    s = kh
    w = relax.op.reshape(relax.op.permute_dims(call.args[1], [1, 2, 3, 0]),
                         [out_channels * s * s, in_channels, 1, 1])
    out_dtype = attrs.out_dtype if str(attrs.out_dtype) not in ("", "void") else None
    y = relax.op.nn.conv2d(call.args[0], w, out_dtype=out_dtype)
    # the pixel shuffle as reshape / permute (TVM 0.27's nn.pixel_shuffle does not legalize)
    n, _, h, wd = data
    y = relax.op.reshape(y, [n, out_channels, s, s, h, wd])
    y = relax.op.permute_dims(y, [0, 1, 4, 2, 5, 3])
    return relax.op.reshape(y, [n, out_channels, h * s, wd * s])


@relax.expr_functor.mutator
class _ConvTransposeAsConv(relax.PyExprMutator):
    def __init__(self, mod: tvm.IRModule):
        super().__init__(mod)
        self.rewritten = 0

    def visit_call_(self, call):
        call = self.visit_expr_post_order(call)
        if getattr(call.op, "name", "") != "relax.nn.conv2d_transpose":
            return call
        new = _as_conv_and_shuffle(call)
        if new is None:
            return call
        self.rewritten += 1
        return new


def conv_transpose_as_conv(mod: tvm.IRModule) -> tuple[tvm.IRModule, int]:
    """(module, how many conv2d_transpose became conv2d + pixel_shuffle)."""
    mutator = _ConvTransposeAsConv(mod)
    return rewrite_functions(mutator, mod), mutator.rewritten
