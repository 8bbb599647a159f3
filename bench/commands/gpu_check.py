"""``python -m bench gpu-check``: one command that proves the native CUDA solve on this machine.

Builds the CUDA kernels (first use), then checks them against the PyTorch reference solve, the
dense solve and the residuals ``T x − y`` / ``Tᵀ λ − g`` (in float64) over images from 16² to
256², C from 3 to 96, k from 1 to 11, batches up to 128, float32 and float64: the solve, the
adjoint solve and the gradients; row strips and the column ring forced; non-contiguous and
channels-last inputs; a side stream; a second GPU if there is one; bitwise determinism over
repeated launches; the fallback of ``INVCONV_SOLVER=auto`` for a shape that does not fit;
``inverse-flow`` and ``finc`` under the native solver against the reference, captured in a
CUDA graph and compiled with ``torch.compile(fullgraph=True)``. Every case runs in a worker
process under a watchdog (``--case-timeout``): a hang is reported as ``timeout`` and the next
case runs in a fresh worker. Where ``compute-sanitizer`` is installed, ``racecheck`` and
``memcheck`` run on a few small cases (strips, ring, k = 1). Finally the kernels are timed
against cuDNN's ``F.conv2d`` of the same shape at the papers' settings (B = 100, C = 12, 32²
and 256², k = 3; k = 11; C = 24).

Writes one folder (default ``results/gpu/check-<UTC>``): ``env.json`` (the environment record,
with the build time), ``cases.jsonl`` (every case: parameters, each check's error and
tolerance, status, seconds), ``timings.json`` and ``summary.md`` (pass/fail table and timings).
Exit status 0 when every case passes, 1 otherwise, 2 when there is no GPU. ``--device cpu``
runs the same machinery on the CPU kernel (streams, graphs and the sanitizer do not apply).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HELP = "prove the native CUDA solve on this GPU: correctness, hangs, races, determinism, timings"
DESCRIPTION = __doc__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default results/gpu/check-<UTC timestamp>)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                        help="cuda (default), or cpu to run the same checks on the CPU kernel")
    parser.add_argument("--case-timeout", type=float, default=None,
                        help="seconds before a case counts as hung (default 90 on cuda, 300 on cpu, where the "
                             "reference is slow; compile, timing and sanitizer cases get 4x)")
    parser.add_argument("--smoke", action="store_true", help="a handful of small cases instead of the full list")
    parser.add_argument("--no-sanitizer", action="store_true", help="skip compute-sanitizer")
    parser.add_argument("--no-timings", action="store_true", help="skip the timings against cuDNN")


def main(args: argparse.Namespace) -> int:
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        print(f"python -m bench gpu-check: no GPU here ({why}; torch {torch.__version__}): nothing to check",
              file=sys.stderr)
        return 2
    from .. import environment
    from ..environment import utc_now
    from ..native_check import (ROOT, SANITIZER_CASES, TIMING_SHAPES, check_cases, default_cases, render_summary,
                                run_sanitizer)
    from layers import native

    t_start = time.perf_counter()
    if args.case_timeout is None:
        args.case_timeout = 90.0 if args.device == "cuda" else 300.0
    out = args.out or ROOT / "results" / "gpu" / f"check-{utc_now().strftime('%Y%m%dT%H%M%SZ')}"
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "worker.log"
    print(f"gpu-check: building or loading the native {args.device} solver ...", file=sys.stderr, flush=True)
    status = native.load(args.device)
    build = status.reason if status.available else f"UNAVAILABLE: {status.reason}"
    env = environment.collect()
    env["native_build"] = {"available": status.available, "reason": status.reason, "seconds": status.seconds,
                           "compiled_now": status.compiled}
    (out / "env.json").write_text(json.dumps(env, indent=1, default=str) + "\n")
    if not status.available:
        print(f"gpu-check: the native {args.device} solver is unavailable: {status.reason}", file=sys.stderr)
        (out / "summary.md").write_text(f"# gpu-check\n\nnative build failed:\n\n```\n{status.reason}\n```\n")
        return 1
    device_count = torch.cuda.device_count() if args.device == "cuda" else 1
    cases = default_cases(args.device, device_count, smoke=args.smoke)
    print(f"gpu-check: {len(cases)} cases, each under a {args.case_timeout:.0f} s watchdog; results in {out}",
          file=sys.stderr, flush=True)

    def progress(r):
        failed = [f"{n}: {c['err']:.1e} > {c['tol']:.0e}" if "err" in c else n
                  for n, c in r.get("checks", {}).items() if not c["ok"]]
        note = "; ".join(failed) or r.get("message", "")
        print(f"  {r['status']:>7}  {r['id']}  ({r.get('seconds', 0):.1f} s)"
              + (f"  {note[:160]}" if r["status"] != "pass" else ""), file=sys.stderr, flush=True)

    results = check_cases(cases, args.device, args.case_timeout, log_path, progress)
    if args.device == "cuda" and not args.no_sanitizer:
        for tool in ("racecheck", "memcheck"):
            print(f"gpu-check: compute-sanitizer --tool {tool} on {len(SANITIZER_CASES)} small cases ...",
                  file=sys.stderr, flush=True)
            record = run_sanitizer(tool, SANITIZER_CASES, args.device, args.case_timeout * 4, log_path)
            results.append(record)
            progress(record)
    timings = []
    if not args.no_timings:
        shapes = TIMING_SHAPES if args.device == "cuda" else [(8, 12, 32, 32, 3)]
        tcases = [{"kind": "timing", "shape": [b, c, h, w], "k": k, "dtype": "float32",
                   "id": f"B={b} C={c} {h}x{w} k={k}", "slow": True} for b, c, h, w, k in shapes]
        print(f"gpu-check: timing {len(tcases)} shapes against F.conv2d ...", file=sys.stderr, flush=True)
        timings = check_cases(tcases, args.device, args.case_timeout, log_path, progress)
        (out / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    with open(out / "cases.jsonl", "w") as f:
        for r in results:
            f.write(json.dumps(r) + "\n")
    wall = time.perf_counter() - t_start
    summary = render_summary(env, results, timings, build, wall)
    (out / "summary.md").write_text(summary)
    bad = [r for r in results + timings if r["status"] not in ("pass", "skip")]
    print(summary)
    print(f"gpu-check: {len(results) - len(bad)} of {len(results)} checks passed in {wall:.0f} s; wrote {out}",
          file=sys.stderr)
    return 1 if bad else 0
