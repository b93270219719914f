"""Backends: onnxruntime (reference and baseline) and TVM."""
