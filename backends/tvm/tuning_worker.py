"""The tuning worker process: how `tuning.tune` starts, follows and stops it, and what it
runs (`python -m onnxforge.backends.tvm.tuning_worker SPEC`).

Files, all in the staging folder the parent made (`database.staging_copy`):
  spec.json        what to tune (model file, target, task names, budget, RPC, timeouts)
  progress.jsonl   the worker's events, one JSON object a line: start, baseline (a
                   task's default-schedule time), round (after each search round),
                   done, error
  worker.log       the worker's stdout and stderr

Parent side (`run_worker`): the worker leads its own process group; the parent reads its
events twice a second and kills the whole group at the hard deadline, on Ctrl-C and after
it exits (builder and runner pool processes must not outlive the run).

Worker side (`main`): it prepares the module as `compile_model` does, keeps the tasks the
parent asked for, times each under onnxforge's default CPU schedule
(`measure_default_schedules`, into `default_schedules.json`), then runs MetaSchedule with
the pieces of `metaschedule` into the staging database. It dies with the parent.

Builds run in a persistent pool of processes (MetaSchedule's LocalBuilder starts a fresh
pool, i.e. a fresh TVM import, for every batch). The functions the pool runs are defined
here, in the module run as `__main__`, so that cloudpickle sends them by value; each pool
process imports onnxforge once, for the TIR op of the table lookups and the vector rounding
that `compile_model`'s builds have (`_builder_process_setup`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ...kernels.schedule_configs import CONFIG_ATTR  # measured knob settings
from ..targets import is_gpu_target, physical_cores, target_arch
from .database import RECORD_FILE, WORKLOAD_FILE, read_baselines, write_baselines
from .metaschedule import (
    budget_scheduler,
    describe_tasks,
    extract_tasks,
    load_cpu_tensor_intrinsics,
    make_runner,
    progress_callback,
    search_strategy,
    trial_plan,
)

logger = logging.getLogger(__name__)

SPEC_FILE = "spec.json"
EVENTS_FILE = "progress.jsonl"
LOG_FILE = "worker.log"


# ---------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------

def run_worker(staging: Path, spec: dict, hard_deadline: float | None,
               on_event: Callable[[dict], str | None], on_tick: Callable[[], None]) -> str:
    """Run the worker on `spec` in `staging` until it exits or `hard_deadline`
    (time.monotonic()) passes; returns how the run ended.

    Each event the worker reports goes to `on_event`, which returns the outcome when the
    event ends the run ("done"); `on_tick` is called between reads. A worker that dies
    without a "done" event is reported to `on_event` as an error with its log's tail.
    """
    (staging / SPEC_FILE).write_text(json.dumps(spec, default=str), encoding="utf-8")
    log = open(staging / LOG_FILE, "w")  # noqa: SIM115 - closed below
    env = dict(os.environ)
    env.setdefault("TVM_NUM_THREADS", str(physical_cores()))
    cmd = [sys.executable, "-m", "onnxforge.backends.tvm.tuning_worker", str(staging / SPEC_FILE)]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    outcome = None
    try:
        outcome = _follow(proc, staging / EVENTS_FILE, hard_deadline, on_event, on_tick)
    except KeyboardInterrupt:
        _kill_group(proc)
        outcome = "interrupted"
    finally:
        # Also after a normal exit: builder/runner pool processes must not outlive the run.
        _kill_group(proc)
        log.close()
    if outcome is None:
        tail = (staging / LOG_FILE).read_text(errors="replace").strip().splitlines()[-15:]
        outcome = f"crash (exit code {proc.returncode})"
        on_event({"event": "error", "message": "tuning worker died: " + " | ".join(tail)})
        logger.warning("tuning worker exited with %s; measured records are kept", proc.returncode)
    return outcome


def _follow(proc: subprocess.Popen, events_path: Path, hard_deadline: float | None,
            on_event: Callable[[dict], str | None], on_tick: Callable[[], None]) -> str | None:
    """Read the worker's events as they come until it exits or the deadline passes."""
    outcome = None
    offset = 0
    while True:
        finished = proc.poll() is not None
        if events_path.is_file():
            with open(events_path, encoding="utf-8") as handle:
                handle.seek(offset)
                chunk = handle.read()
            complete = chunk[: chunk.rfind("\n") + 1]  # a line being written waits
            offset += len(complete.encode("utf-8"))
            for line in complete.splitlines():
                outcome = on_event(json.loads(line)) or outcome
        if finished:
            return outcome
        if hard_deadline and time.monotonic() > hard_deadline:
            _kill_group(proc)
            return "seconds (worker stopped at the deadline)"
        on_tick()
        time.sleep(0.5)


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the worker and everything it started (it leads its own process group)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


# ---------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------

def main(spec_path: str) -> int:
    """Tune the spec's tasks into its work_dir (the staging folder), reporting events."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec.get("parent_pid"):
        _watch_parent(int(spec["parent_pid"]))
    events = Path(spec["work_dir"]) / EVENTS_FILE
    try:
        _tune(spec, events, time.time())
        return 0
    except Exception as exc:
        _emit(events, {"event": "error", "message": f"{type(exc).__name__}: {exc}"})
        raise


def _tune(spec: dict, events: Path, t0: float) -> None:
    import tvm
    from tvm.s_tir import meta_schedule as ms

    work_dir = Path(spec["work_dir"])
    state: dict[str, Any] = {"names": [], "best_us": {}, "trials": {}, "total_trials": 0,
                             "t0": t0, "stopped_by": "trials"}
    target = tvm.target.Target(spec["target"])
    gpu = is_gpu_target(target)
    if not gpu:
        load_cpu_tensor_intrinsics(target_arch(target))
    relax_mod, tasks = _wanted_tasks(spec, target)
    max_trials = int(spec["max_trials"])
    per_task, per_iter = trial_plan(max_trials, len(tasks), spec.get("max_seconds"))
    contexts, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
        tasks, str(work_dir), strategy=search_strategy(per_iter),
        num_threads=physical_cores(), seed=0)
    state["names"] = [c.task_name for c in contexts]
    builder = _builder(spec, target, gpu)
    runner = make_runner(spec["rpc_tracker"], spec["rpc_key"], spec["runner_timeout"])
    database = ms.database.JSONDatabase(
        path_workload=str(work_dir / WORKLOAD_FILE),
        path_tuning_record=str(work_dir / RECORD_FILE), allow_missing=True)
    if not gpu:
        measure_default_schedules(tasks, relax_mod, target, builder, runner, database,
                                  work_dir, events)

    def on_round(event: dict) -> None:
        _emit(events, event)
        _inject_fault(state["rounds"], work_dir)

    _emit(events, {"event": "start", "tasks": state["names"], "per_task": per_task,
                   "per_iter": per_iter, "setup_s": time.time() - t0})
    ms.tune_tasks(
        tasks=contexts, task_weights=weights, work_dir=str(work_dir),
        max_trials_global=max_trials, max_trials_per_task=per_task,
        num_trials_per_iter=per_iter, builder=builder, runner=runner, database=database,
        measure_callbacks=[*ms.measure_callback.MeasureCallback.create("default"),
                           progress_callback(state, on_round)],
        task_scheduler=budget_scheduler(list(range(len(contexts))), spec["deadline_unix"],
                                        state),
    )
    stopped = state["stopped_by"]
    if stopped == "all tasks done" and state["total_trials"] >= max_trials:
        stopped = "trials"
    _emit(events, {"event": "done", "stopped_by": stopped,
                   "total_trials": state["total_trials"], "seconds": time.time() - t0})
    builder.pool.shutdown()


def _wanted_tasks(spec: dict, target) -> tuple[Any, list]:
    """(the fused Relax module, the tasks the parent asked for, biggest FLOP share first)."""
    from .pipeline import prepare_module

    prepared = prepare_module(spec["model"], target, input_shapes=spec["input_shapes"])
    wanted = set(spec["tasks"])
    tasks = [t for t in extract_tasks(prepared.mod, target) if t.task_name in wanted]
    infos = {i.name: i for i in describe_tasks(tasks)}
    tasks.sort(key=lambda t: -infos[t.task_name].share)
    return prepared.mod, tasks


def _emit(path: Path, event: dict) -> None:
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(json.dumps(event) + "\n")
        handle.flush()


def _inject_fault(rounds: int, work_dir: Path) -> None:
    """Test hook: ONNXFORGE_TUNE_FAULT=crash-after:N tears a record line and dies (SIGKILL)
    after N rounds, the way a segfault in the database writer would."""
    fault = os.environ.get("ONNXFORGE_TUNE_FAULT", "")
    if fault.startswith("crash-after:") and rounds >= int(fault.split(":", 1)[1]):
        with open(work_dir / RECORD_FILE, "a", encoding="utf-8") as handle:
            handle.write('[0,[[[["GetSBlock",[],["torn')
        os.kill(os.getpid(), signal.SIGKILL)


def _watch_parent(parent: int) -> None:
    """Kill this worker's process group when the tuning parent disappears."""

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                with contextlib.suppress(OSError):
                    os.killpg(os.getpgrp(), signal.SIGKILL)
                os._exit(1)
            time.sleep(2)

    threading.Thread(target=watch, daemon=True).start()


# ---------------------------------------------------------------------------------------
# The builder pool
# ---------------------------------------------------------------------------------------

def _builder(spec: dict, target, gpu: bool):
    """The builder: light builds on CPU, cross-linked exports for an AArch64 board."""
    import tvm

    f_export = None
    if spec["rpc_tracker"] and target_arch(target) == "aarch64" and \
            target_arch(tvm.target.Target({"kind": "llvm"})) != "aarch64":
        f_export = _cross_export_aarch64
    return _reusing_local_builder(max_workers=physical_cores(),
                                  timeout_sec=spec["builder_timeout"],
                                  f_build=None if gpu else _build, f_export=f_export,
                                  cpu=not gpu)


def _reusing_local_builder(max_workers: int, timeout_sec: float, f_build=None, f_export=None,
                           cpu: bool = True):
    """A LocalBuilder whose pool processes live for the whole run (one TVM import each)."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.builder import BuilderResult, PyBuilder
    from tvm.s_tir.meta_schedule.builder import local_builder as lb
    from tvm.support.popen_pool import PopenPoolExecutor, StatusKind

    @derived_object
    class ReusingLocalBuilder(PyBuilder):
        """LocalBuilder whose worker processes live for the whole run (one TVM import each)."""

        def __init__(self, max_workers: int, timeout_sec: float, f_build=None, f_export=None):
            super().__init__()
            self.timeout_sec = timeout_sec
            self.f_build = f_build
            self.f_export = f_export
            self.pool = PopenPoolExecutor(max_workers=max_workers, timeout=timeout_sec,
                                          maximum_process_uses=256,
                                          initializer=_builder_process_setup, initargs=(cpu,))
            # Start the workers now: their TVM import overlaps the first search round.
            for _ in range(max_workers):
                self.pool.submit(_warm_worker)

        def build(self, build_inputs):
            results = []
            jobs = [(self.f_build, self.f_export, b.mod, b.target,
                     lb._serialize_params(b.params))
                    for b in build_inputs]
            for item in self.pool.map_with_error_catching(lambda x: lb._worker_func(*x), jobs):
                if item.status == StatusKind.COMPLETE:
                    results.append(BuilderResult(item.value, None))
                elif item.status == StatusKind.TIMEOUT:
                    results.append(BuilderResult(
                        None, f"LocalBuilder: Timeout, killed after {self.timeout_sec} seconds"))
                else:
                    results.append(BuilderResult(None, f"LocalBuilder: {item.value}"))
            return results

    return ReusingLocalBuilder(max_workers, timeout_sec, f_build, f_export)


def _builder_process_setup(cpu: bool) -> None:
    """Each builder process builds what `compile_model` builds: the table-lookup op must
    be registered before a module calling it is unpickled, and on CPU rounding vectorizes
    (`kernels/vector_rounding`; a build process builds CPU code only, for its life)."""
    import tvm
    from onnxforge.kernels import vector_lookup  # noqa: F401 - registers the op
    from onnxforge.kernels.vector_rounding import vectorizable_rounding

    if cpu:
        vectorizable_rounding(tvm.target.Target({"kind": "llvm"})).__enter__()


def _warm_worker() -> bool:
    import tvm.s_tir.meta_schedule  # noqa: F401 - the import is the point

    return True


def _build(mod, target, _params):
    """MetaSchedule's default_build without `import tvm.s_tir.tensor_intrin`.

    That import parses every CUDA tensor-core intrinsic (23 s of CPU here, minutes on a
    loaded machine) in each builder process; a scheduled module does not need them.
    """
    from tvm.driver import build as tvm_build
    from tvm.s_tir.transform import RemoveWeightLayoutRewriteBlock

    mod = RemoveWeightLayoutRewriteBlock(skip_tensor_rewrite=True)(mod)
    return tvm_build(mod, target=target)


def _cross_export_aarch64(mod) -> str:
    """Builder export for AArch64 boards over RPC: a .so linked by the cross compiler."""
    from .aarch64 import aarch64_compiler

    path = os.path.join(tempfile.mkdtemp(), "tvm_tmp_mod.so")
    mod.export_library(path, cc=aarch64_compiler())
    return path


# ---------------------------------------------------------------------------------------
# The default-schedule baseline
# ---------------------------------------------------------------------------------------

def _weight_params(relax_mod) -> dict[str, Any]:
    """{PrimFunc name: its `layout_free_buffers` (weight parameters)} as compile marks them.

    The default CPU rules pack weights at compile time only for parameters marked this way;
    timing a task without the mark would time a slower, unpacked schedule.
    """
    import tvm

    try:
        from ...kernels.schedule_pass import attach_layout_free_buffers
    except Exception:  # noqa: BLE001 - older kernels: time the unmarked schedule
        return {}
    copy = tvm.IRModule(dict(relax_mod.functions_items()), attrs=relax_mod.attrs)
    marked = attach_layout_free_buffers(copy)
    return {gv.name_hint: f.attrs["layout_free_buffers"] for gv, f in marked.functions_items()
            if isinstance(f, tvm.tirx.PrimFunc) and f.attrs and "layout_free_buffers" in f.attrs}


def measure_default_schedules(tasks, relax_mod, target, builder, runner, database,
                              work_dir: Path, events: Path) -> None:
    """Time each task under onnxforge's default CPU schedule with the tuner's own builder and
    runner, so that compile_model can keep it where tuning found nothing faster. The
    schedule uses the knob settings compile_model would apply (``schedule_configs_for``:
    the shipped database, then ``work_dir/schedule_configs.json``).

    Weights are packed ahead of time in the compiled model, so the packing blocks are
    removed before timing (the builder's RemoveWeightLayoutRewriteBlock, as for tuned
    candidates) and the runner feeds arguments in the packed layout."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.builder import BuilderInput
    from tvm.s_tir.meta_schedule.runner import RunnerInput

    from .schedules import default_cpu_schedule_pass, schedule_configs_for

    # the knob settings compile_model would use: the shipped database for the target's
    # class and the measured ones (`schedule_configs.json`, copied into `work_dir`)
    configs, sources = schedule_configs_for(target, work_dir, shipped=True)
    if configs:
        logger.info("default-schedule baseline with %d schedule config(s) from %s",
                    len(configs), ", ".join(sources))
    schedule_pass, why_not = default_cpu_schedule_pass(target, configs)
    if schedule_pass is None:
        logger.info("no default-schedule baseline: %s", why_not)
        return
    import tvm

    weights = _weight_params(relax_mod)
    items = []
    configured: dict[str, dict] = {}
    for task in tasks:
        mod = task.dispatched[0]
        # a copy: the pass may update the module it is given in place, and `mod` is the very
        # module the tuning context searches
        functions = dict(mod.functions_items())
        if task.task_name in weights and len(functions) == 1:
            (gvar, func), = functions.items()
            functions = {gvar: func.with_attr("layout_free_buffers", weights[task.task_name])}
        try:
            scheduled = schedule_pass(tvm.IRModule(functions, attrs=mod.attrs))
        except Exception as exc:  # noqa: BLE001 - no baseline for this task
            logger.info("default schedule failed on %s: %s", task.task_name, exc)
            continue
        funcs = [f for _, f in scheduled.functions_items()]
        if len(funcs) != 1 or not (funcs[0].attrs and funcs[0].attrs.get("tirx.is_scheduled")):
            continue
        items.append((task, mod, scheduled))
        setting = funcs[0].attrs.get(CONFIG_ATTR)
        if setting is not None:  # the knob setting timed (None: the rule's heuristic)
            configured[task.task_name] = json.loads(str(setting))
    if not items:
        return
    built = builder.build([BuilderInput(s, target) for _, _, s in items])
    measured, inputs = [], []
    for (task, mod, scheduled), result in zip(items, built):
        if result.error_msg or not result.artifact_path:
            logger.warning("default schedule of %s did not build: %s", task.task_name,
                           (result.error_msg or "").strip()[:500])
            continue
        measured.append((task, mod, result.artifact_path))
        device = "cpu" if target.kind.name == "llvm" else target.kind.name
        inputs.append(RunnerInput(result.artifact_path, device,
                                  ArgInfo.from_entry_func(scheduled, remove_preproc=True)))
    baselines = read_baselines(work_dir)
    for (task, mod, path), future in zip(measured, runner.run(inputs)):
        result = future.result()
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)
        if result.error_msg or not result.run_secs:
            logger.warning("default schedule of %s did not run: %s", task.task_name,
                           (result.error_msg or "no timing").strip()[:500])
            continue
        secs = [float(x) for x in result.run_secs]
        us = sum(secs) / len(secs) * 1e6
        shash = database.commit_workload(mod).as_json()[0]
        baselines[str(shash)] = {"us": us, "task": task.task_name,
                                 "config": configured.get(task.task_name)}
        _emit(events, {"event": "baseline", "task": task.task_name, "us": us})
    write_baselines(work_dir, baselines)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
