"""`quantize`: post-training quantization to standard QDQ ONNX, one module per mode.

  mode=int8     static INT8 QDQ from calibration data (static.py; the rewrite rules
                are in core.py)
  mode=int4     4-bit MatMul/Gemm weights as MatMulNBits (int4.py), the rest int8
                QDQ (rest=int8) or float (rest=float)
  mode=dynamic  int8 weights, activations quantized at run time (dynamic.py)
  mode=fp16     weights and compute in float16 (fp16.py)
  mode=mixed    per-layer int8 / fp16 / fp32 (bits=4: also 4-bit weights) under an
                error and size budget (mixed.py, four_bit.py)

`rounding=gptq` (int8, int4, mixed's 4-bit layers) rounds weights with GPTQ (rounding.py,
gptq.py) instead of to nearest. Every mode adds the weight bytes before and after, and
their ratio, to the stats.
"""

from __future__ import annotations

import onnx_ir as ir

from ...errors import InputSpecError
from ...ir import drop_reinferable_value_info
from ..base import ForgePass, register
from .core import QuantizeOptions, quantize_embeddings, weight_bytes
from .dynamic import quantize_dynamic
from .fp16 import convert_fp16
from .int4 import pack_int4_codes, quantize_int4
from .mixed import quantize_mixed
from .static import quantize_int8


@register
class QuantizePass(ForgePass):
    """Post-training quantization: int8 QDQ (static), int4 weights, dynamic int8, fp16, or
    mixed."""

    name = "quantize"
    summary = ("INT8 QDQ post-training quantization (static/dynamic), int4 weights "
               "(MatMulNBits), GPTQ rounding, fp16, mixed precision")
    exact = False
    Options = QuantizeOptions
    positional = ("mode",)

    @property
    def descends_into_subgraphs(self) -> bool:  # type: ignore[override]
        """int8 (also as the rest of mode=int4) quantizes If/Loop/Scan bodies too
        (bodies.py); the other modes do not."""
        opts = self.options
        return opts.mode == "int8" or (opts.mode == "int4" and opts.rest == "int8")

    subgraph_note = ("only mode=int8 (and the int8 rest of mode=int4) quantizes inside "
                     "If/Loop/Scan bodies; int4 MatMulNBits, dynamic, fp16 and mixed work on "
                     "the main graph only")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts: QuantizeOptions = self.options
        if opts.rounding != "nearest" and opts.mode not in ("int8", "int4", "mixed"):
            raise InputSpecError(f"quantize: rounding={opts.rounding} applies to mode=int8, "
                                 f"int4 and mixed (its 4-bit layers), not mode={opts.mode}")
        if opts.mode == "mixed" and opts.rounding != "nearest" and opts.bits == 8:
            raise InputSpecError(f"quantize: rounding={opts.rounding} in mode=mixed rounds its "
                                 "4-bit layers: it needs bits=4 (int8 layers round to nearest)")
        if opts.bits != 8 and opts.mode != "mixed":
            raise InputSpecError(f"quantize: bits={opts.bits} chooses the lowest precision of "
                                 f"mode=mixed; mode={opts.mode} fixes its own")
        if opts.convs == "int4" and (opts.mode != "int4" or opts.rest != "int8"):
            raise InputSpecError("quantize: convs=int4 needs mode=int4 with rest=int8 (the 4-bit "
                                 "conv codes run in int8 QLinearConv)")
        before = weight_bytes(model)
        annotated = _annotated_values(model)
        if opts.mode == "int8":
            quantize_int8(model, opts, self.context, self.stats)
        elif opts.mode == "int4":
            quantize_int4(model, opts, self.context, self.stats)
            if opts.rest == "int8":
                quantize_int8(model, opts, self.context, self.stats)
                self.stats["int4_codes_packed"] = pack_int4_codes(
                    model, self.stats.get("int4_codes", []))
            elif opts.embeddings:
                self.stats["embeddings_quantized"] = quantize_embeddings(model)
        elif opts.mode == "dynamic":
            self.stats.update(quantize_dynamic(model, opts))
        elif opts.mode == "fp16":
            self.stats.update(convert_fp16(model, opts))
        elif opts.mode == "mixed":
            self.stats.update(quantize_mixed(model, opts, self.context))
        self.stats["value_info_dropped"] = drop_reinferable_value_info(model, annotated)
        after = weight_bytes(model)
        self.stats["weight_bytes_before"] = before
        self.stats["weight_bytes_after"] = after
        self.stats["size_ratio"] = round(before / after, 3) if after else None
        return ir.passes.PassResult(model, modified=True)


def _annotated_values(model: ir.Model) -> set[str]:
    """Names of the main graph's intermediate values that carry a shape or type (written
    to the file as value_info)."""
    return {v.name for n in model.graph for v in n.outputs
            if v.name and (v.shape is not None or v.type is not None)}
