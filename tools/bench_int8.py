"""Benchmark: INT8 in compiled code against onnxruntime, side by side in one process.

    python tools/bench_int8.py                                   # digits + zoo conv nets
    python tools/bench_int8.py --models resnet18 mobilenet_v2 --threads 1 2
    python tools/bench_int8.py --json bench_int8.json

Per model: onnxforge's `cleanup,fuse` (the fp32 graph) and `cleanup,fuse,quantize(int8)`
(the QDQ graph, calibrated on the zoo's sample inputs where it has them, else random
data) are written once; then ORT fp32, ORT int8 (the same QDQ file, ORT's integer
kernels), TVM fp32 and TVM int8 (`compile`: quantized conv/matmul as integer kernels,
VNNI where the CPU has it) run interleaved in rounds, median latency, for each thread
count (ORT intra_op_num_threads = TVM threads, spinning off). Ratios are against ORT
fp32 and ORT int8. The TVM int8 build is checked against ORT on the QDQ file with the
compile command's rule (`backends.tvm.verify_artifact`) before it is timed; the number
of conv/matmul that run as integer kernels is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bench_tvm import REPO, ZOO, model_list, optimized, sample_inputs

DEFAULT_MODELS = ["digits", "resnet18", "mobilenet_v2", "efficientnet_b0", "minilm_l6",
                  "ppocr_det", "ppocr_rec"]


def quantized(name: str, path: Path, shapes: dict):
    """`cleanup,fuse,quantize(int8)`, calibrated on the model's sample data if any."""
    from onnxforge import api

    calibration = {"digits": REPO / "compiler" / "data" / "digits_calib.npz"}.get(
        name, ZOO / f"{name}.inputs.npz")
    return api.optimize(path, "cleanup,fuse,quantize(int8)", input_shapes=shapes or None,
                        calibration=str(calibration) if calibration.is_file() else "random:8",
                        force=True).model


def bench_model(name: str, path: Path, shapes: dict, threads: list[int], args) -> list[dict]:
    from onnxforge.api import benchmark_artifacts
    from onnxforge.backends.ort import OrtArtifact
    from onnxforge.backends.tvm import compile_model, verify_artifact

    fp32, _ = optimized(name, path, shapes, "cleanup,fuse")
    int8 = quantized(name, path, shapes)
    rows = []
    for n in threads:
        tvm_fp32 = compile_model(fp32, "host", input_shapes=shapes or None, threads=n)
        tvm_int8 = compile_model(int8, "host", input_shapes=shapes or None, threads=n)
        check = verify_artifact(tvm_int8, int8, raise_on_failure=False)
        inputs = sample_inputs(name, tvm_fp32)
        artifacts = [OrtArtifact(fp32, threads=n), OrtArtifact(int8, threads=n), tvm_fp32,
                     tvm_int8]
        timings = benchmark_artifacts(artifacts, inputs, warmup=args.warmup, repeat=args.repeat)
        ms = [t["median_ms"] for t in timings]
        integer = tvm_int8.report["integer"]
        rows.append({
            "model": name, "threads": n,
            "ort_fp32_ms": round(ms[0], 3), "ort_int8_ms": round(ms[1], 3),
            "tvm_fp32_ms": round(ms[2], 3), "tvm_int8_ms": round(ms[3], 3),
            "tvm_int8_vs_ort_fp32": round(ms[3] / ms[0], 2),
            "tvm_int8_vs_ort_int8": round(ms[3] / ms[1], 2),
            "tvm_int8_vs_tvm_fp32": round(ms[3] / ms[2], 2),
            "layout": integer.get("layout", "-"),
            "integer_ops": integer["integer_total"], "float_ops": integer["float_total"],
            "lookup_tables": integer.get("lookup_tables", 0),
            "int8_dot_kernels": tvm_int8.report.get("schedule_rules", {}).get("int8-dot", 0),
            "int8_depthwise_kernels": tvm_int8.report.get("schedule_rules", {}).get(
                "int8-depthwise", 0),
            "verified": check.ok, "rel_l2_vs_ort_int8": max(
                (o.rel_l2 for o in check.comparison.outputs), default=0.0),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def render(rows: list[dict]) -> None:
    from bench_common import print_table

    print_table(
        "INT8: TVM (onnxforge compile) vs ONNX Runtime, median ms",
        ["model", "thr", "ORT fp32", "ORT int8", "TVM fp32", "TVM int8", "vs ORT fp32",
         "vs ORT int8", "vs TVM fp32", "int ops", "float ops", "tables", "VNNI kernels",
         "layout", "verified"],
        [[r["model"], str(r["threads"]), f"{r['ort_fp32_ms']:.3f}", f"{r['ort_int8_ms']:.3f}",
          f"{r['tvm_fp32_ms']:.3f}", f"{r['tvm_int8_ms']:.3f}",
          f"{r['tvm_int8_vs_ort_fp32']:.2f}x", f"{r['tvm_int8_vs_ort_int8']:.2f}x",
          f"{r['tvm_int8_vs_tvm_fp32']:.2f}x", str(r["integer_ops"]), str(r["float_ops"]),
          str(r["lookup_tables"]), str(r["int8_dot_kernels"]), r["layout"].split(" ")[0],
          "yes" if r["verified"] else "NO"] for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=DEFAULT_MODELS)
    parser.add_argument("--threads", nargs="*", type=int, default=[1, 2])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for name, path, shapes in model_list(args.models):
        rows += bench_model(name, path, shapes, args.threads, args)
    render(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
