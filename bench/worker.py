"""Entry point of an isolated cell: ``python -m bench.worker`` (started by the executor).

Reads one JSON request on stdin, measures the cell, and writes one JSON line per finished
direction and a final line for the cell on the protocol stream (the original stdout). Anything
the measured code prints goes to stderr instead, so it cannot corrupt the protocol. The children
of the fork server (``bench/zygote.py``) run the same :func:`measure_request`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable


def measure_request(request: dict, emit: Callable[[dict], None]) -> None:
    from .measure import TimingPolicy, measure_cell
    from .sweep import Cell

    measure_cell(
        Cell.from_dict(request["cell"]),
        TimingPolicy(**request["policy"]),
        emit,
        seed=request.get("seed", 0),
        threads=request.get("threads"),
        directions=tuple(request.get("directions", ("forward", "sampling", "train"))),
    )


def main() -> int:
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    request = json.load(sys.stdin)

    def emit(record: dict) -> None:
        protocol.write(json.dumps(record) + "\n")
        protocol.flush()

    measure_request(request, emit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
