"""Measure where the BSR sparse kernels beat dense, and write the break-even per kind.

    python tools/bench_sparse.py                      # all kinds, this CPU class, 1 thread
    python tools/bench_sparse.py --kinds gemv,conv1x1 --write   # + merge into
        kernels/tuning_db/<class>/sparse_break_even.json (other kinds' entries are kept)
    python tools/bench_sparse.py --table --pattern 16x1   # the README's single-layer table
    python tools/bench_sparse.py --table --pattern 1x8 --layers Linear   # some rows only

Kinds: `matmul` (M a multiple of 16, `kernels.sparse_matmul`), `gemv` (M < 16,
`kernels.sparse_gemv`), `conv1x1` and `conv` (kxk stride 1; `kernels.sparse_conv`).
`matmul` times the kernel alone against the dense MatMul as `onnxforge compile` builds
it; the other kinds compile a one-layer ONNX model twice with `compile_model`, dense and
with the BSR kernel forced (so the pad/subsample/slice around a sparse conv is counted),
and time them side by side in one process on the same input, interleaved rounds, 1
thread. A pattern's break-even is the largest nonzero fraction at which sparse was
faster on every shape of the kind (and at every smaller fraction measured); `compile`
uses the sparse kernel only at or below it.
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
# Layer shapes per kind, measured through compile_model: gemv (M, K, N); convs
# (batch, in, out, kernel, stride, padding, H=W): resnet18's 1x1 downsamples and
# stride-1 3x3 convs, mobilenet_v2-like 1x1 expand/project layers
LAYERS = {
    "gemv": [(1, 1024, 1024), (1, 384, 1536), (4, 512, 512)],
    "conv1x1": [(1, 64, 128, 1, 2, 0, 56), (1, 256, 512, 1, 2, 0, 14), (1, 96, 576, 1, 1, 0, 14),
                (1, 576, 96, 1, 1, 0, 14)],
    "conv": [(1, 64, 64, 3, 1, 1, 56), (1, 128, 128, 3, 1, 1, 28), (1, 256, 256, 3, 1, 1, 14),
             (1, 512, 512, 3, 1, 1, 7)],
}
LAYER_PATTERNS = [(1, 8), (16, 1), (4, 4)]
LAYER_DENSITIES = [0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 0.9]
ALL_KINDS = ("matmul", "gemv", "conv1x1", "conv")


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


def block_weight(rng, n: int, k: int, rows: int, cols: int, density: float) -> np.ndarray:
    """A random [n, k] weight whose R x C blocks are nonzero with probability `density`."""
    mask = rng.random((n // rows, k // cols)) < density
    weight = rng.standard_normal((n, k)).astype(np.float32)
    return weight * np.repeat(np.repeat(mask, rows, 0), cols, 1)


def layer_model(kind: str, layer: tuple, weight_view: np.ndarray, pattern: str | None):
    """One-layer ONNX model (MatMul for gemv/matmul, Conv + bias for convs) with the
    weight's sparsity record when `pattern` is given (then compile may go sparse)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if kind in ("gemv", "matmul"):
        m, k, _ = layer
        weight = np.ascontiguousarray(weight_view.T)
        node = helper.make_node("MatMul", ["x", "w"], ["y"])
        x_shape, inits = [m, k], [numpy_helper.from_array(weight, "w")]
        y_shape = [m, weight.shape[1]]
    else:
        batch, cin, cout, ksize, stride, pad, size = layer
        weight = weight_view.reshape(cout, cin, ksize, ksize)
        bias = np.random.default_rng(1).standard_normal(cout).astype(np.float32)
        node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[ksize, ksize],
                                strides=[stride, stride], pads=[pad] * 4)
        x_shape = [batch, cin, size, size]
        out = (size + 2 * pad - ksize) // stride + 1
        y_shape = [batch, cout, out, out]
        inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    graph = helper.make_graph(
        [node], kind, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if pattern is not None:
        entry = {"pattern": pattern, "sparsity": float(np.mean(weight == 0)),
                 "shape": list(weight.shape)}
        helper.set_model_props(model, {"onnxforge.sparsity": json.dumps({"w": entry})})
    onnx.checker.check_model(model)
    return model


def layer_view_shape(kind: str, layer: tuple) -> tuple[int, int]:
    if kind in ("gemv", "matmul"):
        return layer[2], layer[1]
    _, cin, cout, ksize, *_ = layer
    return cout, cin * ksize * ksize


def time_layer(kind: str, layer: tuple, rows: int, cols: int, densities, *, ort: bool,
               rounds: int = 5, seed: int = 0) -> dict:
    """Dense TVM (and ORT) vs the sparse kernel at each nonzero fraction, side by side."""
    import bench_common
    import onnx_ir as ir
    from onnxforge.backends.ort import OrtArtifact
    from onnxforge.backends.tvm import compile_model

    rng = np.random.default_rng(seed)
    n, k = layer_view_shape(kind, layer)
    pattern = f"block({rows}x{cols})"
    forced = {kind: {pattern: 1.0}}
    dense_model = layer_model(kind, layer, rng.standard_normal((n, k)).astype(np.float32), None)
    dense = compile_model(dense_model, "host", threads=1)
    sparse, models = [], []
    for density in densities:
        model = layer_model(kind, layer, block_weight(rng, n, k, rows, cols, density), pattern)
        art = compile_model(model, "host", threads=1, sparse_break_even=forced)
        if art.report["sparse"].get("sparse_kernels") != {kind: 1}:
            raise SystemExit(f"{kind} {layer} {pattern}: not compiled sparse: "
                             f"{art.report['sparse']}")
        sparse.append(art)
        models.append(model)
    feed = {"x": rng.standard_normal(dense.inputs[0].shape).astype(np.float32)}
    errors = []  # against onnxruntime on the same sparse weights
    for model, art in zip(models, sparse):
        reference = OrtArtifact(ir.from_proto(model), threads=1).run(feed)["y"]
        errors.append(float(np.abs(art.run(feed)["y"] - reference).max()))
    arts = [dense, *sparse] + ([OrtArtifact(ir.from_proto(dense_model), threads=1)] if ort else [])
    times = bench_common.side_by_side_ms(arts, feed, warmup=3, repeat=10, rounds=rounds)
    return {"kind": kind, "layer": list(layer), "pattern": pattern,
            "dense_ms": round(times[0], 4), "ort_ms": round(times[-1], 4) if ort else None,
            "sparse": [{"density": d, "sparse_ms": round(t, 4), "ratio": round(t / times[0], 3),
                        "max_abs_error": e}
                       for d, t, e in zip(densities, times[1:len(densities) + 1], errors)]}


def measure_layers(kinds) -> list[dict]:
    """One row per (kind, shape, pattern, density), like the matmul measurements."""
    rows_out = []
    for kind in kinds:
        for layer in LAYERS[kind]:
            for rows, cols in LAYER_PATTERNS:
                n, k = layer_view_shape(kind, layer)
                if n % rows or k % cols:
                    continue
                timed = time_layer(kind, layer, rows, cols, LAYER_DENSITIES, ort=False)
                for entry in timed["sparse"]:
                    row = {"kind": kind, "shape": timed["layer"], "pattern": timed["pattern"],
                           "density": entry["density"], "dense_ms": timed["dense_ms"],
                           "sparse_ms": entry["sparse_ms"], "ratio": entry["ratio"],
                           "max_abs_error": entry["max_abs_error"]}
                    print(json.dumps(row), flush=True)
                    rows_out.append(row)
    return rows_out



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
    """Pattern -> {"max_density"}: the largest measured nonzero fraction at which sparse
    was faster on every shape, and at every smaller fraction measured."""
    table = {}
    for pattern in sorted({r["pattern"] for r in rows}):
        mine = [r for r in rows if r["pattern"] == pattern]
        limit = 0.0
        for d in sorted({r["density"] for r in mine}):
            if not all(r["ratio"] < 1.0 for r in mine if r["density"] == d):
                break
            limit = d
        table[pattern] = {"max_density": limit}
    return table


def write_table(path: Path, rows_by_kind: dict[str, list[dict]]) -> None:
    """Merge the measured kinds into the break-even file (format 2: one table per kind);
    kinds not measured this run keep their entries and measurements."""
    old = json.loads(path.read_text()) if path.exists() else {}
    kernels = dict(old.get("kernels", {}))
    if "patterns" in old:  # format 1: the matmul kernel's table
        kernels.setdefault("matmul", old["patterns"])
    measurements = [dict(r, kind=r.get("kind", "matmul")) for r in old.get("measurements", [])]
    for kind, rows in rows_by_kind.items():
        kernels[kind] = break_even(rows)
        measurements = [r for r in measurements if r["kind"] != kind]
        measurements += [dict(r, kind=kind) for r in rows]
    doc = {"format": 2, "threads": 1, "measured_by": "tools/bench_sparse.py",
           "kernels": kernels, "measurements": measurements}
    path.write_text(json.dumps(doc, indent=1) + "\n")


# The README's single-layer table: 1024x1024 Linear at batch 1 and 16, resnet18's 1x1
# downsamples and stride-1 3x3 convs; block(1x8); 50/70/90 % sparsity and the sweep that
# finds each shape's break-even
TABLE_LAYERS = [("gemv", (1, 1024, 1024)), ("matmul", (16, 1024, 1024)),
                ("conv1x1", (1, 64, 128, 1, 2, 0, 56)), ("conv1x1", (1, 256, 512, 1, 2, 0, 14)),
                ("conv", (1, 64, 64, 3, 1, 1, 56)), ("conv", (1, 128, 128, 3, 1, 1, 28)),
                ("conv", (1, 256, 256, 3, 1, 1, 14)), ("conv", (1, 512, 512, 3, 1, 1, 7))]
TABLE_DENSITIES = [0.05, 0.1, 0.2, 0.3, 0.4, 0.5]


def layer_name(kind: str, layer: tuple) -> str:
    if kind in ("gemv", "matmul"):
        return f"Linear {layer[1]}x{layer[2]}, batch {layer[0]}"
    _, cin, cout, ksize, stride, _, size = layer
    return f"conv {ksize}x{ksize} {cin}->{cout} s{stride} @{size}x{size}"


def print_layer_table(pattern: tuple[int, int], repeats: int, only: str = "") -> None:
    import bench_common

    rows, cols = pattern
    lines = []
    for kind, layer in TABLE_LAYERS:
        if only not in layer_name(kind, layer):
            continue
        runs = [time_layer(kind, layer, rows, cols, TABLE_DENSITIES, ort=True, seed=seed)
                for seed in range(repeats)]
        print(json.dumps(runs), flush=True)

        def med(values):
            return float(np.median(values))

        dense = med([r["dense_ms"] for r in runs])
        ort = med([r["ort_ms"] for r in runs])
        by_density = {d: med([r["sparse"][i]["sparse_ms"] for r in runs])
                      for i, d in enumerate(TABLE_DENSITIES)}
        ratios = {d: med([r["sparse"][i]["ratio"] for r in runs])
                  for i, d in enumerate(TABLE_DENSITIES)}
        even = 0.0
        for d in TABLE_DENSITIES:
            if ratios[d] >= 1.0:
                break
            even = d
        cells = [f"{by_density[d]:.3f} ({1 / ratios[d]:.2f}x)" for d in (0.5, 0.3, 0.1)]
        lines.append([layer_name(kind, layer), f"{ort:.3f}", f"{dense:.3f}", *cells,
                      (f"{1 - even:.0%}" + (" or less" if even == TABLE_DENSITIES[-1] else ""))
                      if even else "none measured (>95 %)",
                      f"{max(e['max_abs_error'] for r in runs for e in r['sparse']):.1e}"])
    bench_common.print_table(
        f"block({rows}x{cols}), 1 thread, ms (speed-up over dense TVM), median of {repeats} "
        "interleaved runs",
        ["layer", "ORT dense", "TVM dense", "sparse 50 %", "sparse 70 %", "sparse 90 %",
         "break-even sparsity", "max |sparse - dense|"], lines)


def main(argv: list[str] | None = None) -> int:
    from onnxforge.backends.targets import resolve_target
    from onnxforge.kernels.schedule_configs import target_class

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default=",".join(ALL_KINDS),
                        help=f"kernel kinds to measure, of {','.join(ALL_KINDS)}")
    parser.add_argument("--write", action="store_true",
                        help="merge into kernels/tuning_db/<class>/sparse_break_even.json")
    parser.add_argument("--table", action="store_true",
                        help="print the README's single-layer table instead")
    parser.add_argument("--pattern", default="1x8", help="block RxC of --table")
    parser.add_argument("--repeats", type=int, default=3, help="--table: runs per layer")
    parser.add_argument("--layers", default="", help="--table: only layers whose name has this")
    args = parser.parse_args(argv)
    if args.table:
        rows, cols = (int(v) for v in args.pattern.split("x"))
        print_layer_table((rows, cols), args.repeats, args.layers)
        return 0
    kinds = [k for k in args.kinds.split(",") if k]
    unknown = set(kinds) - set(ALL_KINDS)
    if unknown:
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {ALL_KINDS}")
    rows_by_kind = {}
    if "matmul" in kinds:
        rows_by_kind["matmul"] = measure(args)
    layer_rows = measure_layers([k for k in kinds if k != "matmul"])
    for kind in kinds:
        if kind != "matmul":
            rows_by_kind[kind] = [r for r in layer_rows if r["kind"] == kind]
    for kind, rows in rows_by_kind.items():
        for pattern, entry in break_even(rows).items():
            print(f"{kind:8s} {pattern:12s} sparse faster up to {entry['max_density']:.2f} "
                  "nonzero blocks")
    if args.write:
        cls = target_class(resolve_target("host"))
        path = REPO / "kernels" / "tuning_db" / cls / "sparse_break_even.json"
        write_table(path, rows_by_kind)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
