"""Quantize the Silero VAD (zoo ``silero_vad``) and print size, ORT latency and decision
agreement against the float model; then hand-built LSTM / GRU layers (``--layers``).

Protocol: calibration = the zoo's ``silero_vad.inputs.npz`` (SYNTHETIC speech-like audio,
``onnxforge.speech.synth_audio`` seed 1, 10 s, the float model's streamed states);
evaluation = a different synthetic clip (seed 2, ``--seconds``), streamed chunk by chunk
(512 samples + 64 of context, state carried) through each model. Latency: the whole
stream, models interleaved in one process, onnxruntime 1 intra-op thread, median of
``--repeats``; ratio = variant / fp32 (< 1 is faster).

Hand-built layers: one LSTM / GRU, input 64, hidden 128, 16 steps, batch 1, random
weights N(0, 0.1) (seed 0), random N(0, 1) inputs; LSTM -> DynamicQuantizeLSTM,
GRU -> weight-only int8 (``recurrent=all``); 300 runs per timing, interleaved.

Run: ``python tools/bench_vad.py [--seconds 20] [--repeats 5] [--layers]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from onnxforge import speech
from onnxforge.api import optimize
from onnxforge.ir import model_bytes

ZOO = ".zoo/silero_vad.onnx"
CALIB = ".zoo/silero_vad.inputs.npz"
SHAPES = {"input": (1, 576), "state": (2, 1, 128), "sr": ()}
STFT = "If_0_then_branch__Inline_0__/stft/Conv"
ENCODER0 = "If_0_then_branch__Inline_0__/encoder/0/reparam_conv/Conv"
VARIANTS = {
    "int8 (Conv QDQ + LSTM)": "quantize(int8)",
    "int8, STFT conv float": f'quantize(int8,keep_float="{STFT}")',
    "int8, STFT + encoder.0 float": f'quantize(int8,keep_float="{STFT},{ENCODER0}")',
    "int8 LSTM only (ops=LSTM)": "quantize(int8,ops=LSTM)",
}


def _time_stream(step, wave: np.ndarray) -> float:
    start = time.perf_counter()
    speech.stream(step, wave)
    return time.perf_counter() - start


def _layer_model(op: str, gates: int, rng: np.random.Generator):
    from onnx import TensorProto
    from onnx import helper as h
    from onnx import numpy_helper as nh

    w = rng.normal(0, 0.1, (1, gates * 128, 64)).astype(np.float32)
    r = rng.normal(0, 0.1, (1, gates * 128, 128)).astype(np.float32)
    b = rng.normal(0, 0.1, (1, 2 * gates * 128)).astype(np.float32)
    node = h.make_node(op, ["X", "W", "R", "B"], ["Y", "Y_h"], hidden_size=128, name=op)
    graph = h.make_graph(
        [node], "g", [h.make_tensor_value_info("X", TensorProto.FLOAT, [16, 1, 64])],
        [h.make_tensor_value_info("Y", TensorProto.FLOAT, None),
         h.make_tensor_value_info("Y_h", TensorProto.FLOAT, None)],
        [nh.from_array(w, "W"), nh.from_array(r, "R"), nh.from_array(b, "B")])
    return h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=8)


def bench_layers(repeats: int) -> None:
    import onnxruntime as ort
    from onnxforge.ir import load_model
    from onnxforge.passes.quantization.recurrent import quantize_recurrent

    rng = np.random.default_rng(0)
    print(f"\n{'layer':<6} {'rewrite':<22} {'size x':>7} {'latency':>8} {'rel L2 (Y)':>11}")
    for op, gates in (("LSTM", 4), ("GRU", 3)):
        proto = _layer_model(op, gates, rng)
        model = load_model(proto)
        report = quantize_recurrent(model, "all")
        data = [proto.SerializeToString(), model_bytes(model)]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sessions = [ort.InferenceSession(d, opts, providers=["CPUExecutionProvider"])
                    for d in data]
        x = {"X": rng.normal(0, 1, (16, 1, 64)).astype(np.float32)}
        ref, got = (s.run(None, x)[0] for s in sessions)
        times: list[list[float]] = [[], []]
        for _ in range(repeats):
            for i, s in enumerate(sessions):
                start = time.perf_counter()
                for _ in range(300):
                    s.run(None, x)
                times[i].append(time.perf_counter() - start)
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        print(f"{op:<6} {report['layers'][op]['as']:<22} {len(data[0]) / len(data[1]):>7.2f} "
              f"{np.median(times[1]) / np.median(times[0]):>8.2f} {rel:>11.4f}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", action="store_true", help="only the hand-built LSTM/GRU")
    args = ap.parse_args(argv)
    if args.layers:
        bench_layers(args.repeats)
        return 0
    wave, _ = speech.synth_audio(args.seconds, seed=2)
    fp32 = Path(ZOO).read_bytes()
    models = {"fp32": fp32}
    for label, pipeline in VARIANTS.items():
        result = optimize(ZOO, pipeline, calibration=CALIB, input_shapes=SHAPES,
                          verify_batches=8)
        models[label] = model_bytes(result.model)
    steps = {k: speech.ort_step(v, threads=1) for k, v in models.items()}
    ref, _ = speech.stream(steps["fp32"], wave)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):  # interleaved: load drifts hit every model alike
        for k, step in steps.items():
            times[k].append(_time_stream(step, wave))
    base = float(np.median(times["fp32"]))
    print(f"Silero VAD, synthetic eval clip {args.seconds:.0f} s ({len(ref)} chunks), "
          f"ORT 1 thread, median of {args.repeats}")
    print(f"{'variant':<28} {'bytes':>9} {'size x':>7} {'latency':>8} {'agree':>7} "
          f"{'max |dp|':>9} {'mean |dp|':>9}")
    for k, data in models.items():
        probs, _ = speech.stream(steps[k], wave)
        agree = speech.decision_agreement(ref, probs)
        print(f"{k:<28} {len(data):>9} {len(fp32) / len(data):>7.2f} "
              f"{np.median(times[k]) / base:>8.2f} {agree['agreement']:>7.4f} "
              f"{agree['max_prob_diff']:>9.4f} {agree['mean_prob_diff']:>9.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
