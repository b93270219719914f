"""Let TVM's loop vectorizer keep ``nearbyint`` (round half to even) a vector op.

Every requantize epilogue rounds with ``tirx.nearbyint`` (Relax ``round``, and the
QuantizeLinear of the ONNX importer). TVM 0.27 registers ``TVectorizable`` for
``round``/``floor``/``trunc``/``exp`` but not for ``nearbyint``, so ``VectorizeLoop``
turns a vectorized epilogue that contains it into a scalar loop and leaves LLVM's SLP
vectorizer to rebuild vectors. Sometimes it does; in mobilenet_v2's first int8
depthwise kernel it did not, and each output pixel became 16 byte-sized stores and 32
scalar loads of the scales. On LLVM targets the vector form is the ``llvm.nearbyint``
intrinsic (one ``vrndscaleps`` on AVX-512, ``frinti`` on AArch64), with the same
rounding as the scalar one.

The attribute is global to the process, so it is set only while an LLVM-based target
is built (``with vectorizable_rounding(target): tvm.compile(...)``): the CUDA/OpenCL
code generators print ``nearbyintf(x)`` per call and have no vector form of it.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import tvm

_OP = "tirx.nearbyint"
_ATTR = "TVectorizable"
_LLVM_KINDS = ("llvm", "hexagon")
_lock = threading.Lock()
_builds = 0  # LLVM builds in progress that rely on our registration


@contextmanager
def vectorizable_rounding(target: tvm.target.Target):
    """Within the block, ``nearbyint`` vectorizes when ``target`` is LLVM-based."""
    global _builds
    op = tvm.ir.Op.get(_OP)
    with _lock:
        # not ours to manage when the target has no vector form, or TVM sets it itself
        ours = target.kind.name in _LLVM_KINDS and (_builds or op.get_attr(_ATTR) is None)
        if ours:
            if not _builds:
                tvm.ir.register_op_attr(_OP, _ATTR, True)
            _builds += 1
    try:
        yield
    finally:
        if ours:
            with _lock:
                _builds -= 1
                if not _builds:
                    op.reset_attr(_ATTR)
