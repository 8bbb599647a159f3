"""Entry point of an isolated cell: ``python -m bench.worker`` (started by the executor).

Reads one JSON request on stdin, says ``{"type": "ready"}`` once its imports are done (the
executor's timeout starts there), measures the cell, and writes one JSON line per finished
direction and a final line for the cell on the protocol stream (the original stdout). Anything
the measured code prints goes to stderr instead, so it cannot corrupt the protocol. The children
of the fork server (``bench/execution/zygote.py``) run the same :func:`measure_request`, and guard against
their parent's death with the same :func:`watch_parent`.

The name ``bench.worker`` is an interface between revisions: ``bench ab`` starts the base
revision's worker by this name inside that revision's checkout, so it stays here, beside
``bench/__main__.py``, whatever else moves.

The worker leads its own process group and must not outlive the process that started it (a
``bench run`` killed with SIGKILL cannot clean up after itself): it asks the kernel for a
SIGTERM when its parent dies (Linux ``prctl(PR_SET_PDEATHSIG)``), and a watchdog thread checks
the parent's pid as well (other platforms, and a parent that died before the ``prctl``). Either
way the worker kills its whole process group, so whatever the layer started dies with it.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from collections.abc import Callable

PARENT_ENV = "INVCONV_BENCH_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def _die_with_group(*_: object) -> None:
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os._exit(137)


def watch_parent() -> None:
    """Exit (with the whole process group) once the parent that started us is gone."""
    expected = os.environ.get(PARENT_ENV)
    parent = int(expected) if expected and expected.isdigit() else os.getppid()
    if os.getppid() != parent:  # it died before we got here
        _die_with_group()
    # The process group is ours only if the executor started us in a new session.
    if os.getpgrp() != os.getpid():
        return
    signal.signal(signal.SIGTERM, _die_with_group)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the watchdog below is enough
    if os.getppid() != parent:  # died between the first check and the prctl
        _die_with_group()

    def watchdog() -> None:
        import time

        while True:
            if os.getppid() != parent:
                _die_with_group()
            time.sleep(0.5)

    threading.Thread(target=watchdog, name="parent-watchdog", daemon=True).start()


def measure_request(request: dict, emit: Callable[[dict], None]) -> None:
    """Measure the cell of one request, streaming its records to ``emit`` (also run by the
    children of the fork server, ``bench/execution/zygote.py``)."""
    from .sweep.cells import Cell
    from .timing.measure import TimingPolicy, measure_cell

    measure_cell(
        Cell.from_dict(request["cell"]),
        TimingPolicy(**request["policy"]),
        emit,
        seed=request.get("seed", 0),
        threads=request.get("threads"),
        directions=tuple(request.get("directions", ("forward", "sampling", "train"))),
    )


def main() -> int:
    watch_parent()
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    request = json.load(sys.stdin)

    from .timing import measure  # noqa: F401 - before "ready": the timeout leaves torch's import out

    def emit(record: dict) -> None:
        protocol.write(json.dumps(record) + "\n")
        protocol.flush()

    emit({"type": "ready", "pid": os.getpid()})
    measure_request(request, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
