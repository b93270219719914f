"""Run the ONNX backend node test suite through an onnxforge pipeline and onnxruntime.

For every node test case (a one-op model with input and expected output data):

1. onnxruntime runs the original model; its outputs are checked against the expected
   ones at the case's tolerance, else at the first looser tier of
   `TOLERANCE_TIERS` that it meets. A case ORT fails at every tier is excluded
   (counted, with ORT's reason);
2. the model is loaded with onnxforge, rewritten by the pipeline (default
   `cleanup,fuse`), saved to a file and loaded again by onnxruntime;
3. the rewritten model's outputs must meet the same tolerance that ORT needed on
   the original.

Cases come from `onnx/backend/test/data/node/*/` (model.onnx + test_data_set_*/
input_*.pb, output_*.pb) when that folder exists (or `--data DIR`); the onnx wheel
installed here ships only the generators of those folders
(`onnx.backend.test.case.node`), so without the folder the same cases are built in
memory from the generators (about 15 s).

    python tools/run_node_suite.py                      # all cases, cleanup,fuse
    python tools/run_node_suite.py -k conv -k gemm      # names containing conv or gemm
    python tools/run_node_suite.py --pipeline fuse --show-failures

Prints a summary table (total, ORT-passing, still passing after the pipeline,
exclusions) and lists every exclusion and failure with its reason; exits 1 if a
case that ORT passes fails after the pipeline.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import io
import logging
import os
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort
from onnx import numpy_helper

TOLERANCE_TIERS: list[tuple[float, float] | None] = [None, (1e-3, 1e-5), (1e-2, 1e-3)]


@dataclass
class NodeCase:
    name: str
    model: onnx.ModelProto
    data_sets: list[tuple[list[Any], list[Any]]]
    rtol: float = 1e-3
    atol: float = 1e-7


@dataclass
class CaseResult:
    name: str
    status: str  # "pass", "fail", "ort-fails", "excluded"
    detail: str = ""
    tier: int = 0
    nodes_before: int = 0
    nodes_after: int = 0
    rewrites: dict[str, int] = field(default_factory=dict)


@dataclass
class SuiteSummary:
    results: list[CaseResult] = field(default_factory=list)
    seconds: float = 0.0

    def counts(self) -> Counter:
        return Counter(r.status for r in self.results)

    def rewrites(self) -> Counter:
        """Rewrite counters summed over the cases that still pass."""
        total: Counter = Counter()
        for r in self.results:
            if r.status == "pass":
                total.update(r.rewrites)
        return total

    @property
    def ort_passing(self) -> int:
        c = self.counts()
        return c["pass"] + c["fail"] + c["excluded"]


# ---------------------------------------------------------------------- cases


def default_data_dir() -> Path:
    return Path(onnx.__file__).parent / "backend" / "test" / "data" / "node"


def _read_pb(path: str, type_proto: onnx.TypeProto) -> Any:
    data = Path(path).read_bytes()
    if type_proto.HasField("sequence_type"):
        proto = onnx.SequenceProto()
        proto.ParseFromString(data)
        return numpy_helper.to_list(proto)
    if type_proto.HasField("optional_type"):
        proto = onnx.OptionalProto()
        proto.ParseFromString(data)
        return numpy_helper.to_optional(proto)
    if type_proto.HasField("map_type"):
        proto = onnx.MapProto()
        proto.ParseFromString(data)
        return numpy_helper.to_dict(proto)
    tensor = onnx.TensorProto()
    tensor.ParseFromString(data)
    return numpy_helper.to_array(tensor)


def cases_from_folder(folder: Path, patterns: Sequence[str] = ()) -> Iterator[NodeCase]:
    for case_dir in sorted(p for p in folder.iterdir() if (p / "model.onnx").exists()):
        if patterns and not any(k in case_dir.name for k in patterns):
            continue
        model = onnx.load(str(case_dir / "model.onnx"))
        sets = []
        for ds in sorted(glob.glob(str(case_dir / "test_data_set_*"))):
            n_in = len(glob.glob(os.path.join(ds, "input_*.pb")))
            n_out = len(glob.glob(os.path.join(ds, "output_*.pb")))
            inputs = [_read_pb(os.path.join(ds, f"input_{i}.pb"), model.graph.input[i].type)
                      for i in range(n_in)]
            outputs = [_read_pb(os.path.join(ds, f"output_{i}.pb"), model.graph.output[i].type)
                       for i in range(n_out)]
            sets.append((inputs, outputs))
        yield NodeCase(case_dir.name, model, sets)


def cases_from_generators(patterns: Sequence[str] = ()) -> Iterator[NodeCase]:
    """The node cases built by onnx's own generators (what the data folder is made from)."""
    from onnx.backend.test.case import node as node_cases

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        cases = node_cases.collect_testcases()
    for case in cases:
        if patterns and not any(k in case.name for k in patterns):
            continue
        if case.model is None or not case.data_sets:
            continue
        sets = [(list(i), list(o)) for i, o in case.data_sets]
        yield NodeCase(case.name, case.model, sets, case.rtol, case.atol)


def load_cases(data: Path | None = None, patterns: Sequence[str] = ()) -> list[NodeCase]:
    folder = data or default_data_dir()
    if folder.is_dir():
        return list(cases_from_folder(folder, patterns))
    return list(cases_from_generators(patterns))


# ---------------------------------------------------------------------- running


def _session(model: str | bytes) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])


def _run(sess: ort.InferenceSession, inputs: list[Any]) -> list[Any]:
    names = [i.name for i in sess.get_inputs()]
    feeds = dict(zip(names, inputs))
    return sess.run(None, feeds)


def _similar(expected: list[Any], got: list[Any], rtol: float, atol: float) -> str:
    """'' when outputs match (onnx's own backend-runner rules), else the mismatch."""
    from onnx.backend.test.runner import Runner

    try:
        Runner.assert_similar_outputs(expected, got, rtol=rtol, atol=atol)
    except (AssertionError, TypeError, ValueError) as exc:
        return " ".join(str(exc).split())[:300]
    return ""


def _tolerance(case: NodeCase, tier: int) -> tuple[float, float]:
    t = TOLERANCE_TIERS[tier]
    return (case.rtol, case.atol) if t is None else (max(case.rtol, t[0]), max(case.atol, t[1]))


def _check_all(case: NodeCase, sess: ort.InferenceSession, tier: int) -> str:
    rtol, atol = _tolerance(case, tier)
    for inputs, expected in case.data_sets:
        got = _run(sess, inputs)
        msg = _similar(expected, got, rtol, atol)
        if msg:
            return msg
    return ""


def _ort_tier(case: NodeCase) -> tuple[int | None, str]:
    """Lowest tolerance tier at which ORT passes the original model, with ORT's reason."""
    try:
        sess = _session(case.model.SerializeToString())
    except Exception as exc:  # noqa: BLE001 - ORT raises its own error types
        return None, f"ORT cannot load: {' '.join(str(exc).split())[:600]}"
    reason = ""
    for tier in range(len(TOLERANCE_TIERS)):
        try:
            reason = _check_all(case, sess, tier)
        except Exception as exc:  # noqa: BLE001
            return None, f"ORT cannot run: {' '.join(str(exc).split())[:600]}"
        if not reason:
            return tier, ""
    return None, f"ORT output mismatch: {reason}"


def run_case(case: NodeCase, pipeline: str, workdir: Path) -> CaseResult:
    """Run one case: ORT on the original, then the pipeline, save, ORT again."""
    from onnxforge.errors import InvalidModelError, ModelLoadError
    from onnxforge.ir import load_model, save_model
    from onnxforge.pass_manager import PassManager
    from onnxforge.passes.base import PassContext

    tier, reason = _ort_tier(case)
    if tier is None:
        return CaseResult(case.name, "ort-fails", reason)
    try:
        model = load_model(case.model)
    except (InvalidModelError, ModelLoadError) as exc:
        return CaseResult(case.name, "excluded", f"onnxforge refuses the model: {exc}", tier)
    before = sum(1 for _ in model.graph)
    rewrites: dict[str, int] = {}
    try:
        model, steps = PassManager(pipeline, PassContext()).run(model)
        path = save_model(model, workdir / f"{case.name}.onnx")
        for step in steps:
            for key, value in step.stats.items():
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    rewrites[key] = rewrites.get(key, 0) + value
    except Exception as exc:  # noqa: BLE001 - report any pipeline failure as a failure
        return CaseResult(case.name, "fail", f"pipeline raised {type(exc).__name__}: {exc}",
                          tier, before)
    after = sum(1 for _ in model.graph)
    try:
        sess = _session(str(path))
        msg = _check_all(case, sess, tier)
    except Exception as exc:  # noqa: BLE001
        msg = f"ORT cannot run the rewritten model: {' '.join(str(exc).split())[:600]}"
    finally:
        for p in workdir.glob(f"{case.name}.onnx*"):
            p.unlink()
    return CaseResult(case.name, "fail" if msg else "pass", msg, tier, before, after, rewrites)


@contextlib.contextmanager
def _quiet_native_stdout() -> Iterator[None]:
    """Silence what native code (onnxsim's C++ warnings) writes to descriptors 1 and 2."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


def run_suite(cases: list[NodeCase], pipeline: str = "cleanup,fuse",
              progress: bool = False) -> SuiteSummary:
    for name in ("onnxforge", "onnx_ir"):
        logging.getLogger(name).setLevel(logging.ERROR)
    summary = SuiteSummary()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxforge-node-suite-") as tmp:
        for i, case in enumerate(cases):
            with warnings.catch_warnings(), _quiet_native_stdout():
                warnings.simplefilter("ignore")
                summary.results.append(run_case(case, pipeline, Path(tmp)))
            if progress and (i + 1) % 100 == 0:
                print(f"  {i + 1}/{len(cases)} cases, {time.perf_counter() - start:.0f}s",
                      file=sys.stderr)
    summary.seconds = time.perf_counter() - start
    return summary


# ---------------------------------------------------------------------- report


def format_summary(summary: SuiteSummary, pipeline: str, show_failures: bool = True) -> str:
    c = summary.counts()
    total = len(summary.results)
    ort_ok = summary.ort_passing
    still = c["pass"]
    rate = 100.0 * still / max(1, ort_ok - c["excluded"])
    tiers = Counter(r.tier for r in summary.results if r.status in ("pass", "fail"))
    changed = sum(1 for r in summary.results if r.status == "pass" and r.nodes_after != r.nodes_before)
    lines = [
        f"ONNX node test suite through `{pipeline}` ({summary.seconds:.0f} s)",
        "",
        "| total | ORT passes original | excluded | still passing after pipeline | failing | rate |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {total} | {ort_ok} | {c['excluded']} | {still} | {c['fail']} | {rate:.1f} % |",
        "",
        f"ORT fails the original (not counted): {c['ort-fails']}; "
        f"tolerance tiers needed by ORT: "
        + ", ".join(f"{_tier_text(t)}: {n}" for t, n in sorted(tiers.items()))
        + f"; passing cases whose node count the pipeline changed: {changed}",
    ]
    rewrites = summary.rewrites()
    if rewrites:
        lines.append("rewrites applied in passing cases: "
                     + ", ".join(f"{k} {n}" for k, n in sorted(rewrites.items())))
    excluded = [r for r in summary.results if r.status == "excluded"]
    if excluded:
        lines += ["", "Exclusions:"] + [f"  {r.name}: {r.detail}" for r in excluded]
    failing = [r for r in summary.results if r.status == "fail"]
    if failing and show_failures:
        lines += ["", "Failing after the pipeline:"] + [f"  {r.name}: {r.detail}" for r in failing]
    ort_reasons = Counter(r.detail.split(":")[0] for r in summary.results
                          if r.status == "ort-fails")
    if ort_reasons:
        lines += ["", "ORT failures by kind: "
                  + ", ".join(f"{k}: {n}" for k, n in ort_reasons.most_common())]
    return "\n".join(lines)


def _tier_text(tier: int) -> str:
    t = TOLERANCE_TIERS[tier]
    return "case tolerance" if t is None else f"rtol {t[0]:g}/atol {t[1]:g}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pipeline", "-p", default="cleanup,fuse")
    parser.add_argument("-k", action="append", default=[], help="only cases whose name "
                        "contains this text (repeatable)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of node cases (default: the onnx wheel's, else generated)")
    parser.add_argument("--show-ort-failures", action="store_true")
    parser.add_argument("--show-failures", action="store_true", default=True)
    args = parser.parse_args(argv)
    cases = load_cases(args.data, args.k)
    summary = run_suite(cases, args.pipeline, progress=True)
    print(format_summary(summary, args.pipeline, args.show_failures))
    if args.show_ort_failures:
        print("\nORT fails the original:")
        for r in summary.results:
            if r.status == "ort-fails":
                print(f"  {r.name}: {r.detail}")
    return 1 if summary.counts()["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
