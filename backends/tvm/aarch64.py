"""AArch64 code run for real on x86: a small C++ loader linked against the aarch64
wheel's `libtvm_runtime.so`, executed under `qemu-aarch64`."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ... import safe_write
from ...errors import (
    BackendError,
    InputSpecError,
)
from .importer import contiguous

logger = logging.getLogger(__name__)


def aarch64_compiler() -> str | None:
    """Debian's cross compiler driver, when installed (`gcc-aarch64-linux-gnu`)."""
    for name in ("aarch64-linux-gnu-g++", "aarch64-linux-gnu-gcc"):
        path = shutil.which(name)
        if path:
            return path
    return None



RUNNER_SOURCE = Path(__file__).parent.parent / "aarch64_runner" / "onnxforge_run.cc"


TVM_WHEEL = "apache-tvm==0.27.0.post1"


TVM_FFI_WHEEL = "apache-tvm-ffi==0.1.14.post1"


AARCH64_SYSROOT = "/usr/aarch64-linux-gnu"


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXFORGE_CACHE", Path.home() / ".cache" / "onnxforge"))


def qemu_available() -> bool:
    return shutil.which("qemu-aarch64") is not None and aarch64_compiler() is not None \
        and Path(AARCH64_SYSROOT).is_dir()


def _python_tag() -> str:
    import sys

    return f"{sys.version_info.major}{sys.version_info.minor}"


def _wheel_spec(distribution: str, fallback: str) -> str:
    """`name==version` of the installed distribution, so both sides run the same TVM."""
    from importlib import metadata

    try:
        return f"{distribution}=={metadata.version(distribution)}"
    except metadata.PackageNotFoundError:
        return fallback


def fetch_aarch64_runtime(*, download: bool = True) -> Path:
    """A folder with the AArch64 libtvm_runtime.so and libtvm_ffi.so (cached).

    They come from the manylinux_2_28_aarch64 wheels of apache-tvm and apache-tvm-ffi,
    downloaded once with pip into `$ONNXFORGE_CACHE/wheels` (default ~/.cache/onnxforge).
    """
    import sys
    import zipfile

    root = cache_dir()
    libdir = root / "aarch64-runtime"
    if (libdir / "libtvm_runtime.so").is_file() and (libdir / "libtvm_ffi.so").is_file():
        return libdir
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)

    def find(prefix: str) -> Path | None:
        hits = sorted(wheels.glob(f"{prefix}-*aarch64*.whl"))
        return hits[-1] if hits else None

    for spec, prefix, extra in ((_wheel_spec("apache-tvm", TVM_WHEEL), "apache_tvm", []),
                                (_wheel_spec("apache-tvm-ffi", TVM_FFI_WHEEL), "apache_tvm_ffi",
                                 ["--python-version", _python_tag()])):
        if find(prefix) is None and download:
            cmd = [sys.executable, "-m", "pip", "download", spec, "--no-deps",
                   "--platform", "manylinux_2_28_aarch64", "--only-binary=:all:",
                   "-d", str(wheels), *extra]
            result = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if result.returncode != 0:
                raise BackendError(f"could not download the aarch64 wheel {spec}: "
                                   f"{result.stderr.strip().splitlines()[-1:]}")
    tvm_wheel = find("apache_tvm")
    ffi_wheel = find("apache_tvm_ffi")
    if tvm_wheel is None or ffi_wheel is None:
        raise BackendError(f"aarch64 wheels of {TVM_WHEEL} / {TVM_FFI_WHEEL} not in {wheels}")
    tmp = Path(tempfile.mkdtemp(prefix=".aarch64-runtime.", dir=root))
    try:
        for wheel, member in ((tvm_wheel, "tvm/lib/libtvm_runtime.so"),
                              (ffi_wheel, "tvm_ffi/lib/libtvm_ffi.so")):
            with zipfile.ZipFile(wheel) as archive:
                (tmp / Path(member).name).write_bytes(archive.read(member))
        if libdir.exists():
            shutil.rmtree(libdir)
        os.replace(tmp, libdir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return libdir


def build_aarch64_runner(libdir: Path | None = None) -> Path:
    """Cross-compile `aarch64_runner/onnxforge_run.cc` against the AArch64 TVM runtime."""
    import tvm_ffi

    libdir = libdir or fetch_aarch64_runtime()
    binary = libdir / "onnxforge_run"
    if binary.is_file() and binary.stat().st_mtime >= RUNNER_SOURCE.stat().st_mtime:
        return binary
    compiler = aarch64_compiler()
    if compiler is None or not compiler.endswith("g++"):
        raise BackendError("g++-aarch64-linux-gnu is needed to build the AArch64 runner")
    include = Path(tvm_ffi.__file__).parent / "include"
    tmp = safe_write.reserve_temp(binary, suffix=binary.suffix)
    cmd = [compiler, "-std=c++17", "-O2", str(RUNNER_SOURCE), f"-I{include}", f"-L{libdir}",
           "-ltvm_runtime", "-ltvm_ffi", "-Wl,-rpath,$ORIGIN", "-o", str(tmp)]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise BackendError(f"building the AArch64 runner failed:\n{result.stderr[-2000:]}")
    safe_write.publish(tmp, binary, 0o777)
    return binary


def run_under_qemu(artifact: Any, inputs: Mapping[str, np.ndarray], *,
                   timeout: float = 600.0, threads: int = 1) -> dict[str, np.ndarray]:
    """Export `artifact` (a `TVMArtifact`; typed Any because `artifact` imports this
    module) for AArch64, run it with the C++ runner under qemu-aarch64."""
    if not qemu_available():
        raise BackendError("qemu-aarch64 and gcc-aarch64-linux-gnu are needed "
                           "(apt-get install qemu-user gcc-aarch64-linux-gnu "
                           "g++-aarch64-linux-gnu)")
    runner = build_aarch64_runner()
    with tempfile.TemporaryDirectory(prefix="onnxforge-qemu-") as work:
        work_path = Path(work)
        library = artifact.export(work_path / "model.so")
        if library.suffix != ".so":
            raise BackendError("the AArch64 library could not be linked (no cross compiler)")
        paths = []
        for i, spec in enumerate(artifact.inputs):
            if spec.name not in inputs:
                raise InputSpecError(f"missing input {spec.name!r}")
            array = contiguous(inputs[spec.name], spec.dtype)
            if tuple(array.shape) != spec.shape:
                raise InputSpecError(f"input {spec.name!r} has shape {array.shape}, "
                                     f"the model was compiled for {spec.shape}")
            path = work_path / f"input_{i}.npy"
            np.save(path, array)
            paths.append(str(path))
        out_dir = work_path / "out"
        out_dir.mkdir()
        env = dict(os.environ, TVM_NUM_THREADS=str(threads))
        cmd = ["qemu-aarch64", "-L", AARCH64_SYSROOT, str(runner), str(library), str(out_dir),
               *paths]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                                    env=env, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BackendError(f"qemu-aarch64 run timed out after {timeout:.0f} s") from exc
        if result.returncode != 0:
            raise BackendError(f"AArch64 run under qemu failed ({result.returncode}): "
                               f"{(result.stderr or result.stdout).strip()[-2000:]}")
        outputs = sorted(out_dir.glob("output_*.npy"), key=lambda p: int(p.stem.split("_")[1]))
        return artifact._name_outputs([np.load(p) for p in outputs])
