"""Calibration / verification inputs from files, images or random data.

Every source yields batches: dicts input-name -> array with the model's batch size.
Sources are streamed, so a large calibration set never sits in memory at once
(an `.npz` is memory-mapped per array by numpy's lazy loader).

    source = open_calibration("data.npz", model, input_shapes)
    for batch in source.batches(limit=32): ...

Spec strings understood by `open_calibration` (and `--calib` on the CLI):
  path/to/data.npz     arrays keyed by input name, leading axis = samples;
                       an optional `labels` array enables accuracy metrics
  path/to/folder/      `.npy` files: `<input>.npy` stacked samples, or one file per
                       sample for a single-input model
  path/to/images/      `.png/.jpg` files for a single image input (resized to the
                       input's H,W; scaled to [0,1], then `(x-mean)/std`)
  random[:N]           N random batches (seeded) from the declared shapes/dtypes
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx_ir as ir

from .errors import InputSpecError, OptionText
from .shapes import input_dtypes, resolve_input_shapes

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class CalibrationSource:
    """Base: a named, re-iterable stream of input batches, optionally with labels."""

    description = "calibration"

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, np.dtype]):
        self.shapes = shapes
        self.dtypes = dtypes

    def batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        raise NotImplementedError

    def labels(self) -> np.ndarray | None:
        """Labels aligned with the samples of `batches()`, if the source has them."""
        return None

    def first(self) -> dict[str, np.ndarray]:
        for batch in self.batches(1):
            return batch
        raise InputSpecError(f"{self.description}: holds no samples")

    def _fit(self, name: str, sample: np.ndarray, first_index: int = 0,
             rows_are_samples: bool = True) -> np.ndarray:
        """Cast one batch to the input's dtype and check its shape and values.

        `first_index` is the sample index (in the source) of the batch's first row;
        `rows_are_samples` says whether each row of the batch is its own sample.
        """
        want = self.shapes[name]
        raw = np.asarray(sample)
        self._check_finite(name, raw, first_index, rows_are_samples)
        arr = raw.astype(self.dtypes[name], copy=False)
        if arr.shape != want:
            raise InputSpecError(OptionText.of(
                f"{self.description}: input {name!r} batch has shape {arr.shape}, the model "
                f"expects {want} (use ", ("input_shapes", None), " to set dynamic dims)"))
        return arr

    def _check_finite(self, name: str, arr: np.ndarray, first_index: int,
                      rows_are_samples: bool) -> None:
        """NaN/Inf inputs make every error measurement NaN: refuse them, naming the sample."""
        if not np.issubdtype(arr.dtype, np.inexact):
            return
        bad = ~np.isfinite(arr)
        if not bad.any():
            return
        row = int(np.argwhere(bad)[0][0]) if arr.ndim and rows_are_samples else 0
        kind = "NaN" if np.isnan(arr).any() else "Inf"
        raise InputSpecError(
            f"{self.description}: input {name!r} sample {first_index + row} contains {kind} "
            f"({int(bad.sum())} non-finite value(s)); calibration and verification data "
            "must be finite"
        )


class ArraySource(CalibrationSource):
    """Samples stacked along axis 0 per input (from .npz, .npy folders, or Python)."""

    def __init__(self, arrays: dict[str, np.ndarray], shapes, dtypes, *, labels=None,
                 description: str = "arrays"):
        super().__init__(shapes, dtypes)
        self.description = description
        missing = [n for n in shapes if n not in arrays]
        if missing:
            raise InputSpecError(
                f"{description}: no data for model input(s) {missing}; found keys "
                f"{sorted(arrays)}"
            )
        self.arrays = {n: arrays[n] for n in shapes}
        self._labels = labels
        counts = {len(a) for a in self.arrays.values()}
        if len(counts) != 1:
            raise InputSpecError(f"{description}: inputs have different sample counts {counts}")
        self.count = counts.pop()

    def _batch_size(self, name: str) -> int:
        arr, want = self.arrays[name], self.shapes[name]
        if arr.ndim == len(want) + 1:
            return 1  # one sample per leading index; batch axis added below
        if arr.ndim == len(want):
            return want[0]
        raise InputSpecError(
            f"{self.description}: input {name!r} has shape {arr.shape}, expected samples "
            f"of shape {want} stacked along axis 0"
        )

    def batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        first = next(iter(self.shapes))
        step = self._batch_size(first)
        n_batches = self.count // step
        if limit is not None:
            n_batches = min(n_batches, limit)
        for b in range(n_batches):
            batch = {}
            for name, arr in self.arrays.items():
                if arr.ndim == len(self.shapes[name]) + 1:
                    batch[name] = self._fit(name, arr[b], b, rows_are_samples=False)
                else:
                    batch[name] = self._fit(name, arr[b * step : (b + 1) * step], b * step)
            yield batch

    def labels(self) -> np.ndarray | None:
        return None if self._labels is None else np.asarray(self._labels)


class RandomSource(CalibrationSource):
    """Seeded random inputs: floats ~ N(0,1) (or U[0,1) with `uniform`), ints in [0, high)."""

    def __init__(self, shapes, dtypes, *, count: int = 8, seed: int = 0, int_high: int = 100):
        super().__init__(shapes, dtypes)
        self.count, self.seed, self.int_high = count, seed, int_high
        self.description = f"random:{count}"

    def batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        rng = np.random.default_rng(self.seed)
        n = self.count if limit is None else min(self.count, limit)
        for _ in range(n):
            batch = {}
            for name, shape in self.shapes.items():
                dtype = self.dtypes[name]
                if np.issubdtype(dtype, np.floating):
                    batch[name] = rng.standard_normal(shape).astype(dtype)
                elif dtype == np.bool_:
                    batch[name] = rng.integers(0, 2, shape).astype(np.bool_)
                else:
                    batch[name] = rng.integers(0, self.int_high, shape).astype(dtype)
            yield batch


class ImageSource(CalibrationSource):
    """A folder of images for a single NCHW (or NHWC) image input."""

    def __init__(self, folder: Path, shapes, dtypes, *, mean=(0.0,), std=(1.0,), layout="NCHW"):
        super().__init__(shapes, dtypes)
        if len(shapes) != 1:
            raise InputSpecError(f"{folder}: an image folder feeds single-input models only")
        self.name = next(iter(shapes))
        self.files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.files:
            raise InputSpecError(f"{folder}: no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        self.mean, self.std, self.layout = np.array(mean), np.array(std), layout
        self.description = str(folder)

    def batches(self, limit: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        from PIL import Image

        shape = self.shapes[self.name]
        n, c, h, w = shape if self.layout == "NCHW" else (shape[0], shape[3], shape[1], shape[2])
        mode = "L" if c == 1 else "RGB"
        count = len(self.files) // n
        if limit is not None:
            count = min(count, limit)
        for b in range(count):
            images = []
            for path in self.files[b * n : (b + 1) * n]:
                try:
                    with Image.open(path) as opened:
                        img = opened.convert(mode).resize((w, h), Image.BILINEAR)
                except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for bad files
                    raise InputSpecError(
                        f"{path}: not a readable image ({type(exc).__name__}: {exc}); remove "
                        "or replace it in the calibration folder"
                    ) from exc
                arr = np.asarray(img, dtype=np.float32).reshape(h, w, c) / 255.0
                arr = (arr - self.mean) / self.std
                images.append(arr.transpose(2, 0, 1) if self.layout == "NCHW" else arr)
            yield {self.name: self._fit(self.name, np.stack(images), b * n)}


def open_calibration(
    spec: str | Path | dict | CalibrationSource | None,
    model: ir.Model,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
    image_mean: tuple[float, ...] = (0.0,),
    image_std: tuple[float, ...] = (1.0,),
) -> CalibrationSource:
    """Open a calibration source for `model` from a spec (see module docstring)."""
    if isinstance(spec, CalibrationSource):
        return spec
    shapes = resolve_input_shapes(model, input_shapes)
    dtypes = input_dtypes(model)
    if spec is None or (isinstance(spec, str) and spec.startswith("random")):
        count = 8
        if isinstance(spec, str) and ":" in spec:
            text = spec.split(":", 1)[1]
            count = int(text) if text.strip().isdigit() else 0
            if count < 1:
                raise InputSpecError(f"{spec!r}: expected random:N with N >= 1 batches")
        return RandomSource(shapes, dtypes, count=count, seed=seed)
    if isinstance(spec, dict):
        labels = spec.get("labels")
        return ArraySource(dict(spec), shapes, dtypes, labels=labels, description="arrays")
    path = Path(spec)
    if not path.exists():
        raise InputSpecError(f"{path}: calibration data not found")
    if path.is_file() and path.suffix == ".npz":
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files if k in shapes}
        labels = data["labels"] if "labels" in data.files else None
        return ArraySource(arrays, shapes, dtypes, labels=labels, description=str(path))
    if path.is_file() and path.suffix == ".npy":
        if len(shapes) != 1:
            raise InputSpecError(f"{path}: a single .npy feeds single-input models only")
        return ArraySource({next(iter(shapes)): np.load(path)}, shapes, dtypes,
                           description=str(path))
    if path.is_dir():
        npys = sorted(path.glob("*.npy"))
        if npys:
            by_name = {p.stem: p for p in npys}
            if set(shapes) <= set(by_name):
                arrays = {n: np.load(by_name[n], mmap_mode="r") for n in shapes}
            elif len(shapes) == 1:
                arrays = {next(iter(shapes)): np.stack([np.load(p) for p in npys])}
            else:
                raise InputSpecError(
                    f"{path}: expected files named after the inputs {sorted(shapes)}"
                )
            labels_file = path / "labels.npy"
            labels = np.load(labels_file) if labels_file.exists() else None
            return ArraySource(arrays, shapes, dtypes, labels=labels, description=str(path))
        return ImageSource(path, shapes, dtypes, mean=image_mean, std=image_std)
    raise InputSpecError(f"{path}: unsupported calibration source (.npz, .npy, folder, random)")
