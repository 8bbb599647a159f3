"""Op-level timing of the causal-convolution solve against ``F.conv2d`` of the same shape.

Measures only; :mod:`bench.commands.kernels` renders. Everything for one shape is timed in one
process, interleaved op by op in rounds, so the ratios (solve ÷ conv2d, reference ÷ native) are
comparable across machines even where absolute times drift (docs/regression.md).

Beside each time goes an *arithmetic floor*: the op's multiply-adds at the machine's peak rate.
It is an estimate from the SIMD path the native kernel runs (``INVCONV_CPU_ISA``), the
multiply-add width per cycle that path reaches on this core (measured, rounded to a power of
two) and the core's clock (measured); see :func:`machine_peak`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from layers import native
from layers.causal import assemble_weight, causal_padding, solve

from ..sweep.cells import Cell
from .clock import Clock
from .stats import Measurement

#: Warm-up before timing: at least this many calls and this many seconds per op, so that native
#: loading, allocator growth, cuDNN autotuning and CPU frequency ramp-up stay out of the samples.
WARMUP_CALLS = 3
WARMUP_SECONDS = 0.2

#: Ops measured for each shape (name -> what it is). ``native`` and ``torch`` are the solvers of
#: :func:`layers.causal.solve` under ``INVCONV_SOLVER``.
OPS = {
    "native solve": "solve (INVCONV_SOLVER=native), no grad",
    "native solve+backward": "solve then backward to y and the weight (adjoint solve + weight-gradient conv)",
    "torch solve": "solve (INVCONV_SOLVER=torch, the per-anti-diagonal PyTorch reference), no grad",
    "torch solve+backward": "the reference's solve then backward",
    "conv2d": "F.conv2d of the same shape (input pre-padded), no grad",
    "conv2d+wgrad": "F.conv2d forward then backward to the weight",
    "native solve, 1 thread": "the native solve on one thread (the others: all --threads)",
    "inverse-flow forward": "the inverse-flow layer's density direction (weight assembly + solve), no grad",
}

#: The work of each op as (solves, convolutions) of the shape (see Shape.solve_flops and
#: Shape.flops): the backward of a solve is an adjoint solve plus a weight gradient (a convolution).
OP_WORK = {"native solve": (1, 0), "native solve+backward": (2, 1), "torch solve": (1, 0),
           "torch solve+backward": (2, 1), "conv2d": (0, 1), "conv2d+wgrad": (0, 2),
           "native solve, 1 thread": (1, 0), "inverse-flow forward": (1, 0)}


class _ShapeMethods:
    """What one solve's shape says of itself (the fields are :data:`Shape`'s)."""

    def label(self) -> str:
        return (f"B={self.batch} C={self.channels} {self.height}×{self.width} k={self.kernel_size} "
                f"{self.orientation} {self.dtype} {self.device}")

    def flops(self) -> int:
        """FLOP of one k×k convolution of this shape: 2·B·H·W·C²·k²."""
        return 2 * self.batch * self.height * self.width * self.channels**2 * self.kernel_size**2

    def solve_flops(self) -> int:
        """FLOP of one solve of this shape: the convolution's, less the centre tap's zero upper
        triangle, 2·B·H·W·(C²·(k²−1) + C·(C+1)/2) — the centre block is triangular (its
        inverse too), so a kernel that skips the zeros does that much; at k = 1 it is about half
        of the dense product's."""
        c, k = self.channels, self.kernel_size
        return 2 * self.batch * self.height * self.width * (c * c * (k * k - 1) + c * (c + 1) // 2)


#: One solve's shape: the tensor geometry of a sweep cell (the fields of
#: :class:`bench.sweep.cells.Cell` of that name, taken from it so there is one list), the kernel size
#: and the orientation.
Shape = dataclasses.make_dataclass(
    "Shape",
    [(f.name, f.type) for f in dataclasses.fields(Cell)
     if f.name in ("device", "dtype", "batch", "channels", "height", "width")]
    + [("kernel_size", int), ("orientation", str)],
    bases=(_ShapeMethods,), frozen=True)
Shape.__module__ = __name__


@dataclasses.dataclass
class ShapeResult:
    shape: Shape
    measurements: dict[str, Measurement]
    #: op -> its arithmetic floor in seconds (an estimate; see machine_peak), where known.
    floors: dict[str, float] = dataclasses.field(default_factory=dict)
    #: The threads' one-way hand-over latency in ns, measured after each round (see handover_ns).
    handover_ns: list[float] = dataclasses.field(default_factory=list)

    def handover_changed(self) -> bool:
        """Whether the hand-over latency changed during the shape's rounds (by more than half):
        then its multi-thread times mix two states of the machine."""
        return len(self.handover_ns) > 1 and max(self.handover_ns) > 1.5 * min(self.handover_ns)

    def ratio(self, num: str, den: str) -> float | None:
        if num in self.measurements and den in self.measurements:
            return self.measurements[num].median / self.measurements[den].median
        return None

    def ratios(self) -> dict[str, float | None]:
        """The ratios of the issue's speed goals (medians)."""
        return {
            "solve / conv2d": self.ratio("native solve", "conv2d"),
            "solve+backward / conv2d": self.ratio("native solve+backward", "conv2d"),
            "solve+backward / conv2d+wgrad": self.ratio("native solve+backward", "conv2d+wgrad"),
            "torch solve / native solve": self.ratio("torch solve", "native solve"),
            "torch solve+backward / native solve+backward": self.ratio("torch solve+backward", "native solve+backward"),
            "inverse-flow forward / conv2d": self.ratio("inverse-flow forward", "conv2d"),
            "solve 1 thread / solve (thread speed-up)": self.ratio("native solve, 1 thread", "native solve"),
        }

    def as_dict(self) -> dict:
        return {"shape": dataclasses.asdict(self.shape), "ratios": self.ratios(), "floors_s": self.floors,
                "handover_ns": self.handover_ns, "handover_changed": self.handover_changed(),
                "measurements": {k: {"op": k, **m.summary(), "samples_s": m.samples}
                                 for k, m in self.measurements.items()}}


@contextlib.contextmanager
def _solver(mode: str | None) -> Iterator[None]:
    """Runs the block with ``INVCONV_SOLVER=mode`` (None: unchanged), restored afterwards. Set
    around a block of timed calls, not inside each: the environment write is not the op's cost."""
    if mode is None:
        yield
        return
    old = os.environ.get(native.SOLVER_ENV)
    os.environ[native.SOLVER_ENV] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ[native.SOLVER_ENV]
        else:
            os.environ[native.SOLVER_ENV] = old


def op_solver(name: str) -> str | None:
    """The solver an op is timed with (None: it does not solve)."""
    if name.startswith("torch "):
        return "torch"
    if name.startswith("native ") or name == "inverse-flow forward":
        return "native"
    return None


@contextlib.contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Runs the block with ``n`` torch threads (None: unchanged), restored afterwards."""
    if n is None or n == torch.get_num_threads():
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def op_grad(name: str) -> bool:
    """Whether an op is timed with grad mode on (the ones with a backward) or off."""
    return name in ("native solve+backward", "torch solve+backward", "conv2d+wgrad")


def op_threads(name: str) -> int | None:
    """The thread count an op is timed with (None: the process's, i.e. ``--threads``)."""
    return 1 if name == "native solve, 1 thread" else None


def solve_inputs(shape: Shape, scale: float = 0.05, generator: torch.Generator | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The solve-against-conv2d problem of ``shape``, seeded: the right-hand side ``y``, a causal
    weight with a unit lower-triangular centre (off-centre taps and the centre's lower triangle
    drawn with standard deviation ``scale``), and ``y`` padded for ``F.conv2d`` of that weight —
    the same work in the convolution direction. Shared by ``bench kernels``, the ratio
    baselines and the pytest-benchmark suite."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    device, dtype = torch.device(shape.device), getattr(torch, shape.dtype)
    c, k, o = shape.channels, shape.kernel_size, shape.orientation
    off = torch.randn(c, c, k * k - 1, generator=gen, dtype=dtype) * scale
    lower = torch.randn(c * (c - 1) // 2, generator=gen, dtype=dtype) * scale
    weight = assemble_weight(off, lower, orientation=o).to(device)
    y = torch.randn(shape.batch, c, shape.height, shape.width, generator=gen, dtype=dtype).to(device)
    y_pad = F.pad(y, causal_padding(k, o)) if k > 1 else y
    return y, weight, y_pad


def make_ops(shape: Shape, include_reference: bool = True, include_layer: bool = True,
             include_one_thread: bool = True) -> dict[str, Callable[[], object]]:
    """The callables to time for ``shape`` (inputs built once, outside the timed region); each
    runs under the solver :func:`op_solver` names, the threads :func:`op_threads` names and the
    grad mode :func:`op_grad` names."""
    device, dtype = torch.device(shape.device), getattr(torch, shape.dtype)
    c, k, o = shape.channels, shape.kernel_size, shape.orientation
    gen = torch.Generator().manual_seed(0)
    y, weight, y_pad = solve_inputs(shape, generator=gen)
    grad = torch.randn(y.shape, generator=gen, dtype=dtype).to(device)
    y_req = y.clone().requires_grad_()
    w_req = weight.clone().requires_grad_()

    # The no-grad ops are plain calls: the measurement runs them with grad mode off (see
    # op_grad), as a torch.no_grad() block around each call would time the context manager
    # (about 1 µs per call, on every op alike, which pulls every ratio towards 1).
    def solve_fwd():
        return solve(y, weight, o, unit_diagonal=True, assume_triangular=True)

    def solve_fwd_bwd():
        x = solve(y_req, w_req, o, unit_diagonal=True, assume_triangular=True)
        return torch.autograd.grad(x, (y_req, w_req), grad)

    def conv_fwd():
        return F.conv2d(y_pad, weight)

    def conv_fwd_wgrad():
        out = F.conv2d(y_pad, w_req)
        return torch.autograd.grad(out, (w_req,), grad)

    ops = {"native solve": solve_fwd, "native solve+backward": solve_fwd_bwd}
    if include_reference:
        ops["torch solve"] = solve_fwd
        ops["torch solve+backward"] = solve_fwd_bwd
    ops["conv2d"] = conv_fwd
    ops["conv2d+wgrad"] = conv_fwd_wgrad
    if include_one_thread and shape.device == "cpu" and torch.get_num_threads() > 1:
        ops["native solve, 1 thread"] = solve_fwd
    if include_layer:
        import layers

        layer = layers.create("inverse-flow", channels=c, kernel_size=k).to(device=device, dtype=dtype)

        def layer_fwd():
            return layer(y)

        ops["inverse-flow forward"] = layer_fwd
    return ops


def machine_peak(device: str, dtype: str) -> dict | None:
    """The peak multiply-add rate behind the arithmetic floor, on a CPU (None elsewhere, or when
    the native kernel, which holds the probes, is unavailable).

    ``clock_ghz`` is measured (a chain of dependent additions, one per cycle); ``flop_per_cycle``
    is the measured multiply-add rate of one thread on the kernel's SIMD path, divided by that
    clock and rounded to a power of two (it is lanes × 2 × FMA pipes: 32 for float32 on AVX2
    with two 256-bit pipes, and on Zen 4's AVX-512, whose 512-bit operations take two passes;
    64 on cores with two 512-bit pipes). Both are best-of-several on a machine that may be
    busy, and the floor is an estimate: no real kernel reaches it.
    """
    if device != "cpu" or not native.load("cpu").available:
        return None
    ops = torch.ops.invconv_cpu
    code = native.cpu_isa_code()
    with _threads(1):
        ghz = float(ops.clock_ghz(200))
        rate = float(ops.peak_flops(code, dtype == "float64", 200))
    out = {"isa": native.cpu_isa(), "clock_ghz": ghz or None, "measured_flops_per_thread": rate,
           "flop_per_cycle": None, "flops_per_thread": rate, "estimate": True}
    if ghz > 0 and rate > 0:
        per_cycle = 2 ** round(math.log2(rate / (ghz * 1e9)))
        out["flop_per_cycle"] = per_cycle
        out["flops_per_thread"] = per_cycle * ghz * 1e9
    return out


def handover_ns(device: str) -> float | None:
    """The one-way hand-over latency between the first two intra-op threads, in ns (the median of
    10 batches of 200 round trips on a shared flag; None on a GPU, with one thread or without the
    native kernel). A multi-thread solve of one image pays it once per row, and every barrier of
    a thread pool pays it: on a VM the host may move the virtual CPUs between cores that share a
    cache (tens of ns) and cores that do not (hundreds), and two-thread times move with it."""
    if device != "cpu" or torch.get_num_threads() < 2 or not native.load("cpu").available:
        return None
    return float(torch.ops.invconv_cpu.handover_ns(10)) or None


def floors(shape: Shape, ops: list[str], peak: dict | None, threads: int) -> dict[str, float]:
    """Each op's arithmetic floor in seconds: its FLOP at ``threads`` × the per-thread peak."""
    if not peak or not peak.get("flops_per_thread"):
        return {}
    out = {}
    for name in ops:
        n = op_threads(name) or threads
        solves, convs = OP_WORK[name]
        out[name] = (solves * shape.solve_flops() + convs * shape.flops()) / (n * peak["flops_per_thread"])
    return out


def measure_shape(shape: Shape, *, min_calls: int = 20, min_seconds: float = 0.5, rounds: int = 5,
                  include_reference: bool = True, include_layer: bool = True, peak: dict | None = None) -> ShapeResult:
    """Times every op of :func:`make_ops` after warm-up, interleaved in ``rounds`` rounds (each op
    runs a block of calls per round) until each op has ``min_calls`` calls and ``min_seconds``.

    Raises :class:`layers.native.NativeUnavailableError` when the native solver cannot be used.
    """
    device = torch.device(shape.device)
    native.kernels_for(device, getattr(torch, shape.dtype), required=True)
    ops = make_ops(shape, include_reference, include_layer)
    clock = Clock(device)
    per_call = {}
    for name, fn in ops.items():  # warm-up, and an estimate of the time per call (median of the warm-up calls)
        start, times = time.perf_counter(), []
        with _threads(op_threads(name)), _solver(op_solver(name)), torch.set_grad_enabled(op_grad(name)):
            while len(times) < WARMUP_CALLS or time.perf_counter() - start < WARMUP_SECONDS:
                t0 = time.perf_counter()
                fn()
                clock.sync()
                times.append(time.perf_counter() - t0)
        per_call[name] = statistics.median(times)
    blocks = {name: max(-(-min_calls // rounds), int(min_seconds / rounds / max(t, 1e-9)) + 1)
              for name, t in per_call.items()}
    samples: dict[str, list[float]] = {name: [] for name in ops}
    handover: list[float] = []
    for _ in range(rounds):
        for name, fn in ops.items():
            # switched outside the timed calls
            with _threads(op_threads(name)), _solver(op_solver(name)), torch.set_grad_enabled(op_grad(name)):
                samples[name].extend(ms / 1e3 for ms in clock.calls(fn, blocks[name]))
        latency = handover_ns(shape.device)
        if latency is not None:
            handover.append(latency)
    return ShapeResult(shape, {name: Measurement(s, unit="s") for name, s in samples.items()},
                       floors(shape, list(ops), peak, torch.get_num_threads()), handover)


def environment(device: str) -> dict:
    """What the numbers depend on — versions, hardware, threads, the solver choice, the commit —
    from the run's environment record (:func:`bench.environment.collect`), flattened
    for the kernel report, with the CPU's SIMD path or the GPU in use."""
    from ..environment import collect

    full = collect()
    env = {
        "utc": full["timestamp_utc"],
        "command": full["command"],
        "python": full["python"],
        "torch": full["torch"]["version"],
        "cuda": full["torch"]["cuda"],
        "cudnn": full["torch"]["cudnn"],
        "cpu": full["cpu"]["model"],
        "cpu_count": full["cpu"]["logical_cpus"],
        "torch_threads": full["torch"]["threads"],
        "git_commit": full["git"]["short"],
        "git_dirty": full["git"]["dirty"],
        "solver": full["solvers"],
    }
    if device == "cpu":
        status = native.load("cpu")
        env["cpu_isa"] = native.cpu_isa() if status.available else None
    if device == "cuda" and torch.cuda.is_available():
        gpu = full["gpus"][torch.cuda.current_device()]
        env["gpu"] = gpu["name"]
        env["gpu_memory_gib"] = round(gpu["total_memory_bytes"] / 2**30, 1)
        env["gpu_sm_count"] = gpu["multiprocessors"]
        env["gpu_driver"] = gpu["driver"] or "unknown"
    env["native_first_use_s"] = {d: s.seconds for d, s in native.build_statuses().items() if s.available}
    env["native_compiled_in_this_process"] = {d: s.compiled for d, s in native.build_statuses().items() if s.available}
    return env
