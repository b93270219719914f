"""Quantize the Silero VAD (zoo ``silero_vad``) and print size, ORT latency and decision
agreement against the float model.

Protocol: calibration = the zoo's ``silero_vad.inputs.npz`` (SYNTHETIC speech-like audio,
``onnxforge.speech.synth_audio`` seed 1, 10 s, the float model's streamed states);
evaluation = a different synthetic clip (seed 2, ``--seconds``), streamed chunk by chunk
(512 samples + 64 of context, state carried) through each model. Latency: the whole
stream, models interleaved in one process, onnxruntime 1 intra-op thread, median of
``--repeats``; ratio = variant / fp32 (< 1 is faster).

Run: ``python tools/bench_vad.py [--seconds 20] [--repeats 5]``
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
VARIANTS = {
    "int8 (Conv QDQ + LSTM)": "quantize(int8)",
    "int8, STFT conv float": f'quantize(int8,keep_float="{STFT}")',
    "int8 LSTM only (ops=LSTM)": "quantize(int8,ops=LSTM)",
}


def _time_stream(step, wave: np.ndarray) -> float:
    start = time.perf_counter()
    speech.stream(step, wave)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
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
