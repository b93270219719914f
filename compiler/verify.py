"""Compare two models (or two sets of outputs) on the same inputs.

Metrics per output, accumulated over all batches:
  max_abs   largest |a - b|
  rel_l2    ||a - b|| / ||a||   (a = reference)
  cosine    cosine similarity of the flattened outputs
  top1      fraction of rows whose argmax over the last axis agrees
            (only for outputs with a last axis > 1)
  accuracy  when the source has labels: top-1 accuracy of reference and candidate
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx_ir as ir

from .backends.ort import OrtArtifact
from .calibration import CalibrationSource
from .errors import InputSpecError, VerificationError


@dataclass
class OutputError:
    name: str
    max_abs: float = 0.0
    rel_l2: float = 0.0
    cosine: float = 1.0
    top1: float | None = None
    ref_max_abs: float = 0.0  # largest |reference| value: the output's scale
    shape: tuple[int, ...] | None = None

    @property
    def rel(self) -> float:
        """max_abs relative to the output's scale (inf when a zero output got non-zero)."""
        if self.ref_max_abs > 0:
            return self.max_abs / self.ref_max_abs
        return 0.0 if self.max_abs == 0 else float("inf")

    def within(self, rtol: float, atol: float = 1e-6) -> bool:
        """Equal up to float noise: small relative L2 error, or every element within
        `rtol` of the output's scale (rel L2 alone is unstable when most values are ~0).
        A NaN measurement is never within (every comparison with NaN is False)."""
        if np.isnan([self.rel_l2, self.max_abs, self.ref_max_abs]).any():
            return False
        return self.rel_l2 <= rtol or self.max_abs <= rtol * self.ref_max_abs + atol


@dataclass
class _Accumulator:
    """Running sums so metrics over many batches need no stored outputs."""

    name: str
    max_abs: float = 0.0
    ref_max_abs: float = 0.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    got_sq: float = 0.0
    dot: float = 0.0
    agree: int = 0
    rows: int = 0
    shape: tuple[int, ...] | None = None

    def add(self, ref: np.ndarray, got: np.ndarray) -> None:
        if ref.shape != got.shape:
            raise VerificationError(
                f"output {self.name!r}: shapes differ, reference {ref.shape} vs {got.shape}"
            )
        self.shape = tuple(ref.shape)
        a = ref.astype(np.float64).ravel()
        b = got.astype(np.float64).ravel()
        if a.size:  # np.maximum keeps a NaN (Python's max would drop it)
            self.max_abs = float(np.maximum(self.max_abs, np.max(np.abs(a - b))))
            self.ref_max_abs = float(np.maximum(self.ref_max_abs, np.max(np.abs(a))))
        self.diff_sq += float(np.dot(a - b, a - b))
        self.ref_sq += float(np.dot(a, a))
        self.got_sq += float(np.dot(b, b))
        self.dot += float(np.dot(a, b))
        if ref.ndim >= 2 and ref.shape[-1] > 1 and np.issubdtype(ref.dtype, np.floating):
            self.agree += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
            self.rows += int(np.prod(ref.shape[:-1]))

    def result(self) -> OutputError:
        denom = np.sqrt(self.ref_sq * self.got_sq)
        return OutputError(
            name=self.name,
            max_abs=self.max_abs,
            rel_l2=float(np.sqrt(self.diff_sq) / np.sqrt(self.ref_sq)) if self.ref_sq else
            float(np.sqrt(self.diff_sq)),
            cosine=float(self.dot / denom) if denom else (1.0 if self.diff_sq == 0 else 0.0),
            top1=self.agree / self.rows if self.rows else None,
            ref_max_abs=self.ref_max_abs,
            shape=self.shape,
        )


@dataclass
class Comparison:
    outputs: list[OutputError] = field(default_factory=list)
    samples: int = 0
    reference_accuracy: float | None = None
    candidate_accuracy: float | None = None

    # NaN-propagating: one NaN output makes the summary NaN (never over budget by accident).
    @property
    def max_rel_l2(self) -> float:
        return _nan_max([o.rel_l2 for o in self.outputs], 0.0)

    @property
    def max_abs(self) -> float:
        return _nan_max([o.max_abs for o in self.outputs], 0.0)

    @property
    def min_cosine(self) -> float:
        return -_nan_max([-o.cosine for o in self.outputs], -1.0)

    @property
    def accuracy_drop(self) -> float | None:
        if self.reference_accuracy is None or self.candidate_accuracy is None:
            return None
        return self.reference_accuracy - self.candidate_accuracy

    def to_dict(self) -> dict:
        data = asdict(self)
        data.update(max_rel_l2=self.max_rel_l2, max_abs=self.max_abs, min_cosine=self.min_cosine,
                    accuracy_drop=self.accuracy_drop)
        return data

    def within(self, rtol: float, atol: float = 1e-6) -> bool:
        return all(o.within(rtol, atol) for o in self.outputs)


def _nan_max(values: list[float], default: float) -> float:
    return float(np.max(values)) if values else default


def check_budget(option: str, value: float | None) -> None:
    """An error budget must be a finite number >= 0 (NaN would make every check pass)."""
    if value is None:
        return
    if not isinstance(value, (int, float)) or not np.isfinite(value) or value < 0:
        raise InputSpecError(f"{option} {value}: must be a finite number >= 0")


class OutputComparer:
    """Feed pairs of output dicts; read the metrics at the end."""

    def __init__(self) -> None:
        self._acc: dict[str, _Accumulator] = {}
        self.samples = 0

    def add(self, reference: Mapping[str, np.ndarray], candidate: Mapping[str, np.ndarray]) -> None:
        for name, ref in reference.items():
            if name not in candidate:
                raise VerificationError(f"candidate has no output named {name!r}")
            self._acc.setdefault(name, _Accumulator(name)).add(np.asarray(ref),
                                                               np.asarray(candidate[name]))
        self.samples += 1

    def result(self) -> Comparison:
        return Comparison([a.result() for a in self._acc.values()], self.samples)


def compare_outputs(reference: Mapping[str, np.ndarray],
                    candidate: Mapping[str, np.ndarray]) -> Comparison:
    comparer = OutputComparer()
    comparer.add(reference, candidate)
    return comparer.result()


def _accuracy(logits: list[np.ndarray], labels: np.ndarray) -> float:
    predictions = np.concatenate([np.asarray(x).reshape(len(x), -1).argmax(-1) for x in logits])
    n = min(len(predictions), len(labels))
    return float(np.mean(predictions[:n] == labels[:n]))


def compare_models(
    reference: ir.Model,
    candidate: ir.Model,
    source: CalibrationSource,
    *,
    limit: int | None = 16,
    threads: int | None = None,
) -> Comparison:
    """Run both models with onnxruntime on `limit` batches of `source` and compare.

    Outputs are matched by name; when the candidate renamed them, by position.
    """
    ref_art = OrtArtifact(reference, threads=threads)
    cand_art = OrtArtifact(candidate, threads=threads)
    if len(ref_art.output_names) != len(cand_art.output_names):
        raise VerificationError(
            f"models have different numbers of outputs: {ref_art.output_names} vs "
            f"{cand_art.output_names}"
        )
    rename = dict(zip(cand_art.output_names, ref_art.output_names))
    comparer = OutputComparer()
    labels = source.labels()
    first_output = ref_art.output_names[0]
    ref_logits, cand_logits = [], []
    for batch in source.batches(limit):
        ref_out = ref_art.run(batch)
        cand_out = {rename[k]: v for k, v in cand_art.run(batch).items()}
        comparer.add(ref_out, cand_out)
        if labels is not None:
            ref_logits.append(ref_out[first_output])
            cand_logits.append(cand_out[first_output])
    result = comparer.result()
    if not result.samples:
        raise VerificationError(
            f"{source.description}: yielded no batch to compare (too few samples for the "
            "model's batch size, or zero batches asked for); nothing was verified"
        )
    if labels is not None and ref_logits:
        result.reference_accuracy = _accuracy(ref_logits, labels)
        result.candidate_accuracy = _accuracy(cand_logits, labels)
    return result
