"""Find the default-schedule rule that makes a compiled model wrong, kernel by kernel.

Each fused kernel of the model is compiled alone twice, as TVM's plain loops and as
onnxforge's default CPU rule schedules it, and both are run on the same random
arguments (``onnxforge.kernels.kernel_check``). Prints one row per kernel (or only the
bad ones with ``--bad-only``) and exits 1 when any kernel differs or changes between
two runs.

    python tools/bisect_kernels.py model.onnx --input-shape x:1,3,48,320 [-p cleanup]
"""

from __future__ import annotations

import argparse
import sys

from rich.console import Console
from rich.table import Table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--input-shape", action="append", default=[],
                        help="name:d1,d2,... for inputs with dynamic dims (repeatable)")
    parser.add_argument("-p", "--pipeline", default="cleanup",
                        help="onnxforge pipeline to run first, as compile does ('' for none)")
    parser.add_argument("-t", "--target", default="host")
    parser.add_argument("--bad-only", action="store_true")
    args = parser.parse_args(argv)

    from onnxforge import api
    from onnxforge.backends.targets import resolve_target
    from onnxforge.backends.tvm import prepare_module
    from onnxforge.kernels.kernel_check import check_kernels

    shapes = {}
    for spec in args.input_shape:
        name, _, dims = spec.rpartition(":")
        shapes[name] = tuple(int(d) for d in dims.split(","))
    model = args.model
    if args.pipeline.strip():
        model = api.optimize(model, args.pipeline, input_shapes=shapes or None).model
    target = resolve_target(args.target)
    prepared = prepare_module(model, target, input_shapes=shapes or None)
    console = Console()
    table = Table("kernel", "rule", "rel error", "same twice", "ok", "note",
                  title=f"{args.model}: default schedules vs plain loops, kernel by kernel")
    with console.status("checking kernels") as status:
        def show(result):
            status.update(f"checked {result.name}")

        results = check_kernels(prepared.mod, target, progress=show)
    for r in results:
        if args.bad_only and r.ok:
            continue
        table.add_row(r.name, r.rule, f"{r.rel_error:.2e}", "yes" if r.deterministic else "NO",
                      "yes" if r.ok else "[red]NO[/]", r.note)
    console.print(table)
    bad = [r for r in results if not r.ok]
    console.print(f"{len(results)} kernels checked, {len(bad)} wrong")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
