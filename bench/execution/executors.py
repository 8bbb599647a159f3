"""Where a sweep's cells run: ``--executor local | gpus | slurm``.

The unit of work stays the cell, measured in its own worker process with its own timeout
(:func:`bench.execution.runner.run_isolated`); an executor only decides which machine and GPU run which
cells, and where their records go.

- ``local``: one cell after another in this process's worker (the default).
- ``gpus``: one worker at a time per visible GPU of this machine, each pinned to its GPU with
  ``CUDA_VISIBLE_DEVICES``, pulling cells from one queue; this process writes every record.
- ``slurm``: cells grouped into the tasks of one SLURM job array, submitted with submitit. Each
  task measures its cells (per-cell timeout as locally) and appends each record to its own
  shard (``shards/<job>_<task>.jsonl``, see :mod:`bench.execution.shards`); this process waits for the
  array, following the shards, then records every assigned cell that no task finished as
  ``lost`` (time limit, preemption, cancel, node failure), which ``--resume`` submits again.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..arguments import nonneg_int, positive_int
from ..errors import UsageError
from .shards import LOST, append, finished_keys, lost_record, read_records, shard_path, where

EXECUTORS = ("local", "gpus", "slurm")
EXECUTOR_FILE = "executor.json"  # the executor and its options, for --resume
SLURM_DIR = "slurm"  # submitit's folder in the run folder: job scripts, pickles, logs

# squeue states of a job array task that may still write records.
_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
           "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD"}
# How SLURM says why it ended a task, in the task's stderr (written by slurmstepd).
_ENDINGS = [("DUE TO TIME LIMIT", "killed by its time limit"), ("DUE TO PREEMPTION", "preempted"),
            ("DUE TO NODE FAILURE", "its node failed"), ("CANCELLED AT", "cancelled")]
_ENDING_STATES = {"TIMEOUT": "killed by its time limit", "PREEMPTED": "preempted", "NODE_FAIL": "its node failed",
                  "CANCELLED": "cancelled", "OUT_OF_MEMORY": "killed for exceeding its memory",
                  "BOOT_FAIL": "its node failed to boot", "DEADLINE": "past its deadline", "FAILED": "failed"}


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus_per_task: int | None = None  # None: 1 for cuda cells, 0 for cpu cells
    cpus_per_task: int | None = None  # None: the run's --threads for cpu cells, 4 for cuda cells
    time_limit: int = 60  # minutes per array task
    array_parallelism: int = 256
    cells_per_task: int = 4
    sbatch: list[str] = field(default_factory=list)  # extra flags, "--key=value" or "--flag"


# --- command line -------------------------------------------------------------------------

def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where cells run (--executor)")
    g.add_argument("--executor", choices=EXECUTORS,
                   help="local: one cell after another here (default); gpus: one worker per visible GPU of this "
                        "machine, each pinned with CUDA_VISIBLE_DEVICES; slurm: SLURM job-array tasks through "
                        "submitit, each writing its own shard of records (with --resume: the run's executor)")
    for dest, kw in SLURM_OPTIONS.items():
        g.add_argument("--" + dest.replace("_", "-"), **kw)


#: The options of --executor slurm, by destination (the flag is the name with dashes): one list for
#: the command line, the check that they come with --executor slurm, and SlurmOptions (all but
#: --dry-run, which is stored nowhere).
SLURM_OPTIONS: dict[str, dict[str, Any]] = {
    "partition": dict(metavar="NAME", help="slurm: partition (default: the cluster's default)"),
    "gpus_per_task": dict(type=nonneg_int, metavar="N",
                          help="slurm: GPUs per array task (default 1 for --device cuda, 0 for cpu)"),
    "cpus_per_task": dict(type=positive_int, metavar="N",
                          help="slurm: CPUs per array task (default: --threads for cpu cells, 4 for cuda cells)"),
    "time_limit": dict(type=positive_int, metavar="MIN",
                       help="slurm: time limit of each array task in minutes (default 60); cells a task has not "
                            "finished by then are recorded as lost and --resume submits them again"),
    "array_parallelism": dict(type=positive_int, metavar="N",
                              help="slurm: at most N array tasks running at once (default 256)"),
    "cells_per_task": dict(type=positive_int, metavar="N", help="slurm: cells per array task (default 4)"),
    "sbatch": dict(action="append", metavar="FLAG",
                   help="slurm: an extra sbatch flag, e.g. --sbatch=--account=proj --sbatch=--qos=high (repeatable)"),
    "dry_run": dict(action="store_true", help="slurm: print the job script and the cells of each array task; submit nothing"),
}


def resolve(args: argparse.Namespace, run_dir: Path | None) -> tuple[str, SlurmOptions]:
    """The executor and its options: the command line's, else (on --resume) the run's."""
    stored: dict[str, Any] = {}
    if run_dir is not None and (Path(run_dir) / EXECUTOR_FILE).exists():
        stored = json.loads((Path(run_dir) / EXECUTOR_FILE).read_text())
    name = args.executor or stored.get("executor") or "local"
    given = [a for a in SLURM_OPTIONS if getattr(args, a, None) not in (None, False)]
    if name != "slurm" and given:
        flags = ", ".join(f"--{a.replace('_', '-')}" for a in given)
        raise UsageError(f"{flags} {'applies' if len(given) == 1 else 'apply'} to --executor slurm only "
                         f"(this run's executor is {name})")
    opts = SlurmOptions(**{k: v for k, v in (stored.get("slurm") or {}).items() if k in SlurmOptions.__dataclass_fields__})
    for a in SLURM_OPTIONS:
        if a == "dry_run":
            continue
        if getattr(args, a, None) is not None:
            setattr(opts, a, getattr(args, a))
    for flag in opts.sbatch:
        _sbatch_flag(flag)  # refuse bad ones before anything is created
    return name, opts


def save(run_dir: Path, name: str, opts: SlurmOptions) -> None:
    from .runs import write_json

    path = Path(run_dir) / EXECUTOR_FILE
    jobs = json.loads(path.read_text()).get("jobs", []) if path.exists() else []  # kept across resumes
    write_json(path, {"executor": name, "slurm": asdict(opts) if name == "slurm" else None, "jobs": jobs})


def run(name: str, opts: SlurmOptions, cells, config, run_dir: Path, done: set[str],
        on_start: Callable | None = None, on_done: Callable | None = None) -> int:
    """Measure every cell of ``cells`` not in ``done`` with executor ``name``."""
    if name == "local":
        from .runner import run_cells

        return run_cells(cells, config, run_dir, done, on_start=on_start, on_done=on_done)
    if name == "gpus":
        return run_gpus(cells, config, run_dir, done, gpu_slots(config), on_start=on_start, on_done=on_done)
    return run_slurm(cells, config, run_dir, done, opts, on_done=on_done)


def check(name: str, config) -> None:
    """Refuse an executor that cannot work here, before a run folder is made."""
    if name != "local" and not config.isolate:
        raise UsageError(f"--no-isolate measures in this process; --executor {name} runs every cell in a worker "
                         "process of its own (drop --no-isolate, or use --executor local)")
    if name == "gpus":
        gpu_slots(config)
    elif name == "slurm":
        _import_submitit()
        missing = [c for c in ("sbatch", "squeue", "srun") if shutil.which(c) is None]
        if missing:
            raise UsageError(f"--executor slurm: {', '.join(missing)} not found on PATH; run this on a SLURM login "
                             "node (or start a local test cluster with .ci/slurm-up)")


# --- gpus: one worker per visible GPU -------------------------------------------------------

@dataclass(frozen=True)
class Slot:
    visible: str  # what CUDA_VISIBLE_DEVICES gets: an index or a GPU UUID
    index: int | str  # the GPU's index on this machine, as nvidia-smi counts (where known)
    name: str | None


def gpu_slots(config) -> list[Slot]:
    """This machine's GPUs as pool slots, or a :class:`UsageError` saying why there are none."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UsageError("--executor gpus runs one worker per GPU, and torch sees no CUDA GPU on this machine "
                         f"(torch {torch.__version__}); use --executor local")
    if config.device != "cuda":
        raise UsageError(f"--executor gpus measures cuda cells; this run's device is {config.device} "
                         "(give --device cuda, or use --executor local)")
    # Honour a CUDA_VISIBLE_DEVICES set by the caller: the pool is the GPUs it names.
    parent = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    ids = parent[:count] if parent else [str(i) for i in range(count)]
    return [Slot(ids[i], int(ids[i]) if ids[i].isdigit() else ids[i], torch.cuda.get_device_name(i))
            for i in range(count)]


def run_gpus(cells, config, run_dir: Path, done: set[str], slots: list[Slot],
             on_start: Callable | None = None, on_done: Callable | None = None) -> int:
    """Measure the cells not in ``done``, one worker per slot at a time. Only this thread writes
    records (one writer, one file). ``slots`` may be any list of ``CUDA_VISIBLE_DEVICES`` values
    (the tests pass fake ones for CPU cells)."""
    import queue

    from .runner import measure_processes, precheck
    from .runs import append_record

    todo: queue.SimpleQueue = queue.SimpleQueue()
    for cell in cells:
        if cell.key() not in done:
            todo.put(cell)
    results: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def worker(slot: Slot) -> None:
        while not stop.is_set():
            try:
                cell = todo.get_nowait()
            except queue.Empty:
                break
            results.put(("start", cell, slot, None))
            try:
                record = precheck(cell, config.directions)
                if record is None:
                    record = measure_processes(cell, config, env={"CUDA_VISIBLE_DEVICES": slot.visible})
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                results.put(("fail", cell, slot, exc))
                return
            results.put(("done", cell, slot, record))
        results.put(("exit", None, slot, None))

    # Daemon threads: on Ctrl-C this thread returns at once; a worker process in flight finishes
    # its cell (or times out) and its record is dropped, as with the local executor.
    threads = [threading.Thread(target=worker, args=(s,), daemon=True, name=f"gpu-{s.visible}") for s in slots]
    for t in threads:
        t.start()
    measured, running = 0, len(threads)
    try:
        while running:
            kind, cell, slot, payload = results.get()
            if kind == "exit":
                running -= 1
            elif kind == "fail":
                raise payload
            elif kind == "start":
                if on_start:
                    on_start(cell)
            else:
                payload["where"] = where("gpus", cell.device, gpu_index=slot.index, gpu_name=slot.name)
                payload["where"]["cuda_visible_devices"] = slot.visible
                append_record(run_dir, payload)
                done.add(cell.key())
                measured += 1
                if on_done:
                    on_done(cell, payload)
    finally:
        stop.set()
    return measured


# --- slurm: job-array tasks through submitit --------------------------------------------------

def _import_submitit():
    try:
        import submitit
    except ImportError:
        raise UsageError("--executor slurm needs submitit (pip install submitit)") from None
    return submitit


def _sbatch_flag(flag: str) -> tuple[str, Any]:
    """``--key=value`` → ``("key", "value")``; ``--flag`` → ``("flag", True)``."""
    m = re.fullmatch(r"--?([A-Za-z][A-Za-z0-9_-]*)(?:[= ](.+))?", flag.strip())
    if not m:
        raise UsageError(f"--sbatch {flag!r}: expected an sbatch flag such as --account=NAME or --exclusive")
    key = m.group(1).replace("_", "-")
    if key in ("array", "output", "error", "wrap"):
        raise UsageError(f"--sbatch {flag!r}: --{key} is set by the executor itself")
    return key, (m.group(2) if m.group(2) is not None else True)


def groups_of(keys: list[str], per_task: int) -> list[list[str]]:
    """Cells dealt round-robin to ceil(n / per_task) tasks: neighbouring cells of a sweep (similar
    cost) land in different tasks, so tasks take about equally long."""
    n = max(1, -(-len(keys) // per_task))
    return [keys[i::n] for i in range(n) if keys[i::n]]


def make_executor(run_dir: Path, opts: SlurmOptions, config):
    from .runs import ROOT

    submitit = _import_submitit()
    try:
        ex = submitit.SlurmExecutor(folder=Path(run_dir) / SLURM_DIR / "%j")
    except RuntimeError as exc:  # no srun on this machine
        raise UsageError(f"--executor slurm: {exc}") from None
    gpus = opts.gpus_per_task if opts.gpus_per_task is not None else (1 if config.device == "cuda" else 0)
    cpus = opts.cpus_per_task or ((config.threads or 1) if config.device == "cpu" else 4)
    extra: dict[str, Any] = {
        # Tasks import this very code tree, wherever the package is installed: it goes first on
        # the path, and tasks start in it (python -m puts the working directory first).
        "chdir": str(ROOT),
        # submitit always asks for SIGUSR2 90 s before the time limit and answers it by requeueing
        # the job; SLURM may send it up to a minute early, so a job shorter than that is requeued
        # at once, again and again, and the signal also kills the worker measuring a cell. Nothing
        # here needs a warning (every finished cell is on disk), so point it at a no-op: SIGCONT
        # to the batch shell only.
        "signal": "B:CONT@60",
    }
    for flag in opts.sbatch:
        key, value = _sbatch_flag(flag)
        extra[key] = value
    params: dict[str, Any] = dict(
        job_name="invconv-bench", time=opts.time_limit, nodes=1, ntasks_per_node=1, cpus_per_task=cpus,
        array_parallelism=opts.array_parallelism, stderr_to_stdout=False,
        setup=[f"export PYTHONPATH={shlex.quote(str(ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}"],
        additional_parameters=extra,
    )
    if gpus:
        params["gpus_per_task"] = gpus
    if opts.partition:
        params["partition"] = opts.partition
    ex.update_parameters(**params)
    return ex


def job_script(ex, n_tasks: int) -> str:
    """The sbatch script submitit writes for an array of ``n_tasks`` (for --dry-run)."""
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor submits for an array

    return _make_sbatch_string(command=ex._submitit_command_str, folder=ex.folder, map_count=n_tasks,
                               **ex.parameters)


def dry_run(cells, config, run_dir: Path | None, done: set[str], opts: SlurmOptions, out=None) -> int:
    """Print what ``--executor slurm`` would submit, submitting nothing."""
    out = out or sys.stdout
    keys = [c.key() for c in cells if c.key() not in done]
    by_key = {c.key(): c for c in cells}
    groups = groups_of(keys, opts.cells_per_task)
    folder = Path(run_dir) if run_dir is not None else Path("/RUN_DIR")  # a placeholder: no folder yet
    ex = make_executor(folder, opts, config)
    print(f"# dry run: {len(keys)} cells in {len(groups)} array tasks "
          f"({len(cells) - len(keys)} already finished); nothing submitted", file=out)
    print(job_script(ex, len(groups)), file=out)
    for i, group in enumerate(groups):
        print(f"# task {i}: " + "; ".join(by_key[k].label() for k in group), file=out)
    return 0


def active_jobs(run_dir: Path) -> list[str]:
    """The run's earlier SLURM array jobs that still have tasks queued or running."""
    path = Path(run_dir) / EXECUTOR_FILE
    if not path.exists():
        return []
    jobs = json.loads(path.read_text()).get("jobs") or []
    active = []
    for job in jobs:
        states = _squeue(job)
        if states is None:
            raise UsageError(f"squeue cannot say whether job {job} of this run still runs; try again")
        if any(state in _ACTIVE for state in states.values()):
            active.append(job)
    return active


def _squeue(job_id: str) -> dict[str, str] | None:
    """State of each task of array job ``job_id`` (``{"123_4": "RUNNING", "123_[5-9]": "PENDING"}``),
    ``{}`` once SLURM has forgotten the job, None when squeue cannot be asked."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%i %T"], capture_output=True,
                             text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return {} if "Invalid job id" in out.stderr else None
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


def run_slurm(cells, config, run_dir: Path, done: set[str], opts: SlurmOptions,
              on_done: Callable | None = None, poll: float = 2.0) -> int:
    """Submit the cells not in ``done`` as one job array, follow the shards until every task has
    ended, and record the assigned cells no task finished as ``lost``. Returns the number of cells
    measured."""
    from .runs import append_record

    still = active_jobs(run_dir)
    if still:
        raise UsageError(f"SLURM job {', '.join(still)} of this run is still queued or running; wait for it, or "
                         f"stop it with scancel {' '.join(still)}, then resume")
    by_key = {c.key(): c for c in cells}
    keys = [k for k in by_key if k not in done]
    if not keys:
        return 0
    groups = groups_of(keys, opts.cells_per_task)
    run_dir = Path(run_dir).resolve()
    ex = make_executor(run_dir, opts, config)
    jobs = ex.map_array(slurm_task, [str(run_dir)] * len(groups), groups)
    array_id = jobs[0].job_id.split("_")[0]
    _remember_job(run_dir, array_id)
    print(f"submitted SLURM job array {array_id}: {len(keys)} cells in {len(groups)} tasks "
          f"(logs in {run_dir / SLURM_DIR})", file=sys.stderr)

    reported: set[str] = set()  # measured by this array
    accounted: set[str] = set()  # recorded as lost by a task of this array (it was stopped)
    last_states: dict[str, str] = {}
    wanted = set(keys)

    def follow() -> None:
        for rec in read_records(run_dir, conflicts=[]):
            k = rec["key"]
            if k not in wanted or k in reported:
                continue
            if rec.get("status") == LOST:
                w = rec.get("where") or {}
                if (w.get("slurm_array_job_id") or w.get("slurm_job_id")) == array_id:  # one task: no array
                    accounted.add(k)
            else:
                reported.add(k)
                done.add(k)
                if on_done:
                    on_done(by_key[k], rec)

    try:
        unreachable_since = None
        while True:
            states = _squeue(array_id)
            follow()
            if states is None:  # slurmctld busy or restarting: keep the tasks' shards, ask again
                unreachable_since = unreachable_since or time.monotonic()
                if time.monotonic() - unreachable_since > 600:
                    raise RuntimeError(f"squeue has not answered for 10 minutes; job {array_id} may still run: "
                                       f"its cells land in {run_dir}/shards, and --resume collects them")
            else:
                unreachable_since = None
                last_states.update(states)
                if not any(s in _ACTIVE for s in states.values()):
                    break
            time.sleep(poll)
    except KeyboardInterrupt:
        print(f"\nSLURM job {array_id} keeps running; its cells land in {run_dir}/shards. Stop it with "
              f"scancel {array_id}; once it has ended, --resume {run_dir} submits what is missing",
              file=sys.stderr)
        raise
    follow()

    # Cells no task finished: say why, per task, and record them as lost.
    for i, (job, group) in enumerate(zip(jobs, groups)):
        unfinished = [k for k in group if k not in reported]
        if not unfinished:
            continue
        why = _why_ended(job, last_states.get(job.job_id))
        print(f"SLURM task {job.job_id} {why}: {len(group) - len(unfinished)} of its {len(group)} cells finished, "
              f"{len(unfinished)} lost", file=sys.stderr)
        missing = [k for k in unfinished if k not in accounted]
        for k in missing:
            rec = lost_record(asdict(by_key[k]), k, config.directions,
                              f"SLURM task {job.job_id} {why} before this cell finished; --resume runs it again")
            rec["where"] = where("slurm")
            rec["where"].update(slurm_job_id=None, slurm_array_job_id=array_id, slurm_array_task_id=str(i))
            append_record(run_dir, rec)
    return len(reported)


def _remember_job(run_dir: Path, job_id: str) -> None:
    from .runs import write_json

    path = Path(run_dir) / EXECUTOR_FILE
    data = json.loads(path.read_text()) if path.exists() else {"executor": "slurm"}
    data["jobs"] = [*data.get("jobs", []), job_id]
    write_json(path, data)


def _why_ended(job, state: str | None) -> str:
    """Why a task ended without finishing its cells: SLURM's words in the task's log, its last
    state in squeue, or the exception the task raised."""
    try:
        log = Path(job.paths.stderr).read_text(errors="replace")
    except OSError:
        log = ""
    for marker, why in _ENDINGS:
        if marker in log:
            return why
    if state and state.split()[0] in _ENDING_STATES:
        return _ENDING_STATES[state.split()[0]]
    if Path(job.paths.result_pickle).exists():
        try:
            job.result()
        except Exception as exc:  # noqa: BLE001 - its message is the reason
            lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
            return f"failed ({lines[-1] if lines else type(exc).__name__})"
    return f"ended ({state or 'state unknown'})"


def slurm_task(run_dir: str, keys: list[str]) -> dict[str, int]:
    """One array task (runs on a compute node): measure ``keys``, appending each record to this
    task's shard. A requeued task skips the cells its earlier run finished. When SLURM ends the
    task (SIGTERM: time limit, preemption, scancel), the cell in flight and the rest are
    recorded as lost, so nothing that ran half counts as measured."""
    from .runner import measure_processes, precheck
    from .runs import CONFIG, read_json
    from ..sweep.cells import SweepConfig, expand

    ending: list[str] = []

    def on_term(signum, frame):  # noqa: ARG001
        ending.append(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_term)
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID", "nojob")
    task = os.environ.get("SLURM_ARRAY_TASK_ID", "0")
    shard = shard_path(run_dir, f"{job}_{task}")
    config = SweepConfig.from_json(read_json(Path(run_dir) / CONFIG))
    cells = {c.key(): c for c in expand(config)}
    finished = finished_keys(read_records(run_dir, conflicts=[]))
    measured = 0
    for key in keys:
        if key in finished:
            continue
        cell = cells[key]
        if ending:
            record = lost_record(asdict(cell), key, config.directions,
                                 f"SLURM task {job}_{task} was stopped ({ending[0]}) before this cell started; "
                                 "--resume runs it again")
        else:
            record = precheck(cell, config.directions) or measure_processes(cell, config)
            if ending and record.get("status") != "ok":
                record = lost_record(asdict(cell), key, config.directions,
                                     f"SLURM task {job}_{task} was stopped ({ending[0]}) while measuring this "
                                     "cell; --resume runs it again")
            else:
                measured += 1
        record["where"] = where("slurm", cell.device)
        append(shard, record)
    return {"measured": measured}
