"""Hand-picked sparse policies against the joint search's choice, digits batch 8 on TVM.

Reads the chosen policy of a `tools/bench_autocompress.py --backend tvm` joint+sparse run,
adds sparse choices to it by hand (a sparse layer drops its int8, `Space.repair`), and
times each model with the input model in the same interleaved rounds (TvmLatency, host,
1 thread, 3 x 10 rounds, median of the ratios); accuracy on the 360 test digits.

    python tools/probe_autocompress_sparse.py /tmp/acsp/a/joint+sparse/report.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from onnxforge import api
from onnxforge.autocompress.build import build
from onnxforge.autocompress.measure import TvmLatency, measure_quality
from onnxforge.autocompress.space import discover, sparse_support
from onnxforge.calibration import open_calibration
from onnxforge.ir import load_model
from onnxforge.passes.base import PassContext

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_autocompress import time_together


def main() -> None:
    model = load_model(api.EXAMPLE_MODEL)
    shapes = {"input": (8, 1, 8, 8)}
    calib = open_calibration(str(api.EXAMPLE_CALIBRATION), model, shapes, seed=0)
    test = open_calibration(str(api.EXAMPLE_TEST_DATA), model, shapes, seed=0)
    context = PassContext(calibration=calib, input_shapes=shapes, threads=1, seed=0)
    space = discover(model, context, sparse=sparse_support("tvm:host", "host")[0])
    report = json.loads(Path(sys.argv[1]).read_text())
    chosen = tuple(next(c for c in report["candidates"] if c["chosen"])["policy"])
    index = {(k.kind, k.key): i for i, k in enumerate(space.knobs)}

    def with_sparse(policy, layers):
        out = list(policy)
        for key in layers:
            out[index["sparse", key]] = 1  # 50 %
        return tuple(out)

    none = tuple(0 for _ in space.knobs)
    policies = {
        "the joint search's choice": chosen,
        "+ /1/1.0/Conv sparse 50 % (its int8 dropped)": with_sparse(chosen, ["/1/1.0/Conv"]),
        "+ both convs sparse 50 %": with_sparse(chosen, ["/1/1.0/Conv", "/3/3.0/Conv"]),
        "all five layers int8, nothing else": tuple(int(k.kind == "bits") for k in space.knobs),
        "both convs sparse 50 %, all fp32": with_sparse(none, ["/1/1.0/Conv", "/3/3.0/Conv"]),
    }
    models = [build(model, space, p, context)[0] for p in policies.values()]
    speedups = time_together(TvmLatency("host", 1, shapes), model, models, calib.first())
    for name, built, speedup in zip(policies, models, speedups):
        q = measure_quality(model, built, test, threads=1)
        print(f"{name}: {speedup:.2f}x, accuracy drop "
              f"{100 * (q.reference_accuracy - q.accuracy):.2f} pt, rel L2 {q.rel_l2:.3f}")


if __name__ == "__main__":
    main()
