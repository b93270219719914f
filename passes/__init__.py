"""Graph rewrites: `base` (pass base class, registry, the list of shipped passes), `naming`,
`cleanup`, and one subpackage per family: `fusion`, `pruning`, `lowrank`, `quantization`."""
