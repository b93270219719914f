"""The ordered list of CPU default-schedule rules (first match wins)."""

from __future__ import annotations

from .rule_base import CpuRule
from .rule_conv2d import Conv2dRule
from .rule_elementwise import ElementwiseRule
from .rule_fallback import FallbackRule
from .rule_int8 import Int8DotRule
from .rule_matmul import MatmulRule
from .rule_reduction import RowReductionRule
from .rule_window import WindowRule


def default_rules() -> list[CpuRule]:
    """Rules from the most specific pattern to the catch-all fallback."""
    return [
        Int8DotRule(),
        Conv2dRule(),
        MatmulRule(),
        WindowRule(),
        RowReductionRule(),
        ElementwiseRule(),
        FallbackRule(),
    ]
