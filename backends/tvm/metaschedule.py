"""onnxforge's side of MetaSchedule: the tasks of a model, the pieces put into the search
(progress callback, budget scheduler, search strategy, runner), and measuring on a remote
device through TVM's RPC tracker.

Used by `tuning` (the parent: which tasks to tune) and `tuning_worker` (the process that
searches). The classes subclass TVM's Python bases, so they are defined inside functions:
importing this module does not import TVM.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import sys
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ...errors import BackendError, InputSpecError, OptionText

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------

@dataclass
class TaskInfo:
    """One tuning task (a fused PrimFunc) and what happened to it."""

    name: str
    flop: float
    weight: int
    share: float  # of the model's FLOPs
    status: str = "pending"  # cached | tuned | untuned | skipped (small) | failed
    trials: int = 0
    best_us: float | None = None
    default_us: float | None = None  # the default schedule, measured the same way
    # best-so-far after each measured round: [trials of this task, best us]
    history: list[list[float]] = field(default_factory=list)


def extract_tasks(mod, target) -> list:
    """MetaSchedule tasks of a fused module (the PrimFuncs compile_model applies a DB to)."""
    from tvm.s_tir import meta_schedule as ms

    return list(ms.relax_integration.extract_tasks(mod, target))


def _task_flop(task) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops

    try:
        return float(estimate_tir_flops(task.dispatched[0]))
    except Exception:  # noqa: BLE001 - some functions have no countable FLOPs
        return 0.0


def describe_tasks(tasks: Sequence) -> list[TaskInfo]:
    """TaskInfo per task, ordered by FLOP share (biggest first)."""
    flops = [_task_flop(t) * int(t.weight) for t in tasks]
    total = sum(flops) or 1.0
    infos = [TaskInfo(t.task_name, f / max(int(t.weight), 1), int(t.weight), f / total)
             for t, f in zip(tasks, flops)]
    return sorted(infos, key=lambda i: -i.share)


def is_cached(database, task) -> bool:
    """Whether `database` has a tuning record for `task`."""
    try:
        record = database.query_tuning_record(task.dispatched[0], task.target, "main")
    except Exception:  # noqa: BLE001
        return False
    return record is not None


# ---------------------------------------------------------------------------------------
# The search: budget per task and round, strategy, callback, scheduler
# ---------------------------------------------------------------------------------------

def trial_plan(max_trials: int, n_tasks: int, max_seconds: float | None) -> tuple[int, int]:
    """(trials per task, trials per search round) for a budget of `max_trials`."""
    per_task = max(1, math.ceil(max_trials / n_tasks))
    per_iter = int(min(64, per_task))
    if max_seconds:
        # finer rounds under a short wall-clock budget: the deadline is checked per round
        per_iter = int(min(per_iter, max(8, max_seconds / 10)))
    return per_task, per_iter


def search_strategy(per_iter: int):
    from tvm.s_tir import meta_schedule as ms

    population = int(min(512, max(64, 4 * per_iter)))
    return ms.search_strategy.EvolutionarySearch(
        population_size=population,
        init_min_unmeasured=min(50, population // 2),
        genetic_num_iters=3 if population <= 128 else 4,
    )


def progress_callback(state: dict, on_round: Callable[[dict], None]):
    """A MeasureCallback that records each task's best latency in `state` (for
    `budget_scheduler`) and hands each round's summary to `on_round`.

    `state`: "names" (task names by task id), "best_us", "trials" (per task name),
    "total_trials", "rounds" and "t0" (the run's start, time.time()).
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback

    @derived_object
    class ProgressCallback(PyMeasureCallback):
        """Records per-task best latency for the scheduler and reports each round."""

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results,
                  runner_results):
            name = state["names"][task_id]
            best = state["best_us"].get(name)
            errors = []
            for built, ran in zip(builder_results, runner_results):
                if built.error_msg:
                    errors.append(built.error_msg.strip().splitlines()[0][:200])
                    continue
                if ran.error_msg or not ran.run_secs:
                    errors.append((ran.error_msg or "no timing").strip().splitlines()[0][:200])
                    continue
                secs = sorted(float(s) for s in ran.run_secs)
                us = secs[len(secs) // 2] * 1e6
                best = us if best is None else min(best, us)
            state["best_us"][name] = best
            state["trials"][name] = state["trials"].get(name, 0) + len(runner_results)
            state["total_trials"] += len(runner_results)
            state["rounds"] = state.get("rounds", 0) + 1
            on_round({
                "event": "round", "task": name, "task_trials": state["trials"][name],
                "best_us": best, "total_trials": state["total_trials"],
                "errors": errors[:3] if len(errors) == len(runner_results) else [],
                "elapsed": time.time() - state["t0"],
            })

    return ProgressCallback()


def budget_scheduler(order: list[int], deadline: float | None, state: dict):
    """A TaskScheduler: one round per task in `order` (FLOP share) first, then rounds for
    the task costing most in the model; stops when the next round would not end before
    `deadline` (time.time()), saying why in `state["stopped_by"]`."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.task_scheduler import PyTaskScheduler

    @derived_object
    class BudgetScheduler(PyTaskScheduler):
        """FLOP-share order first, then the task costing most; stops at the deadline."""

        def __init__(self, order: list[int], deadline: float | None):
            super().__init__()
            self.order = order
            self.deadline = deadline
            self.rounds: list[float] = []
            self.dispatched_at: float | None = None
            self.started: set[int] = set()

        def next_task_id(self) -> int:
            sched = self._outer()
            for i, task in enumerate(sched.tasks_):
                if not task.is_terminated and task.measure_candidates is not None:
                    sched.join_running_task(i)
            now = time.time()
            if self.dispatched_at is not None:
                self.rounds.append(now - self.dispatched_at)
                self.dispatched_at = None
            alive = [i for i in self.order if not sched.tasks_[i].is_terminated]
            if not alive:
                state["stopped_by"] = "all tasks done"
                return -1
            if self.deadline is not None:
                typical = sorted(self.rounds)[len(self.rounds) // 2] if self.rounds else 0.0
                if now + 0.5 * typical >= self.deadline:
                    state["stopped_by"] = "seconds"
                    return -1
            fresh = [i for i in alive if i not in self.started]
            if fresh:
                choice = fresh[0]
            else:
                def cost(i: int) -> float:
                    best = state["best_us"].get(state["names"][i])
                    weight = float(sched.tasks_[i].task_weight)
                    return (best if best is not None else 0.0) * weight
                choice = max(alive, key=cost)
            self.started.add(choice)
            self.dispatched_at = time.time()
            return choice

    return BudgetScheduler(order, deadline)


def load_cpu_tensor_intrinsics(arch: str) -> None:
    """Register only the CPU tensor intrinsics (x86 VNNI/AMX, ARM dot product).

    `TuneContext` imports the whole `tvm.s_tir.tensor_intrin` package, whose CUDA part
    dominates the setup time. For CPU targets the package is pre-registered as an empty
    namespace and only the CPU modules are imported; GPU targets import everything.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType(name)
    package.__path__ = list(spec.submodule_search_locations)
    package.__package__ = name
    sys.modules[name] = package
    modules = (["x86"] if arch == "x86_64" else ["arm_cpu"] if arch == "aarch64"
               else ["x86", "arm_cpu"])
    for module in modules:
        try:
            setattr(package, module, importlib.import_module(f"{name}.{module}"))
        except Exception as exc:  # noqa: BLE001 - fall back to the full import
            logger.debug("tensor intrinsics %s: %s", module, exc)
            del sys.modules[name]
            importlib.import_module(name)
            return


# ---------------------------------------------------------------------------------------
# Measuring: on this machine, or on a device registered with an RPC tracker
# ---------------------------------------------------------------------------------------

def make_runner(rpc_tracker: str | None, rpc_key: str | None, timeout: float):
    """MetaSchedule's runner: LocalRunner, or RPCRunner through the tracker."""
    from tvm.s_tir import meta_schedule as ms

    evaluator = ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=50,
                                          enable_cpu_cache_flush=False)
    if not rpc_tracker:
        return ms.runner.LocalRunner(timeout_sec=timeout, evaluator_config=evaluator)
    host, port = parse_tracker(rpc_tracker)
    return ms.runner.RPCRunner(
        rpc_config=ms.runner.RPCConfig(tracker_host=host, tracker_port=port,
                                       tracker_key=rpc_key, session_timeout_sec=int(timeout)),
        evaluator_config=evaluator, max_workers=1)


def check_rpc_device(rpc_tracker: str, rpc_key: str, *, wait: float = 60.0) -> dict:
    """Ask the tracker whether a device with `rpc_key` is registered (waits up to `wait` s)."""
    from tvm import rpc

    host, port = parse_tracker(rpc_tracker)
    deadline = time.monotonic() + wait
    last_error = None
    while True:
        try:
            summary = rpc.connect_tracker(host, port).summary()
            queue = summary.get("queue_info", {})
            if rpc_key in queue:
                return dict(queue[rpc_key])
            keys = sorted(queue)
            last_error = f"no device with key {rpc_key!r} (registered keys: {keys or 'none'})"
        except Exception as exc:  # noqa: BLE001 - socket and RPC errors alike
            last_error = f"cannot reach the tracker at {host}:{port} ({exc})"
        if time.monotonic() > deadline:
            raise BackendError(
                f"RPC tuning: {last_error}. Start a tracker (python -m tvm.exec.rpc_tracker "
                f"--host 0.0.0.0 --port {port}) and on the device: python -m tvm.exec.rpc_server "
                f"--tracker {host}:{port} --key {rpc_key}"
            )
        time.sleep(1.0)


def parse_tracker(rpc_tracker: str) -> tuple[str, int]:
    host, sep, port = rpc_tracker.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise InputSpecError(OptionText.of(("rpc_tracker", rpc_tracker),
                                           ": expected HOST:PORT, e.g. 127.0.0.1:9190"))
    return host, int(port)
