"""Benchmark onnxforge's quantizer against onnxruntime's `quantize_static` and fp32.

For each model: the same calibration batches go to both quantizers; accuracy or
fidelity is measured on held-out data; size is the serialized model; latency is the
median of interleaved onnxruntime runs in this one process (threads matched,
spinning off, `OrtArtifact.benchmark`).

    python tools/bench_quantization.py                      # every model available
    python tools/bench_quantization.py --models digits,minilm --threads 1

Models and metrics:
  digits       shipped CNN; accuracy on compiler/data/digits_test.npz (calib: digits_calib.npz)
  minilm       .zoo/minilm_l6 (real weights); cosine to fp32 output on held-out real sentences
  resnet18 ... torchvision zoo models (random weights); top-1 agreement / cosine to fp32 on
               natural images bundled in scikit-image (`pip install scikit-image`)
  ppocr_rec    PP-OCRv4 rec; character error rate on text lines rendered with DejaVu fonts,
               decoded with the charset stored in the model's metadata
  ppocr_cls    direction classifier; accuracy on rendered lines, half rotated 180 degrees

ORT baseline: `quant_pre_process` then `quantize_static` (QDQ), once with ORT's defaults
(per-tensor, s8 activations) and once per-channel with u8 activations; the table shows both.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

REPO = Path(__file__).resolve().parents[1]
ZOO = Path(os.environ.get("ONNXFORGE_ZOO", REPO / ".zoo"))
DATA = REPO / "compiler" / "data"

from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import ArraySource
from onnxforge.ir import load_model, model_bytes
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.shapes import input_dtypes

logger = logging.getLogger("bench_quantization")
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
SKIMAGE_IMAGES = ["astronaut", "camera", "cat", "chelsea", "coffee", "coins", "colorwheel",
                  "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page", "retina",
                  "rocket", "text", "horse", "grass", "gravel", "brick", "microaneurysms", "cell",
                  "clock", "checkerboard"]


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


def _manifest() -> dict:
    path = ZOO / "manifest.json"
    if not path.exists():
        return {}
    data = json.loads(path.read_text())
    return data.get("models", data)


def zoo_shapes(name: str) -> dict[str, tuple[int, ...]]:
    entry = _manifest().get(name, {})
    return {s["name"]: tuple(s["shape"]) for s in entry.get("inputs", [])}


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
        crops = [(0, 0, s, s), (w - s, h - s, w, h), ((w - s) // 2, (h - s) // 2, (w + s) // 2, (h + s) // 2)]
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
        agree, cos = [], []
        for r, c in zip(ref, cand):
            a, b = next(iter(r.values())), next(iter(c.values()))
            agree.append(float(a.argmax() == b.argmax()))
            a, b = a.ravel(), b.ravel()
            cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        return {"top1_agree": float(np.mean(agree)), "cosine_mean": float(np.mean(cos))}

    return Task(name, path, cal, ev, metric, notes=f"{len(cal)} calib / {len(ev)} eval crops")


OCR_LINES = [
    "Hello World 2024", "quantization error", "onnxruntime int8", "The quick brown fox",
    "jumps over 13 lazy dogs", "Invoice No. 48213", "Total: $1,299.00", "Station 7 Platform B",
    "deep learning on phones", "version 3.14.15", "Open 9:00 - 18:30", "Room 402, Level 4",
    "Temperature 21.5 C", "Please keep left", "Exit only / No entry", "Model: PP-OCRv4",
    "call 555-0199 now", "Batch size 32", "error rate below 1%", "Monday to Friday",
    "Serial ABX-7731-Q", "coffee and tea", "Meeting at noon", "North Gate 12",
]


WORDS = ["alpha", "beta", "model", "layer", "tensor", "quant", "int8", "float", "error", "batch", "kernel", "graph", "node", "scale", "zero", "point", "onnx", "runtime", "speed", "size", "phone", "board", "camera", "image", "text", "line", "price", "total", "room", "gate", "north", "south", "east", "west", "level", "open", "close", "data"]


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
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.truetype(font_path, 30)
    left, top, right, bottom = font.getbbox(text)
    img = Image.new("RGB", (right - left + 16, height), (255, 255, 255))
    ImageDraw.Draw(img).text((8 - left, (height - (bottom - top)) // 2 - top), text, fill=(0, 0, 0), font=font)
    w = min(width, int(img.width * height / img.height))
    img = img.resize((w, height), Image.BILINEAR)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - 0.5) / 0.5
    canvas = np.zeros((height, width, 3), dtype=np.float32)
    canvas[:, :w] = arr
    return canvas.transpose(2, 0, 1)[None]


def _fonts() -> list[str]:
    base = Path("/usr/share/fonts/truetype/dejavu")
    fonts = [str(base / f) for f in ("DejaVuSans.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
                                      "DejaVuSans-Bold.ttf", "DejaVuSansCondensed.ttf") if (base / f).exists()]
    if not fonts:
        raise FileNotFoundError("DejaVu fonts missing: apt-get install fonts-dejavu-core")
    return fonts


def ppocr_rec_task() -> Task | None:
    path = ZOO / "ppocr_rec.onnx"
    if not path.exists():
        return None
    proto = onnx.load(str(path), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    charset = meta.get("character", "").splitlines()
    input_name = proto.graph.input[0].name
    fonts = _fonts()
    texts = OCR_LINES + text_lines(72)
    lines = [(t, fonts[i % len(fonts)]) for i, t in enumerate(texts)]
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
                errors += _edit_distance(pred, t if chars else decode(next(iter(ref[0].values()))))
                total += len(t)
            out[key] = errors / max(total, 1)
        agree = [decode(next(iter(r.values()))) == decode(next(iter(c.values()))) for r, c in zip(ref, cand)]
        out["seq_agree"] = float(np.mean(agree))
        return {"cer": out["cer"], **out}

    return Task("ppocr_rec", path, cal, ev, metric,
                notes=f"{len(ev)} rendered lines, charset {'from model metadata' if chars else 'absent'}")


def ppocr_cls_task() -> Task | None:
    path = ZOO / "ppocr_cls.onnx"
    if not path.exists():
        return None
    proto = onnx.load(str(path), load_external_data=False)
    input_name = proto.graph.input[0].name
    fonts = _fonts()
    samples, labels = [], []
    for i, t in enumerate(OCR_LINES):
        x = render_line(t, fonts[i % len(fonts)], 48, 192)
        rotated = i % 2 == 1
        if rotated:
            x = x[:, :, ::-1, ::-1].copy()
        samples.append({input_name: x})
        labels.append(int(rotated))
    order = list(range(len(samples)))
    cal = [samples[i] for i in order if (i // 2) % 2 == 0]
    ev_idx = [i for i in order if (i // 2) % 2 == 1]
    ev = [samples[i] for i in ev_idx]
    y = np.array([labels[i] for i in ev_idx])

    def metric(ref, cand):
        pr = np.array([next(iter(o.values())).argmax() for o in ref])
        pc = np.array([next(iter(o.values())).argmax() for o in cand])
        return {"accuracy": float(np.mean(pc == y)), "acc_ref": float(np.mean(pr == y)),
                "agree": float(np.mean(pr == pc))}

    return Task("ppocr_cls", path, cal, ev, metric, notes=f"{len(ev)} rendered lines, half upside down")


def _edit_distance(a, b) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


# ---------------------------------------------------------------- quantizers


class _Reader:
    def __init__(self, batches):
        self._it = iter(batches)

    def get_next(self):
        return next(self._it, None)

    def rewind(self):  # pragma: no cover - ORT may call it
        pass


def ort_quantize(model_path: Path, calib, out_dir: Path, *, per_channel: bool, u8: bool) -> Path:
    """onnxruntime's own static quantizer (the baseline), after its pre-processing."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = out_dir / "ort_pre.onnx"
    try:
        quant_pre_process(str(model_path), str(pre))
    except Exception:  # noqa: BLE001 - ORT's symbolic shape inference fails on some models
        try:
            quant_pre_process(str(model_path), str(pre), skip_symbolic_shape=True)
        except Exception:  # noqa: BLE001
            pre = model_path
    out = out_dir / f"ort_q_{int(per_channel)}{int(u8)}.onnx"
    quantize_static(str(pre), str(out), _Reader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=per_channel,
                    activation_type=QuantType.QUInt8 if u8 else QuantType.QInt8,
                    weight_type=QuantType.QInt8)
    return out


def ours_quantize(model_path: Path, calib, pipeline: str):
    model = load_model(model_path)
    names = [v.name for v in model.graph.inputs]
    shapes = {n: tuple(calib[0][n].shape) for n in names}
    arrays = {n: np.concatenate([b[n] for b in calib]) for n in names}
    source = ArraySource(arrays, shapes, input_dtypes(model), description="bench calibration")
    context = PassContext(calibration=source, input_shapes=shapes, threads=2,
                          max_calibration_batches=len(calib))
    start = time.perf_counter()
    model, steps = PassManager(pipeline, context).run(model)
    return model, time.perf_counter() - start, steps[-1].stats


def run_all(outputs_of: OrtArtifact, batches) -> list[dict]:
    return [outputs_of.run(b) for b in batches]


def bench_task(task: Task, threads: int, repeat: int, tmp: Path, pipeline: str | None) -> list[dict]:
    rows = []
    fp32 = load_model(task.model_path)
    variants: dict[str, tuple[object, float]] = {"fp32": (fp32, 0.0)}
    ours, secs, stats = ours_quantize(task.model_path, task.calib, pipeline or task.pipeline)
    variants["onnxforge int8"] = (ours, secs)
    for pc, u8, label in ((False, False, "ORT quantize_static (defaults)"),
                          (True, True, "ORT quantize_static (per-channel, u8)")):
        try:
            start = time.perf_counter()
            path = ort_quantize(task.model_path, task.calib, tmp, per_channel=pc, u8=u8)
            variants[label] = (load_model(path), time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the rest
            logger.warning("%s: ORT quantizer failed: %s", task.name, exc)
    if task.dynamic:
        # MatMul-heavy models: dynamic quantization, ours vs onnxruntime's quantize_dynamic
        start = time.perf_counter()
        dyn, dsecs, _ = ours_quantize(task.model_path, task.calib, "quantize(dynamic)")
        variants["onnxforge dynamic"] = (dyn, dsecs)
        try:
            from onnxruntime.quantization import quantize_dynamic

            start = time.perf_counter()
            out = tmp / "ort_dynamic.onnx"
            quantize_dynamic(str(task.model_path), str(out), per_channel=True)
            variants["ORT quantize_dynamic (per-channel)"] = (load_model(out), time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the rest
            logger.warning("%s: ORT quantize_dynamic failed: %s", task.name, exc)
    arts = {}
    for k, (m, _) in list(variants.items()):
        try:
            arts[k] = OrtArtifact(m, threads=threads)
        except Exception as exc:  # noqa: BLE001 - e.g. ORT's quantizer emitting an invalid model
            logger.warning("%s: %s does not load in onnxruntime: %s", task.name, k, str(exc)[:300])
            variants.pop(k)
    ref_out = run_all(arts["fp32"], task.evaluate)
    timings: dict[str, list[float]] = {k: [] for k in arts}
    feed = task.evaluate[0]
    for _ in range(3):  # interleaved rounds against machine noise
        for k, a in arts.items():
            timings[k].extend(a.benchmark(feed, warmup=3, repeat=repeat).samples_ms)
    base_ms = float(np.median(timings["fp32"]))
    for k, (m, secs) in variants.items():
        cand = ref_out if k == "fp32" else run_all(arts[k], task.evaluate)
        metrics = task.metric(ref_out, cand)
        ms = float(np.median(timings[k]))
        rows.append({"model": task.name, "variant": k, **metrics,
                     "size_kb": len(model_bytes(m)) / 1024, "latency_ms": ms,
                     "vs_fp32": ms / base_ms, "quantize_s": secs})
    rows[1]["stats"] = {k: v for k, v in stats.items() if k in ("compute_quantized", "qdq_pairs", "relu_folded")}
    return rows


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="onnxforge quantize vs onnxruntime quantize_static vs fp32")
    metric_keys = []
    for r in rows:
        for k in r:
            if k not in ("model", "variant", "size_kb", "latency_ms", "vs_fp32", "quantize_s", "stats") \
                    and k not in metric_keys:
                metric_keys.append(k)
    for col in ["model", "variant", *metric_keys, "size KB", "ms", "x fp32", "quant s"]:
        table.add_column(col)
    for r in rows:
        table.add_row(r["model"], r["variant"], *[f"{r[k]:.4f}" if k in r else "" for k in metric_keys],
                      f"{r['size_kb']:.0f}", f"{r['latency_ms']:.3f}", f"{r['vs_fp32']:.2f}",
                      f"{r['quantize_s']:.1f}")
    Console(width=220).print(table)


TASKS = {
    "digits": digits_task,
    "minilm": minilm_task,
    "resnet18": lambda: vision_task("resnet18"),
    "mobilenet_v2": lambda: vision_task("mobilenet_v2"),
    "mobilenet_v3_small": lambda: vision_task("mobilenet_v3_small"),
    "efficientnet_b0": lambda: vision_task("efficientnet_b0"),
    "squeezenet1_1": lambda: vision_task("squeezenet1_1"),
    "ppocr_rec": ppocr_rec_task,
    "ppocr_cls": ppocr_cls_task,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--pipeline", default=None, help="override onnxforge's pipeline for every model")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-quant-") as tmp:
        for name in args.models.split(","):
            task = TASKS[name]()
            if task is None:
                print(f"{name}: model absent (run tools/build_zoo.py)", file=sys.stderr)
                continue
            print(f"{name}: {task.notes}", file=sys.stderr)
            rows.extend(bench_task(task, args.threads, args.repeat, Path(tmp), args.pipeline))
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
