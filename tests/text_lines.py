"""Text lines rendered with DejaVu fonts, for the PP-OCR models in tests and benchmarks.

Seeded synthetic lines (`text_lines`) and fixed ones (`OCR_LINES`), `render_line` to a
[1, 3, H, W] input, and `recognizer_lines`: calibration / evaluation feeds for the
recognizer with a character-error-rate metric. `tools/bench_common.py` imports it too.
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


def recognizer_lines(path: str | Path) -> RecognizerLines:
    """PP-OCR recognizer data: 96 lines in the installed DejaVu fonts (FileNotFoundError
    when none are); the charset comes from the model's `character` metadata."""
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    charset = meta.get("character", "").splitlines()
    input_name = proto.graph.input[0].name
    font_paths = fonts()
    texts = OCR_LINES + text_lines(72)
    lines = [(t, font_paths[i % len(font_paths)]) for i, t in enumerate(texts)]
    samples = [{input_name: render_line(t, f)} for t, f in lines]
    # 32 lines calibrate, the other 64 (about 1,000 characters) evaluate
    cal = samples[:32]
    ev = samples[32:]
    truth = texts[32:]
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
