"""Run the ONNX backend node test suite through an onnxforge pipeline and onnxruntime.

A thin command line over `onnxforge.node_suite` (how cases are loaded, run, classified
and reported is described there). Cases come from `onnx/backend/test/data/node/*/` when
that folder exists (or `--data DIR`), else from onnx's own generators (about 15 s).

    python tools/run_node_suite.py                      # all cases, cleanup,fuse
    python tools/run_node_suite.py -k conv -k gemm      # names containing conv or gemm
    python tools/run_node_suite.py --pipeline fuse --show-failures

Prints a summary table (total, ORT-passing, still passing after the pipeline,
exclusions) and lists every exclusion and failure with its reason; exits 1 if a
case that ORT passes fails after the pipeline.

`--backend tvm` instead compiles every case that ORT passes with the TVM backend
(default CPU schedules on), each in a worker process with a per-case timeout
(`--timeout`), and reports passed / wrong result (with what is at fault) / unsupported
by TVM's importer / other failure; `--no-freeze` does not retry importer failures with
the parameter inputs frozen into initializers, `--no-blame` does not recompile failing
cases to attribute them. All cases take about 2.5 minutes on 2 cores.

    python tools/run_node_suite.py --backend tvm --json tvm_node_suite.json
    python tools/run_node_suite.py --backend tvm -k conv -k resize --timeout 60

Exits 1 if a case gives a wrong result.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

from onnxforge.node_suite import (
    SuiteSummary,
    format_summary,
    load_cases,
    run_suite,
    run_tvm_suite,
    tvm_report,
)


def write_json(summary: SuiteSummary, path: Path) -> None:
    """The summary and every case's result as JSON, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(summary.to_json(), handle, indent=1)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("ort", "tvm"), default="ort",
                        help="ort: the pipeline, then onnxruntime (default); tvm: compile "
                        "with onnxforge.backends.tvm")
    parser.add_argument("--pipeline", "-p", default=None,
                        help="ORT mode: the pipeline to apply (default cleanup,fuse)")
    parser.add_argument("-k", action="append", default=[], help="only cases whose name "
                        "contains this text (repeatable)")
    parser.add_argument("--data", type=Path, default=None,
                        help="folder of node cases (default: the onnx wheel's, else generated)")
    parser.add_argument("--target", default="host", help="TVM mode: target preset or JSON")
    parser.add_argument("--timeout", type=float, default=120.0,
                        help="TVM mode: seconds per case before its worker is killed")
    parser.add_argument("--no-freeze", dest="freeze", action="store_false",
                        help="TVM mode: do not retry importer failures with the parameter "
                        "inputs frozen into initializers")
    parser.add_argument("--no-blame", dest="blame", action="store_false",
                        help="TVM mode: do not recompile failing cases to attribute them")
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    parser.add_argument("--show-ort-failures", action="store_true")
    parser.add_argument("--show-failures", action="store_true", default=True)
    args = parser.parse_args(argv)
    if args.backend == "tvm" and args.pipeline is not None:
        parser.error("--pipeline applies to --backend ort; the TVM mode compiles the cases "
                     "as they are")
    pipeline = args.pipeline or "cleanup,fuse"
    cases = load_cases(args.data, args.k)
    if args.backend == "tvm":
        from rich.console import Console

        summary = run_tvm_suite(cases, args.target, timeout=args.timeout, freeze=args.freeze,
                                blame=args.blame, progress=True)
        console = Console(width=None if sys.stdout.isatty() else 160)
        for item in tvm_report(summary, args.target, args.show_failures):
            console.print(item)
        failed = summary.counts()["wrong"]
    else:
        summary = run_suite(cases, pipeline, progress=True)
        print(format_summary(summary, pipeline, args.show_failures))
        failed = summary.counts()["fail"]
    if args.show_ort_failures:
        print("\nORT fails the original:")
        for r in summary.results:
            if r.status == "ort-fails":
                print(f"  {r.name}: {r.detail}")
    if args.json:
        write_json(summary, args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
