"""Synthetic speech-like audio and the streaming protocol of the Silero voice-activity
detector (zoo model ``silero_vad``).

There is no speech corpus on this machine, so the audio is **synthetic**: voiced
"syllables" are glottal pulse trains with a moving pitch contour (85-260 Hz) shaped by
three moving formant resonators, unvoiced "consonants" are high-passed noise bursts,
and the non-speech parts are silence with a low noise floor, stationary coloured noise
and steady tones (hum, beeps). It sounds like mumbled vowels, not like language; it is
enough to exercise the detector's whole range (probabilities near 0 and near 1) and to
compare a rewritten model's decisions with the float model's, which is what it is for.
It says nothing about the detector's accuracy on real speech.

Streaming protocol (silero_vad's own ``OnnxWrapper``): 16 kHz, chunks of 512 samples,
each fed with the previous chunk's last 64 samples in front (input ``[1, 576]``), the
LSTM state ``[2, 1, 128]`` carried from one chunk to the next, ``sr`` = 16000.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SAMPLE_RATE = 16000
CHUNK = 512
CONTEXT = 64
STATE_SHAPE = (2, 1, 128)
SPEECH_THRESHOLD = 0.5  # silero_vad's default decision threshold

# One call of the model: (input [1, 576], state [2, 1, 128], sr) -> (prob [1, 1], state)
VadStep = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _resonate(x: np.ndarray, freqs: np.ndarray, bandwidth: float) -> np.ndarray:
    """Two-pole resonator with a per-sample centre frequency (a moving formant)."""
    r = np.exp(-np.pi * bandwidth / SAMPLE_RATE)
    a1 = 2 * r * np.cos(2 * np.pi * freqs / SAMPLE_RATE)
    a2 = -r * r
    y = np.zeros_like(x)
    y1 = y2 = 0.0
    for i in range(len(x)):  # ~10^5 samples per clip: fast enough in plain Python
        y0 = x[i] + a1[i] * y1 + a2 * y2
        y[i] = y0
        y2, y1 = y1, y0
    return y * (1 - r)


def _vowel(n: int, rng: np.random.Generator) -> np.ndarray:
    """A voiced syllable: pulse train with a pitch contour through three formants."""
    t = np.arange(n) / SAMPLE_RATE
    f0 = rng.uniform(85, 260) * (1 + rng.uniform(-0.25, 0.25) * np.sin(
        2 * np.pi * rng.uniform(1, 4) * t + rng.uniform(0, np.pi)))
    phase = np.cumsum(f0 / SAMPLE_RATE)
    pulses = (np.diff(np.floor(phase), prepend=0.0) > 0).astype(np.float64)
    pulses += 0.02 * rng.standard_normal(n)  # breathiness
    out = np.zeros(n)
    for lo, hi, bw in ((300, 850, 90), (850, 2300, 110), (2300, 3200, 160)):
        start, end = rng.uniform(lo, hi, 2)
        out += _resonate(pulses, np.linspace(start, end, n), bw)
    env = np.sin(np.pi * np.linspace(0, 1, n)) ** 0.6  # attack and decay
    return out * env


def _fricative(n: int, rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(n)
    hp = np.diff(noise, prepend=0.0)  # high-pass: energy above ~2 kHz
    return 0.3 * hp * np.hanning(n)


def _non_speech(n: int, rng: np.random.Generator) -> np.ndarray:
    kind = rng.integers(0, 3)
    if kind == 0:  # near-silence
        return 0.002 * rng.standard_normal(n)
    if kind == 1:  # coloured (low-passed) stationary noise
        noise = rng.standard_normal(n)
        return 0.05 * np.convolve(noise, np.ones(8) / 8, mode="same")
    t = np.arange(n) / SAMPLE_RATE  # steady tones: mains hum + a beep
    return 0.05 * np.sin(2 * np.pi * 50 * t) + 0.03 * np.sin(2 * np.pi * rng.uniform(400, 2000) * t)


def synth_audio(seconds: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 waveform at 16 kHz in [-1, 1], int8 per-sample label 1 = speech-like).

    Alternates non-speech stretches (0.3-1.5 s) with "utterances" of 2-8 syllables
    (vowels of 80-250 ms, some preceded by a 40-120 ms fricative, short gaps)."""
    rng = np.random.default_rng(seed)
    total = int(seconds * SAMPLE_RATE)
    parts, labels = [], []
    size = 0
    while size < total:
        n = int(rng.uniform(0.3, 1.5) * SAMPLE_RATE)
        parts.append(_non_speech(n, rng))
        labels.append(np.zeros(n, np.int8))
        size += n
        for _ in range(int(rng.integers(2, 9))):
            if rng.random() < 0.4:
                n = int(rng.uniform(0.04, 0.12) * SAMPLE_RATE)
                parts.append(_fricative(n, rng))
                labels.append(np.ones(n, np.int8))
            n = int(rng.uniform(0.08, 0.25) * SAMPLE_RATE)
            parts.append(_vowel(n, rng) * rng.uniform(0.3, 1.0))
            labels.append(np.ones(n, np.int8))
            n = int(rng.uniform(0.02, 0.1) * SAMPLE_RATE)
            parts.append(0.002 * rng.standard_normal(n))
            labels.append(np.ones(n, np.int8))  # a gap inside an utterance is still speech
        size = sum(len(p) for p in parts)
    wave = np.concatenate(parts)[:total]
    wave = wave + 0.001 * rng.standard_normal(total)  # recording noise floor
    wave = 0.9 * wave / max(np.abs(wave).max(), 1e-9)
    return wave.astype(np.float32), np.concatenate(labels)[:total]


def stream(step: VadStep, wave: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run the detector over `wave` chunk by chunk as silero_vad does: (speech probability
    per chunk, the feeds of every call stacked: ``input`` [N,1,576], ``state``
    [N,2,1,128], ``sr`` [N])."""
    state = np.zeros(STATE_SHAPE, np.float32)
    context = np.zeros((1, CONTEXT), np.float32)
    sr = np.array(SAMPLE_RATE, np.int64)
    probs, inputs, states = [], [], []
    for start in range(0, len(wave) - CHUNK + 1, CHUNK):
        x = np.concatenate([context, wave[None, start:start + CHUNK]], axis=1)
        inputs.append(x)
        states.append(state)
        prob, state = step(x, state, sr)
        probs.append(float(np.asarray(prob).reshape(-1)[0]))
        context = x[:, -CONTEXT:]
    feeds = {"input": np.stack(inputs), "state": np.stack(states),
             "sr": np.full(len(inputs), SAMPLE_RATE, np.int64)}
    return np.array(probs, np.float32), feeds


def ort_step(path_or_bytes, *, threads: int = 1) -> VadStep:
    """A `VadStep` running the ONNX model in onnxruntime (CPU, `threads` intra-op)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(path_or_bytes, opts, providers=["CPUExecutionProvider"])

    def step(x, state, sr):
        out, new_state = sess.run(None, {"input": x, "state": state, "sr": sr})
        return out, new_state

    return step


def decision_agreement(ref_probs: np.ndarray, probs: np.ndarray,
                       threshold: float = SPEECH_THRESHOLD) -> dict[str, float]:
    """Speech/non-speech decisions of a candidate against the reference, per chunk."""
    ref, cand = ref_probs >= threshold, probs >= threshold
    return {"agreement": float(np.mean(ref == cand)),
            "max_prob_diff": float(np.abs(ref_probs - probs).max()),
            "mean_prob_diff": float(np.abs(ref_probs - probs).mean()),
            "speech_fraction_ref": float(ref.mean())}
