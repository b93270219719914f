"""The ordered list of CPU default-schedule rules.

``default_schedule_pass`` tries the rules of ``default_rules()`` on each PrimFunc in
this order and the first that schedules it wins (a rule that declines or raises hands
the function to the next one), so the list runs from the most specific pattern to the
catch-all ``FallbackRule``.

A new rule is one file and one entry here: a ``rule_<name>.py`` holding a ``CpuRule``
subclass (``rule_base``: ``name`` and ``schedule``; ``configs`` and ``schedule_config``
when it has knobs), then its import and its line in ``default_rules()``, placed before
the rules that would otherwise take its functions.
"""

from __future__ import annotations

from .rule_base import CpuRule
from .rule_conv2d import Conv2dRule
from .rule_elementwise import ElementwiseRule
from .rule_fallback import FallbackRule
from .rule_int8 import Int8DepthwiseRule, Int8DotRule
from .rule_matmul import MatmulRule
from .rule_reduction import ChannelsLastReductionRule, RowReductionRule
from .rule_window import WindowRule


def default_rules() -> list[CpuRule]:
    """Rules from the most specific pattern to the catch-all fallback."""
    return [
        Int8DotRule(),
        Int8DepthwiseRule(),
        Conv2dRule(),
        MatmulRule(),
        WindowRule(),
        ChannelsLastReductionRule(),
        RowReductionRule(),
        ElementwiseRule(),
        FallbackRule(),
    ]
