"""The project's thin base over onnx_ir's pass infrastructure, and the pass registry.

A pass is an `onnx_ir.passes.InPlacePass` with:
- a registry `name` (what a pipeline string uses) and a one-line `summary`;
- typed options as a dataclass `Options` (parsed from pipeline text by type hints);
- `exact`: True when the rewrite must not change outputs (the pass manager checks);
- `stats`: a dict the pass fills with what it changed, copied into the report;
- `context`: calibration data, input shapes and threads shared by the whole run.

Pass modules register themselves with `@register` when imported. `BUILTIN_PASSES`
below is the one list of the shipped passes and the module defining each: a pipeline
imports only the modules of the passes it names; `load_builtin_passes()` imports them all
(for `onnxforge passes`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir

from ..errors import InputSpecError, OptionText, PipelineError


@dataclass
class PassContext:
    """What every pass of one run may use besides the model itself."""

    calibration: Any = None  # onnxforge.calibration.CalibrationSource | None
    input_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    threads: int = 1
    seed: int = 0
    # Largest number of calibration batches a data-driven pass should read.
    max_calibration_batches: int = 64
    # --force: a pass that cannot meet its own budget writes its closest result and
    # says so (a warning and its stats) instead of refusing (quantize mode=mixed).
    force: bool = False

    def calibration_batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """Stream calibration batches (name -> array); error if none were given."""
        if self.calibration is None:
            raise InputSpecError(OptionText.of(
                "this pass needs calibration data: pass ", ("calibration", "data.npz"),
                " (or a folder of .npy files / images, or 'random')"))
        yield from self.calibration.batches(limit or self.max_calibration_batches)

    @property
    def has_calibration(self) -> bool:
        return self.calibration is not None

    def blas_threads(self) -> contextlib.AbstractContextManager:
        """numpy's BLAS limited to the run's `threads` while a pass computes: with more
        BLAS threads than free cores, OpenBLAS spins (measured on a loaded 2-core machine:
        100 solves of a 100x100 system 18 s instead of 0.02 s). No-op without threadpoolctl."""
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional: without it BLAS keeps its own default
            return contextlib.nullcontext()
        return threadpool_limits(limits=max(1, int(self.threads or 1)), user_api="blas")


@dataclass
class NoOptions:
    pass


class ForgePass(ir.passes.InPlacePass):
    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions
    # Option names that may be given without `key=` in pipeline text, in order
    # (e.g. `quantize(int8)` sets `mode`).
    positional: ClassVar[tuple[str, ...]] = ()
    # Whether the pass rewrites nodes inside If/Loop/Scan bodies. When False and bodies
    # hold compute, the pass manager records and prints what was skipped, with
    # `subgraph_note` (why) in the report.
    descends_into_subgraphs: ClassVar[bool] = False
    subgraph_note: ClassVar[str] = "this pass only rewrites the main graph"

    def __init__(self, options: Any = None, context: PassContext | None = None, **kwargs: Any):
        super().__init__()
        if options is None:
            options = self.Options(**kwargs)
        elif kwargs:
            options = dataclasses.replace(options, **kwargs)
        check_options(self.name, options)
        self.options = options
        self.context = context or PassContext()
        self.stats: dict[str, Any] = {}

    def count(self, key: str, n: int = 1) -> None:
        """Add `n` to a counter in this pass's stats (e.g. 'bn_folded')."""
        self.stats[key] = self.stats.get(key, 0) + n

    def describe(self) -> str:
        """Pipeline text for this pass: name plus the options that differ from defaults."""
        parts = []
        defaults = self.Options()
        for f in dataclasses.fields(self.options):
            value = getattr(self.options, f.name)
            if value != getattr(defaults, f.name):
                parts.append(f"{f.name}={format_option_value(value)}")
        return f"{self.name}({','.join(parts)})" if parts else self.name


PASSES: dict[str, type[ForgePass]] = {}


def register(cls: type[ForgePass]) -> type[ForgePass]:
    """Class decorator: make a pass available by its `name` in pipelines."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no registry name")
    if cls.name in PASSES and PASSES[cls.name] is not cls:
        raise TypeError(f"pass name {cls.name!r} registered twice")
    PASSES[cls.name] = cls
    return cls


# Every shipped pass, by family in reading order: pipeline name -> defining module.
# A new pass module adds its passes here (tests/test_pipeline.py checks the list).
BUILTIN_PASSES: dict[str, str] = {
    "cleanup": "onnxforge.passes.cleanup",
    "fuse": "onnxforge.passes.fusion.fuse",
    "fold-bn": "onnxforge.passes.fusion.batchnorm",
    "fold-affine": "onnxforge.passes.fusion.affine",
    "fuse-matmul-add": "onnxforge.passes.fusion.affine",
    "fuse-horizontal": "onnxforge.passes.fusion.horizontal",
    "fuse-transpose": "onnxforge.passes.fusion.layout",
    "fuse-reshape": "onnxforge.passes.fusion.layout",
    "fuse-pad": "onnxforge.passes.fusion.pad",
    "fuse-layernorm": "onnxforge.passes.fusion.patterns",
    "fuse-gelu": "onnxforge.passes.fusion.patterns",
    "prune": "onnxforge.passes.pruning.prune",
    "lowrank": "onnxforge.passes.lowrank.lowrank",
    "sparsify": "onnxforge.passes.sparsity.sparsify",
    "quantize": "onnxforge.passes.quantization.quantize",
}


def load_builtin_passes() -> dict[str, type[ForgePass]]:
    """Import the module of every shipped pass; returns all registered passes."""
    for module in dict.fromkeys(BUILTIN_PASSES.values()):
        importlib.import_module(module)
    return PASSES


def get_pass(name: str) -> type[ForgePass]:
    """The pass class registered as `name`, importing only its module if it is built in."""
    if name not in PASSES and name in BUILTIN_PASSES:
        importlib.import_module(BUILTIN_PASSES[name])
    if name not in PASSES:
        passes = load_builtin_passes()
        raise PipelineError(
            f"unknown pass {name!r}; available passes: {', '.join(sorted(passes))} "
            "(run `onnxforge passes` for their options)"
        )
    return PASSES[name]


# ---------------------------------------------------------------- option typing


def option(default: Any = None, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None,
           also: tuple[Any, ...] = ()) -> Any:
    """A dataclass field for a pass option with a range: `rounds: int = option(4, ge=1)`.

    `check_options` refuses values outside [ge|gt, le|lt] (None bounds are open) and
    NaN; values in `also` (sentinels such as -1 for "auto") and None are always allowed.
    """
    return field(default=default, metadata={"range": (ge, gt, le, lt), "also": also})


def _range_text(ge, gt, le, lt) -> str:
    low = f">= {ge:g}" if ge is not None else f"> {gt:g}" if gt is not None else ""
    high = f"<= {le:g}" if le is not None else f"< {lt:g}" if lt is not None else ""
    return " and ".join(p for p in (low, high) if p)


def check_options(pass_name: str, options: Any) -> None:
    """Range-check a pass's options (fields made with `option(...)`), then call the
    options' own `validate()` hook if it has one; raise PipelineError naming the option."""
    if not dataclasses.is_dataclass(options):
        return
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if isinstance(value, float) and not np.isfinite(value):
            raise PipelineError(f"{pass_name}: option {f.name}={value} must be a finite number")
        bounds = f.metadata.get("range")
        if bounds is None or value is None or isinstance(value, bool) \
                or value in f.metadata.get("also", ()):
            continue
        ge, gt, le, lt = bounds
        if not ((ge is None or value >= ge) and (gt is None or value > gt)
                and (le is None or value <= le) and (lt is None or value < lt)):
            also = "".join(f" or {a}" for a in f.metadata.get("also", ()))
            raise PipelineError(
                f"{pass_name}: option {f.name}={value} is out of range: must be "
                f"{_range_text(ge, gt, le, lt)}{also}"
            )
    validate = getattr(options, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as exc:
            raise PipelineError(f"{pass_name}: {exc}") from exc


def option_specs(cls: type[ForgePass]) -> list[tuple[str, str, Any]]:
    """(name, type description, default) for each option of a pass."""
    hints = typing.get_type_hints(cls.Options)
    specs = []
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kind = _type_name(hints[f.name])
        if f.metadata.get("range"):
            kind += " " + _range_text(*f.metadata["range"]) + "".join(
                f" or {a}" for a in f.metadata.get("also", ()))
        specs.append((f.name, kind, default))
    return specs


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "|".join(str(a) for a in typing.get_args(tp))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " or ".join(_type_name(a) for a in typing.get_args(tp) if a is not type(None)) + "?"
    return getattr(tp, "__name__", str(tp))


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce_option(pass_name: str, option: str, text: Any, tp: Any) -> Any:
    """Convert pipeline text to the option's declared type, or raise PipelineError."""
    if not isinstance(text, str):
        return text
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return _coerce_union(pass_name, option, text, args)
    if origin is typing.Literal:
        for choice in args:
            if str(choice) == text:
                return choice
        raise PipelineError(
            f"{pass_name}: option {option}={text!r} is not one of {', '.join(map(str, args))}"
        )
    return _coerce_scalar(pass_name, option, text, tp)


def _coerce_union(pass_name: str, option: str, text: str, args: tuple[Any, ...]) -> Any:
    """None for "none" / "null", else the first member type that takes the text."""
    if text.lower() in ("none", "null"):
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return coerce_option(pass_name, option, text, arg)
        except PipelineError as exc:
            errors.append(str(exc))
    raise PipelineError(errors[-1] if errors else f"{pass_name}: bad value for {option}")


def _coerce_scalar(pass_name: str, option: str, text: str, tp: Any) -> Any:
    """The text as a bool, int, float or str option."""
    try:
        if tp is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        if tp is int:
            return int(text)
        if tp is float:
            return float(text)
        if tp is str:
            return text
    except ValueError:
        raise PipelineError(
            f"{pass_name}: option {option}={text!r} is not a valid {_type_name(tp)}"
        ) from None
    raise PipelineError(f"{pass_name}: option {option} has an unsupported type {tp}")


def format_option_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and any(c in value for c in ",()= "):
        return f'"{value}"'
    return str(value)
