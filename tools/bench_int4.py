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

  resnet18   torchvision, random weights; cosine to fp32 on held-out image crops

`mixed 5x` / `6x` / `7x` are `quantize(mixed,bits=4)` (mixed.py: 4, 8 or float bits per
layer by measured sensitivity) with the size as the only budget (`max_error=0`,
`max_size_ratio` 0.195 / 0.16 / 0.137 of the fp32 weight bytes, i.e. about 5x / 6x / 7x
smaller files; the file ratio is what the table shows) and GPTQ for the 4-bit layers; a
target the model cannot reach is shown as such. PP-OCR rec is evaluated on
`--ocr-lines` (256) held-out lines.

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

from bench_common import (
    digits_task,
    minilm_task,
    ppocr_rec_task,
    print_table,
    run_batches,
    side_by_side_ms,
    vision_task,
)
from bench_quantization import ours_quantize
from onnxforge.backends.ort import OrtArtifact
from onnxforge.errors import BudgetExceededError
from onnxforge.ir import load_model, model_bytes

TASKS = {"digits": digits_task, "minilm": minilm_task, "ppocr_rec": ppocr_rec_task,
         "resnet18": lambda: vision_task("resnet18")}
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
    "mixed 5x": "mixed,bits=4,max_error=0,max_size_ratio=0.195,block=32,rounding=gptq",
    "mixed 6x": "mixed,bits=4,max_error=0,max_size_ratio=0.16,block=32,rounding=gptq",
    "mixed 6x b128": "mixed,bits=4,max_error=0,max_size_ratio=0.16,block=128,rounding=gptq",
    "mixed 7x b128": "mixed,bits=4,max_error=0,max_size_ratio=0.137,block=128,rounding=gptq",
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
    for label in variants:
        extra = EXTRA_MIXED.get(task.name, "") if label.startswith("mixed") else ""
        opts = ",".join(o for o in (VARIANTS[label], EXTRA.get(task.name, ""), extra) if o)
        print(f"{task.name}: quantize({opts})", file=sys.stderr)
        try:
            models[label] = ours_quantize(task.model_path, task.calib, f"quantize({opts})")
        except BudgetExceededError as exc:  # a size target the model cannot reach
            print(f"{task.name} {label}: {exc}", file=sys.stderr)
            refused[label] = str(exc)
    arts = {k: OrtArtifact(m, threads=threads) for k, (m, _, _) in models.items()}
    ref = run_batches(arts["fp32"], task.evaluate)
    medians = dict(zip(arts, side_by_side_ms(list(arts.values()), task.evaluate[0], warmup=3,
                                             repeat=repeat, rounds=3)))
    base_bytes = len(model_bytes(fp32))
    rows = []
    for k, (m, secs, stats) in models.items():
        metrics = task.metric(ref, ref if k == "fp32" else run_batches(arts[k], task.evaluate))
        rows.append({"model": task.name, "variant": k, **metrics,
                     "size_ratio": base_bytes / len(model_bytes(m)),
                     "latency_ratio": medians[k] / medians["fp32"], "ms": medians[k],
                     "quantize_s": secs, "gptq_over_rtn": _gptq_ratio(stats),
                     "int4_matmuls": stats.get("int4_matmuls", 0), "bits": _bits(stats),
                     "weight_ratio": stats.get("size_ratio") or 1.0})
    rows += [{"model": task.name, "variant": k, "size_ratio": float("nan"),
              "latency_ratio": float("nan"), "ms": float("nan"), "quantize_s": 0.0,
              "gptq_over_rtn": "", "int4_matmuls": 0, "bits": "not reached",
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
            "gptq_over_rtn", "int4_matmuls", "bits", "weight_ratio"}
    metric_keys = []
    for r in rows:
        metric_keys += [k for k in r if k not in skip and k not in metric_keys]
    columns = ["model", "variant", *metric_keys, "size ÷", "weights ÷", "ms", "x fp32",
               "quant s",
               "gptq/rtn (int4 / int8)", "int4 MatMuls", "mixed 4/8/16/32 layers"]
    cells = [(r["model"], r["variant"], *[f"{r[k]:.4f}" if k in r else "" for k in metric_keys],
              f"{r['size_ratio']:.2f}", f"{r.get('weight_ratio', float('nan')):.2f}",
              f"{r['ms']:.3f}", f"{r['latency_ratio']:.2f}",
              f"{r['quantize_s']:.1f}", r["gptq_over_rtn"], str(r["int4_matmuls"]), r["bits"])
             for r in rows]
    print_table("rounding (nearest / GPTQ) and int4 MatMul weights, onnxruntime", columns, cells)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(TASKS))
    ap.add_argument("--variants", default=",".join(DEFAULT),
                    help=f"comma-separated, from: {'; '.join(VARIANTS)}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--ocr-lines", type=int, default=256,
                    help="held-out PP-OCR rec lines (calibration: 32 other lines)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        ap.error(f"unknown variant {unknown[0]!r}; known: {', '.join(VARIANTS)}")
    rows = []
    for name in args.models.split(","):
        task = ppocr_rec_task(args.ocr_lines) if name == "ppocr_rec" else TASKS[name]()
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
