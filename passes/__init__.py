"""Graph rewrites: `base` (pass base class, registry, the list of shipped passes), `naming`,
`graph` (helpers every family shares), `cleanup`, and one subpackage per family: `fusion`,
`pruning`, `lowrank`, `quantization`."""
