"""Time per kernel of a compiled model, for the compile report (`onnxforge compile --profile`).

TVM 0.27's Relax VM has no profiler. `VirtualMachine.set_instrument(fn)` calls
`fn(func, name, before_run, ret, *args)` before and after every call the VM makes (kernels
and its builtins); we time each kernel call on the host clock between the two. CPU
kernels run synchronously, so the span is the kernel's time, plus a few microseconds of
Python per call: for tiny models the per-kernel numbers are an upper bound, which is
why the report also gives the median run time without instrumentation.
"""

from __future__ import annotations

import time
from typing import Any

from .verification import random_inputs

BUILTINS = "vm.builtin."


def profile_kernels(artifact: Any, *, runs: int = 20, warmup: int = 3,
                    seed: int = 0) -> dict[str, Any]:
    """{"runs", "plain_median_ms", "instrumented_ms", "kernels": [{name, calls, total_ms,
    share}], "builtins_ms"}: `main` run `runs` times on random inputs (after `warmup`)."""
    inputs = random_inputs(artifact.inputs, seed)
    plain = artifact.benchmark(inputs, warmup=warmup, repeat=runs)
    vm = artifact._get_vm()  # the VM benchmark() just loaded; its calls are timed
    started: dict[str, float] = {}
    totals: dict[str, list] = {}

    def instrument(_func, name, before_run, _ret, *_args) -> int:
        now = time.perf_counter()
        name = str(name)
        if before_run:
            started[name] = now
        elif name in started:
            entry = totals.setdefault(name, [0, 0.0])
            entry[0] += 1
            entry[1] += now - started.pop(name)
        return 0  # run the call as usual

    for _ in range(warmup):
        artifact.run(inputs)
    vm.set_instrument(instrument)
    try:
        begin = time.perf_counter()
        for _ in range(runs):
            artifact.run(inputs)
        elapsed = time.perf_counter() - begin
    finally:
        vm.set_instrument(lambda *_: 0)
    kernels = {n: v for n, v in totals.items() if not n.startswith(BUILTINS)}
    kernel_total = sum(v[1] for v in kernels.values()) or 1.0
    rows = [{"name": n, "calls": c // runs, "total_ms": round(t * 1e3, 4),
             "share": round(t / kernel_total, 4)}
            for n, (c, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])]
    return {"runs": runs, "plain_median_ms": round(plain.median_ms, 4),
            "instrumented_ms": round(elapsed * 1e3 / runs, 4), "kernels": rows,
            "builtins_ms": round(sum(v[1] for n, v in totals.items()
                                     if n.startswith(BUILTINS)) * 1e3 / runs, 4)}
