"""Quantization: the `quantize` pass (int8 static, int4 weights, int8 dynamic, fp16, mixed
precision).

Read in this order:
- `quantize`: the pass; it hands each mode to its module;
- `core`: the options and the shared plan / calibrate / apply core with the INT8 QDQ
  rewrite rules; it imports no mode, and the modes import it;
- `static` (mode=int8): the steps of static quantization, in order;
- `prepare`: the exact float rewrites run first (BatchNorm folding, Gemm forms, opset);
- `observers`: range observers and calibration methods (minmax, percentile, entropy, mse);
- `repair`: accuracy repair (bias correction, cross-layer equalization, SmoothQuant);
- `rounding` (rounding=gptq): GPTQ-rounded weights and their report; the algorithm is in
  `gptq`, the layer-input Hessians (im2col for Conv) in `hessian`;
- `int4` (mode=int4): MatMulNBits / GatherBlockQuantized, packed 4-bit conv codes, and
  their float form for TVM;
- `dynamic`, `fp16`, `mixed` (mode=dynamic / fp16 / mixed): the other modes.
"""
