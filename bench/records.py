"""The results record: its fields, which status wins, and how ``results.jsonl`` is read and appended.

Every reader and writer of a run's ``results.jsonl`` goes through this module, so a torn last
line (a run killed mid-write, or NUL bytes left by a crash), a JSON line that is not a record, or
a record of another configuration is handled the same way everywhere:

- :func:`append` starts the new record on a fresh line (a torn or NUL-padded last line is cut
  off first, so the next record is never glued onto a fragment) and fsyncs it before returning;
- :func:`read` skips what is not a record with a warning (line number and why) and keeps the last
  record of each key (a cell re-run after a resume replaces its earlier record).

A record is one cell: ``{"schema", "key", "cell", "directions", "status", "message", ...}``.
Only the required fields are checked, so records may carry more (per-process fields, say).
A record stores what rendering it later needs — ``params``, ``recon_error``, ``exact_inverse``
(whether the layer inverts exactly) — so an old run renders the same whatever is installed then;
the readers below (:func:`axis_value`, :func:`exact_inverse`) are how the report reads a cell.
:func:`assemble` builds a record from a worker's messages, for every way of running a cell.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

SCHEMA = 1
RESULTS = "results.jsonl"

# When directions differ, a cell's status is the most telling one: the first of this list.
# "lost": a cell a SLURM task never finished (time limit, preemption); --resume measures it again.
STATUS_PRIORITY = ("unsupported", "lost", "oom", "timeout", "error", "nonfinite", "ok")
STATUSES = frozenset(STATUS_PRIORITY)
REQUIRED = ("key", "cell", "directions", "status")


class RecordError(ValueError):
    """A JSON value that is not a results record."""


def worst_status(statuses) -> str:
    """The status that wins among ``statuses`` (unknown statuses, e.g. from a newer version, win
    over everything: they are not "ok" and we cannot rank them)."""
    statuses = list(statuses)
    if not statuses:
        raise ValueError("worst_status() of no statuses")
    return min(statuses, key=lambda s: STATUS_PRIORITY.index(s) if s in STATUSES else -1)


def assemble(cell: Any, messages: list[dict[str, Any]], directions: Iterable[str],
             missing_status: str = "error", missing_message: str = "") -> dict[str, Any]:
    """One results record of ``cell`` (a :class:`bench.sweep.cells.Cell`) from its worker's
    messages (the protocol of ``bench/worker.py``: ``direction``, ``memory`` and ``cell`` lines);
    directions it never reported get ``missing_status`` (e.g. "timeout"), or the cell-level
    status if the cell failed to build."""
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


def validate(record: Any) -> dict[str, Any]:
    """``record`` if it has the required fields with the right types, else ``RecordError``."""
    if not isinstance(record, dict):
        raise RecordError(f"a {type(record).__name__}, not a record (a JSON object)")
    missing = [k for k in REQUIRED if k not in record]
    if missing:
        raise RecordError(f"no {', '.join(missing)} field{'s' if len(missing) > 1 else ''}")
    if not isinstance(record["key"], str):
        raise RecordError(f"key must be a string, got {type(record['key']).__name__}")
    if not isinstance(record["cell"], dict) or not isinstance(record["cell"].get("layer"), str):
        raise RecordError("cell must be an object with a layer name")
    if not isinstance(record["directions"], dict) or not all(
            isinstance(d, dict) and isinstance(d.get("status"), str) for d in record["directions"].values()):
        raise RecordError("directions must map each direction to an object with a status")
    if not isinstance(record["status"], str):
        raise RecordError(f"status must be a string, got {type(record['status']).__name__}")
    return record


def read(run_dir: str | os.PathLike, *, latest: bool = True) -> list[dict[str, Any]]:
    """The records of a run folder's ``results.jsonl``, in file order; what is not a record is
    skipped with a warning. (A sharded run's readers use :func:`bench.execution.shards.read_records`, which
    reads every file of the run through :func:`read_file`.)

    ``latest``: keep only the last record of each key (a cell re-measured after a resume).
    """
    records = read_file(Path(run_dir) / RESULTS)
    for r in records:
        r.pop("_line", None)
    if not latest:
        return records
    by_key: dict[str, dict[str, Any]] = {}
    for r in records:
        by_key.pop(r["key"], None)  # re-inserted: a re-measured cell takes its new place
        by_key[r["key"]] = r
    return list(by_key.values())


def read_file(path: Path) -> list[dict[str, Any]]:
    """Every record of one JSON-lines file, in order, each with ``_line`` (its line number); what
    is not a record is skipped with a warning."""
    if not path.exists():
        return []
    records = []
    # Bytes, not text: a crash can leave NUL bytes or half a UTF-8 sequence at the end.
    for i, raw in enumerate(path.read_bytes().split(b"\n")):
        line = raw.strip(b"\0 \t\r")
        if not line:
            continue
        try:
            record = validate(json.loads(line.decode("utf-8")))
            record["_line"] = i + 1
            records.append(record)
        except (UnicodeDecodeError, json.JSONDecodeError):
            warnings.warn(f"{path}:{i + 1}: skipping a line that is not JSON (a write interrupted by a crash?)",
                          stacklevel=2)
        except RecordError as exc:
            warnings.warn(f"{path}:{i + 1}: skipping a JSON line that is not a record: {exc}", stacklevel=2)
    return records


def append(run_dir: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one record to the run's ``results.jsonl`` (see :func:`append_file`)."""
    append_file(Path(run_dir) / RESULTS, record)


def append_file(path: Path, record: dict[str, Any]) -> None:
    """Append one record on a line of its own and force it to disk before returning."""
    validate(record)
    record = {k: v for k, v in record.items() if k != "_line"}
    line = json.dumps({"schema": SCHEMA, **record}, default=_json_default).encode()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        _repair_tail(fd, Path(path).name)
        os.write(fd, line + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def _repair_tail(fd: int, name: str) -> None:
    """Cut a torn last line (no newline at the end: a write that was interrupted) and trailing NUL
    bytes (what a crash can leave in a file's last block), so the next record starts a line.

    The fragment is dropped, not kept: it is not a record (its cell was not saved, so it is
    measured again), and a JSON fragment glued to the next record would lose that one too.
    """
    size = os.fstat(fd).st_size
    if size == 0:
        return
    # Look back far enough to find the last complete line's newline (records are a few KiB).
    end, chunk = size, 1 << 16
    while end > 0:
        start = max(0, end - chunk)
        data = os.pread(fd, end - start, start)
        if data.endswith(b"\n") and end == size:
            return  # intact
        nl = data.rfind(b"\n")
        if nl >= 0:
            keep = start + nl + 1
            break
        end = start
    else:
        keep = 0
    tail = os.pread(fd, size - keep, keep)
    if tail.strip(b"\0"):
        warnings.warn(f"dropping a torn last line of {len(tail)} bytes from {name} (an interrupted write); "
                      "its cell is measured again", stacklevel=3)
    os.ftruncate(fd, keep)


def _json_default(obj: Any) -> Any:
    return str(obj)  # e.g. a torch.dtype in a layer option


def exact_inverse(record: dict[str, Any]) -> bool | None:
    """Whether the record's layer inverts exactly, as the run stored it (``exact_inverse``); for a
    record written before runs stored it, what the installed registry says; ``None`` if neither
    knows the layer."""
    if record.get("exact_inverse") is not None:
        return bool(record["exact_inverse"])
    import layers

    try:
        return layers.info(record["cell"]["layer"]).exact_inverse
    except layers.LayerError:
        return None


def axis_value(cell: dict[str, Any], axis: str) -> Any:
    """A record's cell on one sweep axis; ``input_size`` is ``H`` for a square input, else ``"HxW"``."""
    if axis == "input_size":
        h, w = cell["height"], cell["width"]
        return h if h == w else f"{h}x{w}"
    return cell[axis]


def foreign(records: list[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """The records whose cell the run's configuration (``config.json``'s content) does not
    describe: copied in from another run, or left from an earlier configuration. Checked field
    by field, so it needs no layer registry (a layer's kernel size may not apply: ``None``)."""
    values = config.get("values") or {}
    sizes = [tuple(s) if isinstance(s, list) else (s, s) for s in values.get("input_size", [])]
    out = []
    for r in records:
        c = r["cell"]
        ok = (c.get("layer") in config.get("layers", [])
              and c.get("device") == config.get("device") and c.get("dtype") == config.get("dtype")
              and c.get("batch") in values.get("batch", []) and c.get("channels") in values.get("channels", [])
              and (c.get("kernel_size") is None or c.get("kernel_size") in values.get("kernel_size", []))
              and (c.get("height"), c.get("width")) in sizes
              and (c.get("scope") or "layer") == (config.get("scope") or "layer")
              and (c.get("options") or {}) in _expected_options(c, config))
        if not ok:
            out.append(r)
    return out


def _expected_options(cell: dict[str, Any], config: dict[str, Any]) -> list[dict[str, Any]]:
    """The layer options a cell of ``config`` may carry: the layer's, and for a published
    architecture's cell those merged with the options of the configuration's entries for that
    architecture (as bench.sweep.cells.expand builds them; none when the configuration does not
    list the architecture)."""
    base = (config.get("options") or {}).get(cell.get("layer")) or {}
    architecture = cell.get("architecture")
    if not architecture:
        return [base]
    return [{**base, **(entry.get("options") or {})} for entry in config.get("architectures") or []
            if entry.get("layer") == cell.get("layer") and entry.get("architecture") == architecture]
