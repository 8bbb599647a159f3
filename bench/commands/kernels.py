"""``python -m bench kernels``: the native solve against the PyTorch reference and ``F.conv2d``.

Times, in one process and on one device, the native solve, its backward, the PyTorch reference
solve, the inverse-flow layer's forward, the native solve on one thread, and ``F.conv2d``
(forward, and forward + weight gradient) of the same shape, then prints a Markdown table with the
medians, p20–p80, mean ± std, the arithmetic floor of the machine (an estimate, CPU only) and
the ratios of the speed goals (solve ÷ conv2d, solve+backward ÷ conv2d, reference ÷ native,
layer ÷ conv2d, one thread ÷ all), and, with two threads or more on a CPU, the threads'
hand-over latency after each round, flagged when it changed during a shape (a VM whose host
moved its CPUs: the multi-thread times then mix two states). ``-B``, ``-C`` and ``-k`` take comma-separated lists: every
combination is measured and a sweep table of the ratios per shape follows. Measuring is
:mod:`bench.timing.kernels`; this module only parses and renders.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

HELP = "time the native solve kernels against the PyTorch reference and F.conv2d"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("-B", "--batch", default=None,
                        help="batch size, or a comma-separated list to sweep (default 8 on cpu, 100 on cuda)")
    parser.add_argument("-C", "--channels", default="12", help="channels, or a comma-separated list to sweep")
    parser.add_argument("-H", "--height", type=int, default=32)
    parser.add_argument("-W", "--width", type=int, default=None, help="default: the height")
    parser.add_argument("-k", "--kernel-size", default="3", help="kernel size, or a comma-separated list to sweep")
    parser.add_argument("--orientation", default="TL", choices=["TL", "TR", "BL", "BR"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, pinned (default 2)")
    parser.add_argument("--min-calls", type=int, default=20, help="at least this many timed calls per op")
    parser.add_argument("--min-time", type=float, default=0.5, help="at least this many seconds per op")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the ops")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) PyTorch reference solve")
    parser.add_argument("--no-layer", action="store_true", help="skip the inverse-flow layer's forward")
    parser.add_argument("--json", action="store_true", help="print the record as JSON instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON record here, and the table beside it (.md)")


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f} µs" if us < 1e4 else f"{us / 1e3:,.2f} ms"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _floor_line(peak: dict | None, threads: int) -> str | None:
    if not peak:
        return None
    if peak.get("flop_per_cycle"):
        how = (f"{peak['flop_per_cycle']} FLOP/cycle per thread ({peak['isa']}, multiply-add rate measured: "
               f"{peak['measured_flops_per_thread'] / 1e9:.0f} GFLOP/s) × {peak['clock_ghz']:.2f} GHz (measured)")
    else:
        how = f"{peak['measured_flops_per_thread'] / 1e9:.0f} GFLOP/s per thread ({peak['isa']}, measured)"
    return (f"- arithmetic floor (an estimate): the op's FLOP ÷ (threads × {how}); "
            f"{threads} threads ≈ {threads * peak['flops_per_thread'] / 1e9:.0f} GFLOP/s")


#: The ratios of the sweep table (short names).
SWEEP_RATIOS = {"solve / conv2d": "solve ÷ conv", "solve+backward / conv2d": "solve+bwd ÷ conv",
                "solve+backward / conv2d+wgrad": "solve+bwd ÷ conv+wgrad",
                "inverse-flow forward / conv2d": "layer ÷ conv",
                "solve 1 thread / solve (thread speed-up)": "1 thread ÷ all"}


def _handover_range(res, collapse: bool = False) -> str:
    """The threads' hand-over latencies of a shape's rounds as "lo–hi" in ns (with ``collapse``,
    "lo" when they are equal)."""
    lo, hi = min(res.handover_ns), max(res.handover_ns)
    return f"{lo:.0f}" if collapse and hi - lo < 0.5 else f"{lo:.0f}–{hi:.0f}"


def _handover_line(res) -> str | None:
    """The threads' hand-over latency during a shape's rounds, flagged when it changed."""
    if not res.handover_ns:
        return None
    line = (f"- thread hand-over latency (one way, after each of {len(res.handover_ns)} rounds): "
            f"{_handover_range(res, collapse=True)} ns")
    if res.handover_changed():
        line += (" — **changed during the measurement**: the machine moved its CPUs, so the multi-thread "
                 "times above mix two states; rerun before comparing them")
    return line


def render_markdown(env: dict, results: list) -> str:
    """The table(s) of a run, with the environment it came from."""
    from tabulate import tabulate

    from ..timing.kernels import OPS

    lines = [f"`{env['command']}`", ""]
    hw = env.get("gpu") or env["cpu"]
    lines.append(f"torch {env['torch']}, {hw}, {env['torch_threads']} CPU threads"
                 + (f", CPU ISA {env['cpu_isa']}" if env.get("cpu_isa") else "")
                 + f", commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, {env['utc']}")
    if env.get("load_average"):
        lines.append(f"- load average (1, 5, 15 min) at the start: {', '.join(f'{x:.2f}' for x in env['load_average'])}")
    for device_type, s in env["solver"].items():
        lines.append(f"- solver on {device_type}: {s['solver']} — {s['reason'].splitlines()[0] if s['reason'] else ''}")
    floor_line = _floor_line(env.get("peak"), env["torch_threads"])
    if floor_line:
        lines.append(floor_line)
    lines.append("")
    for res in results:
        lines.append(f"**{res.shape.label()}**")
        lines.append("")
        rows = []
        for name, m in res.measurements.items():
            floor = res.floors.get(name)
            rows.append([name, _us(m.median), f"{_us(m.p20)} – {_us(m.p80)}", f"{_us(m.mean)} ± {_us(m.std)}",
                         m.n, _us(floor) if floor else "—",
                         f"{m.median / floor:.1f}×" if floor else "—", OPS[name]])
        lines.append(tabulate(rows, headers=["op", "median", "p20 – p80", "mean ± std", "n", "floor (est.)",
                                             "÷ floor", "what"], tablefmt="github"))
        lines.append("")
        lines.append(tabulate([[k, _ratio(v)] for k, v in res.ratios().items() if v is not None],
                              headers=["ratio (medians)", ""], tablefmt="github"))
        lines.append("")
        handover = _handover_line(res)
        if handover:
            lines += [handover, ""]
    if len(results) > 1:
        lines.append("**Sweep (medians; ratios of medians measured interleaved per shape)**")
        lines.append("")
        rows = []
        for r in results:
            solve = r.measurements["native solve"].median
            floor = r.floors.get("native solve")
            ratios = r.ratios()
            handover = (_handover_range(r) + (" (changed)" if r.handover_changed() else "")) if r.handover_ns else "—"
            rows.append([r.shape.batch, r.shape.channels, r.shape.kernel_size, _us(solve),
                         _us(floor) if floor else "—", _us(r.measurements["conv2d"].median)]
                        + [_ratio(ratios[k]) for k in SWEEP_RATIOS] + [handover])
        lines.append(tabulate(rows, headers=["B", "C", "k", "solve", "solve floor (est.)", "conv2d"]
                              + list(SWEEP_RATIOS.values()) + ["hand-over ns"], tablefmt="github"))
        lines.append("")
    return "\n".join(lines)


def _positive_list(value: str, flag: str, what: str) -> list[int]:
    """A positive integer or a comma-separated list of them, else a one-line usage error."""
    from ..errors import UsageError

    try:
        out = [int(v) for v in value.split(",")]
    except ValueError:
        raise UsageError(f"{flag} {value!r}: expected an integer or a comma-separated list of {what} "
                         f"(positive integers)") from None
    bad = [v for v in out if v < 1]
    if bad:
        raise UsageError(f"{flag} {value!r}: {what} must be positive integers (>= 1), got {bad[0]}")
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    from ..errors import UsageError
    from ..timing.kernels import Shape, environment, machine_peak, measure_shape
    from layers import native

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: the native kernels exist for cpu and cuda only")
    if args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be a positive integer (>= 1)")
    batches = _positive_list(args.batch or ("100" if device.type == "cuda" else "8"), "--batch", "batch sizes")
    channels = _positive_list(args.channels, "--channels", "channel counts")
    kernel_sizes = _positive_list(args.kernel_size, "--kernel-size", "kernel sizes")
    if args.height < 1 or (args.width is not None and args.width < 1):
        raise UsageError(f"--height/--width {args.height}/{args.width}: must be positive integers (>= 1)")
    if args.rounds < 1 or args.min_calls < 1 or not args.min_time >= 0:
        raise UsageError("--rounds and --min-calls must be >= 1 and --min-time a number >= 0")
    torch.set_num_threads(args.threads)
    width = args.width or args.height
    status = native.load(device.type)  # the first-use build, outside any timing
    if not status.available:
        print(f"python -m bench kernels: the native {device.type} solver is unavailable: {status.reason}",
              file=sys.stderr)
        return 1
    load_average = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    peak = machine_peak(device.type, args.dtype)
    results = []
    for c in channels:
        for k in kernel_sizes:
            for b in batches:
                shape = Shape(str(device), args.dtype, b, c, args.height, width, k, args.orientation)
                print(f"measuring {shape.label()} ...", file=sys.stderr, flush=True)
                results.append(measure_shape(shape, min_calls=args.min_calls, min_seconds=args.min_time,
                                             rounds=args.rounds, include_reference=not args.no_reference,
                                             include_layer=not args.no_layer, peak=peak))
    env = environment(device.type)
    env["load_average"] = load_average
    env["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    env["peak"] = peak
    record = {"environment": env, "results": [r.as_dict() for r in results]}
    table = render_markdown(env, results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    print(json.dumps(record, indent=1) if args.json else table)
    return 0
