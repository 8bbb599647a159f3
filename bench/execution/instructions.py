"""The deterministic CPU metric: instructions executed per call, counted by valgrind's callgrind.

Wall time on a shared machine moves by 2× between identical processes; an instruction count
does not move with load at all, so a gate on it can use a threshold of a few per cent
(``--metric instructions``; the approach CodSpeed and SQLite use on noisy CI machines). We do
not instrument anything ourselves: the cells run under ``valgrind --tool=callgrind`` with
collection off (``--collect-atstart=no``), and around each direction's counted calls the worker
switches collection on and dumps it with the toggles PyTorch ships for
``torch.utils.benchmark.Timer.collect_callgrind`` (``torch._C._valgrind_toggle`` and
``_valgrind_toggle_and_dump_stats``). Each dump is a file whose ``summary:`` line is the number
of instructions executed while collecting.

Every cell of one revision runs in **one** valgrind process (:func:`count_cells`): importing
torch alone costs about a minute under callgrind, a cell a fraction of a second.

Why the counts repeat (measured on the gate's cells: two processes agreed within 0.81 % over all
33 directions of the eleven layers, the worst being inverse-flow's sampling; 0.44 %
at worst over 9 directions; within one process, dumps of the same call within 0.3 %):

- one torch thread (callgrind serialises threads anyway, and OpenMP's spin-waits would count);
- a fixed ``PYTHONHASHSEED`` (set iteration order, hence the work, would change per process);
- :data:`WARMUP_CALLS` calls before counting: Python 3.11's adaptive interpreter specialises a
  function's bytecode after it has run a few times, and torch's first calls fill caches — with
  2 warm-up calls two dumps of the same call differed by 3.5 %, with 20 by 0.1 %;
- the garbage collector is run before and disabled during the counted calls;
- the median of :data:`DUMPS` dumps of :data:`CALLS` calls each.

What it does not see: time. A change that adds no instructions but more cache misses, memory
stalls, page faults, lock waits or worse vectorisation (valgrind reports a CPU without
AVX-512, so torch, oneDNN and our kernel take their AVX2 paths under it), or that changes how
work is split between threads, is invisible here — the wall-clock A/B (``bench ab``) and the
ratio baselines cover those.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..errors import UsageError

WARMUP_CALLS = 20
CALLS = 3
DUMPS = 3
IMPORT_ALLOWANCE_S = 600.0
"""Time allowed for the valgrind process to start and import torch before the per-cell timeouts
start to count (about a minute on an idle 2-core machine, several under load)."""

THRESHOLD = 0.03
"""Default failing increase of an instruction count: far above the 0.8 % two identical
processes can differ by, and low enough that a 5 % regression always fails."""

HASH_SEED = "0"
WORKER = Path(__file__).with_name("count_worker.py")


class InstructionsUnavailable(RuntimeError):
    """valgrind (or torch's callgrind bindings) missing: the message says how to get them."""


def require_valgrind() -> str:
    """The path of ``valgrind``, or :class:`InstructionsUnavailable` saying how to install it."""
    path = shutil.which("valgrind")
    if path is None:
        raise InstructionsUnavailable(
            "--metric instructions counts instructions under valgrind's callgrind, and valgrind is not installed; "
            "install it (Debian/Ubuntu: apt-get install valgrind; Fedora: dnf install valgrind; "
            "conda: conda install -c conda-forge valgrind) or use --metric time")
    import torch

    if not getattr(torch._C, "_valgrind_supported_platform", lambda: False)():
        raise InstructionsUnavailable(f"this torch build ({torch.__version__}) has no callgrind bindings on this "
                                      "platform; --metric instructions needs Linux and a standard torch build")
    return path


def check_config(config) -> None:
    """Refuse a sweep ``--metric instructions`` cannot count, before anything runs: one on a GPU,
    one without worker processes, or one on a machine without valgrind."""
    if config.device != "cpu":
        raise UsageError("--metric instructions counts CPU instructions; use it with --device cpu")
    if not config.isolate:
        raise UsageError("--metric instructions always runs the cells in a callgrind process; drop --no-isolate")
    try:
        require_valgrind()
    except InstructionsUnavailable as exc:
        raise UsageError(str(exc)) from None


def read_dump(path: Path) -> int:
    """Instructions (``Ir``) in one callgrind dump file."""
    with open(path) as fh:
        for line in fh:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise ValueError(f"{path}: no summary line (not a callgrind dump?)")


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def count_cells(cells: list[Any], directions: Iterable[str], on_record: Callable[[dict[str, Any]], None], *,
                root: Path | None = None, timeout: float = 300.0, seed: int = 0,
                calls: int = CALLS, dumps: int = DUMPS, warmup: int = WARMUP_CALLS) -> None:
    """Count the instructions per call of every direction of every cell, all in one valgrind
    process running ``root``'s ``bench`` and ``layers`` (default: this tree).

    ``on_record(record)`` is called with each cell's results record as soon as it is complete.
    ``timeout`` applies per cell, after an allowance for valgrind's start and torch's import; a
    cell that hangs, or a valgrind process that dies, leaves the cells not yet reported with an
    ``error`` or ``timeout`` record.
    """
    from ..records import assemble
    from .runs import ROOT

    valgrind = require_valgrind()
    root = Path(root) if root is not None else ROOT
    directions = list(directions)
    cells = list(cells)
    if not cells:
        return
    tmp = Path(tempfile.mkdtemp(prefix="invconv-callgrind-"))
    try:
        request = {"cells": [asdict(c) for c in cells], "directions": directions, "seed": seed,
                   "calls": calls, "dumps": dumps, "warmup": warmup}
        (tmp / "request.json").write_text(json.dumps(request))
        out_file = tmp / "callgrind.out"
        env = {**os.environ, "PYTHONHASHSEED": HASH_SEED, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
        cmd = [valgrind, "--tool=callgrind", f"--callgrind-out-file={out_file}", "--instr-atstart=yes",
               "--collect-atstart=no", "--dump-line=no", "--dump-instr=no",
               # The interpreter itself, not a shim script (pyenv's `python` is a shell script,
               # and valgrind does not follow exec'd children).
               os.path.realpath(sys.executable), str(WORKER), str(tmp / "request.json")]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=root,
                                start_new_session=True)
        stderr_chunks: list[str] = []
        drain = threading.Thread(target=lambda: stderr_chunks.append(proc.stderr.read()), daemon=True)
        drain.start()
        deadline = [time.monotonic() + IMPORT_ALLOWANCE_S + timeout]
        timed_out = threading.Event()

        def watchdog():
            while proc.poll() is None:
                if time.monotonic() > deadline[0]:
                    timed_out.set()
                    _kill_group(proc)
                    return
                time.sleep(0.5)

        threading.Thread(target=watchdog, daemon=True).start()
        by_key = {c.key(): c for c in cells}
        pending: dict[str, list[dict[str, Any]]] = {}
        reported: set[str] = set()
        try:
            for line in proc.stdout:
                try:
                    msg = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if not isinstance(msg, dict) or msg.get("key") not in by_key:
                    continue
                key = msg.pop("key")
                if msg.get("type") == "started":
                    deadline[0] = time.monotonic() + timeout
                    continue
                if msg.get("type") == "direction" and msg.get("status") == "ok":
                    counts = [read_dump(Path(f"{out_file}.{i}")) for i in msg.pop("dumps")]
                    msg["instructions"] = _median(counts) / msg["calls"]
                    msg["instructions_dumps"] = counts
                    msg["metric"] = "instructions"
                pending.setdefault(key, []).append(msg)
                if msg.get("type") == "cell":
                    record = assemble(by_key[key], pending.pop(key), directions)
                    record["metric"] = "instructions"
                    reported.add(key)
                    on_record(record)
        except BaseException:
            _kill_group(proc)
            raise
        finally:
            proc.wait()
            drain.join(timeout=5)
        missing = [c for c in cells if c.key() not in reported]
        if missing:
            err = "".join(stderr_chunks).strip().splitlines()
            last = next((ln for ln in reversed(err) if ln.strip() and not ln.startswith("==")), "")
            for i, cell in enumerate(missing):
                if timed_out.is_set() and i == 0:
                    status, message = "timeout", f"cell exceeded --timeout {timeout:g} s under callgrind"
                else:
                    status = "error"
                    message = (f"not counted: the callgrind process ended (exit status {proc.returncode}) "
                               f"before this cell{': ' + last if last else ''}")
                record = assemble(cell, pending.pop(cell.key(), []), directions, status, message)
                record["metric"] = "instructions"
                on_record(record)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
