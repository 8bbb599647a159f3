"""A run's records from several writers: its own ``results.jsonl`` plus one shard per task.

Appending to one file from many hosts over NFS interleaves and tears lines, so every SLURM
array task writes its own ``shards/<job>_<task>.jsonl`` and nothing else; only the submitting
process writes ``results.jsonl``. Readers merge the files with :func:`read_records`:

- sources in a fixed order (``results.jsonl``, then the shards by name), lines in file order;
- one record per cell key, the **newest** by ``where.finished_utc`` (records without it, from
  before this field existed, count as oldest; ties go to the later source and line), so the
  result does not depend on which host's clock listed its directory first;
- a cell with records in more than one file is a **conflict** (it was measured twice, e.g. a
  task that was believed lost had finished): reported, the newest kept. ``lost`` records
  (cells a killed task never finished) are placeholders and never conflict.

Every record says where it ran (:func:`where`): executor, host, GPU index and name, and the
SLURM job, array job and array task ids.
"""

from __future__ import annotations

import datetime as _dt
import functools
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import records as record_io
from ..records import RESULTS

SHARDS = "shards"
# A cell that a task was assigned and did not finish (time limit, preemption, cancel, node
# failure). Not a measurement: `--resume` runs these cells again.
LOST = "lost"

_SLURM_ENV = {"slurm_job_id": "SLURM_JOB_ID", "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
              "slurm_array_task_id": "SLURM_ARRAY_TASK_ID"}


@dataclass
class Conflict:
    key: str
    kept: str  # "file:line" of the record kept
    dropped: list[str]  # "file:line (status)" of the others

    def __str__(self) -> str:
        return f"cell {self.key} has {1 + len(self.dropped)} records; kept the newest, {self.kept}, over " + \
            ", ".join(self.dropped)


def where(executor: str, device: str | None = None, gpu_index: int | str | None = None,
          gpu_name: str | None = None) -> dict[str, Any]:
    """Where and when a record was made. ``gpu_index``: the GPU as this machine numbers it (by
    default the first of ``CUDA_VISIBLE_DEVICES``, which SLURM sets for a task's GPUs, else 0 for
    cuda cells); SLURM's job ids are read from the environment."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu_index is None and (visible or device == "cuda"):
        gpu_index = visible.split(",")[0] if visible else 0
    if isinstance(gpu_index, str) and gpu_index.isdigit():
        gpu_index = int(gpu_index)
    if gpu_name is None and device == "cuda":
        gpu_name = _cuda_name()
    out: dict[str, Any] = {"executor": executor, "host": socket.gethostname(), "pid": os.getpid(),
                           "gpu_index": gpu_index, "gpu_name": gpu_name, "cuda_visible_devices": visible}
    for field, var in _SLURM_ENV.items():
        out[field] = os.environ.get(var)
    out["finished_utc"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="microseconds")
    return out


@functools.lru_cache(maxsize=None)
def _cuda_name() -> str | None:
    """The name of the GPU that a worker started from here measures on (its cuda:0)."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - provenance must never fail a record
        return None


def shard_path(run_dir: str | os.PathLike, name: str) -> Path:
    path = Path(run_dir) / SHARDS / f"{name}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def append(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record to a shard, on a line of its own, fsync'ed (:func:`bench.records.append_file`)."""
    record_io.append_file(Path(path), record)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of one file (:func:`bench.records.read_file`: torn lines and lines that are not
    records are skipped with a warning)."""
    return record_io.read_file(Path(path))


def sources(run_dir: str | os.PathLike) -> list[Path]:
    """The files holding a run's records, in merge order."""
    run_dir = Path(run_dir)
    return [run_dir / RESULTS, *sorted((run_dir / SHARDS).glob("*.jsonl"))]


def merge(files: list[tuple[str, list[dict[str, Any]]]]) -> tuple[list[dict[str, Any]], list[Conflict]]:
    """Merge ``(name, records)`` lists (in source order): one record per key, newest wins."""
    best: dict[str, tuple[tuple, dict[str, Any], str]] = {}
    seen: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    order: list[str] = []
    for s, (name, records) in enumerate(files):
        for rec in records:
            key = rec["key"]
            rank = ((rec.get("where") or {}).get("finished_utc") or "", s, rec.get("_line", 0))
            if key not in best:
                order.append(key)
            if key not in best or rank >= best[key][0]:
                best[key] = (rank, rec, name)
            seen.setdefault(key, []).append((name, rec))
    conflicts = []
    for key in order:
        real = [(n, r) for n, r in seen[key] if r.get("status") != LOST]
        if len({n for n, _ in real}) > 1:
            _, kept, kept_name = best[key]
            conflicts.append(Conflict(
                key, f"{kept_name}:{kept.get('_line')}",
                [f"{n}:{r.get('_line')} ({r.get('status')})" for n, r in real if r is not kept]))
    out = []
    for key in order:
        rec = dict(best[key][1])
        rec.pop("_line", None)
        out.append(rec)
    return out, conflicts


def read_records(run_dir: str | os.PathLike, conflicts: list[Conflict] | None = None) -> list[dict[str, Any]]:
    """Every record of a run, shards merged (see the module's docstring). Conflicts are
    appended to ``conflicts`` when given, else reported as warnings."""
    run_dir = Path(run_dir)
    files = [(str(p.relative_to(run_dir)), read_jsonl(p)) for p in sources(run_dir)]
    records, found = merge(files)
    if conflicts is not None:
        conflicts.extend(found)
    else:
        for c in found:
            warnings.warn(str(c), stacklevel=2)
    return records


def finished_keys(records: list[dict[str, Any]]) -> set[str]:
    """Keys of the cells that need no more work (everything but ``lost``)."""
    return {r["key"] for r in records if r.get("status") != LOST}


def lost_record(cell_dict: dict[str, Any], key: str, directions, message: str) -> dict[str, Any]:
    """The placeholder of a cell a task did not finish."""
    return {"key": key, "cell": cell_dict,
            "directions": {d: {"status": LOST, "message": message} for d in directions},
            "status": LOST, "message": message}
