"""Lossy stages of the differential fuzzer: `prune`, `lowrank` and `sparsify` on random graphs.

Each random graph is first rewritten by `cleanup,fuse` (checked exact by the pipeline
stage; the lossy passes expect folded BatchNorms), giving the *base*. Each stage draws
its pass options from the graph's bytes (the same graph always gets the same options,
shown in the stage's detail), runs the pass through `PassManager` with a verification
source (so the step reports its error as `optimize` does), and checks:

- every stage: the result passes `onnx.checker` (full), onnxruntime runs it with the
  base's output names and shapes, the error the step reports equals the one measured
  here with onnxruntime on the same batches (`REPORT_RTOL`), and the result compiled for
  the host (dense: an empty break-even table) matches onnxruntime on the same file;
- `prune`: without recovery, the pruned model equals the base with the removed channels
  masked (`masked_reference` from the pass's own plan: the units it removes); with
  recovery, that the layer structure is that plan's;
- `lowrank`: in *exact* mode (`rank=full`, a margin that always replaces) the
  decomposed model equals the base (the rewrite itself: factor layout, transB/alpha,
  Tucker-2 cores with pads/strides/dilations, spatial SVD, bias and bias-Add handling);
  otherwise only the common checks;
- `sparse`: the sparsity record names existing initializers with the zero fraction they
  hold and the block pattern holds on each weight's 2-D view; without recovery every
  other weight is the base's, bit for bit, and every kept weight equals the base's;
  then the file is compiled with the sparse kernels *forced on* (every break-even 1.0),
  must match onnxruntime on the sparsified file, and the compile report's sparse op
  count is kept (`StageResult.extra`) so a run can show the kernels actually ran.

Statuses as in `onnxforge.fuzz`: a pass that refuses with a clear onnxforge error is
`refused`; a prune that refused itself (model left unchanged, reason in its stats) is
`refused` with that reason; numbers that disagree are `wrong`; other exceptions `crash`.
"""

from __future__ import annotations

import io
import json
import re
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx

from .errors import one_line

LOSSY_STAGES = ("prune", "lowrank", "sparse")
# the block patterns sparsify writes that the sparse kernels take (block(1x1) is not a
# sparsify pattern), each forced on
SPARSE_PATTERNS = ((1, 8), (16, 1), (4, 4), (1, 4), (2, 2))
SPARSE_KINDS = ("matmul", "gemv", "conv1x1", "conv")
FORCE_SPARSE = {kind: {f"block({r}x{c})": 1.0 for r, c in SPARSE_PATTERNS}
                for kind in SPARSE_KINDS}
DENSE_ONLY: dict[str, dict[str, float]] = {}  # no break-even: every op stays dense
CALIB_BATCHES = 8
EVAL_BATCHES = 4
# the step's reported relative L2 error vs the one measured here (same batches, same ORT)
REPORT_RTOL = 1e-3
# lowrank at full rank: an exact rewrite up to the SVD's rounding, amplified by the graph
EXACT_LOWRANK_RTOL = 1e-3
BASE_PIPELINE = "cleanup,fuse"


class Wrong(Exception):
    """A check failed: the stage's outputs or report disagree with the reference."""

    def __init__(self, detail: str, rel: float | None = None, rel_l2: float | None = None):
        super().__init__(detail)
        self.detail, self.rel, self.rel_l2 = detail, rel, rel_l2


class Refused(Exception):
    """The pass declined the graph itself and left it unchanged (its stats say why)."""


def graph_rng(model: onnx.ModelProto, stage: str) -> np.random.Generator:
    """Options drawn from the graph's bytes: one graph, one set of options per stage."""
    return np.random.default_rng([zlib.crc32(model.SerializeToString()), zlib.crc32(
        stage.encode())])


def _pick(rng: np.random.Generator, options: list, weights: list[float] | None = None):
    p = None if weights is None else np.asarray(weights, float) / sum(weights)
    return options[int(rng.choice(len(options), p=p))]


# ---------------------------------------------------------------------- options


def prune_options(rng: np.random.Generator) -> str:
    criterion = _pick(rng, ["l1", "l2", "bn", "activation", "energy", "reconstruction"],
                      [2, 3, 1, 1, 1, 1])
    target = (f"macs={_pick(rng, [0.2, 0.4])}" if rng.random() < 0.25
              else f"ratio={_pick(rng, [0.25, 0.5, 0.75])}")
    recover = str(rng.random() < 0.35).lower()
    round_to = _pick(rng, [1, 1, 2, 4])
    return f"prune({target},criterion={criterion},recover={recover},round_to={round_to})"


def lowrank_options(rng: np.random.Generator) -> tuple[str, bool]:
    """(pipeline text, exact): exact mode keeps full rank and always replaces a layer."""
    method = _pick(rng, ["tucker2", "spatial"], [2, 1])
    aware = str(rng.random() < 0.5).lower()
    if rng.random() < 0.5:
        text = (f"lowrank(rank=full,margin=-100,round_to=1,method={method},data_aware={aware},"
                "guard=false)")
        return text, True
    budget = _pick(rng, ["energy=0.5", "energy=0.8", "energy=0.95", "macs=0.3", "params=0.5",
                         "rank=0.5"])
    margin = _pick(rng, [0.1, -1.0])
    text = (f"lowrank({budget},margin={margin},round_to={_pick(rng, [1, 8])},method={method},"
            f"data_aware={aware},guard=false)")
    return text, False


def sparsify_options(rng: np.random.Generator, base) -> tuple[str, bool]:
    """(pipeline text, recover); the block pattern is one that tiles a layer of `base`."""
    from .passes.sparsity.layers import find_layers
    from .passes.sparsity.patterns import parse_pattern

    layers, _ = find_layers(base.graph)
    fitting = [f"block({r}x{c})" for r, c in SPARSE_PATTERNS if any(
        parse_pattern(f"block({r}x{c})").unfit_reason(layer.view().shape) is None
        for layer in layers)]
    pattern = _pick(rng, fitting or [f"block({r}x{c})" for r, c in SPARSE_PATTERNS])
    recover = bool(rng.random() < 0.35)
    return (f"sparsify({_pick(rng, [0.5, 0.7, 0.9])},pattern={pattern},"
            f"criterion={_pick(rng, ['magnitude', 'wanda'])},"
            f"scope={_pick(rng, ['layer', 'layer', 'global'])},"
            f"keep={_pick(rng, ['none', 'none', 'first,last,depthwise'])!r},"
            f"recover={str(recover).lower()})"), recover


# ---------------------------------------------------------------------- shared checks


class LossyCase:
    """The base (cleanup,fuse) of one graph, its data, and helpers the stages share."""

    def __init__(self, model: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
                 target: str = "host", rtol: float = 1e-4):
        from .calibration import RandomSource
        from .ir import load_model, to_proto
        from .pass_manager import PassManager
        from .passes.base import PassContext

        self.inputs, self.target, self.rtol = inputs, target, rtol
        self.shapes = {name: tuple(a.shape) for name, a in inputs[0].items()}
        dtypes = {name: a.dtype for name, a in inputs[0].items()}
        self.calibration = RandomSource(self.shapes, dtypes, count=CALIB_BATCHES, seed=1)
        self.evaluation = RandomSource(self.shapes, dtypes, count=EVAL_BATCHES, seed=2)
        working = load_model(model)
        self.base, _ = PassManager(BASE_PIPELINE, PassContext(input_shapes=self.shapes)
                                   ).run(working)
        self.base_proto = to_proto(self.base)
        self.base_outputs = _ort(self.base_proto, inputs)

    def run_pass(self, text: str, prepare: Callable[[list], None] | None = None):
        """(result as an IR model, its proto, the step report) of pipeline `text` on a
        copy of the base, with the step's error measured on the evaluation batches;
        `prepare` sees the configured passes first (to record what they compute)."""
        from rich.console import Console

        from .ir import load_model, to_proto
        from .pass_manager import PassManager
        from .passes.base import PassContext
        from .pipeline import Pipeline

        context = PassContext(calibration=self.calibration, input_shapes=self.shapes)
        working = load_model(self.base, check=False)
        pipeline = Pipeline.parse(text, context)
        if prepare is not None:
            prepare(pipeline.passes)
        manager = PassManager(pipeline, context, verify_source=self.evaluation,
                              verify_batches=EVAL_BATCHES, console=Console(file=io.StringIO()))
        working, steps = manager.run(working)
        return working, to_proto(working), steps[-1]

    def check_valid(self, proto: onnx.ModelProto) -> list[dict[str, np.ndarray]]:
        """The result is a valid model onnxruntime runs with the base's outputs' names and
        shapes; returns its outputs on the fuzz inputs."""
        try:
            onnx.checker.check_model(proto, full_check=True)
        except Exception as exc:  # several checker error types
            raise Wrong(one_line(f"invalid model: {exc}", 200)) from exc
        try:
            got = _ort(proto, self.inputs)
        except Exception as exc:  # ORT raises its own types
            raise Wrong(one_line(f"ORT cannot run the result: {exc}", 200)) from exc
        want = [o.name for o in self.base_proto.graph.output]
        have = [o.name for o in proto.graph.output]
        if have != want:
            raise Wrong(f"outputs {have} != the original's {want}")
        for ref, out in zip(self.base_outputs, got):
            for name, array in ref.items():
                if out[name].shape != array.shape:
                    raise Wrong(f"output {name!r} shape {out[name].shape} != {array.shape}")
                if np.all(np.isfinite(array)) and not np.all(np.isfinite(out[name])):
                    raise Wrong(f"output {name!r} has non-finite values")
        return got

    def check_equal(self, got: list[dict[str, np.ndarray]], want: list[dict[str, np.ndarray]],
                    what: str, rtol: float | None = None) -> None:
        from .fuzz_stages import compare

        r = compare(want, got, self.rtol if rtol is None else rtol)
        if r.status != "correct":
            raise Wrong(f"{what}: {r.detail}", r.rel, r.rel_l2)

    def check_reported_error(self, step, proto: onnx.ModelProto) -> float:
        """The step's reported relative L2 error equals the one measured here."""
        if not step.modified:
            return 0.0
        if step.error is None:
            raise Wrong("the lossy step reported no error")
        batches = list(self.evaluation.batches(EVAL_BATCHES))
        ref, got = _ort(self.base_proto, batches), _ort(proto, batches)
        measured = 0.0
        for name in ref[0]:
            diff = sum(float(np.sum((r[name].astype(np.float64) - g[name]) ** 2))
                       for r, g in zip(ref, got))
            norm = sum(float(np.sum(r[name].astype(np.float64) ** 2)) for r in ref)
            measured = max(measured, np.sqrt(diff) / np.sqrt(norm) if norm else np.sqrt(diff))
        reported = float(step.error.max_rel_l2)
        if not abs(reported - measured) <= REPORT_RTOL * max(measured, reported) + 1e-6:
            raise Wrong(f"reported error (relative L2 {reported:.4g}) != measured "
                        f"{measured:.4g}")
        return measured

    def check_compiled(self, proto: onnx.ModelProto, references, table, what: str
                       ) -> dict[str, Any]:
        """Compile `proto` with break-even `table`, compare with onnxruntime on the same
        file; returns the compile report's `sparse` entry."""
        from .fuzz_stages import run_compile_stage

        r = run_compile_stage(proto, self.inputs, references, self.target, self.rtol,
                              sparse_break_even=table)
        if r.status == "wrong":
            raise Wrong(f"{what}: {r.detail}", r.rel, r.rel_l2)
        if r.status != "correct":
            raise _Sub(r.status, f"{what}: {r.detail}")
        return r.extra.get("sparse", {})


class _Sub(Exception):
    """A compile that refused or crashed inside a lossy stage: that status, its detail."""

    def __init__(self, status: str, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _ort(proto: onnx.ModelProto, batches: list[dict[str, np.ndarray]]):
    from .fuzz_stages import ort_outputs

    return ort_outputs(proto, batches)


# ---------------------------------------------------------------------- stages


def run_prune_check(case: LossyCase, text: str) -> tuple[str, dict[str, Any]]:
    from .passes.base import PassContext
    from .passes.pruning.apply import masked_reference
    from .passes.pruning.prune import PrunePass
    from .pipeline import Pipeline

    _, proto, step = case.run_pass(text)
    if "refused" in step.stats:
        raise Refused(f"prune refused: {step.stats['refused']}")
    if not step.modified:
        return "nothing to prune", {}
    got = case.check_valid(proto)
    error = case.check_reported_error(step, proto)
    # the plan the pass follows, made again on the base (deterministic: same data, seed)
    context = PassContext(calibration=case.calibration, input_shapes=case.shapes)
    options = Pipeline.parse(text, context).passes[0].options
    plan = PrunePass(options, context).plan(case.base)
    for key in ("macs", "params"):  # the pass's own cost model vs the written model
        reported = (step.stats.get(f"{key}_before"), step.stats.get(f"{key}_after"))
        counted = (step.before.get(key), step.after.get(key))
        if reported != counted:
            raise Wrong(f"reported {key} {reported[0]} -> {reported[1]}, the models have "
                        f"{counted[0]} -> {counted[1]}")
    if len(plan.chosen) != step.stats.get("units_removed"):
        raise Wrong(f"the pass removed {step.stats.get('units_removed')} units, its plan "
                    f"{len(plan.chosen)}")
    if "recover=false" in text:
        from .ir import to_proto

        masked = to_proto(masked_reference(case.base, plan.analysis, plan.removed))
        case.check_equal(got, _ort(masked, case.inputs), "pruned != original with the "
                         "removed channels masked")
    case.check_compiled(proto, got, DENSE_ONLY, "dense compile of the pruned model")
    return (f"{len(plan.chosen)} units removed, MACs -{step.stats.get('macs_removed_fraction')}, "
            f"error {error:.3g}"), {}


def _record_reconstructions(passes: list, found: dict[str, np.ndarray]) -> None:
    """Make the lowrank pass record each decomposed weight's reconstruction, in the ONNX
    layout of the weight it replaces (`found`: weight name -> array)."""
    lowrank = passes[0]
    factors = lowrank._factors

    def recording(layer, plan, ranks):
        out, approx = factors(layer, plan, ranks)
        w = np.asarray(approx, np.float64)
        if layer.op == "MatMul":
            w = w.T
        elif layer.op == "Gemm":  # alpha and transB were folded into the weight
            from .passes.graph import attr

            w = w / float(attr(layer.node, "alpha", 1.0))
            w = w if int(attr(layer.node, "transB", 0)) else w.T
        found[layer.weight_value.name] = w.reshape(layer.weight_value.const_value.shape)
        return out, approx

    lowrank._factors = recording


def _with_weights(proto: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for t in copy.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(np.float32), t.name))
    return copy


def run_lowrank_check(case: LossyCase, text: str, exact: bool) -> tuple[str, dict[str, Any]]:
    approx: dict[str, np.ndarray] = {}
    _, proto, step = case.run_pass(text, lambda passes: _record_reconstructions(passes, approx))
    if not step.modified:
        return f"nothing decomposed ({step.stats.get('candidates', 0)} candidates)", {}
    got = case.check_valid(proto)
    error = case.check_reported_error(step, proto)
    kept = sum(1 for r in step.stats.get("layers", {}).values() if r.get("kept"))
    if kept != step.stats.get("decomposed"):
        raise Wrong(f"stats: {step.stats.get('decomposed')} decomposed, {kept} layers kept")
    oracle = ""
    if exact:
        case.check_equal(got, case.base_outputs, "full-rank decomposition != original",
                         EXACT_LOWRANK_RTOL)
        oracle = " (= original)"
    elif "data_aware=false" in text:  # no bias correction: the weights alone changed
        names = {t.name for t in case.base_proto.graph.initializer}
        replaced = {k: v for k, v in approx.items() if k in names}
        if len(replaced) == len(approx) == kept:
            reference = _ort(_with_weights(case.base_proto, replaced), case.inputs)
            case.check_equal(got, reference, "decomposed model != original with each "
                             "decomposed weight replaced by its reconstruction",
                             EXACT_LOWRANK_RTOL)
            oracle = " (= original with the reconstructed weights)"
    case.check_compiled(proto, got, DENSE_ONLY, "dense compile of the decomposed model")
    return f"{kept} layers decomposed{oracle}, error {error:.3g}", {}


def _zeros_are_blocks(view: np.ndarray, pattern: str) -> bool:
    """The zeros of the 2-D view are whole R x C blocks of `pattern`, at least one (what
    the BSR conversion drops; the random weights have no zero of their own)."""
    rows, cols = (int(v) for v in re.fullmatch(r"block\((\d+)x(\d+)\)", pattern).groups())
    o, i = view.shape
    zero_blocks = np.all(view.reshape(o // rows, rows, i // cols, cols) == 0, axis=(1, 3))
    expanded = np.repeat(np.repeat(zero_blocks, rows, axis=0), cols, axis=1)
    return bool(zero_blocks.any()) and bool(np.array_equal(view == 0, expanded))


def check_sparsity_record(base: onnx.ModelProto, proto: onnx.ModelProto,
                          recover: bool) -> dict[str, Any]:
    """The `onnxforge.sparsity` record against the weights it describes; without recover,
    every weight is the base's except zeros written into the recorded ones."""
    from onnx import numpy_helper

    from .passes.sparsity.metadata import SPARSITY_KEY

    props = {p.key: p.value for p in proto.metadata_props}
    record = json.loads(props.get(SPARSITY_KEY, "{}"))
    new = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    old = {t.name: numpy_helper.to_array(t) for t in base.graph.initializer}
    for name, entry in record.items():
        if name not in new:
            raise Wrong(f"sparsity record names {name!r}, not an initializer")
        w = new[name]
        zeros = float(np.mean(w == 0))
        if abs(zeros - float(entry["sparsity"])) > 1e-6 or list(w.shape) != entry["shape"]:
            raise Wrong(f"sparsity record of {name!r} says {entry['sparsity']} zeros, shape "
                        f"{entry['shape']}; the weight has {zeros:.6f}, {list(w.shape)}")
    if not recover:
        for name, w in new.items():
            base_w = old.get(name)
            if base_w is None:
                raise Wrong(f"initializer {name!r} is not in the original")
            if name in record:
                expect = np.where(w == 0, np.zeros_like(base_w), base_w)
            else:
                expect = base_w
            if w.shape != base_w.shape or not np.array_equal(w, expect):
                raise Wrong(f"weight {name!r} changed beyond the zeros sparsify wrote")
    return record


def run_sparse_check(case: LossyCase, text: str, recover: bool) -> tuple[str, dict[str, Any]]:
    from .passes.sparsity.layers import find_layers

    model, proto, step = case.run_pass(text)
    if not step.modified:
        return "nothing sparsified", {"sparse_ops": 0}
    got = case.check_valid(proto)
    error = case.check_reported_error(step, proto)
    record = check_sparsity_record(case.base_proto, proto, recover)
    pattern = step.stats.get("pattern", "")
    views = {layer.weight.name: layer.view() for layer in find_layers(model.graph)[0]}
    broken = [n for n in record if n not in views or not _zeros_are_blocks(views[n], pattern)]
    if broken:
        raise Wrong(f"{broken[0]!r} is recorded as {pattern}, its zeros are not whole blocks")
    sparse = case.check_compiled(proto, got, FORCE_SPARSE,
                                 "compile with the sparse kernels forced")
    case.check_compiled(proto, got, DENSE_ONLY, "dense compile of the sparsified model")
    kinds = sparse.get("sparse_kernels", {})
    used = ", ".join(f"{k} {n}" for k, n in kinds.items()) or "none"
    dense = "; ".join(f"{d['count']}x {d['reason']}" for d in sparse.get("dense_ops", []))
    return (f"{len(record)} weights sparsified, sparse kernels: {used}"
            + (f" (dense: {dense})" if dense else "") + f", error {error:.3g}",
            {"sparse_ops": int(sparse.get("sparse_ops", 0)), "sparse_kernels": kinds})


def lossy_options(detail: str) -> str | None:
    """The pipeline text at the front of a lossy stage's detail (None if there is none)."""
    head = detail.split(": ", 1)[0]
    return head if re.fullmatch(r"(prune|lowrank|sparsify)\(.*\)", head) else None


def run_lossy_stage(stage: str, model: onnx.ModelProto, inputs: list[dict[str, np.ndarray]],
                    target: str = "host", rtol: float = 1e-4, options: str | None = None):
    """One lossy stage (`prune`, `lowrank`, `sparse`) of graph `model` as a StageResult;
    `options` (pipeline text) replaces the options drawn from the graph (the shrinker
    keeps the failing graph's)."""
    from .fuzz_stages import StageResult, classify_exception

    start = time.perf_counter()
    rng = graph_rng(model, stage)
    text = ""
    try:
        case = LossyCase(model, inputs, target, rtol)
        if stage == "prune":
            text = options or prune_options(rng)
            detail, extra = run_prune_check(case, text)
        elif stage == "lowrank":
            text = options or lowrank_options(rng)[0]
            detail, extra = run_lowrank_check(case, text, "rank=full" in text)
        elif stage == "sparse":
            text = options or sparsify_options(rng, case.base)[0]
            detail, extra = run_sparse_check(case, text, "recover=true" in text)
        else:
            raise ValueError(f"unknown lossy stage {stage!r}")
        result = StageResult("correct", f"{text}: {detail}", extra=extra)
    except Wrong as w:
        result = StageResult("wrong", f"{text}: {w.detail}", w.rel, w.rel_l2)
    except Refused as r:
        result = StageResult("refused", f"{text}: {r}")
    except _Sub as s:
        result = StageResult(s.status, f"{text}: {s.detail}")
    except Exception as exc:  # noqa: BLE001 - classified, never raised
        result = classify_exception(exc)
        result.detail = f"{text}: {result.detail}" if text else result.detail
    result.seconds = time.perf_counter() - start
    return result
