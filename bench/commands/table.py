"""``python -m bench table RUN_DIR``: re-render a finished run's tables without re-measuring."""

from __future__ import annotations

import argparse
import sys

HELP = "render a run's tables (Markdown, CSV or LaTeX) from its records"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..render import METRICS

    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. results/runs/20261122T101500Z_abc1234")
    parser.add_argument("--format", choices=("md", "csv", "latex"), default="md", help="output format (default md)")
    parser.add_argument("--metric", action="append", choices=METRICS, metavar="METRIC",
                        help=f"which tables, repeatable: {', '.join(METRICS)} (default: median, memory, params, "
                             "recon_error; CSV always has every column)")
    parser.add_argument("--write", action="store_true",
                        help="also rewrite table.md, table.csv and table.tex in the run folder")


def main(args: argparse.Namespace) -> int:
    from .. import render
    from ..report import load_run, markdown_report, write_tables

    path, config, env, records = load_run(args.run_dir)
    if not records:
        print(f"{path}: no finished cells yet", file=sys.stderr)
        return 1
    if args.format == "csv":
        sys.stdout.write(render.to_csv(records))
    elif args.format == "latex":
        sys.stdout.write(render.to_latex(render.tables(records, config.get("sweep", []), args.metric),
                                         render.describe_run(config, env)))
    else:
        sys.stdout.write(markdown_report(config, env, records, metrics=args.metric))
    if args.write:
        write_tables(path)
    return 0
