"""Measure where the BSR sparse kernel beats the dense matmul, and write the break-even.

    python tools/bench_sparse.py           # this machine's CPU class, 1 thread
    python tools/bench_sparse.py --write   # + kernels/tuning_db/<class>/sparse_break_even.json

For each layer shape (M activation rows, K inputs, N outputs) the dense matmul is
compiled once as `onnxforge compile` builds it (default schedule) and the sparse
kernel (`kernels.sparse_matmul`) for every block pattern and fraction of nonzero blocks;
both run side by side in one process on the same input, median of interleaved rounds.
A pattern's break-even is the largest nonzero fraction at which sparse was faster on
every shape; `compile` uses the sparse kernel only at or below it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(128, 384, 384), (128, 384, 1536), (128, 1536, 384), (32, 512, 512)]
PATTERNS = [(1, 8), (1, 4), (16, 1), (4, 4)]
DENSITIES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5]


def dense_matmul(m: int, k: int, n: int, weight_nk: np.ndarray):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxforge.backends.tvm import compile_model

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(np.ascontiguousarray(weight_nk.T), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return compile_model(model, "host", threads=1)


def sparse_kernel(m, k, n, rows, cols, weight_nk):
    import tvm
    from onnxforge.backends.targets import resolve_target
    from onnxforge.kernels.sparse_matmul import bsr_matmul, to_bsr

    data, indices, indptr = to_bsr(weight_nk, rows, cols)
    func = bsr_matmul(m, k, n, rows, cols, len(indices)).with_attr("global_symbol", "main")
    lib = tvm.compile(tvm.IRModule({"main": func}), target=resolve_target("host"))
    args = [tvm.runtime.tensor(a) for a in (data, indices, indptr)]
    out = tvm.runtime.tensor(np.zeros((m, n), np.float32))
    return lambda x: (lib["main"](x, *args, out), out)[1]


def median_ms(run, rounds: int = 30) -> float:
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1e3


def measure(args) -> list[dict]:
    import tvm

    rng = np.random.default_rng(0)
    rows_out = []
    for m, k, n in SHAPES:
        x = rng.standard_normal((m, k)).astype(np.float32)
        dense = dense_matmul(m, k, n, rng.standard_normal((n, k)).astype(np.float32))
        x_tvm = tvm.runtime.tensor(x)
        dense_main = dense._get_vm()["main"]  # called like the kernel: no numpy conversion
        for rows, cols in PATTERNS:
            for density in DENSITIES:
                mask = rng.random((n // rows, k // cols)) < density
                weight = rng.standard_normal((n, k)).astype(np.float32)
                weight *= np.repeat(np.repeat(mask, rows, 0), cols, 1)
                run = sparse_kernel(m, k, n, rows, cols, weight)
                got = run(x_tvm).numpy()
                error = float(np.abs(got - x @ weight.T).max())
                dense_ms = median_ms(partial(dense_main, x_tvm))
                sparse_ms = median_ms(partial(run, x_tvm))
                row = {"shape": [m, k, n], "pattern": f"block({rows}x{cols})",
                       "density": density, "dense_ms": round(dense_ms, 4),
                       "sparse_ms": round(sparse_ms, 4),
                       "ratio": round(sparse_ms / dense_ms, 3), "max_abs_error": error}
                print(json.dumps(row), flush=True)
                rows_out.append(row)
    return rows_out


def break_even(rows: list[dict]) -> dict[str, dict]:
    table = {}
    for pattern in sorted({r["pattern"] for r in rows}):
        ok = [d for d in DENSITIES if all(r["ratio"] < 1.0 for r in rows
                                          if r["pattern"] == pattern and r["density"] == d)]
        # the largest density below which every measured density was faster
        limit = 0.0
        for d in DENSITIES:
            if d not in ok:
                break
            limit = d
        table[pattern] = {"max_density": limit}
    return table


def main(argv: list[str] | None = None) -> int:
    from onnxforge.backends.targets import resolve_target
    from onnxforge.kernels.schedule_configs import target_class

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true",
                        help="write kernels/tuning_db/<class>/sparse_break_even.json")
    args = parser.parse_args(argv)
    rows = measure(args)
    table = break_even(rows)
    for pattern, entry in table.items():
        print(f"{pattern:12s} sparse faster up to {entry['max_density']:.2f} nonzero blocks")
    if args.write:
        cls = target_class(resolve_target("host"))
        path = REPO / "kernels" / "tuning_db" / cls / "sparse_break_even.json"
        doc = {"format": 1, "threads": 1, "measured_by": "tools/bench_sparse.py",
               "patterns": table, "measurements": rows}
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
