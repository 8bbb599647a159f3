"""``python -m bench plot RUN_DIR``: re-draw a finished run's plots without re-measuring."""

from __future__ import annotations

import argparse
import sys

HELP = "draw a run's plots (PNG: time and peak memory against the swept axis)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. results/runs/20261122T101500Z_abc1234")
    parser.add_argument("--out", metavar="DIR", help="where to write the PNGs (default: the run folder)")


def main(args: argparse.Namespace) -> int:
    from ..report.write import write_plots

    written = write_plots(args.run_dir, args.out)
    if not written:
        print(f"{args.run_dir}: nothing to plot (no finished cells with timings)", file=sys.stderr)
        return 1
    for p in written:
        print(p)
    return 0
