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
from .runs import ROOT, append_record
from .shards import where
from .sweep import Cell, SweepConfig

# When a direction fails, the cell's status is the most telling of its directions' statuses.
_STATUS_PRIORITY = ["unsupported", "oom", "timeout", "error", "nonfinite", "ok"]


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
    record["status"] = min(statuses, key=_STATUS_PRIORITY.index)
    if build_status is not None:
        record["message"] = build_message
    else:
        bad = [d.get("message") for d in record["directions"].values() if d["status"] == record["status"]]
        record["message"] = next((m for m in bad if m), "")
    return record


def _request(cell: Cell, config: SweepConfig) -> dict[str, Any]:
    return {"cell": asdict(cell), "policy": asdict(policy_of(config)), "seed": config.seed,
            "threads": config.threads, "directions": list(config.directions)}


def run_isolated(cell: Cell, config: SweepConfig, root: Path | None = None,
                 env: dict[str, str] | None = None) -> dict[str, Any]:
    """Measure ``cell`` in a fresh ``python -m bench.worker`` process, killed after ``config.timeout``.

    ``root``: the code tree whose ``bench`` and ``layers`` the worker imports (default: this
    one, :data:`bench.runs.ROOT`). ``bench ab`` passes a checkout of another revision; that
    revision's worker must accept this revision's request (see ``bench/ab.py``). ``env``: variables
    set for the worker on top of this process's (``--executor gpus`` pins CUDA_VISIBLE_DEVICES).
    """
    root = Path(root) if root is not None else ROOT
    env = {**os.environ, **(env or {})}
    # The worker must run that very code, installed or not: its tree goes first on the path, and
    # it starts in that tree, because `python -m` puts the working directory before PYTHONPATH.
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, env=env, cwd=root,
        start_new_session=True,  # Ctrl-C reaches us, not the worker; we stop it ourselves
    )
    timed_out = False
    try:
        out, err = proc.communicate(json.dumps(_request(cell, config)), timeout=config.timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        out, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.communicate()
        raise
    messages = []
    for line in out.splitlines():
        try:
            messages.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    finished = any(m.get("type") == "cell" for m in messages)
    if timed_out:
        status, message = "timeout", f"cell exceeded --timeout {config.timeout:g} s"
    elif proc.returncode == -signal.SIGKILL:
        status, message = "oom", "worker was killed by SIGKILL, most likely by the out-of-memory killer"
    elif proc.returncode != 0 or not finished:
        last = next((ln for ln in reversed(err.strip().splitlines()) if ln.strip()), "")
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        status, message = "error", f"worker died ({how}): {last}"
    else:
        status, message = "error", "worker did not report this direction"
    record = assemble(cell, messages, config.directions, status, message)
    if (timed_out or not finished) and err.strip():
        record["stderr_tail"] = err.strip()[-2000:]
    return record


def run_in_process(cell: Cell, config: SweepConfig) -> dict[str, Any]:
    """Measure ``cell`` here (``--no-isolate``): faster to start, but one crash ends the sweep,
    memory readings include earlier cells' leftovers, and the timeout is best effort (it cannot
    interrupt a long native call)."""
    from .measure import measure_cell

    messages: list[dict[str, Any]] = []
    timed_out = False

    def on_alarm(signum, frame):  # noqa: ARG001
        raise TimeoutError

    use_alarm = hasattr(signal, "SIGALRM") and config.timeout
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, on_alarm)
        signal.setitimer(signal.ITIMER_REAL, config.timeout)
    try:
        measure_cell(cell, policy_of(config), messages.append, seed=config.seed, threads=config.threads,
                     directions=tuple(config.directions))
    except TimeoutError:
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
        record["where"] = where("local", cell.device)
        append_record(run_dir, record)
        done.add(cell.key())
        measured += 1
        if on_done:
            on_done(cell, record)
    return measured
