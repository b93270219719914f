"""Sparsity: the `sparsify` pass, which zeros Conv / Gemm / MatMul weights in a pattern
(unstructured, block(RxC), N:M) and can refit the rest (lossy; the ONNX stays dense).

Read in this order:
- `sparsify`: the pass, its options and steps (choose layers, score, mask, refit, record);
- `layers`: which layers are candidates, their 2-D weight view, which are kept dense;
- `scores`: magnitude and Wanda importance (input feature RMS on calibration data);
- `patterns`: the patterns and the masks that realise a ratio exactly;
- `refit`: masked least-squares refit of the kept weights (`recover=true`);
- `metadata`: the `onnxforge.sparsity` record in the model's metadata_props.
"""
