"""A spawned worker process that serves tasks over a pipe and is restarted when it dies
or overruns: how the fuzzer and the ONNX node-suite runner survive a compiler that
crashes or hangs on one input.

The child runs ``target(conn, *args)``: it sends one message when it is ready, then
answers each task it receives, and returns when it receives ``None``. The parent sends
a task and reads messages until one is final; a child that dies, or is still running
at the deadline, is killed, and the next task starts a fresh one.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import signal
import time
from collections.abc import Callable
from typing import Any, Self


def serve(conn, handle: Callable[[Any], Any]) -> None:
    """The child's side: say it is ready, then send `handle(task)` for each task until
    the parent sends None or goes away."""
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        conn.send(handle(task))


class WorkerGone(Exception):
    """The worker died or ran past its deadline; the message says which."""


class SpawnedWorker:
    """One child process at a time (spawned: a fresh interpreter, no forked ORT or TVM
    threads), started on the first task and after every death or timeout."""

    def __init__(self, target: Callable, args: tuple = (), *, name: str = "onnxforge-worker",
                 start_timeout: float = 300.0):
        self.target = target
        self.args = args
        self.name = name
        self.start_timeout = start_timeout
        self.restarts = 0
        self._ctx = multiprocessing.get_context("spawn")
        self._proc = None
        self._conn = None

    @property
    def pid(self) -> int | None:
        """The worker's process id (None until the first task starts it)."""
        return self._proc.pid if self._proc is not None else None

    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        proc = self._ctx.Process(target=self.target, args=(child, *self.args), daemon=True,
                                 name=self.name)
        proc.start()
        child.close()
        if not parent.poll(self.start_timeout):
            self._kill(proc)
            raise RuntimeError(f"the {self.name} process did not start in "
                               f"{self.start_timeout:.0f} s")
        try:
            parent.recv()
        except EOFError as exc:
            self._kill(proc)
            raise RuntimeError(f"the {self.name} process died while starting (exit code "
                               f"{proc.exitcode})") from exc
        self._proc, self._conn = proc, parent

    @staticmethod
    def _kill(proc) -> None:
        if proc.is_alive():
            proc.kill()
        proc.join(10)

    def drop(self) -> None:
        """Kill the worker (the next task starts a new one)."""
        if self._proc is not None:
            self._kill(self._proc)
            self._conn.close()
            self.restarts += 1
        self._proc = self._conn = None

    def send(self, task: Any) -> None:
        """Send a task, starting a worker first when there is none (or it died idle)."""
        if self._proc is not None and not self._proc.is_alive():
            self.drop()
        if self._proc is None:
            self._start()
        try:
            self._conn.send(task)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            self.drop()
            self._start()
            self._conn.send(task)

    def receive(self, deadline: float) -> Any:
        """The worker's next message; raises WorkerGone (and drops the worker) when it
        dies or sends nothing before ``deadline`` (a ``time.perf_counter()`` value)."""
        left = deadline - time.perf_counter()
        if left <= 0 or not self._conn.poll(left):
            self.drop()
            raise WorkerGone("timeout")
        try:
            return self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(10)
            code = self._proc.exitcode
            self.drop()
            raise WorkerGone(f"signal {signal.Signals(-code).name}" if code is not None
                             and code < 0 else f"exit code {code}") from None

    def close(self) -> None:
        if self._proc is not None:
            with contextlib.suppress(OSError, BrokenPipeError):
                self._conn.send(None)
            self._proc.join(5)
            self._kill(self._proc)
            self._conn.close()
        self._proc = self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
