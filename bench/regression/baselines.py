"""Machine-independent baselines: ratios of two timings taken in one process, interleaved.

An absolute time recorded on one machine says little about another (docs/regression.md), but the ratio of two operations timed side by side in the same process
moves far less: both see the same CPU, the same memory system and the same background load.
Two families of ratios are stored (``results/baselines/<device>-<machine class>.json``, see
:func:`machine_class`) and checked:

- ``solve / conv2d``: :func:`layers.causal.solve` of a unit lower-triangular causal weight (built
  by :func:`layers.causal.assemble_weight`) divided by ``F.conv2d`` of the same shape (on the
  input already padded, so it is exactly the convolution the solve inverts; docs/math.md §8: the solve
  does the same arithmetic and should cost a small multiple of it);
- ``<layer> <direction> / glow-1x1``: each layer's forward, sampling and train time divided by
  ``glow-1x1``'s in the same direction at the same shape (glow's 1×1 convolution is the cheapest
  invertible mixing, the natural unit).

How a ratio is measured (:func:`measure`): every operation of a shape is warmed up, then the
operations are called in turn, one timed call each, over and over (forwards, then backwards),
so that numerator and denominator samples are interleaved call by call and share whatever load
the machine is under; the ratio is the quotient of the two fastest calls (see :func:`measure`).
torch is pinned to :data:`THREADS` thread, so the ratio does not depend on the core count or on
how busy the other cores are, and on a CPU a call is timed in wall time minus the time the
thread spent waiting for a core (``minus_wait`` of :class:`bench.timing.clock.Clock`). On a GPU, CUDA events.

The check (:func:`check`) fails a ratio only when it exceeds ``baseline × (1 + threshold)`` in
:data:`CHECK_ATTEMPTS` measurements in a row: a regression in the code is there every time, a
burst of load rarely is. Each ratio's threshold is recorded with it: the device's minimum
(:data:`MIN_THRESHOLDS`) or :data:`SPREAD_MARGIN` times the spread seen while recording,
whichever is larger. Lower ratios than the baseline are reported as improvements, never
failures; re-record to lock them in (``python -m bench baseline record``) — necessarily so when
the solver changes (native kernels), which the check points out.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..locations import baselines_dir

SCHEMA = 1
REFERENCE_LAYER = "glow-1x1"

THREADS = 1
"""torch threads while measuring ratios: one thread is the only setting that means the same on
every machine, and the only one not disturbed by other jobs on a shared CPU."""

ROUNDS = 5
MIN_PASSES = 10
ROUND_TIME = {"cpu": 0.3, "cuda": 0.1}
"""A measurement is :data:`ROUNDS` rounds of at least :data:`MIN_PASSES` passes and
:data:`ROUND_TIME` seconds each (see :func:`measure`): cheap operations get hundreds of
interleaved samples, the slowest at least 50; a few seconds per shape."""
RECORD_REPEATS = 3
"""Measurements per ratio when recording; the baseline is their median, so one measurement
spoilt by a burst of load does not become the reference."""
WARMUP_CALLS = 3
WARMUP_TIME = 0.1

MIN_THRESHOLDS = {"cpu": 0.5, "cuda": 0.25}
MAX_THRESHOLD = 2.0
"""Smallest allowed increase of a ratio before the check fails. Generous on a CPU: the baseline
may be checked on another CPU model, where the balance between a convolution (vectorised
library code) and a solve (a Python loop over anti-diagonals) shifts by tens of per cent."""

SPREAD_MARGIN = 3.0
"""A ratio that was noisy while recording gets a threshold of at least this many times its
relative spread (max − min of the :data:`RECORD_REPEATS` measurements, over their median), up
to :data:`MAX_THRESHOLD` (a recording that noisy is flagged: re-record on a quieter machine)."""

CHECK_ATTEMPTS = 3
"""Measurements of a ratio before the check calls it regressed (each must exceed the limit)."""

# Shapes: small on a CPU (the pure-PyTorch solve takes milliseconds there), the papers' batch on
# a GPU.
SHAPES = {
    "cpu": {"batch": 8, "channels": 12, "kernel_size": 3, "solve_sizes": [16, 32], "layer_size": 16},
    "cuda": {"batch": 100, "channels": 12, "kernel_size": 3, "solve_sizes": [32, 128], "layer_size": 32},
}


@dataclass
class Ratio:
    """One stored ratio: what is divided by what, at which cell, its value and threshold."""

    name: str
    layer: str  # what a Perf-Regression-Accepted pattern names: the layer, or "solve"
    numerator: str
    denominator: str
    cell: dict[str, Any]
    value: float
    spread: float  # (max − min) / value of the measurements taken while recording
    threshold: float
    repeats: list[float] = field(default_factory=list)  # those measurements

    @property
    def label(self) -> str:
        from ..sweep.cells import Cell

        return Cell.from_dict(self.cell).label()

    @property
    def limit(self) -> float:
        """The largest value that passes the check."""
        return self.value * (1 + self.threshold)


@dataclass
class Op:
    """A timed operation (the numerator or denominator of ratios)."""

    name: str
    fn: Callable[[], Any]


@dataclass
class Spec:
    """A ratio to measure: ``num`` ÷ ``den``, both ops of the same shape group."""

    name: str
    layer: str
    num: str
    den: str
    cell: dict[str, Any]


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_identity() -> tuple[str, str, set[str]]:
    """(vendor, family, feature flags) from ``/proc/cpuinfo``; ("unknown", "", {}) elsewhere."""
    vendor, family, flags = "", "", set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key, value = key.strip(), value.strip()
                if key == "vendor_id" and not vendor:
                    vendor = value
                elif key == "cpu family" and not family:
                    family = value
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
                elif not line.strip() and vendor:
                    break  # the first processor is enough
    except OSError:
        pass
    vendor = {"AuthenticAMD": "amd", "GenuineIntel": "intel"}.get(vendor, vendor or platform.machine() or "unknown")
    return _slug(vendor), family, flags


def machine_class(device: str) -> str:
    """The kind of machine a ratio baseline holds for, e.g. ``amd-fam25-kernel-avx2-fma-aten-avx512``.

    A ratio of two kernels is machine-independent only while both run the same kind of code:
    the solve ÷ ``F.conv2d`` ratio recorded on an AVX2-only EPYC rose by 74 % on a Xeon where
    oneDNN's convolution uses AVX-512 and our kernel AVX2. So a CPU class is the vendor and
    family, the SIMD path of our native kernel (``layers.native.cpu_isa``) and the CPU
    capability ATen dispatches to (oneDNN follows the same ISA detection), plus AMX where
    present. A GPU class is the device name and compute capability.
    """
    import torch

    if device == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        return _slug(f"{p.name} sm{p.major}{p.minor}")
    from layers import native

    vendor, family, flags = _cpu_identity()
    try:
        kernel = native.cpu_isa()
    except Exception:  # noqa: BLE001 - no native kernel here: the solve ratios are the reference's
        kernel = "torch"
    aten = torch.backends.cpu.get_cpu_capability()
    parts = [vendor, f"fam{family}" if family else "", f"kernel {kernel}", f"aten {aten}",
             "amx" if "amx_tile" in flags else ""]
    return _slug(" ".join(p for p in parts if p))


def baseline_path(device: str, machine: str | None = None) -> Path:
    """``results/baselines/<device>-<machine class>.json`` (the class of this machine by default)."""
    return baselines_dir() / f"{device}-{machine or machine_class(device)}.json"


def recorded_classes(device: str) -> list[str]:
    return sorted(p.stem[len(device) + 1:] for p in baselines_dir().glob(f"{device}-*.json"))


def current_solver(device: str) -> str | None:
    """The solver ``layers.causal.solve`` uses on ``device`` now (``layers.native.solver_status``)."""
    from layers import native

    return native.solver_status(build=True).get(device, {}).get("solver")


def _cell(layer: str, device: str, batch: int, channels: int, size: int, k: int | None) -> dict[str, Any]:
    return {"layer": layer, "device": device, "dtype": "float32", "batch": batch, "channels": channels,
            "height": size, "width": size, "kernel_size": k, "options": {}}


# ---------------------------------------------------------------------------------------------
# What to measure


def solve_group(device: str, size: int) -> tuple[list[Op], list[Spec]]:
    import torch
    import torch.nn.functional as F

    from layers.causal import solve

    from ..timing.kernels import Shape, solve_inputs

    s = SHAPES[device]
    b, c, k = s["batch"], s["channels"], s["kernel_size"]
    y, weight, y_padded = solve_inputs(Shape(device, "float32", b, c, size, size, k, "TL"), scale=0.1)

    def run_solve():
        with torch.no_grad():
            return solve(y, weight, "TL", unit_diagonal=True, assume_triangular=True)

    def run_conv():
        with torch.no_grad():
            return F.conv2d(y_padded, weight)

    tag = f"{size}x{size}"
    ops = [Op(f"solve {tag}", run_solve), Op(f"conv2d {tag}", run_conv)]
    cell = _cell("solve", device, b, c, size, k)
    spec = Spec(f"solve / conv2d @ B={b} C={c} {tag} k={k}", "solve", f"solve {tag}", f"conv2d {tag}", cell)
    return ops, [spec]


def layer_group(device: str, names: list[str], directions=("forward", "sampling", "train"),
                ) -> tuple[list[Op], list[Spec], list[str]]:
    """Ops for every layer in ``names`` plus glow-1x1, the specs dividing by glow-1x1, and notes
    on the layers that could not be built at this shape."""
    import torch

    import layers

    from ..timing.measure import direction_calls

    s = SHAPES[device]
    b, c, k, size = s["batch"], s["channels"], s["kernel_size"], s["layer_size"]
    ops: list[Op] = []
    specs: list[Spec] = []
    notes: list[str] = []
    for name in dict.fromkeys([REFERENCE_LAYER, *names]):
        try:
            info = layers.info(name)
            kk = k if info.kernel_size_applies else None
            info.check(c, kk, (size, size), torch.device(device))
            torch.manual_seed(0)
            layer = layers.create(name, c, kernel_size=kk, input_size=(size, size)).to(device)
        except Exception as exc:  # noqa: BLE001 - an unbuildable layer is noted, the others measured
            if name == REFERENCE_LAYER:
                raise
            notes.append(f"{name}: not measured at B={b} C={c} {size}x{size}: {type(exc).__name__}: {exc}")
            continue
        x = torch.randn(b, c, size, size, device=device)
        z = torch.randn_like(x)
        calls = direction_calls(layer, x, z)
        for d in directions:
            ops.append(Op(f"{name} {d}", calls[d]))
            if name != REFERENCE_LAYER:
                specs.append(Spec(f"{name} {d} / {REFERENCE_LAYER} @ B={b} C={c} {size}x{size}"
                                  + (f" k={kk}" if kk else ""), name, f"{name} {d}", f"{REFERENCE_LAYER} {d}",
                                  _cell(name, device, b, c, size, kk)))
    return ops, specs, notes


# ---------------------------------------------------------------------------------------------
# Measuring


def _median(values: list[float]) -> float:
    v = sorted(values)
    n = len(v)
    return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def measure(ops: list[Op], specs: list[Spec], device: str, rounds: int = ROUNDS,
            min_passes: int = MIN_PASSES) -> dict[str, tuple[float, list[float]]]:
    """``{spec name: (ratio, [ratio of each round])}``.

    One *pass* calls every operation once, timing each call; the direction of the pass
    alternates, so no operation always follows the same one. A round is at least
    ``min_passes`` passes and :data:`ROUND_TIME` seconds. A ratio is the fastest call of its
    numerator over the fastest call of its denominator, over all rounds (the value) and per
    round (its spread). Timing single calls interleaved this finely puts numerator and
    denominator under the same load at every moment.

    Why the minimum and not the median: interference (another process on the core, a cache
    emptied by it) only ever adds time — on a shared 2-core VM the calls of one operation fall
    into a fast and a 2–3× slower mode, in proportions that change from second to second — so
    the fastest of many calls is the best estimate of the undisturbed cost, and the quotient of
    two minima is the statistic that moves least between processes and loads (measured while
    writing this, under a load average of 4–8 on 2 cores: about ±10 % between processes for
    minima, against ±30 % and bimodal jumps for medians and low percentiles). The A/B gate, which compares revisions rather than operations, uses medians
    and a confidence interval instead (``bench/regression/statistics.py``).
    """
    import torch

    from ..timing.clock import Clock
    from ..timing.measure import TimingPolicy, time_call

    needed = {s.num for s in specs} | {s.den for s in specs}
    timed = [op for op in ops if op.name in needed]
    previous = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    clock = Clock(device, minus_wait=True)  # the run-queue wait is left out on a CPU (see Clock)
    try:
        warm = TimingPolicy(warmup=WARMUP_CALLS, warmup_time=WARMUP_TIME, repeat=1, min_time=0.0)
        for op in timed:
            time_call(op.fn, clock, warm)
        fastest: dict[str, list[float]] = {op.name: [] for op in timed}  # per round
        backwards = False
        for _ in range(rounds):
            best = {op.name: float("inf") for op in timed}
            passes, start = 0, time.perf_counter()
            while passes < min_passes or time.perf_counter() - start < ROUND_TIME[device]:
                for op in (reversed(timed) if backwards else timed):
                    best[op.name] = min(best[op.name], clock(op.fn))
                backwards = not backwards
                passes += 1
            for name, t in best.items():
                fastest[name].append(t)
    finally:
        torch.set_num_threads(previous)
        clock.close()
    return {s.name: (min(fastest[s.num]) / min(fastest[s.den]),
                     [n / d for n, d in zip(fastest[s.num], fastest[s.den])]) for s in specs}


def _clock_name(device: str) -> str:
    from ..timing.clock import Clock

    with Clock(device, minus_wait=True) as clock:
        return clock.name


def groups(device: str, layer_names: list[str]) -> tuple[list[tuple[list[Op], list[Spec]]], list[str]]:
    out = [solve_group(device, size) for size in SHAPES[device]["solve_sizes"]]
    ops, specs, notes = layer_group(device, layer_names)
    out.append((ops, specs))
    return out, notes


# ---------------------------------------------------------------------------------------------
# Recording and checking


def record(device: str, layer_names: list[str], env: dict[str, Any], rounds: int = ROUNDS,
           progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Measure every ratio and return the baseline document (the caller writes it)."""
    ratios: list[Ratio] = []
    all_groups, notes = groups(device, layer_names)
    for ops, specs in all_groups:
        repeats = [measure(ops, specs, device, rounds) for _ in range(RECORD_REPEATS)]
        for spec in specs:
            values = [m[spec.name][0] for m in repeats]
            value = _median(values)
            spread = (max(values) - min(values)) / value
            threshold = min(MAX_THRESHOLD, max(MIN_THRESHOLDS[device], SPREAD_MARGIN * spread))
            if SPREAD_MARGIN * spread > MAX_THRESHOLD:
                notes.append(f"{spec.name}: very noisy while recording (spread {spread:.0%}); its threshold is "
                             f"capped at +{MAX_THRESHOLD:.0%}: re-record on a quieter machine")
            ratios.append(Ratio(spec.name, spec.layer, spec.num, spec.den, spec.cell, value, spread,
                                round(threshold, 3), [round(v, 5) for v in values]))
            if progress:
                progress(f"{spec.name}: {value:.4g} (spread {spread:.0%}, threshold +{threshold:.0%})")
    return {
        "schema": SCHEMA,
        "device": device,
        "machine_class": machine_class(device),
        "recorded_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "how": {"clock": _clock_name(device), "threads": THREADS, "repeats": RECORD_REPEATS, "rounds": rounds, "min_passes": MIN_PASSES,
                "round_time_s": ROUND_TIME[device],
                "shapes": SHAPES[device], "reference_layer": REFERENCE_LAYER,
                "check": f"fails when a ratio exceeds value × (1 + threshold) in {CHECK_ATTEMPTS} measurements"},
        "notes": notes,
        "environment": env,
        "ratios": [asdict(r) for r in ratios],
    }


@dataclass
class CheckRow:
    ratio: Ratio
    now: float | None  # the smallest of the attempts' values (None: could not measure)
    attempts: list[float]
    verdict: str  # ok, regressed, improved, missing
    message: str = ""
    accepted: Any = None  # the bench.regression.accept.Marker that accepted a regression

    @property
    def layer(self) -> str:
        return self.ratio.layer

    @property
    def name(self) -> str:
        return self.ratio.name

    @property
    def failing(self) -> bool:
        return self.verdict == "regressed" and self.accepted is None


def load(path: Path) -> tuple[dict[str, Any], list[Ratio]]:
    import json

    doc = json.loads(Path(path).read_text())
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{path}: baseline schema {doc.get('schema')!r}, expected {SCHEMA}; re-record it")
    return doc, [Ratio(**r) for r in doc["ratios"]]


def check(doc: dict[str, Any], ratios: list[Ratio], markers=(), attempts: int = CHECK_ATTEMPTS,
          rounds: int = ROUNDS, progress: Callable[[str], None] | None = None) -> tuple[list[CheckRow], list[str]]:
    """Measure the stored ratios again; (rows, notes). A ratio is ``regressed`` only when every
    one of ``attempts`` measurements exceeds its limit (later attempts re-measure only the
    ratios still over it)."""
    import layers

    device = doc["device"]
    names = sorted({r.layer for r in ratios if r.layer != "solve"})
    available = [n for n in names if n in layers.available()]
    notes = [f"{n}: in the baseline but not available now ({', '.join(layers.available())} are)"
             for n in names if n not in available]
    unrecorded = [n for n in layers.available() if n not in names and n != REFERENCE_LAYER]
    if unrecorded:
        notes.append(f"not in the baseline, so not checked: {', '.join(unrecorded)} "
                     "(re-record to include them: python -m bench baseline record)")
    all_groups, build_notes = groups(device, available)
    notes += build_notes
    by_name = {r.name: r for r in ratios}
    attempts_of: dict[str, list[float]] = {r.name: [] for r in ratios}
    pending = set(by_name)
    for attempt in range(attempts):
        for ops, specs in all_groups:
            specs = [s for s in specs if s.name in pending]
            if not specs:
                continue
            for name, (value, _) in measure(ops, specs, device, rounds).items():
                attempts_of[name].append(value)
        pending = {n for n in pending if attempts_of[n] and min(attempts_of[n]) > by_name[n].limit}
        if progress and attempt + 1 < attempts and pending:
            progress(f"{len(pending)} ratio(s) over the limit; measuring again ({attempt + 2}/{attempts}): "
                     + ", ".join(sorted(pending)))
        if not pending:
            break
    rows = []
    for r in ratios:
        got = attempts_of[r.name]
        if not got:
            rows.append(CheckRow(r, None, [], "missing", "not measured now (see the notes)"))
            continue
        now = min(got)
        if now > r.limit:
            verdict = "regressed"
        elif now < r.value / (1 + r.threshold):
            verdict = "improved"
        else:
            verdict = "ok"
        rows.append(CheckRow(r, now, got, verdict))
    markers = list(markers)
    for row in rows:
        if row.verdict == "regressed":
            for m in markers:
                if m.matches(row):
                    row.accepted = m
                    break
    recorded = (doc.get("environment") or {}).get("solvers", {}).get(device, {}).get("solver")
    try:
        current = current_solver(device)
    except Exception:  # noqa: BLE001 - only for a note
        current = None
    if recorded and current and recorded != current:
        notes.append(f"the {device} solver was {recorded!r} when the baseline was recorded and is {current!r} now: "
                     "the solve ratios are not comparable; re-record with `python -m bench baseline record`")
    return rows, notes


def fmt(v: float | None) -> str:
    if v is None or not math.isfinite(v):
        return "–"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"
