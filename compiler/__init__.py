"""onnxforge: compiler-style ONNX graph optimization for deployment.

The public API lives in `onnxforge.api`; the most used names are re-exported here
lazily so `import onnxforge` stays cheap (no onnxruntime or TVM import).
"""

from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "load_model": "onnxforge.ir",
    "save_model": "onnxforge.ir",
    "optimize": "onnxforge.api",
    "inspect_model": "onnxforge.api",
    "benchmark_models": "onnxforge.api",
    "Pipeline": "onnxforge.pipeline",
    "PassManager": "onnxforge.pass_manager",
    "compare_models": "onnxforge.verify",
    "OnnxforgeError": "onnxforge.errors",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'onnxforge' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY.keys()]  # noqa: PLE0604 - names resolved lazily
