"""Library messages in the CLI's words: the options an `errors.OptionText` names, written
as the flags that set them (`force=True` -> `--force`, `input_shapes={'x': (1, 3, 8, 8)}`
-> `--input-shape x:1,3,8,8`). Used by `cli` and `cli_tvm` for errors, warnings and notes.
"""

from __future__ import annotations

from typing import Any

from .errors import OptionText

# parameters whose flag is not `--` + the name with dashes
FLAGS = {"input_shapes": "--input-shape", "calibration": "--calib"}


def flag(name: str, value: Any) -> str:
    """`name=value` as command-line flags."""
    text = FLAGS.get(name, "--" + name.replace("_", "-"))
    if value is None or value is True:
        return text
    if value is False:
        return "--no-" + text[2:]
    if name == "input_shapes" and isinstance(value, dict):
        return " ".join(f"{text} {k}:{v if isinstance(v, str) else ','.join(map(str, v))}"
                        for k, v in value.items())
    return f"{text} {value}"


def cli_text(text: Any) -> str:
    """`text` (a message, or an exception) with the options it names written as flags."""
    if isinstance(text, BaseException):
        text = text.args[0] if len(text.args) == 1 else str(text)
    return text.render(flag) if isinstance(text, OptionText) else str(text)


def example_or_model(model: Any, example: bool, shapes: dict, calib: str | None,
                     verify_data: str | None, console: Any) -> tuple[Any, dict, Any, Any]:
    """(model, input shapes, calibration, verify data) of a command with `--example`: the
    shipped digits CNN with its calibration and labelled test data filling what was not
    given; an error for both a MODEL and --example, or neither."""
    from . import api
    from .errors import InputSpecError

    if example:
        if model is not None:
            raise InputSpecError("give either a MODEL or --example, not both")
        model = api.EXAMPLE_MODEL
        shapes = shapes or dict(api.EXAMPLE_INPUT_SHAPES)
        calib = calib or str(api.EXAMPLE_CALIBRATION)
        verify_data = verify_data or str(api.EXAMPLE_TEST_DATA)
        console.print(f"using the shipped example model {model}")
    if model is None:
        raise InputSpecError("missing MODEL (or use --example for the shipped digits model)")
    return model, shapes, calib, verify_data
