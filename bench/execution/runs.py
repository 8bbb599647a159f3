"""Run folders: where a run's configuration, environment and per-cell records live.

``results/runs/<UTC timestamp>_<git short sha>[-dirty]/`` holds ``env.json``, ``config.json``,
``results.jsonl`` (one JSON record per finished cell, appended and fsync'ed at once, so an
interrupted run keeps everything it finished) and the rendered tables and plots.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from .. import records
from ..environment import utc_now
from ..git import git_state
from ..locations import TREE
CONFIG = "config.json"
ENV = "env.json"
ROOT = TREE  # the code tree that is measured: the checkout (or site-packages) holding bench/

# The long-format columns, in order (one row per cell and direction).
COLUMNS = [
    "layer", "device", "dtype", "batch", "channels", "height", "width", "kernel_size", "direction", "status",
    "median_ms", "p20_ms", "p80_ms", "mean_ms", "std_ms", "peak_mem_bytes", "params", "recon_error",
    "n", "first_call_ms", "threads", "options", "message",
]
# Appended to the columns when a run has model cells (so layer runs keep their CSV unchanged).
MODEL_COLUMNS = ["scope", "levels", "steps", "hidden_width", "mixing"]




class RunDirError(Exception):
    """A run folder that cannot be created, read or used; the message is one line for the user."""


class RunLockedError(RunDirError):
    """Another process is writing this run folder."""


LOCK = ".lock"  # in a run folder: flock'ed by the process that writes it; holds that process's pid


class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/.lock`` for the lifetime of a run or a resume.

    A second writer (a run ``--overwrite``-ing the folder, a second ``--resume``) is refused with
    the holder's pid instead of deleting or interleaving the first one's records. The kernel
    drops the lock when its holder dies, however it dies, so a stale lock file never blocks.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        path = self.run_dir / LOCK
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise RunDirError(f"cannot lock {self.run_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(f"{self.run_dir} is in use by another run (pid {holder}); wait for it to "
                                 "finish or stop it first") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self if self.fd is not None else self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def new_run_dir(out_root: str | os.PathLike, git: dict[str, Any] | None = None, name: str | None = None,
                overwrite: bool = False) -> tuple[Path, RunLock]:
    """Create and lock ``<out_root>/<UTC timestamp>_<sha>[-dirty]`` (suffixed if it exists
    already), or ``<out_root>/<name>`` when a name is given: ``RunDirError`` if that exists,
    unless ``overwrite`` and it is a run folder no other run is writing (then it is emptied).

    Returns the folder and its :class:`RunLock` (held: release it when the run ends).
    """
    root = Path(out_root)
    _make_out_root(root)
    if name is not None:
        if not name or "/" in name or name in (".", ".."):
            raise RunDirError(f"invalid run folder name {name!r}")
        path = root / name
        try:
            name_max = os.pathconf(root, "PC_NAME_MAX")
        except (OSError, ValueError):
            name_max = 255
        if len(name.encode()) > name_max:
            raise RunDirError(f"--name is {len(name.encode())} bytes long; the file system takes at most {name_max} "
                              "(choose a shorter --name)")
        if path.is_symlink():
            raise RunDirError(f"{path} is a symbolic link; not replacing what it points to (remove the link "
                              "or choose another --name)")
        if path.exists():
            if not overwrite:
                raise RunDirError(f"{path} exists; choose another --name or add --overwrite")
            if not path.is_dir() or not (path / CONFIG).exists():
                # Only ever delete what a run wrote: a folder without config.json may be anything.
                raise RunDirError(f"{path} exists and is not a run folder (no {CONFIG}); not replacing it")
            lock = RunLock(path).acquire()  # refused while another run writes it
            try:
                for child in path.iterdir():
                    if child.name == LOCK:
                        continue
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child)
                    else:
                        child.unlink()
            except OSError as exc:
                lock.release()
                raise RunDirError(f"cannot empty {path} for --overwrite: {exc.strerror or exc}") from None
            return path, lock
        try:
            path.mkdir()
        except OSError as exc:
            raise RunDirError(_os_message(path, exc)) from None
        return path, RunLock(path).acquire()
    git = git if git is not None else git_state()
    sha = git.get("short") or "nogit"
    try:
        path = make_unique_dir(root, f"{utc_now():%Y%m%dT%H%M%SZ}_{sha}{'-dirty' if git.get('dirty') else ''}")
    except OSError as exc:
        raise RunDirError(_os_message(root, exc)) from None
    return path, RunLock(path).acquire()


def make_unique_dir(root: Path, name: str) -> Path:
    """Create ``root/name``, or ``root/name.2``, ``.3``, … if taken (atomic: two runs started in
    the same second never share a folder)."""
    root.mkdir(parents=True, exist_ok=True)
    path, i = root / name, 1
    while True:
        try:
            path.mkdir()
            return path
        except FileExistsError:
            i += 1
            path = root / f"{name}.{i}"


def _make_out_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise RunDirError(f"--out {root} is a file, not a folder")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RunDirError(_os_message(root, exc)) from None
    if not os.access(root, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot create a run folder in {root}: permission denied")


def _os_message(path: Path, exc: OSError) -> str:
    import errno

    if exc.errno == errno.ENAMETOOLONG:
        return f"cannot create {path}: the name is too long for the file system (choose a shorter --name)"
    if exc.errno in (errno.ENOTDIR, errno.EEXIST) and any(p.exists() and not p.is_dir() for p in path.parents):
        bad = next(p for p in reversed(path.parents) if p.exists() and not p.is_dir())
        return f"cannot create {path}: {bad} is a file, not a folder"
    return f"cannot create {path}: {exc.strerror or exc}"


def write_json(path: Path, obj: Any) -> None:
    """Write atomically (a partial file never replaces a good one)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one finished cell and force it to disk before the next cell starts (see
    :func:`bench.records.append`)."""
    records.append(run_dir, record)


def load_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a run: ``results.jsonl`` and the per-task shards of a sharded run
    (``--executor slurm``), merged one record per cell, the newest winning (a cell re-run after
    a resume replaces its earlier record); what is not a record is skipped with a warning. See
    :mod:`bench.execution.shards` and :mod:`bench.records`."""
    from .shards import read_records

    return read_records(run_dir)


def load_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A run folder's ``config.json``, checked: ``RunDirError`` (one line) if it is truncated,
    not an object, or has keys this version does not know."""
    import dataclasses

    from ..sweep.cells import SweepConfig

    path = Path(run_dir) / CONFIG
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise RunDirError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    except json.JSONDecodeError as exc:
        raise RunDirError(f"{path} is not valid JSON (truncated?): {exc.msg} at line {exc.lineno}") from None
    if not isinstance(config, dict):
        raise RunDirError(f"{path} must hold a JSON object, got a {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(SweepConfig)}
    required = {f.name for f in dataclasses.fields(SweepConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    unknown, missing = sorted(set(config) - fields), sorted(required - set(config))
    if unknown:
        raise RunDirError(f"{path}: unknown key(s) {', '.join(unknown)} (written by another version?); "
                          f"accepted: {', '.join(sorted(fields))}")
    if missing:
        raise RunDirError(f"{path}: missing key(s) {', '.join(missing)}")
    return config


def check_run_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.is_dir() or not (p / CONFIG).exists():
        raise FileNotFoundError(f"{p} is not a run folder (no {CONFIG}); run folders are under results/runs/")
    return p


def long_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (cell, direction) with the :data:`COLUMNS`."""
    rows = []
    for r in records:
        cell = r["cell"]
        for direction, d in r.get("directions", {}).items():
            rows.append({
                **{k: cell.get(k) for k in ("layer", "device", "dtype", "batch", "channels", "height", "width",
                                             "kernel_size")},
                "direction": direction,
                "status": d.get("status", r.get("status")),
                **{k: d.get(k) for k in ("median_ms", "p20_ms", "p80_ms", "mean_ms", "std_ms", "n",
                                         "peak_mem_bytes", "first_call_ms")},
                "params": r.get("params"),
                "recon_error": r.get("recon_error"),
                "threads": r.get("threads"),
                "options": json.dumps(cell.get("options") or {}, sort_keys=True) if cell.get("options") else "",
                "message": d.get("message") or "",
                **{k: cell.get(k) for k in MODEL_COLUMNS},
            })
    return rows


def long_frame(records: list[dict[str, Any]]):
    """The records as a long-format ``pandas.DataFrame`` (the CSV's content)."""
    import pandas as pd

    models = any(r["cell"].get("scope") == "model" for r in records)
    df = pd.DataFrame(long_rows(records), columns=COLUMNS + (MODEL_COLUMNS if models else []))
    # Nullable integers, so a missing value does not turn a whole column into floats ("3.0").
    for col in ("batch", "channels", "height", "width", "kernel_size", "n", "peak_mem_bytes", "params", "threads",
                *(("levels", "steps", "hidden_width") if models else ())):
        df[col] = df[col].astype("Int64")
    return df

