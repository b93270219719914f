"""onnxruntime latency of each zoo model before and after the exact passes.

    python tools/bench_exact.py                          # all zoo models, cleanup,fuse
    python tools/bench_exact.py -m resnet18 -m minilm_l6 -p fuse -p cleanup,fuse
    python tools/bench_exact.py --threads 2 --repeat 50 --rounds 5 --ort-opt disable
    python tools/bench_exact.py --onnxslim               # onnxslim's output side by side

For every model, the original and each rewritten model get an onnxruntime
session (`OrtArtifact`: same intra-op thread count, spinning off). Timing is
interleaved: in each of `--rounds` rounds every session runs a block of `--repeat`
timed calls, so load from other processes on a shared machine hits all variants
alike; the latency is the median of all samples. An A/A control (a second session
of the unchanged model) shows the noise floor: ratios closer to 1 than the
control's deviation are not a measured effect. Printed per model: node count, latency
(ms), ratio to the original (< 1 = faster), the largest relative L2 error of
the outputs against the original, the wall time of the rewrite itself (our pipeline in
this process, onnxsim imported once before; onnxslim's `slim`), and the fusions
onnxruntime built for the original but not for the variant (from both optimized graphs,
`onnxforge.ort_fusions`; "-" = none lost). `--ort-opt disable` turns onnxruntime's own
graph optimizations off (what a runtime without them would see).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import bench_common as bc
import numpy as np
from onnxforge.backends.ort import OrtArtifact
from onnxforge.ir import load_model
from onnxforge.ort_fusions import lost_fusions, ort_optimized_ops
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext

ZOO = bc.ZOO


def rel_l2(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> float:
    worst = 0.0
    for name, a in ref.items():
        a64 = a.astype(np.float64)
        denom = float(np.linalg.norm(a64)) or 1.0
        worst = max(worst, float(np.linalg.norm(a64 - got[name])) / denom)
    return worst


def rewrite(path: Path, text: str, shapes: dict, threads: int):
    """(model, seconds) of our pipeline `text`, or of onnxslim for text == "onnxslim"."""
    if text == "onnxslim":
        import onnxslim  # benchmark-only optional dependency: pip install onnxslim

        start = time.perf_counter()
        proto = onnxslim.slim(str(path))
        return load_model(proto), time.perf_counter() - start
    model = load_model(path)
    start = time.perf_counter()
    model, _ = PassManager(text, PassContext(input_shapes=shapes, threads=threads)).run(model)
    return model, time.perf_counter() - start


def bench_model(name: str, entry: dict, pipelines: list[str], threads: int, repeat: int,
                rounds: int, warmup: int, optimize: bool, control: bool = True) -> list[dict]:
    path = ZOO / entry["file"]
    shapes = {i["name"]: tuple(i["shape"]) for i in entry["inputs"]}
    feeds = bc.zoo_feeds(name, entry)
    variants = [("original", load_model(path), 0.0)]
    for text in pipelines:
        model, seconds = rewrite(path, text, shapes, threads)
        variants.append((text, model, seconds))
    if control:
        # A/A control: a second session of the unchanged model. Its ratio is the
        # noise floor of the measurement on this (shared) machine.
        variants.insert(1, ("original (A/A control)", variants[0][1], 0.0))
    arts = [(label, model, secs, OrtArtifact(model, threads=threads, optimize=optimize))
            for label, model, secs in variants]
    outputs = [art.run(feeds) for *_, art in arts]
    fused = [ort_optimized_ops(model, threads=threads) for _, model, _, _ in arts]
    # Fine-grained interleaving: blocks of `repeat` calls per session, alternating,
    # so load from other processes hits every variant alike.
    medians = bc.side_by_side_ms([art for *_, art in arts], feeds, warmup=warmup,
                                 repeat=repeat, rounds=rounds)
    base = medians[0]
    rows = []
    for (label, model, secs, _), out, ms, ops in zip(arts, outputs, medians, fused):
        lost = lost_fusions(fused[0], ops)
        rows.append({"model": name, "variant": label, "nodes": sum(1 for _ in model.graph),
                     "median_ms": ms, "ratio": ms / base, "rel_l2": rel_l2(outputs[0], out),
                     "rewrite_s": secs,
                     "ort_fusions_lost": ", ".join(f"{k} x{v}" for k, v in lost.items())})
    return rows


def format_table(rows: list[dict], threads: int, optimize: bool) -> str:
    lines = [(f"onnxruntime latency, {threads} thread(s), spinning off, ORT graph optimizations "
             f"{'on' if optimize else 'off'}; median of all interleaved samples"),
             "",
             ("| model | variant | nodes | median ms | ratio | rel L2 vs original | rewrite s "
              "| ORT fusions lost |"),
             "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        secs = f"{r['rewrite_s']:.2f}" if r["rewrite_s"] else ""
        lines.append(f"| {r['model']} | {r['variant']} | {r['nodes']} | {r['median_ms']:.3f} | "
                     f"{r['ratio']:.3f} | {r['rel_l2']:.1e} | {secs} | "
                     f"{r['ort_fusions_lost'] or '-'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-m", "--model", action="append", default=[])
    parser.add_argument("-p", "--pipeline", action="append", default=[])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=2, help="calls per block")
    parser.add_argument("--rounds", type=int, default=30, help="alternating blocks per variant")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the A/A control (second session of the original)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--ort-opt", choices=["all", "disable"], default="all")
    parser.add_argument("--onnxslim", action="store_true",
                        help="also time onnxslim's output (pip install onnxslim)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    manifest = bc.manifest()
    if not manifest:
        print(f"no zoo at {ZOO}: run `python tools/build_zoo.py` first", file=sys.stderr)
        return 2
    names = args.model or list(manifest)
    pipelines = (args.pipeline or ["cleanup,fuse"]) + (["onnxslim"] if args.onnxslim else [])
    # Import onnxsim once before timing: its import is paid once per process, not per model.
    from onnxforge.passes.cleanup import _import_onnxsim

    _import_onnxsim()
    optimize = args.ort_opt == "all"
    rows: list[dict] = []
    for name in names:
        if not (ZOO / manifest[name]["file"]).exists():
            print(f"skipping {name}: file absent", file=sys.stderr)
            continue
        print(f"benchmarking {name} ...", file=sys.stderr)
        rows += bench_model(name, manifest[name], pipelines, args.threads, args.repeat,
                            args.rounds, args.warmup, optimize, not args.no_control)
    print(format_table(rows, args.threads, optimize))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
