"""Whole models with sparse kernels: TVM sparse vs TVM dense vs onnxruntime, with quality.

    python tools/bench_sparse_models.py                       # resnet18, 50/70/90 %
    python tools/bench_sparse_models.py --models resnet18 mobilenet_v2 --recover

For each zoo model: `cleanup,fuse` (BatchNorm folded into the convs: the sparse kernels
replace the conv, so BN must not stay behind it) gives the dense model; then
`sparsify(ratio, pattern=block(RxC))` with the default keep rules (first conv, classifier
and depthwise convs dense), calibrated (and refit with `--recover`) on the calibration
crops of `bench_common.vision_task`. One process, 1 thread everywhere, the same input:
onnxruntime runs the dense model, TVM the dense model and the sparse one (`compile`
uses a BSR kernel for a layer only at or below the break-even measured for its kind),
timed side by side in interleaved rounds. Quality: cosine and top-1 agreement of the
sparse model's logits (run by TVM) against the dense model's (onnxruntime) on the held-out
crops. The models' weights are random (torchvision without weights), so top-1 agreement
and cosine are what there is to measure, not accuracy.
"""

from __future__ import annotations

import argparse
import logging
import time

import bench_common as bc
import numpy as np
from onnxforge.backends.ort import OrtArtifact
from onnxforge.backends.tvm import compile_model
from onnxforge.calibration import ArraySource
from onnxforge.ir import load_model
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext


def run_pipeline(model, pipeline: str, ctx: PassContext):
    out, steps = PassManager(pipeline, ctx).run(load_model(model, check=False))
    return out, steps[-1].stats


def quality(ort_dense: OrtArtifact, sparse, batches) -> tuple[float, float]:
    ref = [ort_dense.run(b) for b in batches]
    got = [sparse.run(b) for b in batches]
    return bc.top1_and_cosine(ref, got)


def bench_model(name: str, ratios, pattern: str, recover: bool, rounds: int,
                calib_crops: int | None = None) -> list[list[str]]:
    task = bc.vision_task(name)
    if task is None:
        print(f"{name}: absent (python tools/build_zoo.py) or scikit-image missing")
        return []
    input_name = next(iter(task.calib[0]))
    shape = task.calib[0][input_name].shape
    calib = {input_name: np.concatenate([b[input_name] for b in task.calib[:calib_crops]])}
    source = ArraySource(calib, {input_name: shape}, {input_name: np.float32},
                         description="calibration crops")
    ctx = PassContext(calibration=source, input_shapes={input_name: shape}, threads=1)
    dense, _ = run_pipeline(load_model(task.model_path), "cleanup,fuse", ctx)
    ort = OrtArtifact(dense, threads=1)
    tvm_dense = compile_model(dense, "host", threads=1)
    feed = task.evaluate[0]
    rows = []
    for ratio in ratios:
        start = time.perf_counter()
        text = f"sparsify({ratio},pattern={pattern},recover={'true' if recover else 'false'})"
        sparse_model, stats = run_pipeline(dense, text, ctx)
        pass_s = time.perf_counter() - start
        tvm_sparse = compile_model(sparse_model, "host", threads=1)
        times = bc.side_by_side_ms([ort, tvm_dense, tvm_sparse], feed, warmup=2, repeat=10,
                                   rounds=rounds)
        agree, cosine = quality(ort, tvm_sparse, task.evaluate)
        report = tvm_sparse.report["sparse"]
        kinds = ", ".join(f"{k} {n}" for k, n in report.get("sparse_kernels", {}).items())
        dense_why = "; ".join(f"{e['count']}: {e['reason']}" for e in report["dense_ops"])
        row = [name, text, f"{stats['sparsity']:.3f} of {stats['sparsified']} layers",
               f"{times[0]:.2f}", f"{times[1]:.2f}", f"{times[2]:.2f}",
               f"{times[1] / times[2]:.2f}x", f"{times[0] / times[2]:.2f}x",
               f"{cosine:.4f}", f"{agree:.2f}", kinds or "none", dense_why or "-",
               f"{pass_s:.0f}"]
        print(" | ".join(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=["resnet18"])
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.7, 0.9])
    parser.add_argument("--pattern", default="block(16x1)")
    parser.add_argument("--recover", action="store_true", help="least-squares refit (slow)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calib-crops", type=int, default=None,
                        help="calibration crops (default all 72; fewer makes --recover faster)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = []
    for name in args.models:
        rows += bench_model(name, args.ratios, args.pattern, args.recover, args.rounds,
                            args.calib_crops)
    bc.print_table(
        "sparse kernels on whole models, 1 thread, ms (median of interleaved rounds)",
        ["model", "pipeline", "sparsity", "ORT dense", "TVM dense", "TVM sparse",
         "sparse vs TVM dense", "sparse vs ORT", "cosine", "top-1 agree", "BSR kernels",
         "stayed dense", "pass s"], rows)


if __name__ == "__main__":
    main()
