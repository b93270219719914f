#!/usr/bin/env python
"""Build the schedule-config database that ships with onnxforge for this CPU's class.

For every zoo model (and the shipped digits CNN), as imported and after onnxforge's
exact `cleanup,fuse` pipeline (the two forms users compile), every fused kernel whose
default CPU rule has knobs gets each setting timed on this machine
(`onnxforge.backends.tvm.config_tuning.search_configs`). Per kernel the fastest setting is
kept when it beats the rules' heuristic by 3 % and gives the same output; kernels where
the heuristic won are recorded too (config null), so nothing is measured twice.

The result goes to `kernels/tuning_db/<class>/schedule_configs.json` (class: e.g.
`x86_64-avx512`, from the host target), which `compile_model` applies automatically to
any target of that class. Regenerate it on a quiet machine of the class:

    python tools/build_zoo.py                        # the models, once
    python tools/build_tuning_db.py                  # all zoo models, ~5 min on 2 cores
    python tools/build_tuning_db.py --models resnet18   # add one model's kernels
    python tools/build_tuning_db.py --fresh             # rebuild (after a rule change)

Entries are keyed by kernel (structural hash of the fused PrimFunc), so a run for one
model adds to what is there; `--fresh` starts from an empty database. The file is
rewritten after every model, so an interrupted run keeps what it measured.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))

from bench_common import DATA, ZOO, zoo_shapes

ZOO_MODELS = ["resnet18", "mobilenet_v2", "squeezenet1_1", "efficientnet_b0",
              "mobilenet_v3_small", "minilm_l6", "ppocr_det", "ppocr_rec", "ppocr_cls"]
PIPELINE = "cleanup,fuse"
INT8_PIPELINE = "cleanup,fuse,quantize(int8)"
# models whose int8 QDQ form is measured too (the int8 kernels' tiles); the rest
# have no integer convs/matmuls worth it or are covered by these shapes
INT8_MODELS = {"resnet18", "mobilenet_v2", "efficientnet_b0", "minilm_l6", "ppocr_det",
               "ppocr_rec", "digits_cnn"}


def model_forms(name: str, int8: bool = True):
    """(label, model, input shapes): the model as shipped, after `cleanup,fuse`, and for
    INT8_MODELS after `cleanup,fuse,quantize(int8)` (calibrated on the zoo's sample
    inputs where it has them, else random data)."""
    from onnxforge import api

    path = DATA / "digits_cnn.onnx" if name == "digits_cnn" else ZOO / f"{name}.onnx"
    if not path.is_file():
        print(f"skip {name}: {path} absent (python tools/build_zoo.py)", file=sys.stderr)
        return []
    shapes = zoo_shapes(name) or None
    sample = ZOO / f"{name}.inputs.npz"
    fused = api.optimize(path, PIPELINE, input_shapes=shapes,
                         calibration=str(sample) if sample.is_file() else None).model
    forms = [(name, path, shapes), (f"{name}+{PIPELINE}", fused, shapes)]
    if name in INT8_MODELS and int8:
        calibration = DATA / "digits_calib.npz" if name == "digits_cnn" else sample
        quantized = api.optimize(path, INT8_PIPELINE, input_shapes=shapes, force=True,
                                 calibration=str(calibration) if calibration.is_file()
                                 else "random:8").model
        forms.append((f"{name}+int8", quantized, shapes))
    return forms


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(ZOO_MODELS + ["digits_cnn"]),
                        help="comma list of zoo model names (default: all)")
    parser.add_argument("--out", type=Path, default=REPO / "kernels" / "tuning_db",
                        help="root of the shipped databases (one folder per CPU class)")
    parser.add_argument("--fresh", action="store_true",
                        help="start from an empty database instead of the shipped one "
                             "(measures every kernel again)")
    parser.add_argument("--no-int8", dest="int8", action="store_false",
                        help="skip the int8 QDQ forms (their kernels' tiles)")
    parser.add_argument("--seconds", type=float, default=None,
                        help="budget per model form, seconds")
    args = parser.parse_args(argv)

    from onnxforge.backends.targets import resolve_target, target_key
    from onnxforge.backends.tvm.config_tuning import search_configs
    from onnxforge.errors import OnnxforgeError
    from onnxforge.kernels.schedule_configs import CONFIG_FILE, load_configs, target_class

    target = resolve_target("host")
    cls = target_class(target)
    dest = args.out / cls
    work = Path(tempfile.mkdtemp(prefix="onnxforge-tuning-db-"))
    db_dir = work / target_key(target)
    if (dest / CONFIG_FILE).is_file() and not args.fresh:  # start from what is shipped
        db_dir.mkdir(parents=True)
        shutil.copyfile(dest / CONFIG_FILE, db_dir / CONFIG_FILE)
    print(f"target {target} -> class {cls}; {len(load_configs(db_dir))} kernels known")
    print(f"{'model':<34}{'kernels':>8}{'improved':>9}{'default us':>12}{'best us':>10}"
          f"{'seconds':>9}")
    started = time.monotonic()
    dest.mkdir(parents=True, exist_ok=True)
    for name in args.models.split(","):
        for label, model, shapes in model_forms(name, args.int8):
            try:
                report = search_configs(model, target, work, input_shapes=shapes,
                                        max_seconds=args.seconds)
            except OnnxforgeError as exc:  # e.g. an op TVM's importer lacks in that form
                print(f"{label:<34}skipped: {str(exc).splitlines()[0][:150]}", flush=True)
                continue
            default = sum(k["default_us"] for k in report.kernels)
            best = sum(k["best_us"] for k in report.kernels)
            print(f"{label:<34}{len(report.kernels):>8}{report.improved:>9}{default:>12.0f}"
                  f"{best:>10.0f}{report.seconds:>9.0f}", flush=True)
            # after every model: an interrupted run keeps what it measured
            shutil.copyfile(db_dir / CONFIG_FILE, dest / CONFIG_FILE)
    entries = load_configs(dest)
    chosen = sum(1 for e in entries.values() if e.get("config"))
    print(f"wrote {dest / CONFIG_FILE}: {len(entries)} kernels, {chosen} with a measured "
          f"setting, in {time.monotonic() - started:.0f} s")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
