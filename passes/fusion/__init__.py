"""Fusion: exact rewrites that merge ops into fewer, larger ones (outputs unchanged).

Read in this order:
- `common`: the `RewritePass` base and the preconditions every rewrite checks;
- `fuse`: the `fuse` pass, which runs all the rewrites below in order to a fixed point;
- `patterns` (`fuse-layernorm`, `fuse-gelu`), `batchnorm` (`fold-bn`), `pad` (`fuse-pad`),
  `affine` (`fold-affine`, `fuse-matmul-add`), `horizontal` (`fuse-horizontal`),
  `layout` (`fuse-transpose`, `fuse-reshape`): one module per rewrite family, each with
  its rewrite rules in its docstring.
"""
