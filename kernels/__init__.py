"""TVM TensorIR kernels and schedules the stock TVM wheel lacks.

Default CPU schedules (x86 and AArch64): ``default_schedule_pass(target)`` is a module
pass to run after the fusion passes (LegalizeOps, AnnotateTIROpPattern, FoldConstant,
FuseOps, FuseTIR, and MetaScheduleApplyDatabase when a database is used). It schedules
every PrimFunc that is not scheduled yet and records the rule on each function;
``schedule_summary(mod)`` reads that record back.
"""

from __future__ import annotations

__all__ = ["default_schedule_pass", "relax_prepasses", "schedule_summary"]


def __getattr__(name):  # lazy: importing onnxforge.kernels must not require TVM
    if name in ("default_schedule_pass", "schedule_summary"):
        from . import schedule_pass

        return getattr(schedule_pass, name)
    if name == "relax_prepasses":
        from .prepasses import relax_prepasses

        return relax_prepasses
    raise AttributeError(name)
