"""Reports: JSON for toolchains, rich tables for people."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import safe_write
from .units import human

# Below this before/after latency ratio the run warns that the output is slower. One
# interleaved measurement on a shared machine moves by a few percent (the digits example
# measured 0.019 -> 0.020 ms for an exact rewrite), so a ratio just under 1 is noise.
SLOWER_WARNING = 0.95


def write_json(path: str | os.PathLike, data: Any, *, label: str = "report") -> Path:
    """Write JSON atomically (temp file + fsync + rename; see `safe_write`)."""
    return safe_write.write_json(path, data, default=_json_default, label=label)


def write_report(path: str | os.PathLike, data: dict[str, Any]) -> Path:
    """`--report`: a path ending in .html gets the HTML page (html_report.py), any other
    the JSON; both atomic, never over a file the run reads."""
    if Path(path).suffix.lower() in (".html", ".htm"):
        import json

        from .html_report import write_html

        # the page reads what the JSON would hold (numpy scalars, paths made plain)
        return write_html(path, json.loads(json.dumps(data, default=_json_default)))
    return write_json(path, data)


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def render_inspect(info: dict[str, Any], console: Console) -> None:
    console.print(f"[bold]{info['path']}[/]  opset {info['opset']}  IR v{info['ir_version']}  "
                  f"producer {info['producer'] or '-'}  file {human(info['file_bytes'])}B")
    io = Table("kind", "name", "dtype", "shape", title="inputs / outputs")
    for kind in ("inputs", "outputs"):
        for item in info[kind]:
            io.add_row(kind[:-1], item["name"], item["dtype"], str(item["shape"]))
    console.print(io)
    summary = Table("nodes", "params", "weights", "MACs", "FLOPs", title="totals (1 MAC = 2 FLOPs)")
    macs = info["macs"]
    summary.add_row(str(info["nodes"]), human(info["params"]), f"{human(info['weight_bytes'])}B",
                    human(macs) if macs is not None else "unknown",
                    human(2 * macs) if macs is not None else "unknown")
    console.print(summary)
    if info.get("macs_note"):
        console.print(f"[yellow]{info['macs_note']}[/]")
    ops = Table("op", "count", title="operators")
    for op, count in sorted(info["op_counts"].items(), key=lambda kv: -kv[1]):
        ops.add_row(op, str(count))
    console.print(ops)
    if info.get("top_nodes"):
        top = Table("node", "MACs", "share", title="heaviest nodes")
        total = max(macs or 1, 1)
        for name, value in info["top_nodes"]:
            top.add_row(name, human(value), f"{100 * value / total:.1f}%")
        console.print(top)


def render_steps(report: dict[str, Any], console: Console) -> None:
    table = Table("pass", "time s", "nodes", "params", "MACs", "rel L2 err", "changes",
                  title=f"pipeline: {report['pipeline']}")
    for step in report["steps"]:
        b, a = step["before"], step["after"]
        err = step["error"]["max_rel_l2"] if step["error"] else None
        changes = ", ".join(f"{k}={v}" for k, v in step["stats"].items()
                            if isinstance(v, (int, float, str)))
        table.add_row(step["pass"], f"{step['seconds']:.2f}", f"{b['nodes']}→{a['nodes']}",
                      f"{human(b['params'])}→{human(a['params'])}",
                      f"{human(b['macs'])}→{human(a['macs'])}",
                      "-" if err is None else f"{err:.2e}", changes[:60])
    console.print(table)
    final = report.get("error")
    if final:
        line = (f"final vs input: max rel L2 {final['max_rel_l2']:.3e}, max abs "
                f"{final['max_abs']:.3e}, min cosine {final['min_cosine']:.6f}")
        outs = final.get("outputs") or []
        if outs and outs[0].get("top1") is not None:
            line += f", top-1 agreement {outs[0]['top1'] * 100:.2f}%"
        if final.get("reference_accuracy") is not None:
            line += (f", accuracy {final['reference_accuracy'] * 100:.2f}% → "
                     f"{final['candidate_accuracy'] * 100:.2f}%")
        console.print(line)
    lat = report.get("latency")
    if lat:
        console.print(f"ORT latency ({lat['threads']} thread(s), median): "
                      f"{lat['before_ms']:.3f} ms → {lat['after_ms']:.3f} ms "
                      f"(speedup ×{lat['speedup']:.2f})")
        if lat["speedup"] < SLOWER_WARNING:
            # e.g. int8 HardSwish nets: float ops between int8 convs (see README, quantize)
            console.print("[yellow]warning: the output runs slower than the input in "
                          "onnxruntime on this machine (one interleaved measurement; "
                          "confirm with tools/bench_quantization.py or tools/bench_exact.py)"
                          "[/yellow]")


def render_bench(rows: list[dict[str, Any]], console: Console, title: str) -> None:
    table = Table("model", "backend", "median ms", "min ms", "stdev ms", "ratio", "vs",
                  title=title)
    for row in rows:
        table.add_row(row["label"], row["backend"], f"{row['median_ms']:.3f}",
                      f"{row['min_ms']:.3f}", f"{row['stdev_ms']:.3f}", f"{row['ratio']:.3f}",
                      row["baseline"])
    console.print(table)
