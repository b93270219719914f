"""Concrete input shapes: parse `--input-shape name:1,3,224,224`, resolve dynamic dims."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .errors import InputSpecError


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """`["input:1,3,224,224", "mask:1,128"]` -> {"input": (1, 3, 224, 224), ...}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise InputSpecError(f"--input-shape {spec!r}: expected NAME:D1,D2,... e.g. input:1,3,224,224")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            raise InputSpecError(f"--input-shape {spec!r}: dimensions must be integers") from None
    return shapes


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are real inputs (not initializers listed as inputs)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def resolve_input_shapes(
    model: ir.Model, overrides: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """A concrete shape for every model input, or a clear error naming the dynamic dim."""
    overrides = overrides or {}
    names = {v.name for v in model_inputs(model)}
    for name in overrides:
        if name not in names:
            raise InputSpecError(
                f"--input-shape names {name!r}, but the model's inputs are {sorted(names)}"
            )
    shapes = {}
    for value in model_inputs(model):
        if value.name in overrides:
            shape = overrides[value.name]
            if value.shape is not None and len(value.shape) != len(shape):
                raise InputSpecError(
                    f"input {value.name!r} has rank {len(value.shape)}, --input-shape gave {shape}"
                )
            shapes[value.name] = shape
            continue
        if value.shape is None:
            raise InputSpecError(
                f"input {value.name!r} has no declared shape; give it with "
                f"--input-shape {value.name}:D1,D2,..."
            )
        dims = []
        for i, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(dim)
            else:
                example = ",".join(str(d) if isinstance(d, int) else "1" for d in value.shape)
                raise InputSpecError(
                    f"input {value.name!r} has a dynamic dimension {i} ({dim}); give a "
                    f"concrete shape with --input-shape {value.name}:{example}"
                )
        shapes[value.name] = tuple(dims)
    return shapes


def input_dtypes(model: ir.Model) -> dict[str, np.dtype]:
    dtypes = {}
    for value in model_inputs(model):
        dtype = value.dtype
        dtypes[value.name] = dtype.numpy() if dtype is not None else np.dtype(np.float32)
    return dtypes
