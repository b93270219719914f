"""Benchmark the `prune` pass: MACs, parameters, measured ORT speedup and error.

    python tools/bench_pruning.py                         # every zoo model, 30 % and 50 % MACs
    python tools/bench_pruning.py --models resnet18 mobilenet_v2 --targets 0.5
    python tools/bench_pruning.py --round-to 1 --threads 1

For each model and MACs target (`prune(macs=T,round_to=R)`, global ranking, L2
importance, least-squares recovery + BN re-estimation on calibration data) the
table shows MACs and parameters before -> after (onnxforge.metrics on the written
graph), the ORT speedup (original vs pruned sessions in this process, same
threads, spinning off, alternating `benchmark()` rounds, ratio of medians) and the
task metric on held-out inputs with and without recovery:

- torchvision models (random weights): real photos from scikit-image (when
  installed; else random-normal images), top-1 agreement and output cosine;
- ppocr_det: rendered text pages, cosine of the probability map;
- ppocr_rec: rendered text lines, character error rate vs the original's reading
  (and cosine); ppocr_cls: agreement with the original's direction;
- minilm_l6: the 16 real tokenized sentences (8 calibration / 8 held out), cosine
  of the sentence embeddings; both MACs targets (FFN neurons + attention heads)
  and FFN-only `ratio=0.3,kinds=linear`;
- digits: test-set accuracy of the shipped CNN (real labels).

Calibration and evaluation inputs are always disjoint. Data helpers (photos,
rendered text, sentences) come from tools/bench_common.py.
"""

from __future__ import annotations

import argparse
import logging
import time

import bench_common as bc
import numpy as np
from bench_common import Task
from onnxforge import sample_inputs
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import CalibrationSource
from onnxforge.ir import load_model
from onnxforge.metrics import compute_metrics
from onnxforge.passes.base import PassContext
from onnxforge.passes.pruning.prune import PrunePass
from rich.console import Console

ZOO = bc.ZOO
# MiniLM calibration from stdlib docstrings instead of the zoo's own sentences
# (--docstring-calib): out-of-domain text; the refit then hurts (see README).
DOCSTRING_CALIBRATION = False
CLS_LINES = 0  # ppocr_cls held-out lines: 0 = the 12 fixed ones (--cls-lines N: N synthetic)
CLS_CALIB = 0  # ppocr_cls calibration lines: 0 = the 12 other fixed ones (--cls-calib M)
VISION = ["resnet18", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "squeezenet1_1"]
METHODS = {"threshold": "allocate=threshold", "sensitivity": "allocate=sensitivity",
           "sensitivity+energy": "allocate=sensitivity,criterion=energy",
           "sensitivity+reconstruction": "allocate=sensitivity,criterion=reconstruction"}
MODELS = [*VISION, "ppocr_det", "ppocr_rec", "ppocr_cls", "minilm_l6", "digits"]
logger = logging.getLogger("bench_pruning")


class ListSource(CalibrationSource):
    """A fixed list of input batches as a calibration source."""

    def __init__(self, batches: list[dict[str, np.ndarray]], description: str = "list"):
        first = batches[0]
        super().__init__({k: v.shape for k, v in first.items()},
                         {k: v.dtype for k, v in first.items()})
        self.items = batches
        self.description = description

    def batches(self, limit: int | None = None):
        yield from self.items[: limit or len(self.items)]


def _random_images(name: str, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    shapes = bc.zoo_shapes(name)
    rng = np.random.default_rng(seed)
    return [{k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
            for _ in range(count)]


def _vision_metric(ref, cand):
    agree, cos = bc.top1_and_cosine(ref, cand, eps=1e-12)
    return {"top1_agree": agree, "cosine": cos}


def vision_task(name: str) -> Task | None:
    task = bc.vision_task(name)
    if task is not None:
        return Task(name, task.model_path, task.calib[:16], task.evaluate[:12],
                    _vision_metric, notes="photos (scikit-image)")
    path = ZOO / f"{name}.onnx"
    if not path.exists():
        return None
    return Task(name, path, _random_images(name, 16, 1), _random_images(name, 8, 2),
                _vision_metric, notes="random-normal images")


def ppocr_det_task() -> Task | None:
    path = ZOO / "ppocr_det.onnx"
    fonts = sample_inputs.fonts()
    if not path.exists() or not fonts:
        return None
    (name, shape), = bc.zoo_shapes("ppocr_det").items()
    _, _, h, w = shape
    from PIL import Image, ImageDraw, ImageFont

    lines = sample_inputs.text_lines(160, seed=5)
    rng = np.random.default_rng(5)
    pages = []
    for p in range(10):
        page = Image.new("RGB", (w, h), (255, 255, 255))
        draw = ImageDraw.Draw(page)
        for i in range(12):
            font = ImageFont.truetype(fonts[(p + i) % len(fonts)], int(rng.integers(18, 34)))
            xy = (int(rng.integers(10, w // 3)), 15 + i * 52)
            draw.text(xy, lines[p * 12 + i], fill=(0, 0, 0), font=font)
        arr = (np.asarray(page, dtype=np.float32) / 255.0 - bc.IMAGENET_MEAN) / bc.IMAGENET_STD
        pages.append({name: arr.transpose(2, 0, 1)[None].astype(np.float32)})

    def metric(ref, cand):
        cos = []
        for r, c in zip(ref, cand):
            a, b = next(iter(r.values())).ravel(), next(iter(c.values())).ravel()
            cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
        return {"cosine": float(np.mean(cos))}

    return Task("ppocr_det", path, pages[:6], pages[6:], metric, notes="rendered text pages")


DOC_MODULES = ["json", "os", "collections", "functools", "itertools", "argparse", "logging",
               "pathlib", "subprocess", "threading", "csv", "datetime", "decimal", "statistics",
               "random", "shutil", "tempfile", "textwrap"]


def docstring_sentences(count: int, length: int = 128) -> list[dict[str, np.ndarray]] | None:
    """`count` English sentences from stdlib docstrings, one per batch, tokenized with
    the model's own tokenizer like the zoo's sentences ([CLS] ... [SEP], padded)."""
    tokenizer = bc.minilm_tokenizer()
    if tokenizer is None:
        return None
    sentences = bc.docstring_sentences(DOC_MODULES, max_chars=200)[:count]
    batches = []
    for enc in tokenizer.encode_batch(sentences):
        ids = enc.ids[:length]
        row = np.zeros((1, length), np.int64)
        row[0, : len(ids)] = ids
        mask = (row != 0).astype(np.int64)
        batches.append({"input_ids": row, "attention_mask": mask,
                        "token_type_ids": np.zeros_like(row)})
    return batches


def minilm_task() -> Task | None:
    """Calibrate on 128 stdlib docstring sentences, evaluate on the 16 real sentences of
    the zoo (cosine of the sentence embeddings)."""
    task = bc.minilm_task()
    if task is None:
        return None
    if not DOCSTRING_CALIBRATION:
        return task  # 8 real sentences calibrate, the other 8 evaluate
    calib = docstring_sentences(128)
    if calib is None:
        return task
    return Task("minilm_l6", task.model_path, calib, task.calib + task.evaluate, task.metric,
                notes="calib: 128 docstring sentences; eval: the 16 real sentences")


def _ctc_indices(probs: np.ndarray) -> list[int]:
    """Greedy CTC reading as class indices (blank 0 dropped, repeats merged)."""
    seq, prev = [], -1
    for i in probs[0].argmax(-1):
        if i != prev and i != 0:
            seq.append(int(i))
        prev = i
    return seq


def with_cer_vs_fp32(task: Task | None) -> Task | None:
    """Add `cer_fp32`: character error rate against the original model's own reading."""
    if task is None:
        return None
    inner = task.metric

    def metric(ref, cand):
        errors = total = 0
        for r, c in zip(ref, cand):
            a = _ctc_indices(next(iter(r.values())))
            errors += sample_inputs.edit_distance(_ctc_indices(next(iter(c.values()))), a)
            total += max(len(a), 1)
        return {**inner(ref, cand), "cer_fp32": errors / total}

    return Task(task.name, task.model_path, task.calib, task.evaluate, metric, notes=task.notes)


def make_task(name: str) -> Task | None:
    if name in VISION:
        return vision_task(name)
    if name == "ppocr_det":
        return ppocr_det_task()
    if name == "ppocr_rec":
        return with_cer_vs_fp32(bc.ppocr_rec_task())
    if name == "ppocr_cls":
        return bc.ppocr_cls_task(CLS_LINES, CLS_CALIB)
    if name == "minilm_l6":
        return minilm_task()
    if name == "digits":
        return bc.digits_task()
    raise SystemExit(f"unknown model {name}")


# ---------------------------------------------------------------- measurement


def speedup(original, pruned, batch: dict[str, np.ndarray], threads: int,
            rounds: int) -> tuple[float, float]:
    """Median latencies (ms) of both models, measured in alternating rounds."""
    arts = [OrtArtifact(original, threads=threads), OrtArtifact(pruned, threads=threads)]
    t0, t1 = bc.side_by_side_ms(arts, batch, warmup=2, repeat=10, rounds=rounds)
    return t0, t1


def prune(task: Task, base, setting: str, recover: bool, round_to: int) -> tuple:
    options = dict(item.split("=") for item in setting.split(","))
    typed = {}
    for key, value in options.items():
        typed[key] = value if key in ("kinds", "criterion", "allocate") else float(value)
    shapes = {k: v.shape for k, v in task.calib[0].items()}
    context = PassContext(calibration=ListSource(task.calib), input_shapes=shapes)
    model = load_model(base)
    p = PrunePass(context=context, recover=recover, round_to=round_to, **typed)
    start = time.perf_counter()
    p(model)
    return model, p.stats, time.perf_counter() - start


def fmt_metric(values: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in values.items() if not k.startswith("acc_ref"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--targets", nargs="*", type=float, default=[0.3, 0.5])
    parser.add_argument("--round-to", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the no-recovery run (faster)")
    parser.add_argument("--methods", nargs="*", default=["threshold"],
                        choices=list(METHODS),
                        help="how a MACs target is allocated (threshold: global ranking of "
                             "normalized L2 scores; sensitivity: measured output error per "
                             "group; +energy: activation-weighted unit order; "
                             "+reconstruction: greedy output-reconstruction unit order)")
    parser.add_argument("--docstring-calib", action="store_true",
                        help="calibrate MiniLM on 128 stdlib docstring sentences")
    parser.add_argument("--cls-lines", type=int, default=0,
                        help="ppocr_cls: evaluate on this many synthetic lines instead of the "
                             "12 held-out fixed ones")
    parser.add_argument("--cls-calib", type=int, default=0,
                        help="ppocr_cls: calibrate on this many other synthetic lines")
    args = parser.parse_args()
    global DOCSTRING_CALIBRATION, CLS_LINES, CLS_CALIB
    DOCSTRING_CALIBRATION = args.docstring_calib
    CLS_LINES = args.cls_lines
    CLS_CALIB = args.cls_calib
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=240)
    rows = []
    for name in args.models:
        task = make_task(name)
        if task is None:
            console.print(f"[yellow]{name}: model or data missing, skipped")
            continue
        base = load_model(task.model_path)
        shapes = {k: v.shape for k, v in task.calib[0].items()}
        ref_out = bc.run_batches(base, task.evaluate, args.threads)
        settings = [f"macs={t},{METHODS[m]}" for t in args.targets for m in args.methods]
        if name == "minilm_l6":
            settings.append("ratio=0.3,kinds=linear")
        for setting in settings:
            model, stats, secs = prune(task, base, setting, True, args.round_to)
            metric = task.metric(ref_out, bc.run_batches(model, task.evaluate, args.threads))
            plain = "-"
            if not args.no_baseline:
                model0, _, _ = prune(task, base, setting, False, args.round_to)
                plain = fmt_metric(task.metric(ref_out, bc.run_batches(model0, task.evaluate,
                                                                      args.threads)))
            before, after = compute_metrics(base, shapes), compute_metrics(model, shapes)
            t0, t1 = speedup(base, model, task.evaluate[0], args.threads, args.rounds)
            macs = (f"{before.macs / 1e6:.1f}M→{after.macs / 1e6:.1f}M "
                    f"(-{100 * (1 - after.macs / before.macs):.0f}%)")
            row = (name, setting, macs,
                   f"{before.params / 1e6:.2f}M→{after.params / 1e6:.2f}M",
                   f"{t0:.2f}→{t1:.2f}", f"{t0 / t1:.2f}×", fmt_metric(metric), plain,
                   f"{secs:.0f}")
            rows.append(row)
            console.print(" | ".join(row), f"| refit {stats.get('refit_layers')} "
                          f"bn {stats.get('bn_recalibrated')} {stats.get('refused', '')}")
    bc.print_table(f"prune: ORT {args.threads} threads, round_to={args.round_to}",
                   ("model", "setting", "MACs before→after", "params before→after", "ORT ms",
                    "speedup", "metric (recovered)", "metric (no recovery)", "prune s"),
                   rows, width=240)


if __name__ == "__main__":
    main()
