"""``python -m bench compare BASE_RUN NEW_RUN``: is NEW slower than BASE, cell by cell?

For every cell both runs measured (matched by shape, layer, device, dtype and options) and every
direction: the ratio new/base with a confidence interval, a p-value, and a verdict (slower,
faster, same, broken, …; the statistics and the policy are in ``bench/regression/statistics.py``). Runs
made by ``bench ab`` hold several worker processes a side and are compared process by process;
two ``bench run`` folders hold one process per cell and are compared sample by sample, which
shows whether the two processes differed, not whether the code did. Prints a Markdown summary for a pull-request comment. Exit status 1
when a cell is significantly slower *and* beyond the threshold, or ok in BASE but failing in
NEW, unless accepted with ``--accept``/``--accept-from``; 0 otherwise.

Two runs from different times or machines differ for reasons other than the code: for a gate,
use ``python -m bench ab``, which measures both revisions interleaved on one machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError
from . import gate

HELP = "compare two runs cell by cell: median ratio, confidence interval, verdict (exit 1 on a regression)"
DESCRIPTION = __doc__ + """
examples:
  python -m bench compare results/runs/20261122T101500Z_abc1234 results/runs/20261123T090000Z_def5678
  python -m bench compare BASE NEW --threshold 15% --markdown comment.md
  python -m bench compare BASE NEW --accept-from HEAD
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("base_run", metavar="BASE_RUN", help="the reference run folder")
    p.add_argument("new_run", metavar="NEW_RUN", help="the run folder to judge")
    p.add_argument("--threshold", type=gate.fraction, metavar="FRACTION|N%",
                   help="minimum slowdown that fails (default: 10%% for GPU cells, 25%% for CPU cells)")
    gate.add_accept_arguments(p)
    gate.add_report_arguments(p)


def describe(run_dir: Path, env: dict) -> dict:
    return {"git": env.get("git") or {}, "path": str(run_dir)}


def report(comparison, base_desc: dict, new_desc: dict, args: argparse.Namespace, notes: list[str] | None = None) -> int:
    """Print and write the reports of a comparison; the exit status."""
    from ..report.comparison import markdown, summary_lines, to_json

    if not comparison.rows:
        raise UsageError("the two runs have no cell in common: nothing to compare")
    text = markdown(comparison, base_desc, new_desc, notes)
    sys.stdout.write(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(comparison), indent=2) + "\n")
    for line in summary_lines(comparison):
        print(line, file=sys.stderr)
    if comparison.failures:
        print(f"{len(comparison.failures)} regression(s); to accept an intended one, add a trailer "
              "'Perf-Regression-Accepted: PATTERN — REASON' to the commit message (see docs/regression.md)", file=sys.stderr)
        return 1
    return 0


def main(args: argparse.Namespace) -> int:
    from ..regression.statistics import compare_records
    from ..report.write import load_run

    base_dir, _, base_env, base_records = load_run(args.base_run)
    new_dir, _, new_env, new_records = load_run(args.new_run)
    comparison = compare_records(base_records, new_records, args.threshold, gate.markers(args))
    return report(comparison, describe(base_dir, base_env), describe(new_dir, new_env), args)
