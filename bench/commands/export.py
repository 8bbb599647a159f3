"""``python -m bench export RUN_DIR``: a run's timings as JSON for existing trackers.

``--format github-action-benchmark`` writes the ``customSmallerIsBetter`` list that
github-action-benchmark stores and charts per commit; ``--format pytest-benchmark`` writes what
``pytest --benchmark-save`` would, for ``pytest-benchmark compare``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError

HELP = "export a run's timings as github-action-benchmark or pytest-benchmark JSON"
DESCRIPTION = __doc__ + """
examples:
  python -m bench export results/runs/20261122T101500Z_abc1234 --format github-action-benchmark -o bench.json
  python -m bench export RUN_DIR --format pytest-benchmark -o .benchmarks/run.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..report.export import FORMATS

    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder")
    p.add_argument("--format", choices=FORMATS, default="github-action-benchmark",
                   help="github-action-benchmark (customSmallerIsBetter, default) or pytest-benchmark")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of standard output")


def main(args: argparse.Namespace) -> int:
    from ..report.export import export
    from ..report.write import load_run

    _, _, env, records = load_run(args.run_dir)
    try:
        data = export(records, env, args.format)
    except RuntimeError as exc:
        raise UsageError(str(exc)) from None
    if not (data if isinstance(data, list) else data["benchmarks"]):
        print(f"{args.run_dir}: no finished timings to export", file=sys.stderr)
    text = json.dumps(data, indent=2) + "\n"
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
