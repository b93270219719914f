"""`autocompress --backend tvm --rpc-tracker HOST:PORT --rpc-key KEY`: candidates compiled
here for the target and timed on a board registered with TVM's RPC tracker, the tracker
`onnxforge tune --rpc-tracker` measures on (backends.tvm.metaschedule: parse_tracker,
check_rpc_device). On the board: `python -m tvm.exec.rpc_server --tracker HOST:PORT
--key KEY`.

Per model: compiled (backends.tvm.compile_model, as `TvmLatency`), exported as a library
(`TVMArtifact.export`: a .so, or a .tar the board links when there is no cross compiler
here), uploaded, loaded into a Relax VM on the board, checked against onnxruntime here on
the same model and the same seeded inputs (`verify_artifact`: the outputs computed on the
board), then timed with the board's own timer (`time_evaluator`), all models of one call
in the same interleaved rounds. Threads on the board are its TVM runtime's default
(TVM_NUM_THREADS of the server), not `--threads`.
"""

from __future__ import annotations

import hashlib
import math
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ..errors import BackendError, InputSpecError, OptionText
from ..ir import model_bytes


class _BoardArtifact:
    """A compiled model loaded on the board: `inputs`, `report`, `run` (what
    verify_artifact needs) and `time_ms`."""

    def __init__(self, local: Any, session: Any, library: Path):
        from tvm import relax

        session.upload(str(library))
        module = session.load_module(library.name)
        kind = local.target.kind.name
        self.device = session.cpu(0) if kind == "llvm" else session.device(kind, 0)
        self.vm = relax.VirtualMachine(module, self.device)
        self.inputs, self.report, self.output_names = local.inputs, local.report, \
            local.output_names

    def _arguments(self, inputs: Mapping[str, np.ndarray]) -> list:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(inputs[s.name], dtype=s.dtype),
                                   device=self.device) for s in self.inputs]

    def run(self, inputs: Mapping[str, np.ndarray], **_: Any) -> dict[str, np.ndarray]:
        result = self.vm["main"](*self._arguments(inputs))
        values = list(result) if isinstance(result, (list, tuple)) or hasattr(
            result, "__len__") and not hasattr(result, "numpy") else [result]
        arrays = [v.numpy() for v in values]
        names = self.output_names if len(self.output_names) == len(arrays) else \
            [f"output_{i}" for i in range(len(arrays))]
        return dict(zip(names, arrays))

    def time_ms(self, inputs: Mapping[str, np.ndarray], number: int) -> float:
        """Mean ms of `number` runs, timed on the board (the inputs set once)."""
        self.vm.set_input("main", *self._arguments(inputs))
        timer = self.vm.time_evaluator("invoke_stateful", self.device, number=number,
                                       repeat=1)
        return float(timer("main").mean) * 1e3


@dataclass
class RpcTvmLatency:
    """TVM code for `target` timed on the board `rpc_key` of the tracker `rpc_tracker`
    (module docstring). A model that fails to compile, to load on the board or to match
    onnxruntime is not timed: NaN, and `rejected[i]` says why."""

    target: str
    rpc_tracker: str
    rpc_key: str
    threads: int = 1
    input_shapes: dict[str, tuple[int, ...]] | None = None
    rounds: int = 10
    seconds: float = 0.1  # per model and round, at least `repeat` runs
    repeat: int = 3
    session_timeout: int = 600
    wait: float = 30.0  # for the board to be registered with the tracker
    rejected: dict[int, str] = field(default_factory=dict)
    compile_seconds: float = 0.0
    compiled: int = 0

    def __post_init__(self) -> None:
        from ..backends.targets import UnknownTargetError, resolve_target
        from ..backends.tvm.metaschedule import check_rpc_device, parse_tracker

        try:
            resolve_target(self.target)
        except UnknownTargetError as exc:
            raise InputSpecError(f"--target {self.target}: {exc}") from exc
        if not self.rpc_key:
            raise InputSpecError(OptionText.of(("rpc_tracker", self.rpc_tracker), " needs ",
                                               ("rpc_key", "KEY"), " (the board's key)"))
        self.host, self.port = parse_tracker(self.rpc_tracker)
        check_rpc_device(self.rpc_tracker, self.rpc_key, wait=self.wait)
        self._folder = tempfile.TemporaryDirectory(prefix="onnxforge-autocompress-rpc-")
        self._built: dict[str, Any] = {}  # content hash -> (artifact, library) | why not

    @property
    def name(self) -> str:
        return f"tvm:{self.target}@rpc:{self.rpc_key}"

    def _library(self, model: ir.Model) -> Any:
        """(the local artifact, its exported library), or a str saying why there is none."""
        from ..backends.tvm import compile_model

        key = hashlib.sha256(model_bytes(model)).hexdigest()
        if key not in self._built:
            started = time.perf_counter()
            try:
                artifact = compile_model(model, self.target, input_shapes=self.input_shapes,
                                         threads=self.threads)
                library = artifact.export(Path(self._folder.name) / f"{key[:16]}.so")
                self._built[key] = (artifact, library)
            except Exception as exc:  # noqa: BLE001 - any compile failure rejects it
                self._built[key] = f"TVM could not compile it: {type(exc).__name__}: {exc}"
            self.compile_seconds += time.perf_counter() - started
            self.compiled += 1
        return self._built[key]

    def _load(self, session: Any, model: ir.Model) -> Any:
        """The model loaded and verified on the board, or a str saying why not."""
        from ..backends.tvm import verify_artifact

        built = self._library(model)
        if isinstance(built, str):
            return built
        artifact, library = built
        try:
            board = _BoardArtifact(artifact, session, library)
            check = verify_artifact(board, model, threads=self.threads, raise_on_failure=False)
        except Exception as exc:  # noqa: BLE001 - an RPC or load failure rejects it
            return f"the board could not run it: {type(exc).__name__}: {exc}"
        return board if check.ok else f"compiled code failed verification on the board: " \
            f"{check.problem()}"

    def time(self, models: Sequence[ir.Model], inputs: dict[str, np.ndarray]) -> list[float]:
        from tvm import rpc

        try:
            session = rpc.connect_tracker(self.host, self.port).request(
                self.rpc_key, session_timeout=self.session_timeout)
        except Exception as exc:
            raise BackendError(f"--rpc-tracker {self.rpc_tracker} --rpc-key {self.rpc_key}: "
                               f"no session with the board: {exc}") from exc
        # one load per distinct model: the server crashed (SIGSEGV in dlsym) loading the
        # same library twice in one session, and the input model is often timed against
        # itself
        loaded: dict[str, Any] = {}
        found = []
        for m in models:
            key = hashlib.sha256(model_bytes(m)).hexdigest()
            if key not in loaded:
                loaded[key] = self._load(session, m)
            found.append(loaded[key])
        self.rejected = {i: f for i, f in enumerate(found) if isinstance(f, str)}
        if 0 in self.rejected:
            raise BackendError(f"autocompress on {self.name}: the input model: "
                               f"{self.rejected[0]}")
        ok = [i for i, f in enumerate(found) if not isinstance(f, str)]
        probe = found[0].time_ms(inputs, number=self.repeat)
        number = max(self.repeat, math.ceil(self.seconds * 1e3 / max(probe, 1e-3)))
        samples: dict[int, list[float]] = {i: [] for i in ok}
        for _ in range(self.rounds):  # interleaved: every model once per round
            for i in ok:
                samples[i].append(found[i].time_ms(inputs, number))
        out = [math.nan] * len(models)
        for i in ok:
            out[i] = statistics.median(samples[i])
        return out
