"""`fuse`: every exact fusion rewrite, run in a fixed order until nothing changes.

Order of one round (each is also a pass of its own, see its module docstring for
the rewrite rules and preconditions):

1. `fuse-layernorm`, `fuse-gelu`      (patterns.py)   primitive subgraphs -> standard ops
2. `fold-bn`                          (batchnorm.py)  BatchNormalization -> weights/bias
3. `fuse-pad`                         (pad.py)        zero Pad -> Conv pads
4. `fold-affine`                      (affine.py)     Mul/Add/Sub/Div by constants -> weights
5. `fuse-horizontal`                  (horizontal.py) sibling Conv/MatMul/Gemm -> one op + Split
6. `fuse-matmul-add`                  (affine.py)     2-D MatMul + Add -> Gemm
7. `fuse-transpose`, `fuse-reshape`   (layout.py)     layout op pairs cancelled / merged

Rounds repeat (at most `rounds`) while some rewrite fired, because one rewrite can
enable another (a folded BN exposes an affine Mul, a merged Transpose exposes a
pair). Options turn families off: `patterns`, `horizontal`, `layout`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir

from ...ir import infer_shapes
from ..base import ForgePass, option, register
from .affine import FoldAffinePass, FuseMatMulAddPass
from .batchnorm import FoldBatchNormPass
from .common import RewritePass
from .horizontal import FuseHorizontalPass
from .layout import FuseReshapePass, FuseTransposePass
from .pad import FusePadPass
from .patterns import FuseGeluPass, FuseLayerNormPass

logger = logging.getLogger(__name__)


@dataclass
class FuseOptions:
    patterns: bool = True
    horizontal: bool = True
    layout: bool = True
    rounds: int = option(4, ge=1)


@register
class FusePass(ForgePass):
    """Run all exact fusion rewrites to a fixed point."""

    name = "fuse"
    summary = ("all exact fusions: LayerNorm/GELU patterns, BN folding, Pad->Conv, affine "
               "folding, horizontal merge, MatMul+Add->Gemm, Transpose/Reshape pairs")
    exact = True
    Options = FuseOptions
    descends_into_subgraphs = True  # its sub-passes are RewritePasses (every body visited)

    def rewrites(self) -> list[type[RewritePass]]:
        opts: FuseOptions = self.options
        passes: list[type[RewritePass]] = []
        if opts.patterns:
            passes += [FuseLayerNormPass, FuseGeluPass]
        passes += [FoldBatchNormPass, FusePadPass, FoldAffinePass]
        if opts.horizontal:
            passes.append(FuseHorizontalPass)
        passes.append(FuseMatMulAddPass)
        if opts.layout:
            passes += [FuseTransposePass, FuseReshapePass]
        return passes

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        infer_shapes(model, missing_only=True)
        for round_index in range(max(1, self.options.rounds)):
            changed = False
            for cls in self.rewrites():
                p = cls(context=self.context)
                p.infer = False
                result = p(model)
                if result.modified:
                    changed = True
                    for key, value in p.stats.items():
                        if isinstance(value, int):
                            self.count(key, value)
            modified |= changed
            if not changed:
                break
            logger.debug("fuse: round %d changed the model", round_index + 1)
        return ir.passes.PassResult(model, modified=modified)
