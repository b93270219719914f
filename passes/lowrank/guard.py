"""Measured latency guard for the `lowrank` pass.

A decomposition trades one GEMM/conv for two or three thinner ones; whether that
is faster depends on the runtime, the shapes and the thread count, not on the
MAC count alone. For each candidate the guard builds two single-layer models (the
layer as it is and its decomposition) on the layer's real input shape, runs them
with onnxruntime (`OrtArtifact.benchmark`, threads from the pass context, spinning
off) in alternating rounds, and compares the medians of all samples.
"""

from __future__ import annotations

import logging
import statistics
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from ...backends.ort import OrtArtifact
from .graph import Stage, emit_chain

logger = logging.getLogger(__name__)

# Wall time one timed round of one model should take (seconds).
ROUND_SECONDS = 0.03


@dataclass
class GuardTiming:
    original_ms: float
    decomposed_ms: float

    @property
    def ratio(self) -> float:
        """decomposed / original latency (< 1 is faster)."""
        return self.decomposed_ms / self.original_ms if self.original_ms > 0 else float("inf")


def chain_model(stages: list[Stage], x_shape: tuple[int, ...], opset: int) -> ir.Model:
    """A model with one float input of `x_shape` running the chain."""
    x = ir.Value(name="x", shape=ir.Shape(x_shape), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset}, name="lowrank_guard")
    nodes, out = emit_chain(graph, x, stages, "guard", opset)
    graph.extend(nodes)
    out.type = ir.TensorType(ir.DataType.FLOAT)
    graph.outputs.append(out)
    return ir.Model(graph, ir_version=8)


def measure(original: list[Stage], decomposed: list[Stage], x_shape: tuple[int, ...],
            opset: int, *, threads: int | None, rounds: int = 3, seed: int = 0) -> GuardTiming:
    """Median latency of both chains, measured side by side in alternating rounds."""
    feed = {"x": np.random.default_rng(seed).standard_normal(x_shape).astype(np.float32)}
    arts = [OrtArtifact(chain_model(original, x_shape, opset), threads=threads),
            OrtArtifact(chain_model(decomposed, x_shape, opset), threads=threads)]
    probe = [a.benchmark(feed, warmup=2, repeat=3).median_ms for a in arts]
    per_ms = max(max(probe), 1e-3)
    repeat = int(min(max(ROUND_SECONDS * 1e3 / per_ms, 5), 200))
    samples: list[list[float]] = [[], []]
    for _ in range(rounds):
        for i, art in enumerate(arts):
            samples[i].extend(art.benchmark(feed, warmup=1, repeat=repeat).samples_ms)
    timing = GuardTiming(statistics.median(samples[0]), statistics.median(samples[1]))
    logger.debug("guard %s: %.4f ms -> %.4f ms", x_shape, timing.original_ms,
                 timing.decomposed_ms)
    return timing
