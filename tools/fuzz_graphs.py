"""Differential fuzzer: seeded random ONNX graphs through cleanup,fuse and TVM vs onnxruntime.

A thin command line over `onnxforge.fuzz` (the generator is `onnxforge.random_graphs`).
Graph `i` of `--seed S` is the same model on every machine. Each graph that
onnxruntime runs is (1) rewritten by the pipeline and run again in onnxruntime, and
(2) compiled with `onnxforge.backends.tvm.compile_model(model, "host")` (defaults:
default CPU schedules and the shipped schedule-config database), run on 3 input sets
and the first one twice (bit-identical, else nondeterministic). Each graph is
correct / refused (a clear onnxforge error) / wrong / crash (other exception, worker
death, or past --timeout). Graphs onnxruntime rejects are redrawn and counted apart.

    python tools/fuzz_graphs.py --seed 0 --count 100
    python tools/fuzz_graphs.py --seed 3 --count 200 --ops conv,pad --out fuzz_failures/
    python tools/fuzz_graphs.py --seed 0 --count 50 --no-compile --json fuzz.json
    python tools/fuzz_graphs.py --seed 0 --count 100 --shrink      # minimise failures
    python tools/fuzz_graphs.py --seed 0 --count 100 --int8        # + quantized, compiled
    python tools/fuzz_graphs.py --seed 31 --count 150 --lossy      # + prune, lowrank, sparse

Failing graphs are written to --out as `<seed>-<index>.onnx` (`.min.onnx` when shrunk),
with `summary.txt` holding one line per failure. Exits 1 if any graph is wrong or crashes.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from onnxforge.fuzz import DEFAULT_PIPELINE, RTOL, print_report, run_fuzz
from onnxforge.random_graphs import family_names, parse_families
from rich.console import Console


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--count", type=int, default=100, help="graphs to check")
    parser.add_argument("--start", type=int, default=0, help="first graph index")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="only the pipeline stage (no TVM)")
    parser.add_argument("--int8", action="store_true",
                        help="also quantize each graph (cleanup,fuse,quantize(int8), random "
                        "calibration) and check its compiled integer code against "
                        "onnxruntime on the QDQ file")
    parser.add_argument("--lossy", action="store_true",
                        help="also run prune, lowrank and sparsify on each graph (options drawn "
                        "per graph) with their oracles, and compile each result (sparsify's "
                        "with the sparse kernels forced on) against onnxruntime on the same "
                        "file; without --ops the draw adds the opt-in 'prunable' family")
    parser.add_argument("--pipeline", default=DEFAULT_PIPELINE)
    parser.add_argument("--timeout", type=float, default=60.0,
                        help="seconds per graph (all stages) before its worker is killed")
    parser.add_argument("--out", type=Path, default=Path("fuzz_failures"),
                        help="folder for failing graphs and summary.txt")
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    parser.add_argument("--ops", default="", help="op families to draw from, comma separated "
                        "(default all): conv,convtranspose,batchnorm,act,gelu,chain,binary,"
                        "matmul,gemm,softmax,layernorm,transpose,reshape,slice,pad,pool,gap,"
                        "resize,split,concat,residual; opt-in: prunable,upsample")
    parser.add_argument("--rtol", type=float, default=RTOL)
    parser.add_argument("--shrink", action="store_true",
                        help="reduce each failing graph while it fails the same way")
    parser.add_argument("--shrink-checks", type=int, default=60)
    parser.add_argument("-q", "--quiet", action="store_true", help="no per-graph progress")
    args = parser.parse_args(argv)
    try:
        families = parse_families(args.ops)
    except ValueError as exc:
        parser.error(str(exc))
    if args.lossy and not args.ops:
        families = family_names() + ["prunable"]  # with the layers the lossy passes cut
    logging.basicConfig(level=logging.WARNING)
    err = Console(stderr=True)

    def progress(result, summary) -> None:
        if args.quiet:
            return
        c = summary.counts()
        mark = "" if result.status in ("correct", "refused") else f"  <- {result.status}"
        err.print(f"[{c['graphs']}/{args.count}] {result.name} {result.status} "
                  f"({result.seconds:.1f} s){mark}", highlight=False)

    summary = run_fuzz(args.seed, args.count, families=families, compile=args.compile,
                       int8=args.int8, lossy=args.lossy, pipeline=args.pipeline,
                       timeout=args.timeout,
                       out_dir=args.out,
                       shrink=args.shrink, shrink_checks=args.shrink_checks, rtol=args.rtol,
                       start=args.start, progress=progress)
    if args.json:  # before the report: a closed stdout must not lose the results
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary.to_json(), indent=1))
    print_report(summary)
    if summary.failures:
        print(f"failing graphs: {args.out}/ (summary.txt)")
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
