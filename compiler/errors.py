"""One exception hierarchy for every error a user can see.

Messages name the file, node and op type involved and say what to do. The CLI
prints the message on one line and exits non-zero (traceback only with --debug).
"""

from __future__ import annotations


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
