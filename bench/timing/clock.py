"""The clock: how long one call takes, one implementation per device, used by every timing path
(a cell's directions, ``bench kernels``, the ratio baselines).

- CUDA: events recorded around the call on the current stream (``torch.cuda.Event``), read after
  a synchronisation;
- CPU: ``time.perf_counter``, or, with ``minus_wait``, wall time minus the time the calling thread
  spent waiting for a core (below).

Times are in milliseconds.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import torch

COLD_CACHE_BYTES = {"cpu": 64 << 20, "cuda": 256 << 20}  # larger than the LLC / L2 of current chips


class Clock:
    """Times calls on ``device``.

    ``cold_cache``: write a buffer larger than the last-level cache before each timed call
    (outside the timed region), so every call starts with a cold cache.

    ``minus_wait`` (CPU only; for one torch thread): subtract the run-queue wait of the calling
    thread. Wall time cannot be used as it is for long calls on a shared machine: with a load
    average of 6 on 2 cores a 6 ms call seldom runs within one time slice, so even the *fastest*
    of 50 calls includes a wait for a core while a 0.2 ms call does not; the ratio of such a pair
    drifted by ±50 % between measurements. CPU time (``time.thread_time``) removes the waiting
    but also hides a call that sleeps, blocks on a lock or waits for I/O — a slowdown like any
    other. Linux counts, per thread, the time spent runnable but not running (the second field
    of ``/proc/thread-self/schedstat``); wall time minus that is the time the call was running
    *or voluntarily waiting*, which is what it costs. With one torch thread all of a call's
    work runs on the calling thread. The reads of the counter sit inside the wall-clock
    interval, so every wait subtracted happened within it; they cost about 2 µs. Measured
    ratios moved by about ±10 % between processes with this clock. A vCPU's stolen time is
    invisible to the guest and still counts. Without schedstat (not Linux), plain wall time.
    Close a clock made with it (:meth:`close`, or use it as a context manager).
    """

    def __init__(self, device: torch.device | str, cold_cache: bool = False, minus_wait: bool = False):
        device = torch.device(device)
        self.cuda = device.type == "cuda"
        self.flush_buffer = None
        if cold_cache:
            n = COLD_CACHE_BYTES["cuda" if self.cuda else "cpu"] // 4
            self.flush_buffer = torch.empty(n, dtype=torch.float32, device=device)
        self.fd: int | None = None
        if minus_wait and not self.cuda:
            try:
                self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
                self._waited_ns()
            except (OSError, ValueError, IndexError):
                self.close()

    @property
    def name(self) -> str:
        if self.cuda:
            return "CUDA events"
        return "wall time minus run-queue wait (schedstat)" if self.fd is not None else "wall time"

    def _waited_ns(self) -> int:
        return int(os.pread(self.fd, 128, 0).split()[1])

    def flush(self) -> None:
        if self.flush_buffer is not None:
            self.flush_buffer.fill_(1.0)  # evicts the cache between samples (outside the timed region)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def __call__(self, fn: Callable[[], Any]) -> float:
        """Milliseconds one call of ``fn`` took (the device synchronised before and after)."""
        self.flush()
        if self.cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            end.synchronize()
            return float(start.elapsed_time(end))
        if self.fd is None:
            t0 = time.perf_counter_ns()
            fn()
            return (time.perf_counter_ns() - t0) / 1e6
        t0 = time.perf_counter_ns()
        w0 = self._waited_ns()
        fn()
        w1 = self._waited_ns()
        t1 = time.perf_counter_ns()
        return (t1 - t0 - (w1 - w0)) / 1e6

    def calls(self, fn: Callable[[], Any], n: int) -> list[float]:
        """Milliseconds of each of ``n`` back-to-back calls. On a GPU the events are recorded
        around each call and read after one final synchronisation, so the calls queue as they
        would in a model (no synchronisation between them)."""
        if self.cuda:
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
            for start, end in events:
                start.record()
                fn()
                end.record()
            torch.cuda.synchronize()
            return [float(start.elapsed_time(end)) for start, end in events]
        return [self(fn) for _ in range(n)]

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "Clock":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
