"""Train the small digits CNN that onnxforge ships as its embedded default model.

Trains on scikit-learn's bundled ``digits`` set (1797 8x8 grayscale images, 10
classes; no download) with torch on one thread and fixed seeds, then writes:

- ``compiler/data/digits_cnn.onnx``: opset 17, IR version <= 10, a single
  self-contained file. Input ``input`` float32 ``[batch, 1, 8, 8]`` (dim 0 is the
  dynamic axis named ``batch``), pixels scaled to [0, 1] (raw value / 16).
  Output ``logits`` float32 ``[batch, 10]``. BatchNormalization nodes are kept
  (not folded into the convolutions) so the fusion passes have work to do.
- ``compiler/data/digits_test.npz``: held-out test split, keys ``input``
  (float32, N x 1 x 8 x 8) and ``labels`` (int64, N).
- ``compiler/data/digits_calib.npz``: key ``input``, 200 training images
  (float32, 200 x 1 x 8 x 8) for calibration.

It prints the test accuracy measured in torch and in onnxruntime on the exported
file; they must agree. Run: ``python tools/train_digits.py`` (about 15 s).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "compiler" / "data"
SEED = 0
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.31 loads IR <= 10 models


def load_splits(seed: int = SEED) -> dict[str, np.ndarray]:
    """Split sklearn's digits into train/test (80/20, stratified) scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def build_model():
    from torch import nn

    def conv_bn_relu(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=True),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
        )

    return nn.Sequential(
        conv_bn_relu(1, 16),  # 16 x 8 x 8
        conv_bn_relu(16, 32),  # 32 x 8 x 8
        nn.MaxPool2d(2),  # 32 x 4 x 4
        conv_bn_relu(32, 64),  # 64 x 4 x 4
        nn.AdaptiveAvgPool2d(1),  # 64 x 1 x 1 -> GlobalAveragePool
        nn.Flatten(),
        nn.Linear(64, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def random_shift(xb, generator):
    """Shift each image by up to one pixel (zero padding): cheap augmentation."""
    import torch

    n = xb.shape[0]
    padded = torch.nn.functional.pad(xb, (1, 1, 1, 1))
    dx = torch.randint(0, 3, (n,), generator=generator)
    dy = torch.randint(0, 3, (n,), generator=generator)
    out = torch.empty_like(xb)
    for i in range(n):
        out[i] = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
    return out


def train(model, x_train: np.ndarray, y_train: np.ndarray, epochs: int, batch_size: int = 64):
    import torch

    gen = torch.Generator().manual_seed(SEED)
    xt = torch.from_numpy(x_train)
    yt = torch.from_numpy(y_train)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (len(xt) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=3e-3, total_steps=epochs * steps_per_epoch
    )
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.05)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size : (s + 1) * batch_size]
            xb = random_shift(xt[idx], gen) if epoch < epochs - 3 else xt[idx]
            loss = loss_fn(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        if epoch % 10 == 0 or epoch == epochs - 1:
            print(f"  epoch {epoch + 1:3d}/{epochs}  loss {total / len(xt):.4f}", flush=True)
    model.eval()
    return model


def export_onnx(model, path: Path) -> None:
    """Export with the TorchScript exporter, keeping BatchNormalization nodes.

    ``training=PRESERVE`` on a model in eval mode skips the exporter's eval-mode
    peephole that would fold BN into Conv; ``do_constant_folding=False`` keeps
    the graph as written.
    """
    import onnx
    import torch

    tmp = path.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # legacy exporter notice
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 8, 8),),
            str(tmp),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=OPSET,
            do_constant_folding=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            dynamo=False,
        )
    proto = onnx.load(str(tmp))  # loads any external data into the proto
    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    proto.producer_name = "onnxforge/tools/train_digits.py"
    onnx.checker.check_model(proto, full_check=True)
    bn = sum(n.op_type == "BatchNormalization" for n in proto.graph.node)
    if bn != 3:
        raise SystemExit(f"expected 3 BatchNormalization nodes in the export, found {bn}")
    onnx.save(proto, str(tmp), save_as_external_data=False)
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", type=Path, default=DATA_DIR)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args(argv)

    import onnx
    import onnxruntime as ort
    import torch

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    random.seed(SEED)
    np.random.seed(SEED)
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)

    d = load_splits()
    print(f"digits: {len(d['x_train'])} train / {len(d['x_test'])} test images")
    model = train(build_model(), d["x_train"], d["y_train"], args.epochs)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(d["x_test"])).numpy()
    torch_acc = float((torch_logits.argmax(1) == d["y_test"]).mean())

    out = args.out_dir
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "digits_cnn.onnx"
    export_onnx(model, onnx_path)

    rng = np.random.default_rng(SEED)
    calib_idx = np.sort(rng.choice(len(d["x_train"]), size=200, replace=False))
    np.savez_compressed(out / "digits_test.npz", input=d["x_test"], labels=d["y_test"])
    np.savez_compressed(out / "digits_calib.npz", input=d["x_train"][calib_idx])

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    test = np.load(out / "digits_test.npz")
    ort_logits = sess.run(["logits"], {"input": test["input"]})[0]
    ort_acc = float((ort_logits.argmax(1) == test["labels"]).mean())
    max_diff = float(np.abs(ort_logits - torch_logits).max())

    proto = onnx.load(str(onnx_path))
    ops: dict[str, int] = {}
    for n in proto.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    print(f"graph: ir_version {proto.ir_version}, opset {proto.opset_import[0].version}, ops {ops}")
    for name in ("digits_cnn.onnx", "digits_test.npz", "digits_calib.npz"):
        print(f"wrote {out / name} ({(out / name).stat().st_size / 1024:.1f} KiB)")
    print(
        f"test accuracy: torch {torch_acc:.4f}  onnxruntime {ort_acc:.4f}  "
        f"(max |logit diff| {max_diff:.2e}, {len(test['labels'])} images)"
    )
    print(f"total time {time.perf_counter() - t0:.1f} s")
    if ort_acc != torch_acc or max_diff > 1e-3:
        print("error: onnxruntime and torch disagree", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
