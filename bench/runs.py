"""Run folders: where a run's configuration, environment and per-cell records live.

``results/runs/<UTC timestamp>_<git short sha>[-dirty]/`` holds ``env.json``, ``config.json``,
``results.jsonl`` (one JSON record per finished cell, appended and fsync'ed at once, so an
interrupted run keeps everything it finished) and the rendered tables and plots.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

SCHEMA = 1
RESULTS = "results.jsonl"
CONFIG = "config.json"
ENV = "env.json"
ROOT = Path(__file__).resolve().parent.parent  # the checkout (or site-packages) holding bench/

# The long-format columns, in order (one row per cell and direction).
COLUMNS = [
    "layer", "device", "dtype", "batch", "channels", "height", "width", "kernel_size", "direction", "status",
    "median_ms", "p20_ms", "p80_ms", "mean_ms", "std_ms", "peak_mem_bytes", "params", "recon_error",
    "n", "first_call_ms", "threads", "options", "message",
]
# Appended to the columns when a run has model cells (so layer runs keep their CSV unchanged).
MODEL_COLUMNS = ["scope", "levels", "steps", "hidden_width", "mixing"]


def git_state(root: Path = ROOT) -> dict[str, Any]:
    """Commit and dirty flag of the code being measured (``None`` outside a git checkout)."""

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout if out.returncode == 0 else None

    commit = (git("rev-parse", "HEAD") or "").strip()
    if not commit:
        return {"commit": None, "short": None, "dirty": None, "branch": None}
    # Results are not code: run folders kept under results/ (e.g. by `--preset all`, which
    # writes one before starting the next) must not mark the measured code as modified. The
    # porcelain lines are "XY PATH": not stripped, or the first line's path loses a letter.
    changed = [line for line in (git("status", "--porcelain") or "").splitlines()
               if line.strip() and not line[3:].strip('"').startswith("results/")]
    return {"commit": commit, "short": commit[:7], "dirty": bool(changed),
            "branch": (git("rev-parse", "--abbrev-ref", "HEAD") or "").strip() or None}


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def new_run_dir(out_root: str | os.PathLike, git: dict[str, Any] | None = None, name: str | None = None,
                overwrite: bool = False) -> Path:
    """Create ``<out_root>/<UTC timestamp>_<sha>[-dirty]`` (suffixed if it exists already), or
    ``<out_root>/<name>`` when a name is given: ``FileExistsError`` if that exists, unless
    ``overwrite`` and it is a run folder (then it is replaced)."""
    root = Path(out_root)
    root.mkdir(parents=True, exist_ok=True)
    if name is not None:
        if not name or "/" in name or name in (".", ".."):
            raise FileExistsError(f"invalid run folder name {name!r}")
        path = root / name
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"{path} exists; choose another --name or add --overwrite")
            if not (path / CONFIG).exists():
                # Only ever delete what a run wrote: a folder without config.json may be anything.
                raise FileExistsError(f"{path} exists and is not a run folder (no {CONFIG}); not replacing it")
            shutil.rmtree(path)
        path.mkdir()
        return path
    git = git if git is not None else git_state()
    sha = git.get("short") or "nogit"
    return make_unique_dir(root, f"{utc_now():%Y%m%dT%H%M%SZ}_{sha}{'-dirty' if git.get('dirty') else ''}")


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


def write_json(path: Path, obj: Any) -> None:
    """Write atomically (a partial file never replaces a good one)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def append_record(run_dir: Path, record: dict[str, Any]) -> None:
    """Append one finished cell and force it to disk before the next cell starts."""
    line = json.dumps({"schema": SCHEMA, **record}, default=_json_default)
    with open(Path(run_dir) / RESULTS, "a") as fh:
        fh.write(line + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _json_default(obj: Any) -> Any:
    return str(obj)  # e.g. a torch.dtype in a layer option


def load_records(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a run: ``results.jsonl`` and the per-task shards of a sharded run
    (``--executor slurm``), merged one record per cell, the newest winning (a cell re-run after
    a resume replaces its earlier record); torn lines are skipped with a warning. See
    :mod:`bench.shards`."""
    from .shards import read_records

    return read_records(run_dir)


def check_run_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not (p / CONFIG).exists():
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


def command_line() -> str:
    return " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]])
