"""A run from start to end, between the command line and the executors: the run folder opened
(new, or an interrupted one resumed under its lock), the cells still to measure, their
measurement with SIGTERM ending it as Ctrl-C does, a progress bar, and the records read back.
What is rendered and printed at the end is the command's (``bench/commands/run.py``)."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .. import records as records_mod
from ..environment import collect
from ..errors import UsageError
from ..sweep import cells
from ..sweep.cells import Cell, SweepConfig
from . import executors, runs
from .shards import LOST, finished_keys, read_records


def interruptible(body: Callable[[list[int]], int]) -> int:
    """``body(terminated)`` with SIGTERM ending it as Ctrl-C does (the run folder's lock is released
    either way); 143 after SIGTERM. ``terminated`` is non-empty once SIGTERM arrived."""
    with sigterm_as_interrupt() as terminated:
        try:
            return body(terminated)
        except KeyboardInterrupt:
            if terminated:
                print("\ninterrupted (SIGTERM)", file=sys.stderr)
                return 143
            raise


def open_resumed(path: str | Path) -> tuple[Path, runs.RunLock, SweepConfig]:
    """An interrupted run's folder, its lock (held until the run ends: a second --resume, or an
    --overwrite, of this folder is refused) and its configuration."""
    run_dir = runs.check_run_dir(path)
    lock = runs.RunLock(run_dir).acquire()
    try:
        return run_dir, lock, SweepConfig.from_json(runs.load_config(run_dir))
    except BaseException:
        lock.release()
        raise


def note_resume(run_dir: Path) -> dict:
    """The run's environment record with this resumption (when, the command, the git state) added."""
    env = runs.read_json(run_dir / runs.ENV) if (run_dir / runs.ENV).exists() else {}
    env.setdefault("resumed", []).append(
        {k: v for k, v in collect().items() if k in ("timestamp_utc", "command", "git")})
    runs.write_json(run_dir / runs.ENV, env)
    return env


def open_new(out: str | Path, config: SweepConfig, name: str | None, overwrite: bool
             ) -> tuple[Path, runs.RunLock, dict]:
    """A new run folder under ``out`` (named ``name`` or by time and commit), its lock, and its
    environment record, with ``env.json`` and ``config.json`` written."""
    env = collect()
    run_dir, lock = runs.new_run_dir(out, env["git"], name=name, overwrite=overwrite)
    runs.write_json(run_dir / runs.ENV, env)
    runs.write_json(run_dir / runs.CONFIG, config.to_json())
    return run_dir, lock, env


@dataclass
class Pending:
    """A run folder's cells against its records: what is finished, what is left."""

    cells: list[Cell]
    done: set[str]  # keys of every recorded cell but the lost ones
    todo: list[Cell]
    foreign: list[dict]  # records that do not belong to the run's configuration


def pending(config: SweepConfig, run_dir: Path) -> Pending:
    all_cells = expand(config)
    existing = runs.load_records(run_dir)
    done = finished_keys(existing)
    return Pending(all_cells, done, [c for c in all_cells if c.key() not in done],
                   records_mod.foreign(existing, config.to_json()))


def note_load(env: dict, run_dir: Path, when: str) -> float | None:
    """The 1-minute load average now, stored in the run's environment record under ``when``."""
    load = load_average()
    env.setdefault("load_average", {})[when] = load
    runs.write_json(run_dir / runs.ENV, env)
    return load


def measure(executor: str, executor_options, config: SweepConfig, run_dir: Path, work: Pending,
            terminated: list[int], progress: bool = True) -> str | None:
    """Measure the cells of ``work`` not yet done with ``executor``, a progress bar on stderr;
    None, or what interrupted it ("SIGTERM", "Ctrl-C"): the finished cells are saved either way."""
    bar = progress_bar(len(work.cells), len(work.cells) - len(work.todo), not progress)
    try:
        executors.run(executor, executor_options, work.cells, config, run_dir, work.done,
                      on_start=lambda cell: bar.set_postfix_str(cell.label(), refresh=True),
                      on_done=lambda cell, rec: after_cell(bar, cell, rec))
    except KeyboardInterrupt:
        return "SIGTERM" if terminated else "Ctrl-C"
    finally:
        bar.close()
    return None


def read_back(run_dir: Path) -> tuple[list[dict], list, list[dict]]:
    """The run's records (one per cell, shards merged), the conflicts found merging them, and the
    lost ones (their task ended first)."""
    conflicts: list = []
    records = read_records(run_dir, conflicts)
    return records, conflicts, [r for r in records if r.get("status") == LOST]


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


class sigterm_as_interrupt:
    """While a run holds its folder, SIGTERM (what CI cancellation, ``timeout`` and ``kill`` send)
    ends it as Ctrl-C does: the cell in flight is abandoned (its worker's process group killed),
    the finished cells are rendered, and the resume hint is printed. Yields a list that is
    non-empty once SIGTERM arrived."""

    def __enter__(self) -> list[int]:
        self.terminated: list[int] = []
        self.previous = None

        def on_term(signum, frame):  # noqa: ARG001
            self.terminated.append(signum)
            if len(self.terminated) == 1:  # a second SIGTERM must not interrupt the clean-up of the first
                raise KeyboardInterrupt

        try:
            self.previous = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread: leave SIGTERM alone
            self.previous = None
        return self.terminated

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def expand(config: SweepConfig) -> list[Cell]:
    try:
        return cells.expand(config)
    except Exception as exc:  # a layer of the stored config may no longer be installed
        raise UsageError(f"cannot expand the sweep: {exc}") from None


def finished(run_dir: Path) -> set[str]:
    """Cells that --resume skips: every recorded cell but the lost ones."""
    return finished_keys(read_records(run_dir, conflicts=[]))


class _NoBar:
    """What the run calls on a progress bar, doing nothing but print a cell's failure."""

    def set_postfix_str(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def write(self, s):
        print(s, file=sys.stderr)

    def close(self):
        pass


def progress_bar(total: int, initial: int, disabled: bool):
    """A bar over the run's cells on stderr (tqdm), or none."""
    if disabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="cell", dynamic_ncols=True, file=sys.stderr)


def after_cell(bar, cell, record) -> None:
    """Advance the bar; a cell that did not measure says why on its own line."""
    bar.update(1)
    if record["status"] not in ("ok",):
        bar.write(f"  {cell.label()}: {record['status']}"
                  + (f": {record['message']}" if record.get("message") and record["status"] != "unsupported" else ""))
