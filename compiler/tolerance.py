"""The tolerance compiled code is checked with against onnxruntime (`backends.tvm.
verification`): an output passes with relative L2, or every element, within `VERIFY_RTOL`
of the output's scale, plus `VERIFY_ATOL` for outputs whose values are all ~0 (the rule
of `verify.OutputError.within`).

A module of its own, importing nothing, so that the CLI can state the tolerance in its
help without importing onnxruntime or TVM at start-up.
"""

VERIFY_RTOL = 1e-4  # verify.OutputError.within: rel L2, or every element
VERIFY_ATOL = 1e-6  # absolute floor: float32 noise on outputs whose values are all ~0

# Quantized (QDQ) models: two correct implementations legitimately differ where a value
# lies on a rounding boundary (it moves one quantization step, and the flip propagates
# through the following layers); onnxruntime's own integer kernels and its float
# fake-quantization differ this way on the same file. The check for a QDQ model is the
# larger of VERIFY_RTOL, QDQ_MARGIN x that onnxruntime spread measured on the same
# inputs, and QDQ_FLOOR (two steps of an 8-bit tensor's range, relative to it).
QDQ_MARGIN = 2.0
QDQ_FLOOR = 2 / 255
