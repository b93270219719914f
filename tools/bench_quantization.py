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
  ppocr_det    PP-OCR detector; pages of rendered text lines (calibration and evaluation
               pages use different lines): cosine and IoU (> 0.3) of the text probability map

`--ours-only` skips onnxruntime's quantizers (faster). The last lines list every model
whose int8 output runs slower than fp32 in onnxruntime (same process, interleaved).

ORT baseline: `quant_pre_process` then `quantize_static` (QDQ), once with ORT's defaults
(per-tensor, s8 activations) and once per-channel with u8 activations; the table shows both.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_common import (
    Task,
    digits_task,
    minilm_task,
    ppocr_cls_task,
    ppocr_rec_task,
    run_batches,
    side_by_side_ms,
    vision_task,
)
from bench_common import print_table as print_table_rows
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import ArraySource
from onnxforge.ir import load_model, model_bytes
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.sample_inputs import IMAGENET_MEAN, IMAGENET_STD, OCR_LINES, fonts, render_line
from onnxforge.shapes import input_dtypes

logger = logging.getLogger("bench_quantization")


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


def ppocr_det_task() -> Task | None:
    """PP-OCR detector on 640x640 pages of rendered text lines, 12 lines a page."""
    from bench_common import ZOO

    path = ZOO / "ppocr_det.onnx"
    if not path.exists():
        return None
    font_paths = fonts()
    pages = []
    for p in range(8):
        page = np.ones((640, 640, 3), np.float32)
        rng = np.random.default_rng(p)
        for row in range(12):
            i = p * 12 + row
            line = render_line(OCR_LINES[i % len(OCR_LINES)], font_paths[i % len(font_paths)],
                               40, 560)[0].transpose(1, 2, 0) * 0.5 + 0.5
            x = int(rng.integers(0, 60))
            page[20 + row * 50:60 + row * 50, x:x + 560] = line
        pages.append({"x": ((page - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
                      .astype(np.float32)})

    def metric(ref, cand):
        cos, iou = [], []
        for r, c in zip(ref, cand):
            a, b = next(iter(r.values())).ravel(), next(iter(c.values())).ravel()
            cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
            ma, mb = a > 0.3, b > 0.3
            iou.append(float((ma & mb).sum() / max(1, (ma | mb).sum())))
        return {"cosine": float(np.mean(cos)), "iou": float(np.mean(iou))}

    return Task("ppocr_det", path, pages[:4], pages[4:], metric,
                notes="4 calib / 4 eval pages of rendered text lines")


def bench_task(task: Task, threads: int, repeat: int, tmp: Path,
               pipeline: str | None, ours_only: bool = False, rounds: int = 3) -> list[dict]:
    rows = []
    fp32 = load_model(task.model_path)
    variants: dict[str, tuple[object, float]] = {"fp32": (fp32, 0.0)}
    ours, secs, stats = ours_quantize(task.model_path, task.calib, pipeline or task.pipeline)
    variants["onnxforge int8"] = (ours, secs)
    baselines = () if ours_only else (
        (False, False, "ORT quantize_static (defaults)"),
        (True, True, "ORT quantize_static (per-channel, u8)"))
    for pc, u8, label in baselines:
        try:
            start = time.perf_counter()
            path = ort_quantize(task.model_path, task.calib, tmp, per_channel=pc, u8=u8)
            variants[label] = (load_model(path), time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the rest
            logger.warning("%s: ORT quantizer failed: %s", task.name, exc)
    if task.dynamic and not ours_only:
        # MatMul-heavy models: dynamic quantization, ours vs onnxruntime's quantize_dynamic
        start = time.perf_counter()
        dyn, dsecs, _ = ours_quantize(task.model_path, task.calib, "quantize(dynamic)")
        variants["onnxforge dynamic"] = (dyn, dsecs)
        try:
            from onnxruntime.quantization import quantize_dynamic

            start = time.perf_counter()
            out = tmp / "ort_dynamic.onnx"
            quantize_dynamic(str(task.model_path), str(out), per_channel=True)
            variants["ORT quantize_dynamic (per-channel)"] = (load_model(out),
                                                              time.perf_counter() - start)
        except Exception as exc:  # noqa: BLE001 - report, keep benchmarking the rest
            logger.warning("%s: ORT quantize_dynamic failed: %s", task.name, exc)
    arts = {}
    for k, (m, _) in list(variants.items()):
        try:
            arts[k] = OrtArtifact(m, threads=threads)
        except Exception as exc:  # noqa: BLE001 - e.g. ORT's quantizer emitting an invalid model
            logger.warning("%s: %s does not load in onnxruntime: %s", task.name, k, str(exc)[:300])
            variants.pop(k)
    ref_out = run_batches(arts["fp32"], task.evaluate)
    # interleaved rounds against machine noise
    medians = side_by_side_ms(list(arts.values()), task.evaluate[0], warmup=3, repeat=repeat,
                              rounds=rounds)
    timings = dict(zip(arts, medians))
    base_ms = timings["fp32"]
    for k, (m, secs) in variants.items():
        cand = ref_out if k == "fp32" else run_batches(arts[k], task.evaluate)
        metrics = task.metric(ref_out, cand)
        ms = timings[k]
        rows.append({"model": task.name, "variant": k, **metrics,
                     "size_kb": len(model_bytes(m)) / 1024, "latency_ms": ms,
                     "vs_fp32": ms / base_ms, "quantize_s": secs})
    rows[1]["stats"] = {k: v for k, v in stats.items()
                        if k in ("compute_quantized", "qdq_pairs", "relu_folded")}
    rows[1]["stats"]["kept_float_for_ort"] = sum(
        1 for why in stats.get("kept_float", {}).values() if "cheap conv" in why)
    return rows


def print_table(rows: list[dict]) -> None:
    metric_keys = []
    for r in rows:
        for k in r:
            if k not in ("model", "variant", "size_kb", "latency_ms", "vs_fp32", "quantize_s",
                         "stats") and k not in metric_keys:
                metric_keys.append(k)
    columns = ["model", "variant", *metric_keys, "size KB", "ms", "x fp32", "quant s"]
    cells = [(r["model"], r["variant"], *[f"{r[k]:.4f}" if k in r else "" for k in metric_keys],
              f"{r['size_kb']:.0f}", f"{r['latency_ms']:.3f}", f"{r['vs_fp32']:.2f}",
              f"{r['quantize_s']:.1f}") for r in rows]
    print_table_rows("onnxforge quantize vs onnxruntime quantize_static vs fp32", columns, cells)


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
    "ppocr_det": ppocr_det_task,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--pipeline", default=None,
                    help="override onnxforge's pipeline for every model")
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved rounds (each runs every variant --repeat times)")
    ap.add_argument("--ours-only", action="store_true",
                    help="skip onnxruntime's quantizers (fp32 vs onnxforge int8 only)")
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
            rows.extend(bench_task(task, args.threads, args.repeat, Path(tmp), args.pipeline,
                                   args.ours_only, args.rounds))
    print_table(rows)
    slower = [f"{r['model']} ({r['vs_fp32']:.2f}x)" for r in rows
              if r["variant"] == "onnxforge int8" and r["vs_fp32"] > 1.0]
    print("onnxforge int8 slower than fp32 in onnxruntime: " + (", ".join(slower) or "none"))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
