"""Measure one cell in the current process: times, peak memory, parameters, reconstruction error.

Nothing here prints or renders: results go to the ``emit`` callback as plain dicts (one per
direction as soon as it is finished, then one for the cell), so a worker process can stream
them to its parent and a crash or timeout loses only what was not finished yet.
"""

from __future__ import annotations

import math
import os
import resource
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..sweep.cells import DIRECTIONS, Cell
from .clock import Clock
from .stats import Measurement

Emit = Callable[[dict[str, Any]], None]


@dataclass(frozen=True)
class TimingPolicy:
    """How long to warm up and how many samples to take (docs/measurement.md "Timing").

    Warm-up runs until both ``warmup`` calls and ``warmup_time`` seconds are reached, so that
    native builds, cuDNN autotuning and allocator growth stay out of the samples. Sampling runs
    until both ``repeat`` samples and ``min_time`` seconds are reached. Two caps keep a cell
    bounded: a very slow call stops sampling after ``max_time`` seconds once ``MIN_SAMPLES``
    exist (the record's ``n`` says how many), and a very fast one after ``max_samples``.
    """

    warmup: int = 3
    warmup_time: float = 0.2
    repeat: int = 10
    min_time: float = 0.5
    max_time: float = 10.0
    max_samples: int = 5000
    cold_cache: bool = False


MIN_SAMPLES = 3


# ---------------------------------------------------------------------------------------------
# Was the machine quiet? (each direction's usage while its samples were taken)

OFF_CPU_BOUND = 0.2
"""A timed call is *disturbed* when the threads of its process spent more than this share of
its wall time waiting for a CPU (runnable but not running: Linux's schedstat, which is the part
of "wall time minus CPU time" that the machine, not the code, caused — a call that sleeps or
waits for I/O on purpose is not counted). A CPU direction is ``unstable`` when at least
:data:`DISTURBED_SHARE` of its calls were disturbed, since then its median is a disturbed call.
On a quiet machine no call waits at all; under a load average of 9 on 2 cores a 0.1 ms call is
hit about once in 30 calls (by several ms) while its process is off the CPU 70 % of the time —
the median survives that, so the rule looks at the calls, not at the loop's totals (which are
recorded too)."""

DISTURBED_SHARE = 0.5

TICKS_MS = (10.0, 4.0, 1.0)
"""Scheduler ticks of common kernels (HZ = 100, 250, 1000), the coarsest first (a multiple of 4 ms is one of 1 ms too). A descheduled thread resumes at a
tick, so samples that are whole multiples of one (24.0, 20.0, 28.0 ms for a 0.16 ms call) are the
scheduler's time slices, not the call's cost."""
TICK_TOLERANCE = 0.03
"""A sample within this fraction of a tick of a whole multiple counts as "on the tick"."""
TICK_SHARE = 0.8
"""Share of the samples (of at least one tick) that must sit on ticks, over at least two
different multiples, for a direction to be called tick-quantised: a naturally steady call of
about 2.00 ms sits on one multiple only, and a call whose time really varies lands on a tick by
chance for about 2 × 3 % of its samples."""


def tick_quantised(samples_ms: list[float]) -> float | None:
    """The scheduler tick (ms) the samples are quantised at, or None."""
    for tick in TICKS_MS:
        long = [s for s in samples_ms if s >= tick * (1 - TICK_TOLERANCE)]
        if len(long) < 5 or len(long) < 0.5 * len(samples_ms):
            continue
        multiples = [round(s / tick) for s in long]
        on = [m for s, m in zip(long, multiples) if abs(s - m * tick) <= TICK_TOLERANCE * tick]
        if len(on) >= TICK_SHARE * len(long) and len(set(on)) >= 2:
            return tick
    return None


class WaitMeter:
    """Nanoseconds this process's threads have spent runnable but not running, read from
    ``/proc/self/task/*/schedstat`` through descriptors opened once (about 2 µs a thread per
    read). ``available`` is False where there is no schedstat (not Linux)."""

    def __init__(self):
        self.fds: list[int] = []
        try:
            for task in os.scandir("/proc/self/task"):
                self.fds.append(os.open(f"{task.path}/schedstat", os.O_RDONLY))
            self.read()
        except (OSError, ValueError, IndexError):
            self.close()

    @property
    def available(self) -> bool:
        return bool(self.fds)

    def read(self) -> int:
        return sum(int(os.pread(fd, 128, 0).split()[1]) for fd in self.fds)

    def close(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


class Usage:
    """Wall time, CPU time (process and measuring thread) and involuntary context switches
    between two points (``getrusage``)."""

    def __init__(self):
        self.wall = time.perf_counter()
        self.thread_cpu = time.thread_time()
        ru = resource.getrusage(resource.RUSAGE_SELF)
        self.cpu = ru.ru_utime + ru.ru_stime
        self.nivcsw = ru.ru_nivcsw

    def since(self, start: "Usage") -> dict[str, Any]:
        return {"wall_s": self.wall - start.wall, "cpu_s": self.cpu - start.cpu,
                "thread_cpu_s": self.thread_cpu - start.thread_cpu,
                "involuntary_switches": self.nivcsw - start.nivcsw}


def unstable_reasons(samples_ms: list[float], usage: dict[str, Any], device: str) -> list[str]:
    """Why these samples measure the machine rather than the code (empty: no sign of it)."""
    if device != "cpu":
        return []
    reasons = []
    disturbed, n = usage.get("disturbed_calls"), len(samples_ms)
    if disturbed is not None and n and disturbed >= DISTURBED_SHARE * n:
        reasons.append(f"{disturbed} of {n} calls waited for a CPU for over {OFF_CPU_BOUND:.0%} of their time")
    tick = tick_quantised(samples_ms)
    if tick is not None:
        reasons.append(f"the samples are whole multiples of the {tick:g} ms scheduler tick")
    return reasons


# ---------------------------------------------------------------------------------------------
# Timing


def time_call(fn: Callable[[], Any], clock: Clock, policy: TimingPolicy) -> Measurement:
    """Warm up, then sample ``fn`` until the policy is satisfied. Every sample is kept, with
    what the process did meanwhile (``Measurement.usage``: :class:`Usage` over the sampling,
    the run-queue wait of its threads and the number of disturbed calls; see :data:`OFF_CPU_BOUND`)."""
    t_start = time.perf_counter()
    calls = 0
    while calls < policy.warmup or time.perf_counter() - t_start < policy.warmup_time:
        clock(fn)
        calls += 1
    samples: list[float] = []
    meter = None if getattr(clock, "cuda", False) else WaitMeter()
    metered = meter is not None and meter.available
    waited_ns, disturbed = 0, 0
    before = Usage()
    t_start = before.wall
    try:
        while True:
            if metered:
                # The reads bracket the timed interval from outside, so they cost the sample nothing.
                w0 = meter.read()
                sample = clock(fn)
                wait = meter.read() - w0
                waited_ns += wait
                disturbed += wait > OFF_CPU_BOUND * sample * 1e6
            else:
                sample = clock(fn)
            samples.append(sample)
            elapsed = time.perf_counter() - t_start
            n = len(samples)
            if (n >= policy.repeat and elapsed >= policy.min_time) or n >= policy.max_samples \
                    or (n >= MIN_SAMPLES and elapsed >= policy.max_time):
                break
    finally:
        if meter is not None:
            meter.close()
    usage = Usage().since(before)
    usage["timed_s"] = sum(samples) / 1e3
    if metered:
        usage["runqueue_wait_s"] = waited_ns / 1e9
        usage["disturbed_calls"] = disturbed
    return Measurement(samples, usage)


# ---------------------------------------------------------------------------------------------
# Memory


def _proc_status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_libc = None


def configure_allocator() -> None:
    """Make the resident set follow tensor allocations on glibc (no-op elsewhere).

    glibc keeps freed memory in its heap and raises its mmap threshold as large blocks are
    freed, so after warm-up a call can reuse memory without the RSS moving and a peak-RSS
    reading says 0. A fixed mmap threshold returns large blocks to the OS on free, and
    ``malloc_trim`` before each reading releases what the heap still holds. The price is an
    mmap and fresh page faults for every large allocation, which slows calls down: call this
    only after the timing is done.
    """
    global _libc
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD: blocks >= 64 KiB are mmapped and unmapped on free
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
        _libc = libc
    except (OSError, AttributeError):
        _libc = None


def _trim_heap() -> None:
    if _libc is not None:
        _libc.malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


class _Nvml:
    """Device-level memory from NVML (``nvidia-ml-py``), as a cross-check of torch's counters."""

    def __init__(self, device: torch.device):
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            props = torch.cuda.get_device_properties(device)
            bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
            self.handle = pynvml.nvmlDeviceGetHandleByPciBusId(bus_id.encode())
            self._pynvml = pynvml
        except Exception:  # noqa: BLE001 - NVML is a cross-check; its absence is recorded as None
            self.handle = None

    def used(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self._pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:  # noqa: BLE001
            return None


def peak_memory(fn: Callable[[], Any], device: torch.device, nvml: _Nvml | None) -> dict[str, Any]:
    """Peak memory of one call above the memory in use just before it (docs/measurement.md "Memory")."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        reserved_before = torch.cuda.memory_reserved(device)
        nvml_before = nvml.used() if nvml else None
        fn()
        torch.cuda.synchronize(device)
        out: dict[str, Any] = {
            "peak_mem_bytes": int(torch.cuda.max_memory_allocated(device) - base),
            "reserved_bytes": int(torch.cuda.max_memory_reserved(device)),
        }
        nvml_after = nvml.used() if nvml else None
        if nvml_before is not None and nvml_after is not None:
            out["nvml_delta_bytes"] = int(nvml_after - nvml_before)
            torch_delta = torch.cuda.memory_reserved(device) - reserved_before
            # Memory that NVML sees but torch's allocator does not: a raw cudaMalloc somewhere.
            if abs(out["nvml_delta_bytes"] - torch_delta) > max(64 << 20, 0.25 * abs(torch_delta)):
                out["memory_warning"] = (f"NVML saw {out['nvml_delta_bytes']} B more in use, torch's allocator "
                                         f"{torch_delta} B: memory allocated outside torch?")
        return out
    _trim_heap()
    if not _reset_peak_rss():
        fn()
        return {"peak_mem_bytes": None, "memory_warning": "peak RSS not measurable on this platform"}
    base = _proc_status("VmRSS")
    fn()
    peak = _proc_status("VmHWM")
    return {"peak_mem_bytes": None if base is None or peak is None else int(max(peak - base, 0))}


# ---------------------------------------------------------------------------------------------
# Failures


def classify_exception(exc: BaseException) -> tuple[str, str]:
    """(status, one-line message) for an exception raised while building or running a cell."""
    import layers

    message = f"{type(exc).__name__}: {exc}".strip().splitlines()[0] if str(exc) else type(exc).__name__
    if isinstance(exc, layers.UnsupportedError):
        return "unsupported", str(exc)
    if isinstance(exc, torch.cuda.OutOfMemoryError) or (
        isinstance(exc, (RuntimeError, MemoryError))
        and any(s in str(exc) for s in ("out of memory", "can't allocate memory", "not enough memory"))
    ) or isinstance(exc, MemoryError):
        return "oom", message
    return "error", message


# ---------------------------------------------------------------------------------------------
# One cell


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def _all_finite(out: Any) -> bool:
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    return all(bool(torch.isfinite(t).all()) for t in tensors if isinstance(t, torch.Tensor))


def direction_calls(layer: torch.nn.Module, x: torch.Tensor, z_prior: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """The call timed for each direction (docs/measurement.md "What is measured"), shared by the
    runner and the ratio baselines so both time the same thing."""

    def forward():
        with torch.no_grad():
            return layer(x)

    def sampling():
        with torch.no_grad():
            return layer.inverse(z_prior)

    def train():
        layer.zero_grad(set_to_none=True)
        z, logdet = layer(x)
        # Negative log-likelihood under N(0, I), up to a constant: ½‖z‖² − log|det J|.
        loss = 0.5 * (z.float() ** 2).sum() - logdet.float().sum()
        loss.backward()
        return z, logdet, loss

    return {"forward": forward, "sampling": sampling, "train": train}


def check_cell(cell: Cell) -> None:
    """Raise ``layers.UnsupportedError`` (or ``LayerError``) for a cell that cannot be built,
    without building anything: the layer's declared capabilities, checked at the layer's own
    shape or, for a model cell, at every level of the model."""
    import layers

    layers.info(cell.layer).check_dtype(cell.dtype)
    if cell.scope == "model" and cell.architecture:
        return  # a published architecture checks its shapes when it is built
    if cell.scope == "model":
        from ..sweep.models import check_model

        check_model(cell.layer, cell.channels, (cell.height, cell.width), cell.levels, cell.kernel_size, cell.device)
    else:
        layers.info(cell.layer).check(cell.channels, cell.kernel_size, (cell.height, cell.width), cell.device)


class ContractError(Exception):
    """A layer that does not return what the interface requires (recorded as the cell's error)."""


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)}: ({', '.join(_describe(v) for v in value)})"
    return f"a {type(value).__name__}"


def check_contract(direction: str, out: Any, shape: tuple[int, ...]) -> None:
    """``ContractError`` if the first call of a layer cell's ``direction`` did not return what the
    layer interface requires for input shape ``shape``: forward ``(z, logdet)`` with z of the
    input's shape and logdet of shape ``(B,)``; inverse a tensor of the input's shape.

    Checked on each direction's first call, before it is timed: a layer breaking the contract
    would otherwise be timed doing something else (with B = 2 the train step unpacks a bare
    tensor as ``(z, logdet)``), and no extra call is made, so a direction that hangs or fails
    still leaves the others' numbers.
    """
    batch = shape[0]
    need = f"(z, logdet) with z of shape {shape} and logdet of shape ({batch},)"
    if direction == "forward":
        if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out)
                and tuple(out[0].shape) == shape and tuple(out[1].shape) == (batch,)):
            raise ContractError(f"forward returned {_describe(out)}; required: {need}")
    elif direction == "sampling":
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != shape:
            raise ContractError(f"inverse returned {_describe(out)}; required: a tensor of shape {shape}")
    elif direction == "train":
        z, logdet = out[0], out[1]  # what the train step unpacked from forward's result
        if not (isinstance(z, torch.Tensor) and isinstance(logdet, torch.Tensor)
                and tuple(z.shape) == shape and tuple(logdet.shape) == (batch,)):
            raise ContractError(f"forward, unpacked as (z, logdet) by the train step, gave z = {_describe(z)} and "
                                f"logdet = {_describe(logdet)}; required: {need}")


@dataclass
class _Subject:
    """What a cell times: the module, one callable per direction, and the round trip."""

    module: torch.nn.Module
    fns: dict[str, Callable[[], Any]]
    round_trip: Callable[[], tuple[torch.Tensor, torch.Tensor]]  # (x, inverse(forward(x)))
    extra: dict[str, Any]
    input_shape: tuple[int, ...] | None = None  # a layer cell's: its directions' results are checked


def _layer_subject(cell: Cell, device: torch.device, dtype: torch.dtype) -> _Subject:
    import layers

    layer = layers.create(cell.layer, cell.channels, kernel_size=cell.kernel_size,
                          input_size=(cell.height, cell.width), **cell.options).to(device=device, dtype=dtype)
    x = torch.randn(cell.batch, cell.channels, cell.height, cell.width, device=device, dtype=dtype)
    z_prior = torch.randn_like(x)

    def round_trip():
        with torch.no_grad():
            return x, layer.inverse(layer(x)[0])

    return _Subject(layer, direction_calls(layer, x, z_prior), round_trip, {}, input_shape=tuple(x.shape))


def _model_subject(cell: Cell, device: torch.device, dtype: torch.dtype) -> _Subject:
    """A flow model (docs/math.md §6): forward = the density pass giving log p(x), sampling =
    ``sample(batch)`` (latents drawn from N(0, I), then every inverse), train = the density pass
    plus the backward of ``−mean log p(x)``."""
    from ..sweep.models import FlowModel, build_architecture

    if cell.architecture:
        model = build_architecture(cell.architecture, cell.layer, cell.channels, (cell.height, cell.width),
                                   cell.kernel_size, cell.hidden_width, cell.options).to(device=device, dtype=dtype)
    else:
        model = FlowModel(cell.layer, cell.channels, (cell.height, cell.width), levels=cell.levels,
                          steps=cell.steps, width=cell.hidden_width, kernel_size=cell.kernel_size,
                          layer_options=cell.options, mixing=cell.mixing or "auto").to(device=device, dtype=dtype)
    # Image-like input: dequantised intensities in [0, 1).
    x = torch.rand(cell.batch, cell.channels, cell.height, cell.width, device=device, dtype=dtype)
    model.initialize(x)  # ActNorm's data-dependent initialisation, once, before anything is timed

    def forward():
        with torch.no_grad():
            return model.log_prob(x)

    def sampling():
        with torch.no_grad():
            return model.sample(cell.batch)

    def train():
        model.zero_grad(set_to_none=True)
        loss = -model.log_prob(x).float().mean()
        loss.backward()
        return loss

    def round_trip():
        with torch.no_grad():
            return x, model.inverse(model(x)[0])

    return _Subject(model, {"forward": forward, "sampling": sampling, "train": train}, round_trip,
                    {"model": model.describe(), "mixing_used": list(model.mixing_used)})


def exact_inverse(cell: Cell) -> bool:
    """Whether the cell's layer inverts exactly (up to rounding), as its registry entry says:
    stored in the record, so a table rendered later does not depend on what is installed then."""
    import layers

    return layers.info(cell.layer).exact_inverse


def build_subject(cell: Cell, device: torch.device, dtype: torch.dtype) -> _Subject:
    """The module, the call of each direction and the round trip of ``cell`` (also used by the
    instruction counter, ``bench/execution/count_worker.py``)."""
    build = _model_subject if cell.scope == "model" else _layer_subject
    return build(cell, device, dtype)


def measure_cell(cell: Cell, policy: TimingPolicy, emit: Emit, *, seed: int = 0, threads: int | None = None,
                 directions: tuple[str, ...] = DIRECTIONS) -> None:
    """Measure every direction of ``cell``, calling ``emit`` once per direction, then once with
    ``{"type": "cell", ...}`` (parameters, reconstruction error, cell-level status)."""
    t0 = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = torch.device(cell.device)
    final: dict[str, Any] = {"type": "cell", "threads": torch.get_num_threads(), "pid": os.getpid()}
    try:
        check_cell(cell)
        dtype = _dtype(cell.dtype)
        subject = build_subject(cell, device, dtype)
    except Exception as exc:  # noqa: BLE001 - recorded as the cell's status
        final["status"], final["message"] = classify_exception(exc)
        final["traceback"] = traceback.format_exc(limit=8)
        final["wall_s"] = time.perf_counter() - t0
        emit(final)
        return

    final["params"] = sum(p.numel() for p in subject.module.parameters() if p.requires_grad)
    final["exact_inverse"] = exact_inverse(cell)
    final.update(subject.extra)
    clock = Clock(device, policy.cold_cache)
    nvml = _Nvml(device) if device.type == "cuda" else None

    fns = subject.fns
    measured: list[str] = []  # directions that ran, so their peak memory is measured at the end
    for direction in directions:
        record: dict[str, Any] = {"type": "direction", "direction": direction}
        try:
            t_first = time.perf_counter()
            out = fns[direction]()  # the first call: includes lazy builds, reported separately
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            record["first_call_ms"] = (time.perf_counter() - t_first) * 1e3
            if subject.input_shape is not None:
                check_contract(direction, out, subject.input_shape)
            finite = _all_finite(out)
            del out
            m = time_call(fns[direction], clock, policy)
            record["samples_ms"] = m.samples
            record.update(m.summary())
            record["usage"] = m.usage
            reasons = unstable_reasons(m.samples, m.usage, device.type)
            record["unstable"] = bool(reasons)
            if reasons:
                record["unstable_reasons"] = reasons
            if direction == "sampling":  # an iterative inverse's last call: iterations, residual
                from .diagnostics import collect_inverse_diagnostics

                diagnostics = collect_inverse_diagnostics(subject.module)
                if diagnostics:
                    record["inverse_diagnostics"] = diagnostics
            record["status"] = "ok" if finite else "nonfinite"
            if not finite:
                record["message"] = "output contains NaN or Inf"
            measured.append(direction)
        except Exception as exc:  # noqa: BLE001 - one failing direction must not lose the others
            record["status"], record["message"] = classify_exception(exc)
            record["traceback"] = traceback.format_exc(limit=8)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        emit(record)

    # Peak memory after all timing: on a CPU, measuring it needs an allocator setting that would
    # slow the timed calls down (see configure_allocator), so it comes last, per finished direction.
    if device.type == "cpu":
        configure_allocator()
    for direction in measured:
        record = {"type": "memory", "direction": direction}
        try:
            record.update(peak_memory(fns[direction], device, nvml))
        except Exception as exc:  # noqa: BLE001
            record["peak_mem_bytes"] = None
            record["memory_warning"] = f"memory not measured: {classify_exception(exc)[1]}"
        emit(record)

    try:
        x, x_back = subject.round_trip()
        err = (x_back - x).abs().max().item()
        final["recon_error"] = err if math.isfinite(err) else float("nan")
    except Exception as exc:  # noqa: BLE001
        final["recon_error"] = None
        final["recon_message"] = classify_exception(exc)[1]
    from layers import native

    if native.fallbacks():  # shapes the native solve could not run (e.g. too large for shared memory)
        final["solver_fallback"] = native.fallbacks()
    final["wall_s"] = time.perf_counter() - t0
    emit(final)
