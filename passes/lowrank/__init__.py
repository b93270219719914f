"""Low rank: the `lowrank` pass, which factors Gemm / MatMul / Conv weights (lossy).

Read in this order:
- `lowrank`: the pass, its rewrite rules and options (rank selection, data-aware SVD,
  the latency guard);
- `graph`: which layers can be factored, and the factor chain written for one;
- `linalg`: the numpy linear algebra (whitened truncated SVD, Tucker-2, spatial SVD);
- `rank`: rank selection (energy per layer, a global MACs / params budget);
- `guard`: measured latency of a layer before and after, to keep only the faster ones.
"""
