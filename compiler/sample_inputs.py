"""Inputs that make real models give meaningful outputs, for tests, benchmarks and
calibration.

- PP-OCR text: seeded synthetic lines (`text_lines`) and fixed ones (`OCR_LINES`),
  rendered with the installed DejaVu fonts by `render_line` to a [1, 3, H, W] input;
  `recognizer_lines`: calibration / evaluation feeds for the recognizer with a
  character-error-rate metric; `text_page`: a white page with dark word-like bars (no
  font needed), what the detector and a text-line crop expect rather than noise, which
  drives their outputs to ~0.
- `zoo_feeds`: inputs for a model of the zoo that `tools/build_zoo.py` builds, from its
  manifest entry: the shipped samples, text pages for the OCR models, else uniform
  values in the manifest's range.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

OCR_LINES = [
    "Hello World 2024", "quantization error", "onnxruntime int8", "The quick brown fox",
    "jumps over 13 lazy dogs", "Invoice No. 48213", "Total: $1,299.00", "Station 7 Platform B",
    "deep learning on phones", "version 3.14.15", "Open 9:00 - 18:30", "Room 402, Level 4",
    "Temperature 21.5 C", "Please keep left", "Exit only / No entry", "Model: PP-OCRv4",
    "call 555-0199 now", "Batch size 32", "error rate below 1%", "Monday to Friday",
    "Serial ABX-7731-Q", "coffee and tea", "Meeting at noon", "North Gate 12",
]

WORDS = ["alpha", "beta", "model", "layer", "tensor", "quant", "int8", "float", "error", "batch",
         "kernel", "graph", "node", "scale", "zero", "point", "onnx", "runtime", "speed", "size",
         "phone", "board", "camera", "image", "text", "line", "price", "total", "room", "gate",
         "north", "south", "east", "west", "level", "open", "close", "data"]


def text_lines(count: int, seed: int = 0) -> list[str]:
    """Seeded synthetic text lines: words, numbers and punctuation (ASCII)."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(count):
        parts = []
        for _ in range(int(rng.integers(2, 5))):
            r = rng.random()
            if r < 0.6:
                w = str(rng.choice(WORDS))
                parts.append(w.capitalize() if rng.random() < 0.3 else w)
            elif r < 0.85:
                parts.append(str(int(rng.integers(0, 10000))))
            else:
                parts.append(str(rng.choice(["No.", "$12.50", "3.14", "A-7", "(ok)", "x2", "50%"])))
        lines.append(" ".join(parts))
    return lines


def render_line(text: str, font_path: str, height: int = 48, width: int = 320) -> np.ndarray:
    """One text line rendered black on white, normalized to [-1, 1], as [1, 3, H, W]."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 30)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 16, height), (255, 255, 255))
    ImageDraw.Draw(img).text((8 - left, (height - (bottom - top)) // 2 - top), text,
                             fill=(0, 0, 0), font=font)
    w = min(width, int(img.width * height / img.height))
    img = img.resize((w, height), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - 0.5) / 0.5
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    canvas[:, :w] = arr
    return canvas.transpose(2, 0, 1)[None]


def fonts() -> list[str]:
    """Paths of the DejaVu fonts installed; FileNotFoundError when there are none."""
    base = Path("/usr/share/fonts/truetype/dejavu")
    found = [str(base / f) for f in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
                                     "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf")
             if (base / f).exists()]
    if not found:
        raise FileNotFoundError("DejaVu fonts missing: apt-get install fonts-dejavu-core")
    return found


def edit_distance(a, b) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


@dataclass
class RecognizerLines:
    """Rendered lines for a text recognizer: calibration and evaluation feeds, and
    `metric(ref_outputs, cand_outputs)`: character error rate against the true text."""

    calib: list[dict[str, np.ndarray]]
    evaluate: list[dict[str, np.ndarray]]
    metric: Callable[[list[dict], list[dict]], dict[str, float]]
    notes: str


def recognizer_lines(path: str | Path, evaluate: int = 64, skip: int = 0) -> RecognizerLines:
    """PP-OCR recognizer data: 32 + `skip` + `evaluate` lines in the installed DejaVu fonts
    (FileNotFoundError when none are); the charset comes from the model's `character`
    metadata. The first 32 lines calibrate, the next `evaluate` after `skip` more (64:
    951 characters; 256: 3,823) are held out; more lines only add to the end (the
    seeded lines are drawn in order), so the calibration lines never change and
    `skip=256` gives lines no run with the default 256 evaluated."""
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    charset = meta.get("character", "").splitlines()
    input_name = proto.graph.input[0].name
    font_paths = fonts()
    texts = OCR_LINES + text_lines(32 + skip + evaluate - len(OCR_LINES))
    lines = [(t, font_paths[i % len(font_paths)]) for i, t in enumerate(texts)]
    lines = lines[:32] + lines[32 + skip:]
    samples = [{input_name: render_line(t, f)} for t, f in lines]
    cal = samples[:32]
    ev = samples[32:]
    truth = texts[32 + skip:]
    chars = ["blank", *charset, " "] if charset else None

    def decode(probs: np.ndarray) -> list[int] | str:
        idx = probs[0].argmax(-1)
        seq, prev = [], -1
        for i in idx:
            if i != prev and i != 0:
                seq.append(int(i))
            prev = i
        if chars is None:
            return seq
        return "".join(chars[i] if i < len(chars) else "?" for i in seq)

    def metric(ref, cand):
        out = {}
        for key, outs in (("cer_ref", ref), ("cer", cand)):
            errors = total = 0
            for o, t in zip(outs, truth):
                pred = decode(next(iter(o.values())))
                errors += edit_distance(pred, t if chars else decode(next(iter(ref[0].values()))))
                total += len(t)
            out[key] = errors / max(total, 1)
        agree = [decode(next(iter(r.values()))) == decode(next(iter(c.values())))
                 for r, c in zip(ref, cand)]
        out["seq_agree"] = float(np.mean(agree))
        return {"cer": out["cer"], **out}

    charset_note = "from model metadata" if chars else "absent"
    return RecognizerLines(cal, ev, metric, f"{len(ev)} rendered lines, charset {charset_note}")


def text_page(height: int, width: int, seed: int = 0) -> np.ndarray:
    """White page with dark word-like bars (letter gaps every 14 px), values in [0, 1].

    Tall pages (detection) get 40 words of 8-24 px height; a text-line crop
    (recognition, direction classifier) gets one line filling 60 % of its height.
    """
    rng = np.random.default_rng(seed)
    img = np.ones((height, width), np.float32)
    if height <= 64:
        boxes = [(height // 5, width // 20, height * 3 // 5, width * 9 // 10)]
    else:
        boxes = []
        for _ in range(40):
            y, x = (int(v) for v in rng.integers(0, min(height, width) - 40, 2))
            boxes.append((y, x, int(rng.integers(8, 24)), int(rng.integers(40, 300))))
    for y, x, h, w in boxes:
        img[y:y + h, x:x + w] = 0.0
        for gx in range(x, min(width, x + w), 14):
            img[y:y + h, gx:gx + 3] = 1.0
    return img


IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def zoo_feeds(name: str, entry: dict, folder: Path) -> dict[str, np.ndarray]:
    """Inputs for zoo model ``name`` from its manifest ``entry`` (``folder``: the zoo's
    folder, where its sample inputs are): the shipped samples, text-like pages for the
    OCR models (ImageNet-normalized for the detector, [-1, 1] for the others), else
    uniform values in the manifest's range (seed 0)."""
    rng = np.random.default_rng(0)
    samples = np.load(folder / entry["sample_inputs"]) if entry.get("sample_inputs") else None
    feeds = {}
    for spec in entry["inputs"]:
        shape, (lo, hi) = spec["shape"], spec["range"]
        if samples is not None and spec["name"] in samples.files:
            arr = samples[spec["name"]]
            # one sample per leading index (silero_vad's state, sr) or rows = samples
            arr = arr[0] if arr.ndim == len(shape) + 1 else arr[: shape[0]]
            feeds[spec["name"]] = np.asarray(arr).astype(spec["dtype"])
        elif name.startswith("ppocr"):
            img = np.stack([text_page(shape[2], shape[3])] * 3)[None]
            if name == "ppocr_det":
                img = (img - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
            else:
                img = (img - 0.5) / 0.5
            feeds[spec["name"]] = img.astype(np.float32)
        elif spec["dtype"] == "int64":
            feeds[spec["name"]] = rng.integers(lo, hi, size=shape).astype(np.int64)
        else:
            feeds[spec["name"]] = rng.uniform(lo, hi, size=shape).astype(np.float32)
    return feeds
