"""``python -m bench table RUN_DIR``: re-render a finished run's tables without re-measuring.

``--paper ID`` renders a published table (results/paper/ID.toml) in the paper's layout with the
run's measurements beside the published numbers.
"""

from __future__ import annotations

import argparse
import sys

HELP = "render a run's tables (Markdown, CSV or LaTeX) from its records, or beside a published table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from ..report.tables import METRICS

    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder, e.g. results/runs/20261122T101500Z_abc1234")
    parser.add_argument("--format", choices=("md", "csv", "latex"), default="md", help="output format (default md)")
    parser.add_argument("--metric", action="append", choices=METRICS, metavar="METRIC",
                        help=f"which tables, repeatable: {', '.join(METRICS)} (default: median, memory, params, "
                             "recon_error; CSV always has every column)")
    parser.add_argument("--paper", metavar="TABLE",
                        help="render the published table TABLE (an id of results/paper/, e.g. ablation-kernel-size, "
                             "cifar, mnist, finc; 'preset' = the run's preset's table) with ours beside it, in the "
                             "paper's layout")
    parser.add_argument("--write", action="store_true",
                        help="also rewrite table.md, table.csv and table.tex (and paper.md, paper.tex for a preset's "
                             "run) in the run folder")


def main(args: argparse.Namespace) -> int:
    from ..report import tables
    from ..errors import UsageError
    from ..report.write import load_run, markdown_report, render_paper_table, write_tables

    path, config, env, records = load_run(args.run_dir)
    if not records:
        print(f"{path}: no finished cells yet", file=sys.stderr)
        return 1
    if args.paper:
        from ..report.paper import PaperTableError

        table_id = args.paper
        if table_id == "preset":
            table_id = (config.get("preset") or {}).get("paper_table")
            if not table_id:
                raise UsageError(f"{path} was not run from a preset; name the table: --paper ID")
        try:
            sys.stdout.write(render_paper_table(table_id, config, env, records, args.format))
        except PaperTableError as exc:
            raise UsageError(str(exc)) from None
    elif args.format == "csv":
        sys.stdout.write(tables.to_csv(records))
    elif args.format == "latex":
        sys.stdout.write(tables.to_latex(tables.build_tables(records, config.get("sweep", []), args.metric),
                                         tables.describe_run(config, env)))
    else:
        sys.stdout.write(markdown_report(config, env, records, metrics=args.metric))
    if args.write:
        write_tables(path)
    return 0
