"""Graph rewrites, one module per family; each registers itself by name."""
