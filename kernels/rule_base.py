"""Base class of the CPU default-schedule rules (dlight's ``ScheduleRule`` contract).

A rule looks at one PrimFunc, decides from its block structure whether it knows the
pattern, and returns a scheduled ``s_tir.Schedule`` (or None: "not mine"). Rules never
search by themselves: ``tunable`` is ignored and exactly one schedule is returned.

Rules with knobs (register tile, row width) list their settings with ``configs`` (the
heuristic choice first) and take one through ``apply(..., config=...)``; a config that
does not fit the function is ignored and the heuristic choice is used. Which setting is
fastest for a given function is measured by ``config_search`` and kept in a schedule
config database (``schedule_configs``), like TVM's old TopHub for templates.
"""

from __future__ import annotations

from tvm import s_tir, tirx
from tvm.s_tir.dlight.base import ScheduleRule
from tvm.target import Target

from .cpu_target import CpuInfo, cpu_info

LAYOUT_REWRITE_ANN = "meta_schedule.layout_rewrite_preproc"


class CpuRule(ScheduleRule):
    """A default schedule for one family of CPU kernels.

    Subclasses set ``name`` (recorded on the scheduled function) and implement
    ``schedule(sch, func, cpu) -> bool``; returning False (or raising) means the rule does
    not apply, and the next rule gets a fresh schedule.
    """

    name = "cpu-rule"

    def is_target_available(self, target: Target) -> bool:
        return target.kind.name == "llvm"

    def schedule(self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo) -> bool:
        raise NotImplementedError

    def schedule_config(
        self, sch: s_tir.Schedule, func: tirx.PrimFunc, cpu: CpuInfo, config: dict | None
    ) -> bool:
        """``schedule`` with one knob setting; rules without knobs ignore it."""
        return self.schedule(sch, func, cpu)

    def configs(self, func: tirx.PrimFunc, target: Target) -> list[dict]:
        """Knob settings worth timing for ``func``, the heuristic one first ([]: no knobs)."""
        return []

    def apply(self, func: tirx.PrimFunc, target: Target, tunable: bool,
              config: dict | None = None):
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        sch = s_tir.Schedule(func)
        if not self.schedule_config(sch, func, cpu_info(target), config):
            return None
        return sch


def packs_weights(func: tirx.PrimFunc) -> bool:
    """True when a root-level block of ``func`` is a weight-packing (layout rewrite) block."""
    if not hasattr(func.body, "block"):  # hand-written TIR without blocks (a sparse kernel)
        return False
    sch = s_tir.Schedule(func)
    root = sch.get_sblock(func.body.block.name_hint)
    return any(
        LAYOUT_REWRITE_ANN in sch.get(block).annotations for block in sch.get_child_blocks(root)
    )


def layout_free_params(func: tirx.PrimFunc) -> list:
    """Parameters marked layout-free (weights/constants) by AttachAttrLayoutFreeBuffers."""
    indices = func.attrs.get("layout_free_buffers", []) if func.attrs else []
    return [func.params[int(i)] for i in indices]
