"""Concrete input shapes: parse `--input-shape name:1,3,224,224`, resolve dynamic dims."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from .errors import InputSpecError, OptionText


def parse_input_shapes(specs: list[str] | None) -> dict[str, tuple[int, ...]]:
    """`["input:1,3,224,224", "mask:1,128"]` -> {"input": (1, 3, 224, 224), ...}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or []:
        name, sep, dims = spec.rpartition(":")
        if not sep or not name:
            raise InputSpecError(f"--input-shape {spec!r}: expected NAME:D1,D2,... "
                                 "e.g. input:1,3,224,224")
        try:
            shapes[name] = tuple(int(d) for d in dims.split(",") if d.strip())
        except ValueError:
            raise InputSpecError(f"--input-shape {spec!r}: dimensions must be integers") from None
    return shapes


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are real inputs (not initializers listed as inputs)."""
    return [v for v in model.graph.inputs if not v.is_initializer()]


def _is_static(dim) -> bool:
    """A fixed dimension: an int >= 0 (exporters write -1 or 0-less ints for 'any')."""
    return isinstance(dim, int) and dim >= 0


def _shape_text(shape) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


# Sizes suggested for symbolic dims, by (lower-cased) dim name.
_TYPICAL_DIMS = {"batch": 1, "batch_size": 1, "n": 1, "b": 1, "bs": 1,
                 "height": 224, "width": 224, "h": 224, "w": 224,
                 "sequence": 128, "sequence_length": 128, "seq_len": 128, "seq": 128,
                 "length": 128, "tokens": 128}


def suggest_shape(value: ir.Value) -> tuple[int, ...] | None:
    """A plausible concrete shape for an input with dynamic dims, or None if no guess.

    Static dims are kept; a dynamic leading dim is the batch (1); image inputs (rank 4
    with 1 or 3 channels) get 224x224; otherwise the dim's name must say what it is
    (batch, height, sequence, ...). Never a negative or placeholder size.
    """
    if value.shape is None:
        return None
    dims = list(value.shape)
    image = len(dims) == 4 and dims[1] in (1, 3)
    out = []
    for i, dim in enumerate(dims):
        if _is_static(dim):
            out.append(dim)
            continue
        name = str(dim).lower() if not isinstance(dim, int) and dim is not None else ""
        name = "" if name in ("none", "?") else name
        if name in _TYPICAL_DIMS:
            out.append(_TYPICAL_DIMS[name])
        elif i == 0:
            out.append(1)
        elif image and i >= 2:
            out.append(224)
        else:
            return None
    return tuple(out)


def check_input_shapes(model: ir.Model, overrides: dict[str, tuple[int, ...]] | None) -> None:
    """Refuse --input-shape values that name no input or contradict the model's shape."""
    values = {v.name: v for v in model_inputs(model)}
    for name, shape in (overrides or {}).items():
        if name not in values:
            raise InputSpecError(OptionText.of(
                ("input_shapes", None), f" names {name!r}, but the model's inputs are "
                f"{sorted(values)}"))
        if any(d < 1 for d in shape):
            raise InputSpecError(OptionText.of(
                ("input_shapes", {name: tuple(shape)}), ": dims must be >= 1"))
        declared = values[name].shape
        if declared is None:
            continue
        if len(declared) != len(shape):
            raise InputSpecError(OptionText.of(
                f"input {name!r} has rank {len(declared)} (shape {_shape_text(declared)}), ",
                ("input_shapes", None), f" gave {_shape_text(shape)}"))
        fixed = [i for i, (d, g) in enumerate(zip(declared, shape)) if _is_static(d) and d != g]
        if fixed:
            raise InputSpecError(OptionText.of(
                f"input {name!r} has shape {_shape_text(declared)} in the model, ",
                ("input_shapes", None), f" gave {_shape_text(shape)}: dim {fixed[0]} is "
                f"fixed at {declared[fixed[0]]}"))


def resolve_input_shapes(
    model: ir.Model, overrides: dict[str, tuple[int, ...]] | None = None
) -> dict[str, tuple[int, ...]]:
    """A concrete shape for every model input, or a clear error naming the dynamic dim."""
    overrides = overrides or {}
    check_input_shapes(model, overrides)
    shapes = {}
    for value in model_inputs(model):
        if value.name in overrides:
            shapes[value.name] = tuple(overrides[value.name])
            continue
        if value.shape is None:
            raise InputSpecError(OptionText.of(
                f"input {value.name!r} has no declared shape; give it with ",
                ("input_shapes", {value.name: "D1,D2,..."})))
        dims = []
        for i, dim in enumerate(value.shape):
            if _is_static(dim):
                dims.append(dim)
                continue
            guess = suggest_shape(value)
            example = ("e.g. ", ("input_shapes", {value.name: tuple(guess)})) if guess \
                else ("with ", ("input_shapes", {value.name: "D1,D2,..."}))
            raise InputSpecError(OptionText.of(
                f"input {value.name!r} has a dynamic dimension {i} ({dim}) in shape "
                f"{_shape_text(value.shape)}; give a concrete shape ", *example))
        shapes[value.name] = tuple(dims)
    return shapes


def input_dtypes(model: ir.Model) -> dict[str, np.dtype]:
    dtypes = {}
    for value in model_inputs(model):
        dtype = value.dtype
        dtypes[value.name] = dtype.numpy() if dtype is not None else np.dtype(np.float32)
    return dtypes
