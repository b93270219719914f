"""TVM backend: ONNX -> Relax -> scheduled TIR -> a VM executable for CPU or GPU.

    from onnxforge.backends.tvm import compile_model
    art = compile_model("model.onnx", "host", tuning_db="tuning/")
    outputs = art.run({"input": x})
    art.benchmark({"input": x}, threads=2)
    art.export("model.so")

Read in this order: `pipeline` (the whole lowering, top to bottom), `importer` (ONNX ->
Relax and what is refused), `schedules` and `database` (who schedules each kernel),
`artifact` (run, time, export), `verification` (against onnxruntime), `aarch64` (ARM
code under qemu). Tuning: `tuning` (MetaSchedule: the run, in the parent process),
`tuning_worker` (the process that searches), `metaschedule` (the pieces put into the
search, RPC) and `config_tuning` (the default rules' knob settings).

Threads: TVM's thread pool is sized once per process from `TVM_NUM_THREADS` (default:
half the logical CPUs, i.e. 1 on a 2-core machine). Importing this package sets
`TVM_NUM_THREADS` to the number of physical cores when it is unset; `run()` and
`benchmark()` then pick `threads` (default: all of them) with
`runtime.config_threadpool`. Set `TVM_NUM_THREADS` yourself to cap it.
"""

import os

from ..targets import physical_cores

os.environ.setdefault("TVM_NUM_THREADS", str(physical_cores()))

# the public names, as before the split into modules
from .aarch64 import (
    aarch64_compiler,
    build_aarch64_runner,
    fetch_aarch64_runtime,
    qemu_available,
    run_under_qemu,
)
from .artifact import TVMArtifact
from .database import apply_database, open_database, resolve_tuning_db
from .importer import InputSpec, import_onnx, input_specs, load_onnx
from .pipeline import (
    PreparedModule,
    compile_model,
    gpu_schedule_passes,
    legalize_passes,
    lower_passes,
    prepare_module,
    prepare_passes,
)
from .verification import (
    VERIFY_ATOL,
    VERIFY_RTOL,
    VERIFY_SAMPLES,
    Verification,
    compare_to_ort,
    random_inputs,
    verify_artifact,
)

__all__ = [
    "VERIFY_ATOL", "VERIFY_RTOL", "VERIFY_SAMPLES", "InputSpec", "PreparedModule",
    "TVMArtifact", "Verification", "aarch64_compiler", "apply_database",
    "build_aarch64_runner", "compare_to_ort", "compile_model", "fetch_aarch64_runtime",
    "gpu_schedule_passes", "import_onnx", "input_specs", "legalize_passes", "load_onnx",
    "lower_passes", "open_database", "prepare_module", "prepare_passes", "qemu_available",
    "random_inputs", "resolve_tuning_db", "run_under_qemu", "verify_artifact",
]
