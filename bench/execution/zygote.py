"""Fresh worker processes without paying for torch's import each time: a fork server.

Each cell is measured in several fresh processes (the process is the unit of evidence), and
starting a Python process that imports torch costs about 1.5 s of CPU, ten times what measuring a
small cell's three directions costs. So a run starts one *zygote* (``python -m bench.execution.zygote``)
that imports torch, ``layers`` and the measuring code once, starts no thread and runs no torch
operation, and forks a child per measurement: a new process with its own pid, scheduler state,
allocator and thread pool, created in milliseconds. (Spawning a new interpreter per process, as
pyperf does, also re-randomises the address-space layout; between our processes on a shared
machine the differences come from the machine — which core, what else runs — and those a fork
meets like a new interpreter does.)

Protocol, one line each way (the parent is :class:`Zygote`):

- zygote → parent: ``ready`` once the imports are done;
- parent → zygote: a JSON object ``{"request": <the worker request>, "out": PATH, "err": PATH}``;
- zygote → parent: ``pid N`` after forking, then ``exit N STATUS`` when the child has ended
  (``STATUS`` is ``os.waitpid``'s: a signal number in its low byte, else the exit code).

The child starts a session of its own (so a timeout kills the child *and* anything it started,
as one process group), asks to be killed when the zygote dies (which happens when the run dies:
the zygote exits when its standard input closes), writes its protocol lines to ``out`` (one JSON
object per line, as ``bench.worker`` prints them) and everything the measured code prints to ``err``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

READY_TIMEOUT_S = 300.0
"""How long the parent waits for the zygote's imports (seconds on an idle machine, more under load)."""


def _die_with_parent() -> None:
    """Linux: SIGKILL the zygote when the run that started it dies (its children then kill their
    own process groups: see :func:`bench.worker.watch_parent`)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child(request: dict[str, Any], out_path: str, err_path: str) -> None:
    """In the forked child: measure one cell, then leave without running the zygote's exit code."""
    status = 0
    try:
        os.setsid()
        # Like a worker started by the run: the child and its process group die with its parent.
        from ..worker import PARENT_ENV, watch_parent

        os.environ[PARENT_ENV] = str(os.getppid())
        watch_parent()
        err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(err, 1)
        os.dup2(err, 2)
        os.close(err)
        sys.stdout = os.fdopen(1, "w", buffering=1)
        sys.stderr = os.fdopen(2, "w", buffering=1)
        from ..worker import measure_request

        with open(out_path, "w", buffering=1) as protocol:
            def emit(record: dict) -> None:
                protocol.write(json.dumps(record) + "\n")
                protocol.flush()

            measure_request(request, emit)
    except BaseException:  # noqa: BLE001 - reported through the exit status and err
        import traceback

        traceback.print_exc()
        status = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def serve() -> int:
    """The zygote's loop (``python -m bench.execution.zygote``)."""
    _die_with_parent()
    import torch  # noqa: F401 - the point: imported once, before any fork

    import layers  # noqa: F401

    from .. import worker  # noqa: F401
    from ..sweep.cells import Cell  # noqa: F401
    from ..timing import measure  # noqa: F401

    try:  # the native CPU solve's library too, when it is built (loading it starts no thread)
        from layers import native

        if native.requested_mode() != "torch":
            native.load("cpu")
    except Exception:  # noqa: BLE001 - the children load or report it themselves
        pass

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job["request"], job["out"], job["err"])
        out.write(f"pid {pid}\n")
        out.flush()
        _, status = os.waitpid(pid, 0)
        try:  # whatever the measured code started and left running in the child's group
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass  # (never a plain kill here: the child is reaped, its pid may already be another's)
        out.write(f"exit {pid} {status}\n")
        out.flush()
    return 0


class ZygoteError(RuntimeError):
    """The fork server could not be started or stopped answering."""


class Zygote:
    """The parent's handle on a fork server running this tree's code.

    ``run(request, timeout)`` → ``(messages, returncode, timed_out, stderr)`` like a worker
    subprocess would give (``returncode`` negative for a signal). Use as a context manager: the
    zygote is stopped on exit, and dies by itself if this process dies.
    """

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.tmp = Path(tempfile.mkdtemp(prefix="invconv-zygote-"))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.execution.zygote"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=open(self.tmp / "zygote.err", "w"), text=True, cwd=root, env=env, start_new_session=True)
        line = self._readline(READY_TIMEOUT_S)
        if line != "ready":
            err = (self.tmp / "zygote.err").read_text().strip().splitlines()
            self.close()
            raise ZygoteError(f"the fork server did not start: {err[-1] if err else line or 'no answer'}")
        self.count = 0

    def _readline(self, timeout: float) -> str | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], max(timeout, 0.0))
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return line.strip() if line else ""

    def run(self, request: dict[str, Any], timeout: float | None) -> tuple[list[dict], int | None, bool, str]:
        self.count += 1
        out, err = self.tmp / f"{self.count}.out", self.tmp / f"{self.count}.err"
        try:
            self.proc.stdin.write(json.dumps({"request": request, "out": str(out), "err": str(err)}) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise ZygoteError(f"the fork server is gone: {exc}") from None
        line = self._readline(60.0)
        if not line or not line.startswith("pid "):
            raise ZygoteError(f"the fork server did not fork: {line or 'no answer'}")
        pid = int(line.split()[1])
        timed_out = False
        try:
            deadline = None if not timeout else time.monotonic() + timeout
            while True:
                wait = 1.0 if deadline is None else min(1.0, deadline - time.monotonic())
                line = self._readline(wait) if wait > 0 else None
                if line is None and deadline is not None and time.monotonic() >= deadline and not timed_out:
                    timed_out = True
                    _kill_group(pid)
                    deadline = None  # now wait for the zygote to report the exit
                    continue
                if line == "":
                    raise ZygoteError("the fork server died")
                if line and line.startswith(f"exit {pid} "):
                    status = int(line.split()[2])
                    break
        except BaseException:
            _kill_group(pid)
            raise
        returncode = -(status & 0x7F) if status & 0x7F else (status >> 8) & 0xFF
        messages = []
        if out.exists():
            for text in out.read_text().splitlines():
                try:
                    messages.append(json.loads(text))
                except json.JSONDecodeError:
                    continue
        stderr = err.read_text(errors="replace") if err.exists() else ""
        for p in (out, err):
            p.unlink(missing_ok=True)
        return messages, returncode, timed_out, stderr

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                _kill_group(self.proc.pid)
                self.proc.wait()
        import shutil

        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "Zygote":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


if __name__ == "__main__":
    sys.exit(serve())
