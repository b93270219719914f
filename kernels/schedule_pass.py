"""The module pass that gives every unscheduled PrimFunc a default CPU schedule.

``default_schedule_pass(target)`` runs after LegalizeOps / AnnotateTIROpPattern /
FoldConstant / FuseOps / FuseTIR (and after MetaScheduleApplyDatabase when a tuning
database is used). Per PrimFunc without ``tirx.is_scheduled``, the first rule of
``cpu_rules.default_rules()`` that matches schedules it; the function is then marked
``tirx.is_scheduled`` and its attribute ``onnxforge.schedule_rule`` names the rule.

Weight packing: rules may rewrite the layout of weight constants through
``meta_schedule.layout_rewrite_preproc`` blocks. The pass marks the layout-free
parameters first (``AttachAttrLayoutFreeBuffers``) and afterwards splits those blocks out
(``SplitLayoutRewritePreproc``) and folds them into new constants (``FoldConstant``), so the
packing costs nothing at run time. Weights passed as function inputs (``num_input``)
stay packed at run time by a small scheduled kernel.

``schedule_summary(mod)`` tells, per PrimFunc, who scheduled it: a rule name,
``"database"`` (MetaSchedule) or ``"unscheduled"``.
"""

from __future__ import annotations

import logging
from collections import Counter

import tvm
from tvm import relax, tirx
from tvm.target import Target

from .cpu_rules import default_rules

logger = logging.getLogger(__name__)

RULE_ATTR = "onnxforge.schedule_rule"
SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")


def is_scheduled(func: tirx.PrimFunc) -> bool:
    """True when a PrimFunc carries ``tirx.is_scheduled`` (or the older ``tir.`` spelling)."""
    attrs = func.attrs
    if attrs is None:
        return False
    return any(key in attrs and bool(attrs[key]) for key in SCHEDULED_ATTRS)


def _func_target(func: tirx.PrimFunc, target: Target) -> Target:
    own = func.attrs.get("target") if func.attrs else None
    return own if own is not None else target


def _schedule_one(func: tirx.PrimFunc, target: Target, rules) -> tuple[tirx.PrimFunc, str] | None:
    for rule in rules:
        if not rule.is_target_available(target):
            continue
        try:
            sch = rule.apply(func, target, False)
        except Exception as err:  # noqa: BLE001 - a rule that trips is a rule that declines
            logger.debug("rule %s declined after error: %s", rule.name, err)
            continue
        if sch is None:
            continue
        new = sch.mod["main"].with_attr("tirx.is_scheduled", True).with_attr(RULE_ATTR, rule.name)
        return new, rule.name
    return None


def _schedule_module(mod: tvm.IRModule, target: Target, rules) -> tuple[tvm.IRModule, bool]:
    """Schedule all unscheduled PrimFuncs; report whether any weight packing was emitted."""
    updates = {}
    packed = False
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        result = _schedule_one(func, _func_target(func, target), rules)
        if result is None:
            logger.info("no default schedule for %s", gvar.name_hint)
            continue
        new, _rule = result
        updates[gvar] = new
        packed = packed or "meta_schedule.layout_rewrite_preproc" in new.script()
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod, packed


def _has_relax_function(mod: tvm.IRModule) -> bool:
    return any(isinstance(f, relax.Function) for _, f in mod.functions_items())


def default_schedule_pass(target: Target) -> tvm.transform.Pass:
    """Module pass: schedule every PrimFunc that has no schedule yet with the CPU rules.

    Args:
        target: the ``llvm`` target the module is built for (x86 or AArch64). Its
            ``mcpu``/``mattr``/``mtriple`` decide the vector width, ``num-cores`` the
            parallel granularity.

    Returns:
        A ``tvm.transform.Pass``. Functions it schedules get ``tirx.is_scheduled`` and
        ``onnxforge.schedule_rule`` (the rule name); see ``schedule_summary``.
    """
    if not isinstance(target, Target):
        target = Target(target)
    rules = default_rules()

    @tvm.transform.module_pass(opt_level=0, name="OnnxforgeDefaultCpuSchedule")
    def _pass(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        has_relax = _has_relax_function(mod)
        if has_relax:
            mod = relax.transform.AttachAttrLayoutFreeBuffers()(mod)
        mod, packed = _schedule_module(mod, target, rules)
        if has_relax and packed:
            mod = relax.transform.SplitLayoutRewritePreproc()(mod)
            mod = relax.transform.FoldConstant()(mod)
            mod = relax.transform.DeadCodeElimination()(mod)
            # packing kernels that could not be folded (weights given as inputs)
            mod, _ = _schedule_module(mod, target, rules)
        summary = Counter(schedule_summary(mod).values())
        logger.info("default CPU schedules: %s", dict(summary))
        return mod

    return _pass


def schedule_summary(mod: tvm.IRModule) -> dict[str, str]:
    """Map each PrimFunc name to the rule that scheduled it, ``database`` or ``unscheduled``."""
    out = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        rule = func.attrs.get(RULE_ATTR) if func.attrs else None
        if rule is not None:
            out[gvar.name_hint] = str(rule)
        elif is_scheduled(func):
            out[gvar.name_hint] = "database"
        else:
            out[gvar.name_hint] = "unscheduled"
    return out
