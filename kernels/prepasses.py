"""Relax-level passes the default CPU schedules want before legalization.

The default schedules keep the model's NCHW layout and pack weights themselves (inside
``default_schedule_pass``), so no layout conversion is needed. What they do need is
that inference BatchNorm does not survive as its own kernel: folded into the conv
weights, or at least decomposed into a multiply-add that FuseOps puts into the conv's
epilogue (TVM imports BatchNormalization as ``relax.nn.batch_norm``, which legalizes to
a separate pass over memory per BN).

Run these on the imported module before LegalizeOps; the FoldConstant of the usual
legalize list then evaluates the folded weights.
"""

from __future__ import annotations

import tvm
from tvm import relax

from .fast_math import fast_math_prepass


def relax_prepasses(target: tvm.target.Target, fast_math: bool = True) -> list[tvm.transform.Pass]:
    """Passes to run on the imported Relax module before LegalizeOps.

    1. ``FoldBatchnormToConv2D``: conv2d -> batch_norm with constant statistics becomes a
       conv2d with scaled weights plus a bias add.
    2. ``DecomposeOpsForInference``: any remaining batch_norm becomes elementwise math
       that fuses into its producer.
    3. ``fast_math_prepass`` (``fast_math=True``): float32 exp/sigmoid/erf/tanh/softmax ->
       TOPI's vectorizable forms (within 3.3e-7 of float64 on [-9, 9]; LLVM's exp is a
       scalar libm call per lane, 2x slower end to end on efficientnet_b0).
    """
    passes = [
        relax.transform.FoldBatchnormToConv2D(),
        relax.transform.DecomposeOpsForInference(),
    ]
    if fast_math:
        passes.append(fast_math_prepass)
    return passes
