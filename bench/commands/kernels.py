"""``python -m bench kernels``: the native solve against the PyTorch reference and ``F.conv2d``.

Times, in one process and on one device, the native solve, its backward, the PyTorch reference
solve, and ``F.conv2d`` (forward, and forward + weight gradient) of the same shape, then prints a
Markdown table with the medians, p20–p80, mean ± std and the ratios of the speed goals
(solve ÷ conv2d, solve+backward ÷ conv2d, reference ÷ native). Measuring is
:mod:`bench.opbench`; this module only parses and renders.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HELP = "time the native solve kernels against the PyTorch reference and F.conv2d"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("-B", "--batch", default=None,
                        help="batch size, or a comma-separated list to sweep (default 8 on cpu, 100 on cuda)")
    parser.add_argument("-C", "--channels", type=int, default=12)
    parser.add_argument("-H", "--height", type=int, default=32)
    parser.add_argument("-W", "--width", type=int, default=None, help="default: the height")
    parser.add_argument("-k", "--kernel-size", type=int, default=3)
    parser.add_argument("--orientation", default="TL", choices=["TL", "TR", "BL", "BR"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads, pinned (default 2)")
    parser.add_argument("--min-calls", type=int, default=20, help="at least this many timed calls per op")
    parser.add_argument("--min-time", type=float, default=0.5, help="at least this many seconds per op")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds over the ops")
    parser.add_argument("--no-reference", action="store_true", help="skip the (slow) PyTorch reference solve")
    parser.add_argument("--json", action="store_true", help="print the record as JSON instead of the table")
    parser.add_argument("--out", type=Path, help="also write the JSON record here, and the table beside it (.md)")


def _us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.1f} µs" if us < 1e4 else f"{us / 1e3:,.2f} ms"


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def render_markdown(env: dict, results: list) -> str:
    """The table(s) of a run, with the environment it came from."""
    from tabulate import tabulate

    from bench.opbench import OPS

    lines = [f"`{env['command']}`", ""]
    hw = env.get("gpu") or env["cpu"]
    lines.append(f"torch {env['torch']}, {hw}, {env['torch_threads']} CPU threads"
                 + (f", CPU ISA {env['cpu_isa']}" if env.get("cpu_isa") else "")
                 + f", commit {env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, {env['utc']}")
    for device_type, s in env["solver"].items():
        lines.append(f"- solver on {device_type}: {s['solver']} — {s['reason'].splitlines()[0] if s['reason'] else ''}")
    lines.append("")
    for res in results:
        lines.append(f"**{res.shape.label()}**")
        lines.append("")
        rows = []
        for name, m in res.measurements.items():
            rows.append([name, _us(m.median), f"{_us(m.p20)} – {_us(m.p80)}", f"{_us(m.mean)} ± {_us(m.std)}",
                         len(m.samples), OPS[name]])
        lines.append(tabulate(rows, headers=["op", "median", "p20 – p80", "mean ± std", "n", "what"],
                              tablefmt="github"))
        lines.append("")
        lines.append(tabulate([[k, _ratio(v)] for k, v in res.ratios().items()], headers=["ratio (medians)", ""],
                              tablefmt="github"))
        lines.append("")
    if len(results) > 1:
        lines.append("**Batch sweep (medians)**")
        lines.append("")
        names = list(results[0].measurements)
        rows = [[r.shape.batch] + [_us(r.measurements[n].median) for n in names]
                + [_ratio(r.ratios()["solve / conv2d"])] for r in results]
        lines.append(tabulate(rows, headers=["B"] + names + ["solve / conv2d"], tablefmt="github"))
        lines.append("")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    import torch

    from bench.cli import UsageError
    from bench.opbench import Shape, environment, measure_shape
    from layers import native

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: the native kernels exist for cpu and cuda only")
    if args.threads < 1:
        raise UsageError("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    try:
        batches = [int(b) for b in (args.batch or ("100" if device.type == "cuda" else "8")).split(",")]
    except ValueError:
        raise UsageError(f"--batch {args.batch!r}: expected an integer or a comma-separated list") from None
    width = args.width or args.height
    status = native.load(device.type)  # the first-use build, outside any timing
    if not status.available:
        print(f"python -m bench kernels: the native {device.type} solver is unavailable: {status.reason}",
              file=sys.stderr)
        return 1
    results = []
    for b in batches:
        shape = Shape(str(device), args.dtype, b, args.channels, args.height, width, args.kernel_size,
                      args.orientation)
        print(f"measuring {shape.label()} ...", file=sys.stderr, flush=True)
        results.append(measure_shape(shape, min_calls=args.min_calls, min_seconds=args.min_time,
                                     rounds=args.rounds, include_reference=not args.no_reference))
    env = environment(device.type)
    record = {"environment": env, "results": [r.as_dict() for r in results]}
    table = render_markdown(env, results)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
        print(f"wrote {args.out} and {args.out.with_suffix('.md')}", file=sys.stderr)
    print(json.dumps(record, indent=1) if args.json else table)
    return 0
