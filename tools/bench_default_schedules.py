#!/usr/bin/env python
"""Benchmark onnxforge's default CPU schedules against ONNX Runtime and naive TVM.

For each model, in one process and side by side:

* ORT      onnxruntime CPU, ``intra_op_num_threads`` = TVM threads, spinning off
           (``session.intra_op.allow_spinning=0``)
* naive    TVM with the stock ``cpu_generic`` pipeline (no schedules)
* default  TVM with ``onnxforge.kernels.default_schedule_pass``

ORT and default run in interleaved rounds (one round = ``--inner`` runs of each), so a
load spike from another process hits both; naive is timed separately (seconds per run).
Latency = median (and min) over rounds of the per-run mean. A per-PrimFunc profile of
the default build (Relax VM instrumentation) shows where the time goes.

``--cpu-time`` measures thread CPU time with one thread instead of wall time: on a
machine shared with other jobs it is the stable number (no preemption in it).

Models: ``resnet18_like`` / ``mobilenet_v2_like`` are built here with onnx.helper
(BN already folded); zoo models come from ``.zoo/`` (``tools/build_zoo.py``) and the
shipped digits CNN from ``compiler/data``.

    python tools/bench_default_schedules.py --models resnet18_like,mobilenet_v2_like
    python tools/bench_default_schedules.py --models resnet18,mobilenet_v2 --threads 2
    python tools/bench_default_schedules.py --models all --skip-naive --cpu-time
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("ONNXFORGE_ZOO", REPO / ".zoo"))
DIGITS = REPO / "compiler" / "data" / "digits_cnn.onnx"
ZOO_MODELS = [
    "resnet18",
    "mobilenet_v2",
    "squeezenet1_1",
    "efficientnet_b0",
    "mobilenet_v3_small",
    "minilm_l6",
]


# ----------------------------------------------------------------------------------------
# hand-built models (BatchNorm folded: conv + bias)
# ----------------------------------------------------------------------------------------


class _Graph:
    def __init__(self, seed: int = 0):
        self.nodes, self.inits, self.count = [], [], 0
        self.rng = np.random.default_rng(seed)

    def _name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def const(self, arr, prefix: str = "w") -> str:
        name = self._name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype=np.float32), name))
        return name

    def op(self, op_type: str, inputs: list[str], **attrs) -> str:
        out = self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, inputs, [out], **attrs))
        return out

    def conv(self, x, cin, cout, k, s=1, groups=1, act=None) -> str:
        fan_in = cin // groups * k * k
        w = self.const(
            self.rng.standard_normal((cout, cin // groups, k, k)) * np.sqrt(2.0 / fan_in)
        )
        b = self.const(self.rng.standard_normal(cout) * 0.1, "b")
        y = self.op(
            "Conv", [x, w, b], kernel_shape=[k, k], strides=[s, s], pads=[k // 2] * 4, group=groups
        )
        if act == "relu":
            y = self.op("Relu", [y])
        elif act == "relu6":
            y = self.op("Clip", [y, self.const(0.0, "c"), self.const(6.0, "c")])
        return y

    def head(self, x, channels, classes=1000) -> str:
        x = self.op("Flatten", [self.op("GlobalAveragePool", [x])], axis=1)
        w = self.const(self.rng.standard_normal((classes, channels)) * 0.03)
        b = self.const(self.rng.standard_normal(classes) * 0.1, "b")
        return self.op("Gemm", [x, w, b], transB=1)

    def model(self, shape, out) -> onnx.ModelProto:
        inp = helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)
        outp = helper.make_tensor_value_info(out, TensorProto.FLOAT, [shape[0], None])
        graph = helper.make_graph(self.nodes, "g", [inp], [outp], self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 8
        return model


def resnet18_like(batch: int = 1, hw: int = 224) -> onnx.ModelProto:
    """torchvision resnet18's layer shapes, BatchNorm folded into the convs."""
    g = _Graph()
    x = g.conv("input", 3, 64, 7, 2, act="relu")
    x = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for block in range(2):
            s = stride if block == 0 else 1
            y = g.conv(g.conv(x, cin, cout, 3, s, act="relu"), cout, cout, 3)
            shortcut = g.conv(x, cin, cout, 1, s) if (s != 1 or cin != cout) else x
            x, cin = g.op("Relu", [g.op("Add", [y, shortcut])]), cout
    return g.model([batch, 3, hw, hw], g.head(x, 512))


def mobilenet_v2_like(batch: int = 1, hw: int = 224) -> onnx.ModelProto:
    """torchvision mobilenet_v2's inverted residual blocks, BatchNorm folded."""
    g = _Graph()
    x, cin = g.conv("input", 3, 32, 3, 2, act="relu6"), 32
    for t, c, n, s in [
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]:
        for i in range(n):
            stride, hidden = (s if i == 0 else 1), cin * t
            y = g.conv(x, cin, hidden, 1, act="relu6") if t != 1 else x
            y = g.conv(y, hidden, hidden, 3, stride, groups=hidden, act="relu6")
            y = g.conv(y, hidden, c, 1)
            x, cin = (g.op("Add", [x, y]) if stride == 1 and cin == c else y), c
    x = g.conv(x, cin, 1280, 1, act="relu6")
    return g.model([batch, 3, hw, hw], g.head(x, 1280))


BUILT = {"resnet18_like": resnet18_like, "mobilenet_v2_like": mobilenet_v2_like}


# ----------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------


def _manifest_entry(name: str) -> dict:
    path = ZOO / "manifest.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data.get("models", {}).get(name, {})


def load_model(name: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray]] | None:
    """(model, inputs) for a built, zoo or shipped model; None when absent."""
    rng = np.random.default_rng(0)
    if name in BUILT:
        model = BUILT[name]()
        return model, {"input": rng.uniform(-2.5, 2.5, (1, 3, 224, 224)).astype(np.float32)}
    path = (
        DIGITS
        if name == "digits_cnn" and not (ZOO / "digits_cnn.onnx").exists()
        else ZOO / f"{name}.onnx"
    )
    if not path.exists():
        return None
    model = onnx.load(str(path))
    entry = _manifest_entry(name)
    sample = entry.get("sample_inputs")
    inputs: dict[str, np.ndarray] = {}
    if sample and (ZOO / sample).exists():
        data = np.load(ZOO / sample)
        for spec in entry.get("inputs", []):
            if spec["name"] in data:
                arr = data[spec["name"]]
                inputs[spec["name"]] = (
                    arr[: spec["shape"][0]] if arr.shape != tuple(spec["shape"]) else arr
                )
    for spec in entry.get("inputs", []):
        if spec["name"] in inputs:
            continue
        lo, hi = spec.get("range") or (0.0, 1.0)
        if spec["dtype"].startswith("int"):
            inputs[spec["name"]] = rng.integers(int(lo), int(hi), spec["shape"]).astype(
                spec["dtype"]
            )
        else:
            inputs[spec["name"]] = rng.uniform(lo, hi, spec["shape"]).astype(spec["dtype"])
    if not inputs:  # no manifest: the graph's own static shapes
        for value in model.graph.input:
            if any(value.name == init.name for init in model.graph.initializer):
                continue
            dims = [d.dim_value or 1 for d in value.type.tensor_type.shape.dim]
            inputs[value.name] = rng.uniform(0, 1, dims).astype(np.float32)
    return model, inputs


# ----------------------------------------------------------------------------------------
# engines
# ----------------------------------------------------------------------------------------


def ort_session(model: onnx.ModelProto, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(
        model.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def import_relax(model: onnx.ModelProto, inputs: dict[str, np.ndarray], target):
    import tvm
    from onnxforge.kernels import relax_prepasses
    from tvm.relax.frontend.onnx import from_onnx

    shapes = {k: list(v.shape) for k, v in inputs.items()}
    dtypes = {k: str(v.dtype) for k, v in inputs.items()}
    try:
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes)
    except Exception as err:  # noqa: BLE001 - e.g. minilm's ConstantOfShape on a scalar
        import onnxsim

        print(f"from_onnx failed ({str(err).splitlines()[0][:80]}); retrying after onnxsim")
        model, _ = onnxsim.simplify(model, overwrite_input_shapes=shapes)
        mod = from_onnx(model, shape_dict=shapes, dtype_dict=dtypes)
    with target:
        return tvm.transform.Sequential(list(relax_prepasses(target)))(mod)


def build_default(mod, target, configs=None):
    """Legalize + fuse, default schedules (knobs from ``configs`` where it has the
    kernel), then the stock lowering."""
    import tvm
    from onnxforge.kernels import (
        default_schedule_pass,
        legalize_and_fuse_passes,
        schedule_summary,
    )
    from onnxforge.kernels.schedule_configs import CONFIG_ATTR

    passes = [*legalize_and_fuse_passes(), default_schedule_pass(target, configs)]
    with target:
        mod = tvm.transform.Sequential(passes)(mod)
    configured = sum(
        1 for _, f in mod.functions_items()
        if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and CONFIG_ATTR in f.attrs
    )
    return tvm.compile(mod, target=target), schedule_summary(mod), configured


def build_naive(mod, target):
    import tvm

    return tvm.compile(mod, target=target)


def vm_runner(executable, inputs: dict[str, np.ndarray]):
    import tvm
    from tvm import relax

    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(v) for v in inputs.values()]
    func = vm["main"]

    def run():
        return func(*args)

    return vm, run


def first_output(value) -> np.ndarray:
    while not hasattr(value, "numpy"):
        value = value[0]
    return value.numpy()


# ----------------------------------------------------------------------------------------
# measurement
# ----------------------------------------------------------------------------------------


def interleaved(runners: dict, rounds: int, inner: int, clock) -> dict[str, list[float]]:
    """Per-run mean of ``inner`` runs, per round, engines alternating within a round."""
    for run in runners.values():  # warm-up
        run()
        run()
    times = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            start = clock()
            for _ in range(inner):
                run()
            times[name].append((clock() - start) / inner)
    return times


def profile_primfuncs(vm, run, summary: dict[str, str], clock, repeat: int = 5) -> list[tuple]:
    """(ms per inference, share, calls per inference, name, rule) per PrimFunc, slowest first."""
    stats = collections.defaultdict(list)
    starts = {}

    def instrument(func, name, before, ret, *args):
        if before:
            starts[name] = clock()
        else:
            stats[name].append(clock() - starts.pop(name, clock()))
        return 0

    vm.set_instrument(instrument)  # this VM is only used for profiling from here on
    for _ in range(repeat):
        run()
    rows = []
    for name, values in stats.items():
        if name.startswith(("vm.builtin", "relax.")):
            continue
        per_inf = float(np.sum(values)) / repeat
        rule = summary.get(name) or summary.get(name.rsplit("_", 1)[0], "?")
        rows.append([per_inf, 0.0, len(values) / repeat, name, rule])
    total = sum(r[0] for r in rows) or 1.0
    for r in rows:
        r[1] = r[0] / total
    return sorted((tuple(r) for r in rows), reverse=True)


def loadavg() -> str:
    try:
        return "/".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "?"


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out - ref| / max |ref|."""
    return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-12))


def _time_naive(mod, target, inputs, ref, args, clock, result: dict) -> None:
    """Build without the default schedules and time ``args.naive_runs`` runs (into
    ``result``: naive_ms_median/min, rel_err_naive)."""
    t3 = time.perf_counter()
    naive_exe = build_naive(mod, target)
    t4 = time.perf_counter()
    _, run_naive = vm_runner(naive_exe, inputs)
    naive_err = _rel_err(first_output(run_naive()), ref)
    values = []
    for _ in range(args.naive_runs):
        start = clock()
        run_naive()
        values.append(clock() - start)
    result["naive_ms_median"] = 1e3 * float(np.median(values))
    result["naive_ms_min"] = 1e3 * float(np.min(values))
    result["rel_err_naive"] = naive_err
    print(f"naive build {t4 - t3:.1f} s")


def _print_latencies(result: dict) -> None:
    """The engines' latencies against ORT's, the errors, the load after the runs."""
    ort_med, ort_min = result["ort_ms_median"], result["ort_ms_min"]
    print(f"{'engine':<10}{'median ms':>12}{'min ms':>10}{'x ORT (med)':>13}{'x ORT (min)':>13}")
    for key in ("ort", "naive", "default", "default+db"):
        if f"{key}_ms_median" not in result:
            continue
        med, low = result[f"{key}_ms_median"], result[f"{key}_ms_min"]
        print(f"{key:<10}{med:>12.2f}{low:>10.2f}{med / ort_med:>13.2f}{low / ort_min:>13.2f}")
    if "naive_ms_median" in result:
        speedup = result["naive_ms_median"] / result["default_ms_median"]
        print(f"default vs naive: {speedup:.1f}x faster")
    print(
        f"max rel error vs ORT: default {result['rel_err_default']:.1e}"
        + (f", default+db {result['rel_err_db']:.1e}" if "rel_err_db" in result else "")
        + (f", naive {result['rel_err_naive']:.1e}" if "rel_err_naive" in result else "")
    )
    if "db_kernels" in result:
        print(f"default+db: {result['db_kernels']} kernels scheduled with a measured setting")
    print(f"load after: {result['load_after']}")


def _print_profile(rows: list[tuple], top: int) -> None:
    """The ``top`` slowest PrimFuncs and the time share of each rule."""
    print(f"per-PrimFunc profile (default schedules, top {top}):")
    print(f"  {'ms':>8} {'share':>6} {'calls':>5}  {'rule':<20} function")
    for ms_, share, calls, func, rule in rows[:top]:
        print(f"  {1e3 * ms_:8.3f} {100 * share:5.1f}% {calls:5.0f}  {rule:<20} {func}")
    by_rule = collections.defaultdict(float)
    for ms_, _, _, _, rule in rows:
        by_rule[rule] += ms_
    total = sum(by_rule.values()) or 1.0
    print(
        "  by rule: "
        + ", ".join(
            f"{k} {100 * v / total:.0f}%" for k, v in sorted(by_rule.items(), key=lambda kv: -kv[1])
        )
    )


def bench_model(name: str, args, target) -> dict | None:
    loaded = load_model(name)
    if loaded is None:
        print(f"\n## {name}: absent (build the zoo with tools/build_zoo.py)")
        return None
    model, inputs = loaded
    clock = time.thread_time if args.cpu_time else time.perf_counter
    threads = 1 if args.cpu_time else args.threads
    print(
        f"\n## {name}  (threads {threads}, {'thread CPU time' if args.cpu_time else 'wall time'}, "
        f"load {loadavg()} before)"
    )
    t0 = time.perf_counter()
    mod = import_relax(model, inputs, target)
    t1 = time.perf_counter()
    exe, summary, _ = build_default(mod, target)
    t2 = time.perf_counter()
    rules = collections.Counter(summary.values())
    print(
        f"import {t1 - t0:.1f} s, default build {t2 - t1:.1f} s; functions by rule: {dict(rules)}"
    )

    session = ort_session(model, threads)
    ref = session.run(None, inputs)[0]
    vm, run_default = vm_runner(exe, inputs)
    result = {"model": name, "rel_err_default": _rel_err(first_output(run_default()), ref),
              "rules": dict(rules)}
    runners = {"ort": lambda: session.run(None, inputs), "default": run_default}
    if args.configs:
        db_exe, _, configured = build_default(mod, target, args.configs)
        _, runners["default+db"] = vm_runner(db_exe, inputs)
        result["rel_err_db"] = _rel_err(first_output(runners["default+db"]()), ref)
        result["db_kernels"] = configured
    times = interleaved(runners, args.rounds, args.inner, clock)
    for key, values in times.items():
        result[f"{key}_ms_median"] = 1e3 * float(np.median(values))
        result[f"{key}_ms_min"] = 1e3 * float(np.min(values))
    if not args.skip_naive:
        _time_naive(mod, target, inputs, ref, args, clock, result)
    result["load_after"] = loadavg()
    _print_latencies(result)

    rows = profile_primfuncs(vm, run_default, summary, clock)
    result["profile"] = [
        {"ms": r[0], "share": r[1], "calls": r[2], "func": r[3], "rule": r[4]} for r in rows
    ]
    _print_profile(rows, args.top)
    return result


def load_db(spec: str, target) -> dict:
    from onnxforge.kernels.schedule_configs import load_configs, shipped_db_dir

    if spec == "none":
        return {}
    if spec == "shipped":
        return load_configs(shipped_db_dir(target))
    folder = Path(spec)
    if not (folder / "schedule_configs.json").is_file():
        from onnxforge.backends.targets import target_key

        folder = folder / target_key(target)
    return load_configs(folder)


def print_summary(results: list[dict], threads: int, cpu_time: bool) -> None:
    """One markdown row per model: median latencies, and ratios to ORT of the medians
    and of the minima (ORT's spread with spinning off is wide; both are shown)."""
    if not results:
        return
    cols = [c for c in ("ort", "naive", "default", "default+db")
            if any(f"{c}_ms_median" in r for r in results)]
    clock = "thread CPU time, 1 thread" if cpu_time else f"wall time, {threads} threads"
    print(f"\n### summary ({clock}; ms = median; ratio = x ORT, medians / minima)")
    print("| model | " + " | ".join(f"{c} ms" for c in cols) + " | "
          + " | ".join(f"{c} / ORT" for c in cols[1:]) + " |")
    print("|---|" + "---:|" * (2 * len(cols) - 1))
    for r in results:
        ms = [f"{r[f'{c}_ms_median']:.2f}" if f"{c}_ms_median" in r else "-" for c in cols]
        ratios = [
            f"{r[f'{c}_ms_median'] / r['ort_ms_median']:.2f} / "
            f"{r[f'{c}_ms_min'] / r['ort_ms_min']:.2f}" if f"{c}_ms_median" in r else "-"
            for c in cols[1:]
        ]
        print(f"| {r['model']} | " + " | ".join(ms) + " | " + " | ".join(ratios) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models",
        default="resnet18_like,mobilenet_v2_like",
        help="comma list; 'all' = built + zoo + digits_cnn",
    )
    parser.add_argument(
        "--threads", type=int, default=2, help="TVM and ORT threads (wall-time mode)"
    )
    parser.add_argument("--cpu-time", action="store_true", help="1 thread, thread CPU time")
    parser.add_argument(
        "--target",
        default=None,
        help="JSON target dict (default: host CPU via llvm_get_system_cpu)",
    )
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=3)
    parser.add_argument("--naive-runs", type=int, default=2)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--top", type=int, default=12, help="profile rows to print")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--db",
        default="shipped",
        help="schedule config database for the default+db column: 'shipped' (the one "
        "onnxforge ships for this CPU class), a folder, or 'none'",
    )
    args = parser.parse_args(argv)

    threads = 1 if args.cpu_time else args.threads
    os.environ["TVM_NUM_THREADS"] = str(threads)  # before the TVM runtime starts its pool
    import tvm

    if args.target:
        target = tvm.target.Target(json.loads(args.target))
    else:
        mcpu = tvm.target.codegen.llvm_get_system_cpu()
        target = tvm.target.Target({"kind": "llvm", "mcpu": mcpu, "num-cores": threads})
    print(
        f"target {target}; TVM threads {threads}; ORT intra_op {threads} (no spinning); "
        f"TVM_BIND_THREADS={os.environ.get('TVM_BIND_THREADS', '(default)')}"
    )
    args.configs = load_db(args.db, target)
    print(f"default+db: {len(args.configs)} entries from {args.db}")
    names = args.models.split(",")
    if names == ["all"]:
        names = [*BUILT, *ZOO_MODELS, "digits_cnn"]
    results = [r for r in (bench_model(n, args, target) for n in names) if r]
    print_summary(results, threads, args.cpu_time)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
