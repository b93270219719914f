"""TVM TensorIR kernels and schedules the stock TVM wheel lacks.

Default CPU schedules (x86 and AArch64), so that untuned TVM code is fast:

1. ``relax_prepasses(target)`` -> list of Relax passes, run on the imported module
   before LegalizeOps: BatchNorm folded into conv weights (or decomposed so it fuses
   into the conv epilogue), float32 exp/sigmoid/erf/tanh/softmax made vectorizable.
2. the usual LegalizeOps, AnnotateTIROpPattern (+ PresetOpPattern), FoldConstant, FuseOps, FuseTIR
   (``legalize_and_fuse_passes()``; then MetaScheduleApplyDatabase when a tuning
   database is used).
3. ``default_schedule_pass(target)`` -> module pass: schedules every PrimFunc without
   ``tirx.is_scheduled`` with the rules of ``cpu_rules.default_rules()`` (int8 dot
   product, conv2d, matmul, sliding window, row reduction, elementwise, fallback), packs
   weight constants ahead of time, and records the rule in each function's
   ``onnxforge.schedule_rule``.
4. ``schedule_summary(mod)`` -> {PrimFunc name: rule name | "database" | "unscheduled"}.

Vector width, register count and core count come from the target (``cpu_target``).

The modules, in reading order:

- ``cpu_target``: what a target tells the rules (vector lanes, registers, cores);
- ``rule_base``: the rule contract (``CpuRule``: recognize one PrimFunc, schedule it,
  list its knob settings);
- ``cpu_rules``: the ordered list of rules, first match wins; then the rules, one file
  each (``rule_*.py``), built on the block questions and small schedule steps of
  ``sched_common``. Conv2d and matmul share the register-tiled micro-kernel of
  ``cpu_contraction``; the int8 rule uses the dot-product intrinsics of ``int8_intrin``;
- ``schedule_pass``: the module pass around the rules (layout-free weights, weight
  packing folded into constants by ``weight_pack``);
- ``prepasses`` (with ``fast_math``): the Relax rewrites before legalization;
- ``schedule_configs`` and ``config_search``: the measured knob settings per kernel
  (the database format and lookup; the search), with the shipped databases in
  ``tuning_db/``;
- ``kernel_check``: each fused kernel against its unscheduled build, to find the one
  a wrong schedule broke.
"""

from __future__ import annotations

__all__ = [
    "default_schedule_pass",
    "legalize_and_fuse_passes",
    "relax_prepasses",
    "schedule_summary",
]


def __getattr__(name):  # lazy: importing onnxforge.kernels must not require TVM
    if name in ("default_schedule_pass", "legalize_and_fuse_passes", "schedule_summary"):
        from . import schedule_pass

        return getattr(schedule_pass, name)
    if name == "relax_prepasses":
        from .prepasses import relax_prepasses

        return relax_prepasses
    raise AttributeError(name)
