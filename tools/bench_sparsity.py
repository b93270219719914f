"""Benchmark the `sparsify` pass: output error / accuracy against sparsity, pattern,
criterion and recovery.

    python tools/bench_sparsity.py                          # digits and minilm_l6
    python tools/bench_sparsity.py --models digits --ratios 0.5
    python tools/bench_sparsity.py --models minilm_l6 --no-recover

For each model, ratio (0.5, 0.8), pattern (unstructured, block(1x8); 2:4 at 0.5 only, it
fixes the sparsity at 50 %), criterion (magnitude, wanda) and recover (off, on), one
`sparsify` run with the default keep rules (first conv and last Gemm/MatMul dense), then:
- digits: top-1 accuracy on the 360 labelled test digits (`compiler/data/digits_test.npz`),
  and the relative L2 error of the logits against the dense model; calibration: the 200
  images of `digits_calib.npz` in batches of 8;
- minilm_l6: relative L2 and cosine of the sentence embeddings of the 8 held-out real
  sentences (the last 8 of `.zoo/minilm_l6.inputs.npz`) against the dense model;
  calibration: the first 8 sentences plus packed rows of standard-library docstring text
  (`bench_lowrank.make_data`, `--calib` rows in all).
The sparsity column is the share of zeros over the sparsified layers' weights (the pass's
own count). The ONNX stays dense, so there is no latency column: ORT runs the zeros at
dense speed.
"""

from __future__ import annotations

import argparse
import logging
import time

import bench_common as bc
import bench_lowrank as bl
import numpy as np
from onnxforge.ir import load_model
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.shapes import resolve_input_shapes

MODELS = ["digits", "minilm_l6"]


def settings(ratios: list[float], recover_modes: list[bool]) -> list[tuple[str, bool]]:
    out = []
    for ratio in ratios:
        patterns = ["unstructured", "block(1x8)"] + (["2:4"] if ratio == 0.5 else [])
        for pattern in patterns:
            for criterion in ("magnitude", "wanda"):
                ratio_text = "" if pattern == "2:4" else f"{ratio},"
                for recover in recover_modes:
                    text = (f"sparsify({ratio_text}pattern={pattern},criterion={criterion},"
                            f"recover={'true' if recover else 'false'})")
                    out.append((text, recover))
    return out


def digits_data():
    task = bc.digits_task()
    model = load_model(task.model_path)
    shapes = {"input": (8, 1, 8, 8)}
    source = bl.open_calibration(
        {"input": np.concatenate([b["input"] for b in task.calib])}, model, shapes)
    ref = bc.run_batches(model, task.evaluate)

    def metric(candidate) -> dict[str, float]:
        got = bc.run_batches(candidate, task.evaluate)
        values = task.metric(ref, got)
        a = np.concatenate([r["logits"].ravel() for r in ref]).astype(np.float64)
        b = np.concatenate([g["logits"].ravel() for g in got]).astype(np.float64)
        return {"accuracy": values["accuracy"], "acc_ref": values["acc_ref"],
                "rel_l2": float(np.linalg.norm(b - a) / np.linalg.norm(a))}

    return model, shapes, source, metric


def minilm_data(n_calib: int):
    path = bc.ZOO / "minilm_l6.onnx"
    if not path.exists():
        return None
    model = load_model(path)
    shapes = resolve_input_shapes(model, bc.zoo_shapes("minilm_l6"))
    source, evals = bl.make_data("minilm_l6", model, shapes, n_calib, 0)

    def metric(candidate) -> dict[str, float]:
        rel, cos = bl.output_error(model, candidate, evals, 1)
        return {"rel_l2": rel, "cosine": cos}

    return model, shapes, source, metric


def run(model, shapes, source, pipeline: str):
    ctx = PassContext(calibration=source, input_shapes=shapes, threads=1)
    start = time.perf_counter()
    out, steps = PassManager(pipeline, ctx).run(load_model(model, check=False))
    return out, steps[0].stats, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--ratios", nargs="*", type=float, default=[0.5, 0.8])
    parser.add_argument("--no-recover", dest="recover", action="store_false",
                        help="only recover=false")
    parser.add_argument("--calib", type=int, default=32, help="MiniLM calibration rows")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    modes = [False, True] if args.recover else [False]
    for name in args.models:
        data = digits_data() if name == "digits" else minilm_data(args.calib)
        if data is None:
            print(f"{name}: absent (python tools/build_zoo.py)")
            continue
        model, shapes, source, metric = data
        rows = []
        for pipeline, _recover in settings(args.ratios, modes):
            out, stats, seconds = run(model, shapes, source, pipeline)
            values = metric(out)
            row = [pipeline, f"{stats['sparsity']:.3f}", f"{stats['sparsified']}",
                   f"{stats['refit']}", f"{values['rel_l2']:.4f}"]
            row.append(f"{values['accuracy'] * 100:.2f} % (dense {values['acc_ref'] * 100:.2f} %)"
                       if name == "digits" else f"{values['cosine']:.4f}")
            row.append(f"{seconds:.1f}")
            print(" | ".join(row), flush=True)
            rows.append(row)
        bc.print_table(f"sparsify on {name}", ("pipeline", "sparsity", "layers", "refit",
                                              "rel L2", "accuracy" if name == "digits"
                                              else "embedding cosine", "pass s"), rows)


if __name__ == "__main__":
    main()
