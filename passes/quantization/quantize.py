"""`quantize`: post-training quantization to standard QDQ ONNX, one module per mode.

  mode=int8     static INT8 QDQ from calibration data (static.py; the rewrite rules
                are in core.py)
  mode=dynamic  int8 weights, activations quantized at run time (dynamic.py)
  mode=fp16     weights and compute in float16 (fp16.py)
  mode=mixed    per-layer int8 / fp16 / fp32 under an error budget (mixed.py)

Every mode adds the weight bytes before and after, and their ratio, to the stats.
"""

from __future__ import annotations

import onnx_ir as ir

from ..base import ForgePass, register
from .core import QuantizeOptions, weight_bytes
from .dynamic import quantize_dynamic
from .fp16 import convert_fp16
from .mixed import quantize_mixed
from .static import quantize_int8


@register
class QuantizePass(ForgePass):
    """Post-training quantization: int8 QDQ (static), dynamic int8, fp16, or mixed."""

    name = "quantize"
    summary = "INT8 QDQ post-training quantization (static/dynamic), fp16, mixed precision"
    exact = False
    Options = QuantizeOptions
    positional = ("mode",)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts: QuantizeOptions = self.options
        before = weight_bytes(model)
        if opts.mode == "int8":
            quantize_int8(model, opts, self.context, self.stats)
        elif opts.mode == "dynamic":
            self.stats.update(quantize_dynamic(model, opts))
        elif opts.mode == "fp16":
            self.stats.update(convert_fp16(model, opts))
        elif opts.mode == "mixed":
            self.stats.update(quantize_mixed(model, opts, self.context))
        after = weight_bytes(model)
        self.stats["weight_bytes_before"] = before
        self.stats["weight_bytes_after"] = after
        self.stats["size_ratio"] = round(before / after, 3) if after else None
        return ir.passes.PassResult(model, modified=True)
