"""Graph rewrites: `base` (pass base class, registry, the list of shipped passes), `naming`,
`graph` (helpers every family shares), `overrides` (per-layer ratio text of the lossy
passes), `cleanup`, and one subpackage per family: `fusion`, `pruning`, `lowrank`,
`sparsity`, `quantization`."""
