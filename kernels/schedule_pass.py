"""The module pass that gives every unscheduled PrimFunc a default CPU schedule.

``default_schedule_pass(target)`` runs after LegalizeOps / AnnotateTIROpPattern /
FoldConstant / FuseOps / FuseTIR (and after MetaScheduleApplyDatabase when a tuning
database is used). Per PrimFunc without ``tirx.is_scheduled``, the first rule of
``cpu_rules.default_rules()`` that matches schedules it; the function is then marked
``tirx.is_scheduled`` and its attribute ``onnxforge.schedule_rule`` names the rule.

Weight packing: rules may rewrite the layout of weight constants through
``meta_schedule.layout_rewrite_preproc`` blocks. The pass marks the layout-free
parameters first (``attach_layout_free_buffers``, the contract of Relax
``AttachAttrLayoutFreeBuffers`` without its renaming) and afterwards splits those blocks
out (``SplitLayoutRewritePreproc``) and folds them into new constants (numpy, see
``weight_pack``; ``FoldConstant`` for anything else), so the packing costs nothing at
run time. Weights passed as function inputs (``num_input``)
stay packed at run time by a small scheduled kernel.

``legalize_and_fuse_passes()`` lists the Relax passes to run before it (without a
tuning database). ``schedule_summary(mod)`` tells, per PrimFunc, who scheduled it: a
rule name, ``"database"`` (MetaSchedule) or ``"unscheduled"``.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Mapping

import tvm
from tvm import relax, s_tir, tirx
from tvm.target import Target

from .cpu_rules import default_rules
from .rule_base import packs_weights
from .schedule_configs import CONFIG_ATTR, workload_key
from .weight_pack import fold_weight_prepack

logger = logging.getLogger(__name__)

RULE_ATTR = "onnxforge.schedule_rule"
SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")
_CALL_TIR = tvm.ir.Op.get("relax.call_tir")


def is_scheduled(func: tirx.PrimFunc) -> bool:
    """True when a PrimFunc carries ``tirx.is_scheduled`` (or the older ``tir.`` spelling)."""
    attrs = func.attrs
    if attrs is None:
        return False
    return any(key in attrs and bool(attrs[key]) for key in SCHEDULED_ATTRS)


def _func_target(func: tirx.PrimFunc, target: Target) -> Target:
    own = func.attrs.get("target") if func.attrs else None
    return own if own is not None else target


def apply_rule(rule, func: tirx.PrimFunc, target: Target, config: dict | None = None):
    """Schedule ``func`` with one rule (and knob setting); None when the rule declines."""
    try:
        sch = rule.apply(func, target, False, config)
    except Exception as err:  # noqa: BLE001 - a rule that trips is a rule that declines
        logger.debug("rule %s declined after error: %s", rule.name, err)
        return None
    if sch is None:
        return None
    # loop_partition copies blocks with their iter vars: give every copy its own vars
    new = s_tir.renew_defs(sch.mod["main"])
    new = new.with_attr("tirx.is_scheduled", True).with_attr(RULE_ATTR, rule.name)
    if config:
        new = new.with_attr(CONFIG_ATTR, json.dumps(config, sort_keys=True))
    return new


def matching_rule(func: tirx.PrimFunc, target: Target, rules):
    """The first rule that schedules ``func`` (its heuristic knobs) and the result."""
    for rule in rules:
        if rule.is_target_available(target):
            new = apply_rule(rule, func, target)
            if new is not None:
                return rule, new
    return None, None


def _schedule_one(func: tirx.PrimFunc, target: Target, rules,
                  configs: Mapping[str, dict] | None) -> tirx.PrimFunc | None:
    rule, scheduled = matching_rule(func, target, rules)
    entry = configs.get(workload_key(func)) if configs and rule is not None else None
    if entry is not None and entry.get("config"):
        # only a setting of the rule that schedules this function now, and one that rule
        # offers for it, is applied (an entry measured before a rule change is not)
        if entry["rule"] == rule.name and entry["config"] in rule.configs(func, target):
            configured = apply_rule(rule, func, target, entry["config"])
            if configured is not None:
                return configured
        logger.info("schedule config %s for %s not applicable, heuristic knobs used",
                    entry, func.attrs.get("global_symbol") if func.attrs else "?")
    return scheduled


def _schedule_module(mod: tvm.IRModule, target: Target, rules,
                     configs: Mapping[str, dict] | None = None) -> tvm.IRModule:
    """Schedule all unscheduled PrimFuncs."""
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        new = _schedule_one(func, _func_target(func, target), rules, configs)
        if new is None:
            logger.info("no default schedule for %s", gvar.name_hint)
            continue
        updates[gvar] = new
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def _packs_any_weights(mod: tvm.IRModule) -> bool:
    """True when some scheduled PrimFunc (rule or tuning record) packs weights in a block
    that SplitLayoutRewritePreproc can move out of it."""
    return any(isinstance(f, tirx.PrimFunc) and is_scheduled(f) and packs_weights(f)
               for _, f in mod.functions_items())


def _calls_prepack_on_constants(mod: tvm.IRModule) -> bool:
    """True when a ``*_weight_prepack`` kernel is still applied to a constant."""
    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            text = func.script(show_meta=False)
            for line in text.splitlines():
                if "_weight_prepack" in line and "metadata[" in line:
                    return True
    return False


def attach_layout_free_buffers(mod: tvm.IRModule) -> tvm.IRModule:
    """Mark PrimFunc parameters that always receive weights as ``layout_free_buffers``.

    Same contract as Relax ``AttachAttrLayoutFreeBuffers`` (constants and the parameters
    after ``num_input`` are weights) but it keeps every function under its name: that
    pass re-adds the functions and renames them (``f`` -> ``f1``), which breaks the link
    to names a report or a tuning log already holds. A parameter counts only when it is a
    weight at every call site. Functions already scheduled are left alone.
    """
    sites: dict = {}

    @relax.expr_functor.visitor
    class _Collect(relax.PyExprVisitor):
        def __init__(self, weights):
            super().__init__()
            self.weights = weights

        def visit_call_(self, call):
            if call.op.same_as(_CALL_TIR) and isinstance(call.args[0], tvm.ir.GlobalVar):
                args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else []
                flags = [
                    isinstance(a, tvm.ir.expr.Constant) or any(a.same_as(w) for w in self.weights)
                    for a in args
                ]
                sites.setdefault(call.args[0].name_hint, []).append(flags)
            for arg in call.args:
                self.visit_expr(arg)

    for _, func in mod.functions_items():
        if isinstance(func, relax.Function):
            num_input = func.attrs.get("num_input") if func.attrs else None
            weights = list(func.params[int(num_input) :]) if num_input is not None else []
            _Collect(weights).visit_expr(func)
    for gvar, func in list(mod.functions_items()):
        if not isinstance(func, tirx.PrimFunc) or is_scheduled(func):
            continue
        calls = sites.get(gvar.name_hint)
        if not calls or any(len(c) != len(calls[0]) for c in calls):
            continue
        free = [i for i in range(len(calls[0])) if all(c[i] for c in calls)]
        mod[gvar] = func.with_attr("layout_free_buffers", free)
    return mod


def _has_relax_function(mod: tvm.IRModule) -> bool:
    return any(isinstance(f, relax.Function) for _, f in mod.functions_items())


# A PrimFunc made by a rewrite may state its fusion pattern in this attribute where TVM's
# analysis is too cautious: a 256-entry table lookup (backends/tvm/lookup_tables) reads its
# input element by element, but AnnotateTIROpPattern calls its data-dependent load opaque,
# and FuseOps would leave it a kernel of its own, one more pass over the tensor.
PRESET_OP_PATTERN = "onnxforge.op_pattern"


@tvm.transform.module_pass(opt_level=0, name="PresetOpPattern")
def preset_op_pattern(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """``op_pattern`` := ``onnxforge.op_pattern`` where a PrimFunc states one."""
    for gvar, func in list(mod.functions_items()):
        if isinstance(func, tirx.PrimFunc) and func.attrs and PRESET_OP_PATTERN in func.attrs:
            mod[gvar] = func.with_attr("op_pattern", func.attrs[PRESET_OP_PATTERN])
    return mod


def legalize_and_fuse_passes() -> list[tvm.transform.Pass]:
    """The Relax passes that make the fused PrimFuncs ``default_schedule_pass`` schedules:
    LegalizeOps, AnnotateTIROpPattern, PresetOpPattern, FoldConstant, FuseOps, FuseTIR
    (in this order, under the target's context)."""
    return [
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        preset_op_pattern,
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def default_schedule_pass(target: Target,
                          configs: Mapping[str, dict] | None = None) -> tvm.transform.Pass:
    """Module pass: schedule every PrimFunc that has no schedule yet with the CPU rules.

    Args:
        target: the ``llvm`` target the module is built for (x86 or AArch64). Its
            ``mcpu``/``mattr``/``mtriple`` decide the vector width, ``num-cores`` the
            parallel granularity.
        configs: measured knob settings by workload key (``schedule_configs``); a
            function found there is scheduled with that setting (attribute
            ``onnxforge.schedule_config``), the others with the rules' heuristics.

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
            mod = attach_layout_free_buffers(mod)
        mod = _schedule_module(mod, target, rules, configs)
        if has_relax and _packs_any_weights(mod):
            mod = relax.transform.SplitLayoutRewritePreproc()(mod)
            mod = fold_weight_prepack(mod)
            if _calls_prepack_on_constants(mod):
                mod = relax.transform.FoldConstant()(mod)
            mod = relax.transform.DeadCodeElimination()(mod)
            # packing kernels that could not be folded (weights given as inputs)
            mod = _schedule_module(mod, target, rules)
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
