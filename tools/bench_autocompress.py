"""autocompress's joint search against single-technique searches at equal quality.

For one model, runs `autocompress` four times with the same quality limit and an
out-of-reach speedup (so each run looks for the fastest model within the limit): the joint
space (prune + rank + bits), prune only, int8/fp32 only (bits), low rank only (rank).
Prints, per run, the fastest model within the limit (its speedup measured again side by
side with the input model, ORT, threads as given, spinning off) and writes one plot with
the four measured fronts.

    python tools/bench_autocompress.py --model digits --batch 8 --out /tmp/ac_bench \\
        --plot docs/autocompress_digits_b8_baselines.png

Every speedup is a ratio to the input model timed in the same interleaved rounds of the
same run; the four runs follow each other (the machine's load may differ between them).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from onnxforge import api
from onnxforge.autocompress import autocompress
from onnxforge.autocompress.search import pareto_indices
from rich.console import Console
from rich.table import Table

RUNS = {"joint": ("prune", "rank", "bits"), "prune only": ("prune",),
        "int8 only": ("bits",), "lowrank only": ("rank",)}


def model_args(name: str, batch: int) -> dict:
    if name != "digits":
        raise SystemExit(f"unknown model {name!r}: digits")
    return {"model": api.EXAMPLE_MODEL, "calibration": str(api.EXAMPLE_CALIBRATION),
            "verify_data": str(api.EXAMPLE_TEST_DATA),
            "input_shapes": {"input": (batch, 1, 8, 8)}}


def front(report: dict) -> list[tuple[float, float]]:
    rows = [c for c in report["candidates"] if "failed" not in c]
    points = [(c["latency_ratio"], 100 * c["accuracy_drop"]) for c in rows]
    return sorted(points[i] for i in pareto_indices(points))


def plot(results: dict[str, dict], path: Path, limit_pt: float, title: str) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.6, 4.4), layout="constrained")
    ax = fig.subplots()
    for (name, report), marker in zip(results.items(), "o^sD"):
        pts = front(report)
        ax.plot([1 / x for x, _ in pts], [y for _, y in pts], marker=marker, label=name)
    ax.axhline(limit_pt, ls="--", color="grey", label=f"{limit_pt:g} pt limit")
    ax.set_xlabel("speedup over the input model (ORT, measured side by side)")
    ax.set_ylabel("accuracy drop (pt, digits test set)")
    ax.set_yscale("symlog", linthresh=0.5)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="digits")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-accuracy-drop", type=float, default=0.005)
    ap.add_argument("--max-candidates", type=int, default=25)
    ap.add_argument("--time-budget", type=float, default=240)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/autocompress_bench"))
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()
    console = Console(stderr=True)
    results = {}
    for name, kinds in RUNS.items():
        console.print(f"[bold]{name}[/] ({','.join(kinds)})")
        folder = args.out / name.replace(" ", "_")
        result = autocompress(
            **model_args(args.model, args.batch), output=None, speedup=100.0,
            max_accuracy_drop=args.max_accuracy_drop, kinds=kinds, threads=args.threads,
            max_candidates=args.max_candidates, time_budget=args.time_budget,
            seed=args.seed, force=True, cache_dir=args.out / "cache",
            report_path=folder / "report.json", console=console)
        results[name] = result.report
    table = Table("search", "candidates", f"best within {args.max_accuracy_drop * 100:g} pt:"
                  " speedup", "accuracy drop", "rel L2", "size", "policy",
                  title=f"{args.model} batch {args.batch}, ORT {args.threads} thread(s)")
    for name, report in results.items():
        final = report["final"]
        changed = [f"{r['kind']} {r['layer']} {r['choice']}" for r in report["policy"] or []
                   if r["choice"] not in ("keep", "full", "fp32")]
        table.add_row(name, str(len(report["candidates"])), f"{final['speedup']:.2f}x",
                      f"{final['accuracy_drop'] * 100:.2f} pt", f"{final['rel_l2']:.3f}",
                      f"{final['size_bytes'] / 1e6:.3f} MB", "; ".join(changed) or "-")
    Console().print(table)
    (args.out / "summary.json").write_text(json.dumps(
        {n: {"final": r["final"], "policy": r["policy"], "front": front(r)}
         for n, r in results.items()}, indent=1))
    if args.plot:
        plot(results, args.plot, args.max_accuracy_drop * 100,
             f"{args.model} (batch {args.batch}): joint vs single-technique fronts")
        console.print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
