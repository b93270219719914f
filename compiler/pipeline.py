"""Pipelines as one line of text, the way MLIR/LLVM print and accept them.

    cleanup,fuse,prune(ratio=0.3,criterion=l2),quantize(int8,calibration=entropy)

Grammar: passes separated by top-level commas; each is `name` or `name(args)`;
args are `key=value` or, for passes that declare positional options, bare values.
Values may be quoted with '"' or "'". `Pipeline.text` prints the canonical form a
user can paste back to reproduce a run.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from .errors import PipelineError
from .passes.base import ForgePass, PassContext, check_options, coerce_option, get_pass


@dataclass
class PassSpec:
    name: str
    args: list[str] = field(default_factory=list)
    kwargs: dict[str, str] = field(default_factory=dict)


def _split_top_level(text: str, sep: str = ",") -> list[str]:
    parts, depth, quote, current = [], 0, "", []
    for ch in text:
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
            continue
        if ch in "\"'":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise PipelineError(f"unbalanced ')' in pipeline {text!r}")
        elif ch == sep and depth == 0:
            parts.append("".join(current).strip())
            current = []
            continue
        current.append(ch)
    if depth or quote:
        raise PipelineError(f"unbalanced parenthesis or quote in pipeline {text!r}")
    parts.append("".join(current).strip())
    return parts


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    return text


def parse_pipeline(text: str) -> list[PassSpec]:
    """Parse pipeline text into pass specs (names and raw option strings)."""
    specs = []
    for item in _split_top_level(text.strip()):
        if not item:
            if text.strip():
                raise PipelineError(f"empty pass name in pipeline {text!r}")
            continue
        if "(" in item:
            if not item.endswith(")"):
                raise PipelineError(f"expected ')' at the end of {item!r}")
            name, inner = item.split("(", 1)
            inner = inner[:-1]
        else:
            name, inner = item, ""
        spec = PassSpec(name.strip())
        if not spec.name.replace("-", "").replace("_", "").isalnum():
            raise PipelineError(f"bad pass name {spec.name!r} in pipeline {text!r}")
        for arg in _split_top_level(inner) if inner.strip() else []:
            if "=" in arg:
                key, value = arg.split("=", 1)
                key = key.strip()
                if not key:
                    raise PipelineError(f"{spec.name}: option {arg!r} has no name")
                if key in spec.kwargs:
                    raise PipelineError(f"{spec.name}: option {key!r} given twice")
                spec.kwargs[key] = _unquote(value)
            elif spec.kwargs:
                raise PipelineError(f"{spec.name}: positional value {arg!r} after key=value")
            else:
                spec.args.append(_unquote(arg))
        specs.append(spec)
    return specs


def build_pass(spec: PassSpec, context: PassContext | None = None) -> ForgePass:
    """Instantiate a registered pass with options converted to their declared types."""
    cls = get_pass(spec.name)
    hints = typing.get_type_hints(cls.Options)
    fields = {f.name for f in dataclasses.fields(cls.Options)}
    values: dict[str, typing.Any] = {}
    if len(spec.args) > len(cls.positional):
        raise PipelineError(
            f"{spec.name}: takes {len(cls.positional)} positional value(s) "
            f"({', '.join(cls.positional) or 'none'}), got {spec.args}"
        )
    for key, raw in zip(cls.positional, spec.args):
        values[key] = coerce_option(spec.name, key, raw, hints[key])
    for key, raw in spec.kwargs.items():
        if key not in fields:
            raise PipelineError(
                f"{spec.name}: unknown option {key!r}; options: "
                f"{', '.join(sorted(fields)) or '(none)'}"
            )
        if key in values:
            raise PipelineError(f"{spec.name}: option {key!r} given twice")
        values[key] = coerce_option(spec.name, key, raw, hints[key])
    try:
        options = cls.Options(**values)
    except (TypeError, ValueError) as exc:
        raise PipelineError(f"{spec.name}: {exc}") from exc
    check_options(spec.name, options)
    return cls(options, context)


class Pipeline:
    """An ordered list of configured passes, built from text or from pass objects."""

    def __init__(self, passes: list[ForgePass]):
        self.passes = passes

    @classmethod
    def parse(cls, text: str, context: PassContext | None = None) -> Pipeline:
        return cls([build_pass(spec, context) for spec in parse_pipeline(text)])

    @property
    def text(self) -> str:
        return ",".join(p.describe() for p in self.passes)

    def __iter__(self):
        return iter(self.passes)

    def __len__(self) -> int:
        return len(self.passes)

    def __repr__(self) -> str:
        return f"Pipeline({self.text!r})"
