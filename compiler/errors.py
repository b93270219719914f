"""One exception hierarchy for every error a user can see.

Messages name the file, node and op type involved and say what to do. The CLI
prints the message on one line and exits non-zero (traceback only with --debug).

A message that tells the caller which option to change is an `OptionText`: it reads in
Python terms (`force=True`), and the CLI writes the same options as its flags (`--force`,
`cli_flags`), so library code never names a command-line flag.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Self


class OnnxforgeError(Exception):
    """Base class of all errors onnxforge raises on purpose."""

    exit_code = 1


class ModelLoadError(OnnxforgeError):
    """The model file cannot be read, parsed or checked."""

    exit_code = 2


class InvalidModelError(OnnxforgeError):
    """The model parsed but is not a valid graph (missing tensor, cycle, bad opset)."""

    exit_code = 2


class PipelineError(OnnxforgeError):
    """A pipeline string or pass option is wrong (unknown pass, bad option)."""

    exit_code = 3


class PassFailedError(OnnxforgeError):
    """A pass raised or broke an invariant while rewriting the model."""

    exit_code = 4


class VerificationError(OnnxforgeError):
    """An exact rewrite changed outputs, or two models cannot be compared."""

    exit_code = 5


class BudgetExceededError(OnnxforgeError):
    """A lossy rewrite went past the user's error budget (use --force to write anyway)."""

    exit_code = 6


class InputSpecError(OnnxforgeError):
    """Calibration/verification inputs are missing, mis-shaped, or dims are dynamic."""

    exit_code = 7


class UnsupportedOpError(OnnxforgeError):
    """A backend cannot handle a node; names the node, op type and opset."""

    exit_code = 8


class BackendError(OnnxforgeError):
    """A backend failed to compile, run or export a model."""

    exit_code = 9


class UnsafeWriteError(InputSpecError):
    """An output path is a file the run reads, or not a regular file; nothing is written."""


class OptionText(str):
    """Text naming options of the call, e.g. ``OptionText.of("pass ", ("force", True),
    " to write anyway")``: as a str it reads in Python terms ("pass force=True to write
    anyway"); `render` writes the options another way (the CLI: "pass --force ...").

    `template` is a str.format template (literal braces doubled) with one `{}` per option,
    in order; an option is (parameter name, value): None names the parameter alone
    ("exceeds max_error 0.05"), any other value is the one to pass ("verify=False",
    "rpc_tracker='HOST:PORT'"; `input_shapes` a {name: dims} dict).
    """

    template: str
    options: tuple[tuple[str, Any], ...]

    def __new__(cls, template: str, *options: tuple[str, Any]) -> Self:
        text = super().__new__(cls, template.format(*(python_option(*o) for o in options)))
        text.template = template
        text.options = options
        return text

    def __reduce__(self):  # pickled as template and options (exceptions cross processes)
        return (type(self), (self.template, *self.options))

    def render(self, option: Callable[[str, Any], str]) -> str:
        """The text with each option written by `option(name, value)`."""
        return self.template.format(*(option(*o) for o in self.options))

    @classmethod
    def of(cls, *parts: str | tuple[str, Any]) -> Self:
        """Text from pieces: plain text (taken literally), OptionTexts (options kept) and
        options ((name, value) tuples), in order."""
        templates, options = [], []
        for part in parts:
            if isinstance(part, OptionText):
                templates.append(part.template)
                options.extend(part.options)
            elif isinstance(part, str):
                templates.append(_escape(part))
            else:
                templates.append("{}")
                options.append(part)
        return cls("".join(templates), *options)


def _escape(text: str) -> str:
    return text.replace("{", "{{").replace("}", "}}")


def python_option(name: str, value: Any) -> str:
    """An option as a Python caller writes it: `max_error`, `force=True`,
    `input_shapes={'x': (1, 3, 8, 8)}`."""
    if value is None:
        return name
    if name == "input_shapes" and isinstance(value, dict):
        shapes = ", ".join(f"{k!r}: ({_dims(v)})" for k, v in value.items())
        return f"{name}={{{shapes}}}"
    return f"{name}={value!r}"


def _dims(dims: Any) -> str:
    """A Python tuple's inside: (1, 3, 8, 8), or a placeholder such as "D1,D2,..."."""
    if isinstance(dims, str):
        return ", ".join(dims.split(","))
    return ", ".join(map(str, dims)) + ("," if len(dims) == 1 else "")


def one_line(text: object, limit: int = 200) -> str:
    """An error message on one line: its first line, plus its last line when that is a
    different one (where TVM and onnxruntime put the reason), cut at `limit`."""
    lines = [" ".join(line.split()) for line in str(text).strip().splitlines()]
    lines = [line for line in lines if line]
    if not lines:
        return ""
    line = lines[0]
    if len(lines) > 1 and lines[-1] not in line:
        line = f"{line} ... {lines[-1]}"
    return line if len(line) <= limit else line[: limit - 3] + "..."
