"""Run cells: each in a fresh worker process with a timeout (default) or in this process.

A cell's record is assembled from what the worker streamed before it finished, crashed or was
killed, so a timeout or a crash in the train direction still keeps the forward and sampling
numbers. The sweep loop appends each record to the run's ``results.jsonl`` before starting the
next cell.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..timing.measure import TimingPolicy
from ..records import assemble, worst_status
from .zygote import Zygote, ZygoteError
from .runs import ROOT, append_record
from .shards import where
from ..sweep.cells import Cell, SweepConfig



def policy_of(config: SweepConfig) -> TimingPolicy:
    return TimingPolicy(warmup=config.warmup, warmup_time=config.warmup_time, repeat=config.repeat,
                        min_time=config.min_time, max_time=config.max_time, cold_cache=config.cold_cache)


def _process_median(samples: list[float]) -> float:
    v = sorted(samples)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def merge_processes(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One results record from a cell's records measured in several worker processes.

    The process is the unit of evidence (a process is lucky or unlucky as a whole; see
    ``bench/regression/statistics.py``): per direction the record keeps every process's samples, in order,
    with ``round_sizes`` saying how many each contributed, and ``process_medians_ms``; its
    ``median_ms`` is the median of the process medians and ``process_min_ms``/``process_max_ms``
    their spread (``p20_ms``/``p80_ms``, ``mean_ms``, ``std_ms`` stay statistics of all samples).
    A direction is ``unstable`` when at least half of its processes were, since then the median
    over processes may itself be the machine's. A direction that failed in any process takes the
    most telling failure's status and message.
    """
    from ..timing.stats import Measurement

    if len(records) == 1:
        return records[0]
    merged = {k: v for k, v in records[-1].items() if k != "directions"}
    merged["processes"] = len(records)
    merged["directions"] = {}
    names = list(dict.fromkeys(d for r in records for d in r.get("directions", {})))
    for name in names:
        ds = [r["directions"].get(name, {"status": "error", "message": "not measured in this process"})
              for r in records]
        if all(d.get("status") == "ok" and d.get("samples_ms") for d in ds):
            samples = [s for d in ds for s in d["samples_ms"]]
            medians = [_process_median(d["samples_ms"]) for d in ds]
            firsts = sorted(d["first_call_ms"] for d in ds if d.get("first_call_ms") is not None)
            mems = [d["peak_mem_bytes"] for d in ds if d.get("peak_mem_bytes") is not None]
            unstable = [d for d in ds if d.get("unstable")]
            out = {
                **ds[-1], "samples_ms": samples, "round_sizes": [len(d["samples_ms"]) for d in ds],
                **Measurement(samples).summary(),
                "median_ms": _process_median(medians), "process_medians_ms": medians,
                "process_min_ms": min(medians), "process_max_ms": max(medians), "processes": len(ds),
                "first_call_ms": firsts[len(firsts) // 2] if firsts else None,
                "peak_mem_bytes": max(mems) if mems else None,
                "usage": [d.get("usage") for d in ds],
                "unstable": 2 * len(unstable) >= len(ds),
                "unstable_processes": len(unstable),
            }
            out.pop("unstable_reasons", None)
            if unstable:  # the first unstable process's reasons stand for the others
                out["unstable_reasons"] = list(unstable[0].get("unstable_reasons", []))
            merged["directions"][name] = out
        else:
            worst_of = worst_status([d.get("status", "error") for d in ds])
            worst = next(d for d in ds if d.get("status", "error") == worst_of)
            merged["directions"][name] = {**worst, "processes_ok": sum(d.get("status") == "ok" for d in ds)}
    statuses = [d["status"] for d in merged["directions"].values()] or [records[-1].get("status", "error")]
    merged["status"] = worst_status(statuses)
    bad = [d.get("message") for d in merged["directions"].values() if d["status"] == merged["status"]]
    merged["message"] = next((m for m in bad if m), records[-1].get("message", ""))
    return merged


def measure_processes(cell: Cell, config: SweepConfig, zygote: Any = None,
                      env: dict[str, str] | None = None) -> dict[str, Any]:
    """``cell`` measured in ``config.processes`` fresh worker processes, one after another, merged
    (:func:`merge_processes`). A cell that does not come out ``ok`` in its first process is not
    measured again: repeating an error or a timeout only costs time."""
    records = []
    for i in range(max(1, config.processes)):
        record = run_isolated(cell, config, zygote=zygote, env=env)
        records.append(record)
        if i == 0 and record.get("status") != "ok":
            break
    return merge_processes(records)


def _request(cell: Cell, config: SweepConfig) -> dict[str, Any]:
    return {"cell": asdict(cell), "policy": asdict(policy_of(config)), "seed": config.seed,
            "threads": config.threads, "directions": list(config.directions)}


# The worker's start (a fresh interpreter importing torch: ~1.5 s, much more on a loaded machine)
# is not part of a cell's time: the timeout starts when the worker says it is ready, and the start
# itself gets this long.
STARTUP_TIMEOUT = 120.0
PARENT_ENV = "INVCONV_BENCH_PARENT_PID"  # the worker exits when this process dies (bench/worker.py)


class CellTimeout(BaseException):
    """Raised by the ``--no-isolate`` alarm. A ``BaseException``, so that the per-direction
    ``except Exception`` of :func:`bench.timing.measure.measure_cell` cannot record it as an error and
    carry on with the next direction without a limit."""


def _oom_kills() -> int | None:
    """Out-of-memory kills so far: this cgroup's (v2) and the whole system's, summed; ``None`` if
    neither is readable. A SIGKILLed worker was killed by the OOM killer if this grew meanwhile."""
    total, found = 0, False
    try:
        with open("/proc/vmstat") as fh:
            for line in fh:
                if line.startswith("oom_kill "):
                    total, found = total + int(line.split()[1]), True
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/self/cgroup") as fh:
            rel = next((ln.split(":", 2)[2].strip() for ln in fh if ln.startswith("0::")), None)
        if rel is not None:
            with open(f"/sys/fs/cgroup{rel.rstrip('/')}/memory.events") as fh:
                for line in fh:
                    if line.startswith("oom_kill "):
                        total, found = total + int(line.split()[1]), True
    except (OSError, ValueError):
        pass
    return total if found else None


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (the worker and whatever the layer started)."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _limit(timeout: float | None) -> float | None:
    """``--timeout 0`` (or none) means no limit, with or without isolation."""
    return timeout if timeout and timeout > 0 else None


def worker_env(root: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker running ``root``'s code (``extra`` on top: ``--executor gpus``
    pins CUDA_VISIBLE_DEVICES)."""
    env = {**os.environ, **(extra or {})}
    # The worker must run that very code, installed or not: its tree goes first on the path, and
    # it starts in that tree, because `python -m` puts the working directory before PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env[PARENT_ENV] = str(os.getpid())
    return env


def run_isolated(cell: Cell, config: SweepConfig, root: Path | None = None, zygote: Any = None,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure ``cell`` in a fresh worker process, killed after ``config.timeout``: forked from
    ``zygote`` (a :class:`bench.execution.zygote.Zygote` of this tree) when given, else a new
    ``python -m bench.worker`` process. ``env``: variables set for a new worker on top of this
    process's.

    ``root``: the code tree whose ``bench`` and ``layers`` the worker imports (default: this
    one, :data:`bench.execution.runs.ROOT`). ``bench ab`` passes a checkout of another revision; that
    revision's worker must accept this revision's request (see ``bench/regression/ab.py``).

    The worker leads its own process group; the group is killed when the cell ends in any way
    (finished, timed out, interrupted), so a process the layer started cannot outlive the cell
    or keep its pipes (and so this call) open. The worker also kills its group when this process
    dies (see ``bench/worker.py``); Linux ties that to the *thread* that started it, so call
    this from a thread that lives as long as the cell (the main thread, or a pool's worker).
    """
    if zygote is not None:
        oom_before = _oom_kills()
        messages, returncode, timed_out, err = zygote.run(_request(cell, config), _limit(config.timeout))
        return _record_of(cell, config, messages, returncode, timed_out, err, oom_before)
    import threading
    import time

    root = Path(root) if root is not None else ROOT
    env = worker_env(root, env)
    oom_before = _oom_kills()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env=env, cwd=root,
        start_new_session=True,  # Ctrl-C reaches us, not the worker; we stop its whole group ourselves
    )
    lines: list[str] = []
    ready_at: list[float] = []  # when the worker said it was ready
    err_chunks: list[bytes] = []

    def read_out() -> None:
        for raw in proc.stdout:
            line = raw.decode("utf-8", "replace")
            lines.append(line)
            if not ready_at and line.startswith('{"type": "ready"'):
                ready_at.append(time.monotonic())

    def read_err() -> None:
        while chunk := proc.stderr.read1(65536):
            err_chunks.append(chunk)
            if sum(map(len, err_chunks)) > 1 << 20:  # keep the tail only: a chatty layer must not fill memory
                del err_chunks[: len(err_chunks) // 2]

    readers = [threading.Thread(target=read_out, daemon=True), threading.Thread(target=read_err, daemon=True)]
    for t in readers:
        t.start()
    timed_out = startup_failed = False
    limit = _limit(config.timeout)
    try:
        try:
            proc.stdin.write(json.dumps(_request(cell, config)).encode())
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass  # the worker died at once; its exit status says why
        # The limit counts from the worker's "ready"; before that, the start-up gets STARTUP_TIMEOUT
        # more (a worker of another revision that never says "ready" still gets the whole limit).
        start = time.monotonic()
        while proc.poll() is None:
            if limit is None:
                proc.wait()
                break
            deadline = ready_at[0] + limit if ready_at else start + STARTUP_TIMEOUT + limit
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out, startup_failed = bool(ready_at), not ready_at
                break
            try:
                proc.wait(timeout=min(left, 0.05 if not ready_at else left))
            except subprocess.TimeoutExpired:
                pass
    finally:
        # Always, also on KeyboardInterrupt: nothing the cell started may outlive it.
        kill_group(proc.pid)
        proc.wait()
        for t in readers:
            t.join(timeout=5)  # a grandchild that escaped the group could hold a pipe; do not wait for it
    err = b"".join(err_chunks).decode("utf-8", "replace")
    messages = []
    for line in lines:
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(m, dict):
            messages.append(m)
    return _record_of(cell, config, messages, proc.returncode, timed_out, err, oom_before, startup_failed)


def _record_of(cell: Cell, config: SweepConfig, messages: list[dict[str, Any]], returncode: int | None,
               timed_out: bool, err: str, oom_before: int | None, startup_failed: bool = False) -> dict[str, Any]:
    """A cell's record from what its worker reported and how it ended."""
    finished = any(m.get("type") == "cell" for m in messages)
    last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")
    if timed_out:
        status, message = "timeout", f"cell exceeded --timeout {config.timeout:g} s"
    elif startup_failed:
        status, message = "timeout", (f"cell exceeded --timeout {config.timeout:g} s (the worker never said it was "
                                      f"ready; {STARTUP_TIMEOUT:g} s were allowed for its start)")
    elif returncode == -signal.SIGKILL and not finished:
        oom_after = _oom_kills()
        if oom_before is not None and oom_after is not None and oom_after > oom_before:
            status, message = "oom", "worker was killed by the out-of-memory killer (SIGKILL)"
        elif oom_before is not None and oom_after is not None:
            status, message = "error", "worker was killed by SIGKILL, not by the out-of-memory killer (by a person?)"
        else:
            status, message = "oom", "worker was killed by SIGKILL (out of memory, or killed)"
    elif not finished:
        rc = returncode
        how = f"signal {-rc}" if rc < 0 else f"exit status {rc}"
        status, message = "error", f"worker died ({how})" + (f": {last}" if last else "")
    else:
        status, message = "error", "worker did not report this direction"
    record = assemble(cell, messages, config.directions, status, message)
    if (timed_out or not finished) and err.strip():
        record["stderr_tail"] = err.strip()[-2000:]
    return record


def run_in_process(cell: Cell, config: SweepConfig) -> dict[str, Any]:
    """Measure ``cell`` here (``--no-isolate``): faster to start, but one crash ends the sweep,
    memory readings include earlier cells' leftovers, and the timeout is best effort (it cannot
    interrupt a long native call). A timeout ends the whole cell: the directions not finished by
    then are recorded as ``timeout``."""
    from ..timing.measure import measure_cell

    messages: list[dict[str, Any]] = []
    timed_out = False

    def on_alarm(signum, frame):  # noqa: ARG001
        raise CellTimeout

    limit = _limit(config.timeout)
    use_alarm = hasattr(signal, "SIGALRM") and limit is not None
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        measure_cell(cell, policy_of(config), messages.append, seed=config.seed, threads=config.threads,
                     directions=tuple(config.directions))
    except CellTimeout:
        timed_out = True
    finally:
        if use_alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    status, message = ("timeout", f"cell exceeded --timeout {config.timeout:g} s") if timed_out else ("error", "")
    return assemble(cell, messages, config.directions, status, message)


def precheck(cell: Cell, directions: Iterable[str]) -> dict[str, Any] | None:
    """A record for a cell the layer declares unsupported, without starting a worker."""
    import layers

    from ..timing.measure import check_cell

    try:
        check_cell(cell)
    except layers.UnsupportedError as exc:
        return assemble(cell, [{"type": "cell", "status": "unsupported", "message": str(exc)}], directions)
    return None


def run_cells(cells: list[Cell], config: SweepConfig, run_dir: Path, done: set[str],
              on_start: Callable[[Cell], None] | None = None,
              on_done: Callable[[Cell, dict[str, Any]], None] | None = None) -> int:
    """Measure every cell not in ``done``, appending each record to ``run_dir`` as it finishes.

    Returns the number of cells measured. ``KeyboardInterrupt`` propagates after the cell in
    flight is abandoned (everything finished before it is already on disk).
    """
    if config.metric == "instructions":
        return _count_cells(cells, config, run_dir, done, on_done)
    measured = 0
    zygote = None
    try:
        for cell in cells:
            if cell.key() in done:
                continue
            if on_start:
                on_start(cell)
            record = precheck(cell, config.directions)
            if record is None and config.isolate:
                if zygote is None:
                    zygote = _start_zygote()
                try:
                    record = measure_processes(cell, config, zygote or None)
                except ZygoteError as exc:
                    print(f"note: {exc}; measuring the remaining cells in new interpreter processes",
                          file=sys.stderr)
                    zygote.close()
                    zygote = False
                    record = measure_processes(cell, config)
            elif record is None:
                record = run_in_process(cell, config)
            _save(run_dir, done, cell, record, on_done)
            measured += 1
    finally:
        if zygote:
            zygote.close()
    return measured


def _save(run_dir: Path, done: set[str], cell: Cell, record: dict[str, Any],
          on_done: Callable[[Cell, dict[str, Any]], None] | None) -> None:
    """A finished cell: where it ran, appended to the run (fsync'ed) before anything else happens."""
    record["where"] = where("local", cell.device)
    append_record(run_dir, record)
    done.add(cell.key())
    if on_done:
        on_done(cell, record)


def _start_zygote():
    """A fork server of this tree (``bench/execution/zygote.py``), or False (with a note) where none starts."""
    if not hasattr(os, "fork"):
        return False
    try:
        return Zygote(ROOT, worker_env(ROOT))
    except ZygoteError as exc:
        print(f"note: {exc}; measuring in new interpreter processes instead", file=sys.stderr)
        return False


def _count_cells(cells: list[Cell], config: SweepConfig, run_dir: Path, done: set[str],
                 on_done: Callable[[Cell, dict[str, Any]], None] | None) -> int:
    """``--metric instructions``: every cell in one callgrind process (bench/execution/instructions.py)."""
    from .instructions import count_cells

    todo: list[Cell] = []
    by_key: dict[str, Cell] = {}
    measured = 0

    def finish(cell: Cell, record: dict[str, Any]) -> None:
        nonlocal measured
        _save(run_dir, done, cell, record, on_done)
        measured += 1

    for cell in cells:
        if cell.key() in done:
            continue
        record = precheck(cell, config.directions)
        if record is not None:
            record["metric"] = "instructions"
            finish(cell, record)
        else:
            todo.append(cell)
            by_key[cell.key()] = cell
    count_cells(todo, config.directions, lambda rec: finish(by_key[rec["key"]], rec), timeout=config.timeout,
                seed=config.seed)
    return measured
