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

import onnx
import onnx_ir as ir

from ...errors import InputSpecError
from ...ir import _drop_large_tensor_bytes, _is_small, to_proto
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
        self.stats["value_info_dropped"] = _drop_inferred_value_info(model, annotated)
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


def _drop_inferred_value_info(model: ir.Model, annotated: set[str]) -> int:
    """Forget the shapes and types that quantization inferred for intermediate values the
    input model did not annotate, where ONNX shape inference finds them again: in the
    file they are value_info that nothing needs (onnxruntime infers them at load, passes
    and metrics infer them again) and they weigh: ~50 KB, 3 % of a 4-bit PP-OCRv4 rec.
    What inference cannot find (outputs of com.microsoft ops such as MatMulNBits, and
    what depends on them) keeps its annotation, as do graph inputs and outputs and the
    input model's own annotations. Returns the count dropped."""
    if not _is_small(model):
        return 0
    outputs = {id(v) for v in model.graph.outputs}
    saved = {v.name: (v, v.shape, v.type) for n in model.graph for v in n.outputs
             if v.name and id(v) not in outputs and v.name not in annotated
             and (v.shape is not None or v.type is not None)}
    for v, _, _ in saved.values():
        v.shape, v.type = None, None
    proto = to_proto(model)
    _drop_large_tensor_bytes(proto)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - inference failed: keep every annotation
        inferred = onnx.ModelProto()
    found = {vi.name for vi in inferred.graph.value_info
             if vi.type.tensor_type.HasField("shape") and vi.type.tensor_type.elem_type}
    dropped = 0
    for name, (v, shape, vtype) in saved.items():
        if name in found:
            dropped += 1
        else:
            v.shape, v.type = shape, vtype
    return dropped
