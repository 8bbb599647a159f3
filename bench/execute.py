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

from .measure import TimingPolicy
from .records import STATUS_PRIORITY, worst_status
from .runs import ROOT, append_record
from .sweep import Cell, SweepConfig

_STATUS_PRIORITY = list(STATUS_PRIORITY)  # the old name, still imported by bench/ab.py


def policy_of(config: SweepConfig) -> TimingPolicy:
    return TimingPolicy(warmup=config.warmup, warmup_time=config.warmup_time, repeat=config.repeat,
                        min_time=config.min_time, max_time=config.max_time, cold_cache=config.cold_cache)


def assemble(cell: Cell, messages: list[dict[str, Any]], directions: Iterable[str],
             missing_status: str = "error", missing_message: str = "") -> dict[str, Any]:
    """One results record from the worker's messages; directions it never reported get
    ``missing_status`` (e.g. "timeout"), or the cell-level status if the cell failed to build."""
    record: dict[str, Any] = {"key": cell.key(), "cell": asdict(cell), "directions": {}}
    cell_msg: dict[str, Any] = {}
    memory: list[dict[str, Any]] = []
    for m in messages:
        if m.get("type") == "direction":
            record["directions"][m["direction"]] = {k: v for k, v in m.items() if k not in ("type", "direction")}
        elif m.get("type") == "memory":
            memory.append(m)
        elif m.get("type") == "cell":
            cell_msg = {k: v for k, v in m.items() if k != "type"}
    for m in memory:  # measured after all timing, so it arrives after the direction's record
        if m["direction"] in record["directions"]:
            record["directions"][m["direction"]].update({k: v for k, v in m.items() if k not in ("type", "direction")})
    build_status = cell_msg.pop("status", None)
    build_message = cell_msg.pop("message", None)
    record.update(cell_msg)
    for d in directions:
        if d not in record["directions"]:
            if build_status is not None:
                record["directions"][d] = {"status": build_status, "message": build_message or ""}
            else:
                record["directions"][d] = {"status": missing_status, "message": missing_message}
    statuses = [d["status"] for d in record["directions"].values()] or [build_status or missing_status]
    record["status"] = worst_status(statuses)
    if build_status is not None:
        record["message"] = build_message
    else:
        bad = [d.get("message") for d in record["directions"].values() if d["status"] == record["status"]]
        record["message"] = next((m for m in bad if m), "")
    return record


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
    ``except Exception`` of :func:`bench.measure.measure_cell` cannot record it as an error and
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


def run_isolated(cell: Cell, config: SweepConfig, root: Path | None = None) -> dict[str, Any]:
    """Measure ``cell`` in a fresh ``python -m bench.worker`` process, killed after ``config.timeout``.

    ``root``: the code tree whose ``bench`` and ``layers`` the worker imports (default: this
    one, :data:`bench.runs.ROOT`). ``bench ab`` passes a checkout of another revision; that
    revision's worker must accept this revision's request (see ``bench/ab.py``).

    The worker leads its own process group; the group is killed when the cell ends in any way
    (finished, timed out, interrupted), so a process the layer started cannot outlive the cell
    or keep its pipes (and so this call) open. The worker also kills its group when this process
    dies (see ``bench/worker.py``); Linux ties that to the *thread* that started it, so call
    this from a thread that lives as long as the cell (the main thread, or a pool's worker).
    """
    import threading
    import time

    root = Path(root) if root is not None else ROOT
    env = dict(os.environ)
    # The worker must run that very code, installed or not: its tree goes first on the path, and
    # it starts in that tree, because `python -m` puts the working directory before PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    env[PARENT_ENV] = str(os.getpid())
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
    finished = any(m.get("type") == "cell" for m in messages)
    last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")
    if timed_out:
        status, message = "timeout", f"cell exceeded --timeout {config.timeout:g} s"
    elif startup_failed:
        status, message = "timeout", (f"cell exceeded --timeout {config.timeout:g} s (the worker never said it was "
                                      f"ready; {STARTUP_TIMEOUT:g} s were allowed for its start)")
    elif proc.returncode == -signal.SIGKILL and not finished:
        oom_after = _oom_kills()
        if oom_before is not None and oom_after is not None and oom_after > oom_before:
            status, message = "oom", "worker was killed by the out-of-memory killer (SIGKILL)"
        elif oom_before is not None and oom_after is not None:
            status, message = "error", "worker was killed by SIGKILL, not by the out-of-memory killer (by a person?)"
        else:
            status, message = "oom", "worker was killed by SIGKILL (out of memory, or killed)"
    elif not finished:
        rc = proc.returncode
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
    from .measure import measure_cell

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

    from .measure import check_cell

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
    measured = 0
    for cell in cells:
        if cell.key() in done:
            continue
        if on_start:
            on_start(cell)
        record = precheck(cell, config.directions)
        if record is None:
            record = run_isolated(cell, config) if config.isolate else run_in_process(cell, config)
        append_record(run_dir, record)
        done.add(cell.key())
        measured += 1
        if on_done:
            on_done(cell, record)
    return measured
