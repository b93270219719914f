"""Static int8 QDQ inside control flow: every If branch and Loop / Scan body.

`quantize(int8)` plans and rewrites the main graph first (static.py); then each body,
outer scopes first, gets the same plan/apply rules of core.py, run on a view of the
model whose graph is that body (`BodyModel`):
  * new quantized weights, scales and zero points are main-graph initializers that the
    body reads from the outer scope (names are unique model-wide; onnxruntime fuses
    DQ -> Conv -> Q inside the branch to QLinearConv all the same);
  * an activation a body reads from an outer scope and feeds to a quantized op first
    gets a body-local `Identity`, so its Q/DQ pair is inserted in the body and rewires
    only the body's readers;
  * calibration: one streaming pass over the calibration data for all bodies, reading
    body values through `onnxforge.subgraphs.expose_values` (each value is lifted out
    of its If branch as an extra output; an empty array when the branch was not taken,
    which the observers skip; stacked over the iterations for Loop / Scan). A value whose
    branch never ran on the calibration data has no range: its ops stay float and are
    listed in `kept_float` with that reason.
  * not applied inside bodies: the float preparation of static.py (BatchNorm / bias
    folding, equalization, SmoothQuant, MatMul+Add merging) and, for Loop / Scan bodies,
    bias correction (their calibration values are stacked over iterations).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from ...activations import iter_activations
from ...errors import InputSpecError
from ...subgraphs import Scope, describe_path, iter_scopes, owners, scope_path
from ..graph import remove_unused
from ..naming import NameAllocator
from .core import (
    COMPUTE_OPS,
    Calibration,
    QuantizeOptions,
    _progress_batches,
    apply_calibrated,
    bias_correction_inputs,
    make_plan,
)
from .layer_error import output_errors
from .observers import ChannelMeanObserver, TensorObserver
from .recurrent import RECURRENT_OPS, quantize_recurrent


class BodyModel(ir.Model):
    """A model view whose graph is one subgraph of `root` (opsets and names from `root`)."""

    def __init__(self, root: ir.Model, body: ir.Graph):
        super().__init__(body, ir_version=root.ir_version)
        self.root = root
        self.root_graph = root.graph  # core._Builder allocates names and weights there

    @property
    def opset_imports(self) -> dict[str, int]:  # type: ignore[override]
        return self.root.opset_imports


def _localize_outer_inputs(body: ir.Graph, names: NameAllocator, ops: set[str]) -> int:
    """Identity copies, inside `body`, of outer-scope activations read by compute ops of
    the types `ops` (the ones the run quantizes)."""
    local = {id(v) for v in body.inputs} | {id(o) for n in body for o in n.outputs}
    copies: dict[int, ir.Value] = {}
    first = next(iter(body), None)
    for node in list(body):
        if node.op_type not in COMPUTE_OPS or node.op_type not in ops:
            continue
        for i, v in enumerate(node.inputs):
            if v is None or id(v) in local or v.const_value is not None:
                continue
            producer = v.producer()
            if producer is not None and producer.op_type == "Constant":
                continue
            if id(v) not in copies:
                copy = names.make_node("Identity", [v], name=f"{v.name}_local",
                                       output_names=[f"{v.name}_local"])
                copy.outputs[0].type, copy.outputs[0].shape = v.type, v.shape
                body.insert_before(first, copy) if first is not None else body.append(copy)
                copies[id(v)] = copy.outputs[0]
            node.replace_input_with(i, copies[id(v)])
    return len(copies)


def _in_loop(scope: Scope, by_graph: dict) -> bool:
    return any(s.owner.op_type in ("Loop", "Scan") for s in scope_path(scope.graph, by_graph))


def _calibrate(model: ir.Model, context: Any, names: set[str], channel_inputs: dict[str, int],
               opts: QuantizeOptions) -> Calibration:
    """One pass over the calibration data reading body values (empty arrays skipped)."""
    observers = {n: TensorObserver(opts.calibration) for n in names}
    channel = {n: ChannelMeanObserver(a) for n, a in channel_inputs.items()}
    start = time.perf_counter()
    limit = opts.calib_batches or context.max_calibration_batches
    batches = _progress_batches(context.calibration_batches(limit), limit, "calibrating bodies")
    count = 0
    for acts in iter_activations(model, sorted(names | set(channel)), batches,
                                 threads=context.threads):
        for n, obs in observers.items():
            obs.add(acts[n])
        for n, obs in channel.items():
            if np.asarray(acts[n]).size:
                obs.add(acts[n])
        count += 1
    if count == 0:
        raise InputSpecError("quantize: the calibration source yielded no batches")
    return Calibration(observers, channel, count, time.perf_counter() - start)


def _drop_unobserved(plan, calibration: Calibration, where: str) -> bool:
    """Compute ops touching a value never seen (branch not taken) leave `plan.compute`,
    with the reason in `plan.skipped`; True when any did (the plan must be made again:
    its tensors include values without a range)."""
    unseen = set()
    for name, tq in plan.tensors.items():
        if not calibration.observers[tq.data_name].seen:
            unseen.update((name, tq.data_name))
    if not unseen:
        return False
    keep = [n for n in plan.compute
            if not any(v is not None and v.name in unseen for v in [*n.inputs, *n.outputs])]
    for n in plan.compute:
        if n not in keep:
            plan.skipped[n.name] = f"{where}: branch never taken on the calibration data"
    plan.compute = keep
    return True


def quantize_bodies(model: ir.Model, opts: QuantizeOptions, context: Any, *,
                    with_nodes: bool = False):
    """Static int8 QDQ in every If / Loop / Scan body of `model` (in place): the report
    (and, `with_nodes`, the compute nodes quantized)."""
    by_graph = owners(model.graph)
    scopes = list(iter_scopes(model.graph))
    quantized: list[ir.Node] = []
    if not scopes:
        return ({}, quantized) if with_nodes else {}
    names = NameAllocator(model.graph)
    jobs = []
    for scope in scopes:
        _localize_outer_inputs(scope.graph, names, {o.strip() for o in opts.ops.split(",")})
        view = BodyModel(model, scope.graph)
        # keep_float: the names that are nodes of this body ("first"/"last": main graph)
        here = {n.name for n in scope.graph}
        keep = ",".join(t.strip() for t in opts.keep_float.split(",") if t.strip() in here)
        body_opts = dataclasses.replace(opts, keep_float=keep)
        if _in_loop(scope, by_graph):
            body_opts = dataclasses.replace(body_opts, bias_correction=False)
        plan = make_plan(view, body_opts)
        if plan.compute:
            jobs.append((describe_path(scope_path(scope.graph, by_graph)), view, plan, body_opts))
    report: dict[str, Any] = {"bodies": len(scopes), "bodies_quantized": 0,
                              "compute_quantized": 0, "qdq_pairs": 0, "kept_float": {}}
    if not jobs:
        return (report, quantized) if with_nodes else report
    tensors = {tq.data_name for _, _, plan, _ in jobs for tq in plan.tensors.values()}
    channel = {k: v for _, _, plan, o in jobs for k, v in bias_correction_inputs(plan, o).items()}
    calibration = _calibrate(model, context, tensors, channel, opts)
    report["calibration_batches"] = calibration.batches
    for where, view, plan, body_opts in jobs:
        if _drop_unobserved(plan, calibration, where):
            # re-plan without the unobserved ops (their tensors have no range)
            only = {n.name for n in plan.compute}
            skipped = dict(plan.skipped)
            plan = make_plan(view, body_opts, only or {"\0none"})
            plan.skipped.update(skipped)
            if _drop_unobserved(plan, calibration, where):  # still a value without range
                for n in plan.compute:
                    plan.skipped[n.name] = f"{where}: a value it needs was never observed"
                plan.compute = []
        if plan.compute:
            applied, _ = apply_calibrated(view, plan, calibration, body_opts)
            report["bodies_quantized"] += 1
            report["compute_quantized"] += len(plan.compute)
            report["qdq_pairs"] += applied["qdq_pairs"]
            quantized.extend(plan.compute)
        report["kept_float"].update({k: v for k, v in plan.skipped.items()})
    if quantized:
        remove_unused(model)  # float weights bodies read from the main graph are now dead
    return (report, quantized) if with_nodes else report


def has_bodies_or_recurrent(model: ir.Model) -> bool:
    """Whether `model` has an If/Loop/Scan body or an LSTM/GRU anywhere."""
    return any(n.op_type in RECURRENT_OPS or n.op_type in ("If", "Loop", "Scan")
               for n in ir.traversal.RecursiveGraphIterator(model.graph))


def quantize_bodies_and_recurrent(model: ir.Model, opts: QuantizeOptions, context: Any,
                                  reference: ir.Model | None) -> dict[str, Any]:
    """QDQ in every body, then LSTM/GRU weights (`opts.recurrent`); with the float
    `reference`, each rewritten layer's output error (layer_error.py) is reported:
    `subgraphs.layer_rel_l2` and `recurrent.layers.<name>.output_rel_l2`."""
    if reference is None:
        return {}
    bodies, quantized = quantize_bodies(model, opts, context, with_nodes=True)
    recurrent = quantize_recurrent(model, opts.recurrent)
    outputs = {n.name: n.outputs[0].name for n in quantized if n.outputs}
    for name, layer in recurrent.get("layers", {}).items():
        outputs[name] = layer.pop("output")
    errors = output_errors(reference, model, sorted(set(outputs.values())), context)
    if quantized:
        bodies["layer_rel_l2"] = {n.name: errors.get(outputs[n.name]) for n in quantized}
    for name, layer in recurrent.get("layers", {}).items():
        layer["output_rel_l2"] = errors.get(outputs[name])
    return {"subgraphs": bodies, "recurrent": recurrent}
