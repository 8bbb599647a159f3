"""Write a run's reports (tables and plots) from its records; used by `run`, `table` and `plot`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import tables
from ..records import RESULTS, foreign
from ..execution.runs import ENV, check_run_dir, load_config, load_records, read_json


def load_run(run_dir: str | Path) -> tuple[Path, dict[str, Any], dict[str, Any], list[dict[str, Any]]]:
    """(path, config, env, records) of a run folder; a warning for records that the run's
    configuration does not describe (copied in from another run?)."""
    import warnings

    path = check_run_dir(run_dir)
    env = read_json(path / ENV) if (path / ENV).exists() else {}
    config, records = load_config(path), load_records(path)
    others = foreign(records, config)
    if others:
        warnings.warn(f"{path / RESULTS}: {len(others)} record(s) do not belong to this run's configuration "
                      f"(copied from another run?), e.g. {others[0]['key']}", stacklevel=2)
    return path, config, env, records


def markdown_report(config: dict[str, Any], env: dict[str, Any], records: list[dict[str, Any]],
                    heading: str | None = None, metrics: list[str] | None = None) -> str:
    built = tables.build_tables(records, config.get("sweep", []), metrics)
    return tables.to_markdown(built, tables.describe_run(config, env), heading)


def write_tables(run_dir: str | Path) -> list[Path]:
    """``table.md``, ``table.csv``, ``table.tex``; for a preset's run also ``paper.md`` and
    ``paper.tex`` (ours beside the published table)."""
    path, config, env, records = load_run(run_dir)
    if not records:
        return []
    sweep = config.get("sweep", [])
    (path / "table.md").write_text(markdown_report(config, env, records, heading=f"invconv-bench run {path.name}"))
    (path / "table.csv").write_text(tables.to_csv(records))
    latex_tables = tables.build_tables(records, sweep, ["median", "memory", "params"])
    (path / "table.tex").write_text(tables.to_latex(latex_tables, tables.describe_run(config, env)))
    written = [path / "table.md", path / "table.csv", path / "table.tex"]
    table_id = (config.get("preset") or {}).get("paper_table")
    if table_id:
        for fmt, fname in (("md", "paper.md"), ("latex", "paper.tex")):
            (path / fname).write_text(render_paper_table(table_id, config, env, records, fmt))
            written.append(path / fname)
    return written


def render_paper_table(table_id: str, config: dict[str, Any], env: dict[str, Any], records: list[dict[str, Any]],
                       fmt: str = "md") -> str:
    """The published table ``table_id`` with our ``records`` beside it (md, latex or csv)."""
    from . import paper

    table = paper.render_paper(paper.load_table(table_id), config, env, records)
    if fmt == "latex":
        return paper.to_latex(table)
    if fmt == "csv":
        return paper.to_csv(table)
    return tables.to_markdown([table])


def paper_report(run_dir: str | Path, table_id: str, fmt: str = "md") -> str:
    _, config, env, records = load_run(run_dir)
    return render_paper_table(table_id, config, env, records, fmt)


def write_plots(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    from .plots import plot_run

    path, config, env, records = load_run(run_dir)
    if not records:
        return []
    lines = tables.describe_run(config, env)
    # A busy-machine warning comes first in the description; the plot keeps it above the device line.
    title = "\n".join(lines[:2]) if lines[0].startswith("Warning") else lines[0]
    return plot_run(records, config.get("sweep", []), Path(out_dir or path), title=title)
