"""Shared fixtures: the shipped digits model and the model zoo built by tools/build_zoo.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "compiler" / "data"
ZOO = Path(os.environ.get("ONNXFORGE_ZOO", REPO / ".zoo"))


def zoo_manifest() -> dict:
    path = ZOO / "manifest.json"
    return json.loads(path.read_text()) if path.exists() else {}


def zoo_path(name: str) -> Path:
    """Path of a zoo model; skips the test with a reason when the zoo was not built."""
    path = ZOO / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"zoo model {name} absent: run `python tools/build_zoo.py` "
                    "(see tools/README.md)")
    return path


def zoo_input_shapes(name: str) -> dict[str, tuple[int, ...]]:
    entry = zoo_manifest().get("models", {}).get(name) or zoo_manifest().get(name) or {}
    shapes = {}
    for spec in entry.get("inputs", []):
        shapes[spec["name"]] = tuple(spec["shape"])
    return shapes


@pytest.fixture
def digits_model() -> Path:
    path = DATA / "digits_cnn.onnx"
    if not path.exists():
        pytest.skip("shipped digits model absent (tools/train_digits.py)")
    return path


@pytest.fixture
def digits_test_data() -> Path:
    return DATA / "digits_test.npz"


def zoo_sample_inputs(name: str) -> str | None:
    """Real sample inputs shipped with a zoo model (e.g. tokenized sentences), if any."""
    entry = zoo_manifest().get("models", {}).get(name, {})
    sample = entry.get("sample_inputs")
    return str(ZOO / sample) if sample else None


def need_qemu() -> None:
    """Skip unless AArch64 code can run here (qemu-aarch64, the cross compiler and the
    aarch64 TVM runtime wheel)."""
    from onnxforge.backends.tvm import build_aarch64_runner, fetch_aarch64_runtime, qemu_available
    from onnxforge.errors import BackendError

    if not qemu_available():
        pytest.skip("qemu-aarch64 / aarch64-linux-gnu-g++ absent "
                    "(apt-get install qemu-user gcc-aarch64-linux-gnu g++-aarch64-linux-gnu)")
    try:
        build_aarch64_runner(fetch_aarch64_runtime())
    except BackendError as exc:
        pytest.skip(f"aarch64 TVM runtime wheel unavailable: {exc}")
