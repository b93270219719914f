"""Benchmark weight rounding (nearest vs GPTQ) and 4-bit MatMul weights (MatMulNBits).

For each model: fp32 against `quantize(int8)` and `quantize(int4)` (4-bit MatMul/Gemm
weights as MatMulNBits and 4-bit embedding tables, the rest int8 QDQ), each with
rounding=nearest and rounding=gptq, int4 with blocks of 32 and 128; `convs4` adds 4-bit
Conv weights (`convs=int4`, run by int8 kernels), `rest-float` leaves everything but the
4-bit weights in float (weight-only). Size is the serialized model; latency the median of
interleaved onnxruntime runs in this one process (threads matched, spinning off);
quality on held-out data, never the calibration data:

  digits     shipped CNN; accuracy on compiler/data/digits_test.npz (calib: digits_calib.npz)
  minilm     .zoo/minilm_l6; cosine to fp32 on the held-out half of its real sentences
  ppocr_rec  PP-OCRv4 rec; character error rate on held-out rendered text lines
             (default minmax calibration: on these lines calibration=mse gives int8
             2.2 % CER against minmax's 0.74 %)

  ppocr_det  PP-OCRv4 det; detection F-score at IoU 0.5 and 0.7 against the true boxes
             of 144 held-out rendered lines (ppocr_det_lines_task)
  ppocr_det_hard  the same on harder pages (det_pages.py: rotated, blurred, noisy,
             tinted; 182 held-out lines, region IoU)
  resnet18   torchvision, random weights; cosine to fp32 on held-out image crops
  ppocr_cls  PP-OCR direction classifier; accuracy on 12 held-out rendered lines (half
             upside down; 12 others calibrate; `--cls-lines N` / `--cls-calib M`: N / M
             synthetic lines) and the largest change of its probability

`mixed 5x` / `6x` / `7x` are `quantize(mixed,bits=4)` (mixed.py: 4, 8 or float bits per
layer by measured sensitivity) with the size as the only budget (`max_error=0`,
`max_size_ratio` 0.195 / 0.16 / 0.137 of the fp32 weight bytes, i.e. about 5x / 6x / 7x
smaller files; the file ratio is what the table shows) and GPTQ for the 4-bit layers; a
target the model cannot reach is shown as such. PP-OCR rec is evaluated on
`--ocr-lines` (256) held-out lines.

`mixed all4 b128` puts every layer that has a 4-bit form in 4 bits (block 128, no size
target or error budget; `mse`: calibration=mse; `auto`: calibration=auto, the method
chosen on held-out calibration batches, shown in the `auto chose` column). `prune30 ...`
(`prune50 ...`: macs=0.5) variants first run `prune(macs=0.3,criterion=reconstruction)`
(sensitivity allocation, sequential refit, on the same calibration data; once per model,
shared by the variants) and then quantize the pruned model; `weights ÷` and `size ÷` are
against the original fp32 model, `quant s` includes the pruning.

`gptq/rtn` is the median over layers of GPTQ's relative output error divided by
round-to-nearest's, both measured on held-out calibration batches (pass stats).

    python tools/bench_int4.py                        # every model available
    python tools/bench_int4.py --models minilm --variants "int8,int4 b32 gptq"
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from bench_common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    OCR_LINES,
    ZOO,
    Task,
    digits_task,
    fonts,
    minilm_task,
    ppocr_cls_task,
    ppocr_rec_task,
    print_table,
    render_line,
    run_batches,
    side_by_side_ms,
    vision_task,
)
from bench_quantization import ours_quantize
from det_pages import box_ious, f_scores, hard_pages, region_ious
from onnxforge.backends.ort import OrtArtifact
from onnxforge.errors import BudgetExceededError
from onnxforge.ir import load_model, model_bytes
from onnxforge.passes.quantization.core import weight_bytes


def ppocr_det_lines_task(pages: int = 16, calib_pages: int = 4) -> Task | None:
    """PP-OCRv4 det on 640x640 pages of rendered text lines (12 a page, fonts and x offsets
    varying), scored against the lines' true boxes: the probability map thresholded at
    0.3 (DB's default), connected regions with mean probability >= 0.6 (box_thresh) and
    their boxes grown by DB's unclip (ratio 1.5: each side by area * 1.5 / perimeter) are
    the detections; a detection matches a true line at IoU >= 0.5 (F@0.5) or >= 0.7
    (F@0.7), one to one, ICDAR style. Headline: F-score (hmean of precision and recall,
    %), then the mean IoU of the boxes matched at 0.5 and the text-map IoU to fp32. The
    first `calib_pages` pages calibrate, the others (other fonts and offsets) evaluate;
    the 24 texts repeat on every page, so the texts are not disjoint
    (`ppocr_det_hard_task`'s are)."""
    path = ZOO / "ppocr_det.onnx"
    if not path.exists():
        return None
    font_paths = fonts()
    feeds, truth = [], []
    for p in range(pages):
        page = np.ones((640, 640, 3), np.float32)
        rng = np.random.default_rng(1000 + p)
        boxes = []
        for row in range(12):
            i = p * 12 + row
            line = render_line(OCR_LINES[i % len(OCR_LINES)], font_paths[i % len(font_paths)],
                               40, 560)[0].transpose(1, 2, 0) * 0.5 + 0.5
            ink = np.nonzero(line.mean(2) < 0.25)  # dark text pixels
            line = np.where(line.mean(2, keepdims=True) == 0.5, 1.0, line)  # white padding
            x, y = int(rng.integers(0, 60)), 20 + row * 50
            page[y:y + 40, x:x + 560] = line
            boxes.append((x + ink[1].min(), y + ink[0].min(), x + ink[1].max() + 1,
                          y + ink[0].max() + 1))
        feeds.append({"x": ((page - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
                      .astype(np.float32)})
        truth.append(boxes)

    def metric(ref, cand):
        probs = [next(iter(c.values()))[0, 0] for c in cand]
        out = f_scores([box_ious(p, b) for p, b in zip(probs, truth[calib_pages:])],
                       iou_name="box IoU")
        out["map IoU to fp32"] = _map_iou(ref, probs)
        return out

    return Task("ppocr_det", path, feeds[:calib_pages], feeds[calib_pages:], metric,
                notes=f"{calib_pages} calib / {pages - calib_pages} eval pages, "
                      f"{12 * (pages - calib_pages)} held-out lines with true boxes")


def _map_iou(ref: list[dict], probs: list[np.ndarray]) -> float:
    """Mean pixel IoU of the text maps (probability > 0.3) to fp32's."""
    ious = []
    for r, prob in zip(ref, probs):
        ma, mb = next(iter(r.values()))[0, 0] > 0.3, prob > 0.3
        ious.append(float((ma & mb).sum() / max(1, (ma | mb).sum())))
    return float(np.mean(ious))


def ppocr_det_hard_task(pages: int = 20, calib_pages: int = 4) -> Task | None:
    """PP-OCRv4 det on harder pages (det_pages.hard_pages: tinted paper with a gradient,
    coloured ink, line heights 24-44 px, rotation up to 3 degrees, blur, noise), scored by
    the F-score at region IoU >= 0.5 and >= 0.7 against the lines' rotated rectangles.
    The first `calib_pages` pages calibrate; the others (other seeds, none of the
    calibration texts) evaluate."""
    path = ZOO / "ppocr_det.onnx"
    if not path.exists():
        return None
    calib_imgs, _, used = hard_pages(calib_pages, seed=100)
    eval_imgs, truth, _ = hard_pages(pages - calib_pages, seed=200, exclude=used)

    def feed(page: np.ndarray) -> dict[str, np.ndarray]:
        return {"x": ((page - IMAGENET_MEAN) / IMAGENET_STD).transpose(2, 0, 1)[None]
                .astype(np.float32)}

    def metric(ref, cand):
        probs = [next(iter(c.values()))[0, 0] for c in cand]
        out = f_scores([region_ious(p, t) for p, t in zip(probs, truth)])
        out["map IoU to fp32"] = _map_iou(ref, probs)
        return out

    lines = sum(int(t.max()) for t in truth)
    return Task("ppocr_det_hard", path, [feed(p) for p in calib_imgs],
                [feed(p) for p in eval_imgs], metric,
                notes=f"{calib_pages} calib / {pages - calib_pages} eval hard pages, "
                      f"{lines} held-out lines (rotated, blurred, noisy)")


TASKS = {"digits": digits_task, "minilm": minilm_task, "ppocr_rec": ppocr_rec_task,
         "ppocr_det": ppocr_det_lines_task, "ppocr_det_hard": ppocr_det_hard_task,
         "resnet18": lambda: vision_task("resnet18"), "ppocr_cls": ppocr_cls_task}
EXTRA: dict[str, str] = {}  # per-model extra options (none: every model at the defaults)
# per-model extra options of the mode=mixed variants: PP-OCR rec's cheap convs (kept float
# by mode=int8 for speed) would otherwise cap its size at ~4.7x
EXTRA_MIXED: dict[str, str] = {"ppocr_rec": "keep_cheap_convs_float=false"}
VARIANTS = {
    "int8": "int8",
    "int8 gptq": "int8,rounding=gptq",
    "int4 b32": "int4,block=32",
    "int4 b32 gptq": "int4,block=32,rounding=gptq",
    "int4 b128": "int4,block=128",
    "int4 b128 gptq": "int4,block=128,rounding=gptq",
    "int4 b32 gptq convs4": "int4,block=32,rounding=gptq,convs=int4",
    "int4 b128 gptq convs4": "int4,block=128,rounding=gptq,convs=int4",
    "int4 b32 gptq rest-float": "int4,block=32,rounding=gptq,rest=float",
    # every conv (but depthwise) in 4 bits, the cheap ones too: what `mixed all4` chooses,
    # in one pass (no sensitivity runs)
    "int4 b128 gptq convs4 all": "int4,block=128,rounding=gptq,convs=int4,"
                                 "keep_cheap_convs_float=false",
    "int4 b128 gptq convs4 all mse": "int4,block=128,rounding=gptq,convs=int4,"
                                     "keep_cheap_convs_float=false,calibration=mse",
    "mixed 5x": "mixed,bits=4,max_error=0,max_size_ratio=0.195,block=32,rounding=gptq",
    "mixed 6x": "mixed,bits=4,max_error=0,max_size_ratio=0.16,block=32,rounding=gptq",
    "mixed 6x b128": "mixed,bits=4,max_error=0,max_size_ratio=0.16,block=128,rounding=gptq",
    "mixed 7x b128": "mixed,bits=4,max_error=0,max_size_ratio=0.137,block=128,rounding=gptq",
    # every layer that has a 4-bit form in 4 bits (no size target, no error budget)
    "mixed all4 b128": "mixed,bits=4,max_error=0,block=128,rounding=gptq",
    "mixed all4 b128 mse": "mixed,bits=4,max_error=0,block=128,rounding=gptq,calibration=mse",
    # the activation calibration chosen on held-out calibration batches (auto_calibration.py)
    "int8 auto": "int8,calibration=auto",
    "mixed all4 b128 auto": "mixed,bits=4,max_error=0,block=128,rounding=gptq,calibration=auto",
    "mixed all4 b128 auto top1": "mixed,bits=4,max_error=0,block=128,rounding=gptq,"
                                 "calibration=auto,auto_error=top1",
    "int4 b128 gptq convs4 all auto": "int4,block=128,rounding=gptq,convs=int4,"
                                      "keep_cheap_convs_float=false,calibration=auto",
}
# variants that prune before quantizing: label -> (pruning pass, quantize variant)
PRUNE30 = "prune(macs=0.3,criterion=reconstruction)"
PRUNE50 = "prune(macs=0.5,criterion=reconstruction)"
PRUNED = {
    "prune30": (PRUNE30, None),
    "prune30 int8": (PRUNE30, "int8"),
    "prune30 mixed all4 b128": (PRUNE30, "mixed all4 b128"),
    "prune30 mixed all4 b128 mse": (PRUNE30, "mixed all4 b128 mse"),
    "prune30 int4 b128 gptq convs4 all": (PRUNE30, "int4 b128 gptq convs4 all"),
    "prune30 int4 b128 gptq convs4 all auto": (PRUNE30, "int4 b128 gptq convs4 all auto"),
    "prune50": (PRUNE50, None),
    "prune50 int8": (PRUNE50, "int8"),
    "prune50 int4 b128 gptq convs4 all": (PRUNE50, "int4 b128 gptq convs4 all"),
}
DEFAULT = [v for v in VARIANTS if not v.startswith("mixed")]


def _gptq_ratio(stats: dict) -> str:
    """Median GPTQ / RTN held-out layer error, int4 layers and int8 layers."""
    parts = [f"{stats[k]:.2f}" for k in ("int4_gptq_over_rtn_error_median",
                                         "gptq_over_rtn_error_median") if k in stats]
    return " / ".join(parts)


def bench_task(task, variants: list[str], threads: int, repeat: int) -> list[dict]:
    fp32 = load_model(task.model_path)
    models = {"fp32": (fp32, 0.0, {})}
    refused = {}
    pruned: dict[str, tuple[bytes, float]] = {}  # pruning spec -> (model, seconds), run once
    for label in variants:
        prune, quant = PRUNED.get(label, (None, label))
        source, prune_s = task.model_path, 0.0
        if prune:
            if prune not in pruned:
                print(f"{task.name}: {prune}", file=sys.stderr)
                m, secs, _ = ours_quantize(task.model_path, task.calib, prune)
                pruned[prune] = (model_bytes(m), secs)
            source, prune_s = pruned[prune]
        if not quant:
            models[label] = (load_model(source), prune_s, {})
            continue
        mixed = VARIANTS[quant].startswith("mixed")
        extra = EXTRA_MIXED.get(task.name, "") if mixed else ""
        opts = ",".join(o for o in (VARIANTS[quant], EXTRA.get(task.name, ""), extra) if o)
        print(f"{task.name} {label}: quantize({opts})", file=sys.stderr)
        try:
            m, secs, stats = ours_quantize(source, task.calib, f"quantize({opts})")
            models[label] = (m, prune_s + secs, stats)
            if "calibration_auto" in stats:
                print(f"{task.name} {label}: {stats['calibration_auto']}", file=sys.stderr)
        except BudgetExceededError as exc:  # a size target the model cannot reach
            print(f"{task.name} {label}: {exc}", file=sys.stderr)
            refused[label] = str(exc)
    arts = {k: OrtArtifact(m, threads=threads) for k, (m, _, _) in models.items()}
    ref = run_batches(arts["fp32"], task.evaluate)
    medians = dict(zip(arts, side_by_side_ms(list(arts.values()), task.evaluate[0], warmup=3,
                                             repeat=repeat, rounds=3)))
    base_bytes = len(model_bytes(fp32))
    base_weights = weight_bytes(fp32)  # against the original, also after pruning
    rows = []
    for k, (m, secs, stats) in models.items():
        metrics = task.metric(ref, ref if k == "fp32" else run_batches(arts[k], task.evaluate))
        rows.append({"model": task.name, "variant": k, **metrics,
                     "size_ratio": base_bytes / len(model_bytes(m)),
                     "latency_ratio": medians[k] / medians["fp32"], "ms": medians[k],
                     "quantize_s": secs, "gptq_over_rtn": _gptq_ratio(stats),
                     "int4_matmuls": stats.get("int4_matmuls", 0), "bits": _bits(stats),
                     "calibration": stats.get("calibration_chosen", ""),
                     "weight_ratio": base_weights / max(weight_bytes(m), 1)})
    rows += [{"model": task.name, "variant": k, "size_ratio": float("nan"),
              "latency_ratio": float("nan"), "ms": float("nan"), "quantize_s": 0.0,
              "gptq_over_rtn": "", "int4_matmuls": 0, "bits": "not reached", "calibration": "",
              "weight_ratio": float("nan")}
             for k in refused]
    return rows


def _bits(stats: dict) -> str:
    """Layers at 4 / 8 / 16 / 32 bits chosen by mode=mixed."""
    if "bits_per_layer" not in stats:
        return ""
    return "/".join(str(stats.get(f"layers_{k}", 0)) for k in ("int4", "int8", "fp16", "fp32"))


def show(rows: list[dict]) -> None:
    skip = {"model", "variant", "size_ratio", "latency_ratio", "ms", "quantize_s",
            "gptq_over_rtn", "int4_matmuls", "bits", "weight_ratio", "calibration"}
    metric_keys = []
    for r in rows:
        metric_keys += [k for k in r if k not in skip and k not in metric_keys]
    columns = ["model", "variant", *metric_keys, "size ÷", "weights ÷", "ms", "x fp32",
               "quant s",
               "gptq/rtn (int4 / int8)", "int4 MatMuls", "mixed 4/8/16/32 layers", "auto chose"]
    cells = [(r["model"], r["variant"], *[f"{r[k]:.4f}" if k in r else "" for k in metric_keys],
              f"{r['size_ratio']:.2f}", f"{r.get('weight_ratio', float('nan')):.2f}",
              f"{r['ms']:.3f}", f"{r['latency_ratio']:.2f}",
              f"{r['quantize_s']:.1f}", r["gptq_over_rtn"], str(r["int4_matmuls"]), r["bits"],
              r.get("calibration", ""))
             for r in rows]
    print_table("rounding (nearest / GPTQ) and int4 MatMul weights, onnxruntime", columns, cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(TASKS))
    ap.add_argument("--variants", default=",".join(DEFAULT),
                    help=f"comma-separated, from: {'; '.join([*VARIANTS, *PRUNED])}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--ocr-lines", type=int, default=256,
                    help="held-out PP-OCR rec lines (calibration: 32 other lines)")
    ap.add_argument("--ocr-skip", type=int, default=0,
                    help="evaluate PP-OCR rec on lines after this many held-out ones (fresh "
                         "lines for a check decided after looking at the first ones)")
    ap.add_argument("--cls-lines", type=int, default=0,
                    help="ppocr_cls: evaluate on this many synthetic lines instead of the 12 "
                         "held-out fixed ones (calibration: the 12 other fixed lines)")
    ap.add_argument("--cls-calib", type=int, default=0,
                    help="ppocr_cls: calibrate on this many other synthetic lines")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS and v not in PRUNED]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; known: {', '.join([*VARIANTS, *PRUNED])}")
    rows = []
    for name in args.models.split(","):
        task = (ppocr_rec_task(args.ocr_lines, args.ocr_skip) if name == "ppocr_rec"
                else ppocr_cls_task(args.cls_lines, args.cls_calib) if name == "ppocr_cls"
                else TASKS[name]())
        if task is None:
            print(f"{name}: model absent (run tools/build_zoo.py)", file=sys.stderr)
            continue
        print(f"{name}: {task.notes}", file=sys.stderr)
        rows.extend(bench_task(task, variants, args.threads, args.repeat))
        show(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
