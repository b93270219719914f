"""Calibration sources and output comparison metrics."""

from __future__ import annotations

import numpy as np
import pytest
from builders import conv_relu_gemm
from onnxforge.calibration import open_calibration
from onnxforge.errors import InputSpecError
from onnxforge.ir import load_model
from onnxforge.verify import compare_outputs
from PIL import Image


@pytest.fixture
def model():
    return load_model(conv_relu_gemm(batch="N"))


def test_npz_source_streams_samples_with_labels(tmp_path, model):
    data = np.random.default_rng(0).standard_normal((5, 3, 8, 8)).astype(np.float64)
    np.savez(tmp_path / "d.npz", x=data, labels=np.arange(5))
    source = open_calibration(tmp_path / "d.npz", model, {"x": (1, 3, 8, 8)})
    batches = list(source.batches())
    assert len(batches) == 5 and batches[2]["x"].dtype == np.float32
    np.testing.assert_allclose(batches[2]["x"][0], data[2], rtol=1e-6)
    assert list(source.labels()) == [0, 1, 2, 3, 4]
    assert len(list(source.batches(limit=2))) == 2


def test_npy_folder_and_wrong_shapes(tmp_path, model):
    folder = tmp_path / "npy"
    folder.mkdir()
    for i in range(3):
        np.save(folder / f"{i}.npy", np.zeros((3, 8, 8), np.float32))
    assert len(list(open_calibration(folder, model, {"x": (1, 3, 8, 8)}).batches())) == 3
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 3, 7, 7), np.float32))
    with pytest.raises(InputSpecError, match=r"\(1, 3, 7, 7\).*expects \(1, 3, 8, 8\)"):
        list(open_calibration(tmp_path / "bad.npz", model, {"x": (1, 3, 8, 8)}).batches())
    np.savez(tmp_path / "other.npz", y=np.zeros((4, 3, 8, 8), np.float32))
    with pytest.raises(InputSpecError, match="no data for model input"):
        open_calibration(tmp_path / "other.npz", model, {"x": (1, 3, 8, 8)})


def test_image_folder_is_resized_and_normalised(tmp_path, model):
    folder = tmp_path / "img"
    folder.mkdir()
    Image.fromarray(np.full((20, 30, 3), 255, np.uint8)).save(folder / "a.png")
    source = open_calibration(folder, model, {"x": (1, 3, 8, 8)}, image_mean=(0.5,),
                              image_std=(0.25,))
    (batch,) = list(source.batches())
    np.testing.assert_allclose(batch["x"], np.full((1, 3, 8, 8), 2.0), rtol=1e-6)


def test_random_source_is_seeded(model):
    a = open_calibration("random:3", model, {"x": (1, 3, 8, 8)}, seed=1)
    b = open_calibration("random:3", model, {"x": (1, 3, 8, 8)}, seed=1)
    for x, y in zip(a.batches(), b.batches()):
        np.testing.assert_array_equal(x["x"], y["x"])
    assert len(list(a.batches())) == 3


def test_metrics_against_hand_computed_values():
    ref = {"y": np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], np.float32)}
    got = {"y": np.array([[1.0, 2.0, 4.0], [1.0, 2.0, 1.0]], np.float32)}
    (out,) = compare_outputs(ref, got).outputs
    assert out.max_abs == pytest.approx(2.0)
    assert out.rel_l2 == pytest.approx(np.sqrt(5.0) / np.sqrt(28.0))
    cos = (1 + 4 + 12 + 3 + 4 + 1) / (np.sqrt(28.0) * np.sqrt(1 + 4 + 16 + 1 + 4 + 1))
    assert out.cosine == pytest.approx(cos)
    assert out.top1 == 0.5  # row 0 agrees (index 2), row 1 does not (0 vs 1)
