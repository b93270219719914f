"""A compiled model: run it, time it, export it (`.so`, `.tar`, GPU source)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ... import safe_write
from ...errors import (
    BackendError,
    InputSpecError,
)
from ..targets import (
    physical_cores,
    resolve_target,
    runs_on_this_machine,
    target_arch,
)
from ..timing import Timing, time_callable
from .aarch64 import aarch64_compiler, qemu_available, run_under_qemu
from .importer import InputSpec, contiguous

logger = logging.getLogger(__name__)


def _flatten(value) -> list:
    import tvm

    if isinstance(value, tvm.runtime.Tensor):
        return [value]
    if type(value).__name__ == "Shape":  # an ONNX Shape output: one int64 tensor, not a tuple
        return [np.asarray(tuple(value), dtype=np.int64)]
    if isinstance(value, (list, tuple)) or hasattr(value, "__len__"):
        out = []
        for item in value:
            out += _flatten(item)
        return out
    return [value]


# TVM's pool threads spin for ~0.2 s after each parallel kernel (measured here: 160 ms of
# CPU in the 300 ms after one mobilenet_v2 run at 2 threads) unless told not to. In this
# process that steals a core from whatever runs next: onnxruntime in an interleaved
# benchmark (spinning off, as ours always is), the next candidate, the user's code.
# TVM reads the variable when it starts its pool, so it is set when this module is
# imported, before anything runs; a value the user set is kept. The cost: a kernel's
# workers are woken instead of found spinning (at 2 threads on this loaded machine
# mobilenet_v2 fp32 ran 30.6 instead of 14.0 ms; at 1 thread no difference), the same
# condition onnxruntime is measured under. Exported libraries run under the caller's
# own setting.
SPIN_ENV = "TVM_THREAD_POOL_SPIN_COUNT"
os.environ.setdefault(SPIN_ENV, "0")


def _set_threads(threads: int | None) -> int:
    import tvm

    cap = int(os.environ.get("TVM_NUM_THREADS", physical_cores()) or 1)
    wanted = max(1, min(threads or cap, cap))
    tvm.get_global_func("runtime.config_threadpool")(0, wanted)
    return wanted


def _device_modules(executable) -> list:
    found = []

    def walk(module):
        for sub in module.imports:
            if sub.kind in ("cuda", "opencl", "vulkan", "metal", "rocm", "webgpu"):
                found.append(sub)
            walk(sub)

    walk(executable.mod)
    return found


_SOURCE_SUFFIX = {"cuda": ".cu", "opencl": ".cl", "metal": ".metal", "vulkan": ".spv"}


class TVMArtifact:
    """A compiled model: run / benchmark on this machine, export for the target."""

    backend = "tvm"

    def __init__(self, executable, target, inputs: list[InputSpec], output_names: list[str],
                 report: dict[str, Any], *, threads: int | None = None):
        self.executable = executable
        self.threads = threads
        self.target = target
        self.inputs = inputs
        self.input_names = [s.name for s in inputs]
        self.output_names = output_names
        self.report = report
        self._vm = None
        self._device = None

    # -- running ---------------------------------------------------------------------------
    def _runtime_device(self):
        import tvm

        if self.target.kind.name == "llvm":
            if not runs_on_this_machine(self.target):
                return None
            return tvm.cpu(0)
        if self.target.kind.name == "cuda":
            dev = tvm.cuda(0)
        elif self.target.kind.name == "opencl":
            dev = tvm.opencl(0)
        elif self.target.kind.name == "vulkan":
            dev = tvm.vulkan(0)
        else:
            return None
        try:
            exists = dev.exist
        except Exception:  # noqa: BLE001 - runtime without that device API
            exists = False
        if not exists or target_arch(self.target) != target_arch(resolve_target("host")):
            return None
        return dev

    def _get_vm(self):
        from tvm import relax

        if self._vm is None:
            dev = self._runtime_device()
            if dev is None:
                raise BackendError(
                    f"cannot run {self.report.get('target') or self.report['target_key']} code "
                    "on this machine (no such device or a different CPU architecture); "
                    "export it and run it on the target "
                    "(AArch64: onnxforge.backends.tvm.run_under_qemu)"
                )
            self._device = dev
            self._vm = relax.VirtualMachine(self.executable, dev)
        return self._vm

    def _arguments(self, inputs: Mapping[str, np.ndarray]) -> list:
        import tvm

        args = []
        for spec in self.inputs:
            if spec.name not in inputs:
                raise InputSpecError(f"missing input {spec.name!r} (inputs: {self.input_names})")
            array = contiguous(inputs[spec.name], spec.dtype)
            if tuple(array.shape) != spec.shape:
                raise InputSpecError(
                    f"input {spec.name!r} has shape {tuple(array.shape)}, the model was "
                    f"compiled for {spec.shape}"
                )
            args.append(tvm.runtime.tensor(array, device=self._device))
        return args

    def _name_outputs(self, values: list) -> dict[str, np.ndarray]:
        arrays = [v.numpy() if hasattr(v, "numpy") else np.asarray(v) for v in values]
        names = self.output_names
        if len(names) != len(arrays):
            names = [f"output_{i}" for i in range(len(arrays))]
        return dict(zip(names, arrays))

    def can_run(self) -> bool:
        """True when `run` works here (in process, or AArch64 under qemu)."""
        if self._runtime_device() is not None:
            return True
        return target_arch(self.target) == "aarch64" and self.target.kind.name == "llvm" \
            and qemu_available()

    def run(self, inputs: Mapping[str, np.ndarray], *, threads: int | None = None
            ) -> dict[str, np.ndarray]:
        """Run `main` on this machine; AArch64 CPU code runs under qemu when available."""
        if (self.target.kind.name == "llvm" and target_arch(self.target) == "aarch64"
                and not runs_on_this_machine(self.target)):
            return run_under_qemu(self, inputs)
        vm = self._get_vm()
        _set_threads(threads or self.threads)
        args = self._arguments(inputs)
        try:
            result = vm["main"](*args)
        except Exception as exc:
            raise BackendError(f"TVM failed to run the model: {exc}") from exc
        return self._name_outputs(_flatten(result))

    def benchmark(self, inputs: Mapping[str, np.ndarray], *, warmup: int = 5, repeat: int = 30,
                  threads: int | None = None) -> Timing:
        """Median latency of `main` (threads: TVM thread-pool size, default all cores)."""
        vm = self._get_vm()
        self.report["bench_threads"] = _set_threads(threads or self.threads)
        args = self._arguments(inputs)
        main = vm["main"]
        device = self._device

        def call():
            main(*args)
            device.sync()

        return time_callable(call, warmup=warmup, repeat=repeat)

    # -- exporting --------------------------------------------------------------------------
    def export(self, path: str | os.PathLike) -> Path:
        """Write the deployable library atomically; return the path written.

        CPU: `.so` (x86: the system compiler; AArch64: `aarch64-linux-gnu-g++`, else a
        `.tar` of objects to link on the board). GPU: the `.so` host module with the device
        code inside, plus the device source next to it (`.cu` / `.cl`).
        """
        path = Path(path)
        if path.suffix not in (".so", ".tar"):
            raise BackendError(f"{path}: export to a .so (shared library) or .tar (objects)")
        arch = target_arch(self.target)
        options: dict[str, Any] = {}
        native = arch == target_arch(resolve_target("host"))
        if path.suffix == ".so" and not native:
            compiler = aarch64_compiler() if arch == "aarch64" else None
            if compiler is None:
                logger.warning("no cross compiler for %s: writing a .tar instead of %s",
                               arch, path.name)
                how = ("apt-get install g++-aarch64-linux-gnu" if arch == "aarch64"
                       else "not installed here" if arch != "hexagon"
                       else "the Hexagon SDK's hexagon-clang; not installable here")
                self.report["notes"].append(
                    f"no {arch} cross compiler ({how}): exported a .tar of objects; link it "
                    "on the board"
                )
                path = path.with_suffix(".tar")
            else:
                options["cc"] = compiler
        if path.suffix == ".tar":
            from tvm.support.tar import tar

            options = {"fcompile": tar}
        tmp = safe_write.reserve_temp(path, suffix=path.suffix)
        try:
            self.executable.export_library(str(tmp), **options)
            safe_write.publish(tmp, path, 0o777 if path.suffix == ".so" else 0o666)
        except Exception as exc:
            raise BackendError(f"exporting {path} failed: {exc}") from exc
        finally:
            if tmp.exists():
                tmp.unlink()
        written = [str(path)]
        for module in _device_modules(self.executable):
            source = module.inspect_source()
            if source:
                suffix = _SOURCE_SUFFIX.get(module.kind, f".{module.kind}")
                written.append(str(safe_write.write_text(path.with_suffix(suffix), source)))
            for fmt, suffix in (("ptx", ".ptx"),):
                try:
                    extra = module.inspect_source(fmt)
                except Exception:  # noqa: BLE001 - format not kept by this runtime
                    extra = ""
                if extra:
                    written.append(str(safe_write.write_text(path.with_suffix(suffix), extra)))
        self.report["exported"] = written
        return path

    def host_assembly(self) -> str:
        """Assembly of the compiled CPU code (LLVM modules): where tests look for the
        instructions a kernel was meant to use (e.g. ``vpdpbusd``)."""
        found = []

        def walk(module):
            for sub in module.imports:
                if sub.kind == "llvm":
                    found.append(sub.inspect_source("asm"))
                walk(sub)

        walk(self.executable.mod)
        return "\n".join(found)

    def device_source(self) -> str:
        """Generated GPU source (CUDA C / OpenCL C); '' for CPU targets."""
        return "\n".join(m.inspect_source() for m in _device_modules(self.executable))

    def __repr__(self) -> str:
        return (f"TVMArtifact(target={self.report.get('target') or self.report['target_key']}, "
                f"primfuncs={self.report['num_primfuncs']}, "
                f"compile={self.report['compile_seconds']}s)")
