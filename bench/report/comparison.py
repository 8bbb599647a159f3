"""Render a :class:`bench.regression.statistics.Comparison`: Markdown for a pull-request comment, one line
per failure for a terminal or CI log, and JSON. Nothing here measures or decides."""

from __future__ import annotations

from typing import Any

from tabulate import tabulate

from ..regression.statistics import ALPHA, CONFIDENCE, PROCESS_NOISE_BOUND, THRESHOLDS, Comparison, Row
from .tables import fmt_count, fmt_ms, fmt_number


def _value(row: Row, v: float | None) -> str:
    return fmt_count(v) + " instr" if row.method == "instructions" else fmt_ms(v)

# Failures first, then what a reviewer should look at, then the rest.
_ORDER = ["broken", "slower", "inconclusive", "faster", "fixed", "unsupported", "not compared", "same"]


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else fmt_number(r, most_decimals=2) + "×"


def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "< 1e-6" if p < 1e-6 else f"{p:.2g}"


def fmt_change(r: float) -> str:
    return f"{(r - 1) * 100:+.0f} %"


def _cell_text(row: Row) -> str:
    """The label without the layer (the table has a layer column)."""
    return row.label.split(" ", 1)[1]


def _verdict_text(row: Row) -> str:
    text = row.verdict
    if row.verdict == "same" and row.significant and row.ratio is not None:
        text = f"same ({fmt_change(row.ratio)}, under the threshold)"
    if row.accepted:
        text += " — accepted"
    elif row.failing:
        text = f"**{text}**"
    return text


def _sorted(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (_ORDER.index(r.verdict) if r.verdict in _ORDER else len(_ORDER),
                                       r.layer, r.label, r.direction))


def failure_line(row: Row) -> str:
    """One line naming the layer, the cell, the direction and the ratio."""
    where = f"{row.layer} {row.direction}, cell {row.label}"
    if row.verdict == "broken":
        return f"{where}: ok in base, {row.new_status} in new ({row.message})"
    lo, hi = row.ci
    if row.method == "instructions":
        return (f"{where}: {fmt_change(row.ratio)} instructions per call ({fmt_count(row.base_median)} → "
                f"{fmt_count(row.new_median)}; threshold {fmt_change(1 + row.threshold)})")
    return (f"{where}: {fmt_ratio(row.ratio)} slower ({fmt_ms(row.base_median)} → {fmt_ms(row.new_median)} ms; "
            f"{CONFIDENCE:.0%} CI {fmt_ratio(lo)}–{fmt_ratio(hi)}, p {fmt_p(row.p_value)}; "
            f"threshold {fmt_ratio(1 + row.threshold)})")


def summary_lines(comparison: Comparison) -> list[str]:
    """What a CI log needs: every failure and every accepted regression, one line each."""
    lines = [f"REGRESSION: {failure_line(r)}" for r in _sorted(comparison.failures)]
    lines += [f"accepted regression: {failure_line(r)} — accepted by {r.accepted}" for r in comparison.accepted]
    lines += [f"note: marker {m} matched nothing" for m in comparison.unused_markers]
    return lines


def _run_text(desc: dict[str, Any]) -> str:
    git = desc.get("git") or {}
    sha = git.get("short") or "unknown"
    return f"`{sha}{'-dirty' if git.get('dirty') else ''}`" + (f" ({desc['path']})" if desc.get("path") else "")


def _thresholds_text(comparison: Comparison) -> str:
    used = sorted({r.threshold for r in comparison.rows})
    if len(used) == 1:
        return f"{used[0]:.0%}"
    return ", ".join(f"{t:.0%}" for t in used) or f"{THRESHOLDS['cpu']:.0%} on CPU, {THRESHOLDS['cuda']:.0%} on GPU"


def markdown(comparison: Comparison, base: dict[str, Any], new: dict[str, Any], notes: list[str] | None = None) -> str:
    """A pull-request comment. ``base``/``new``: ``{"git": ..., "path": ...}`` describing the runs."""
    failures, accepted = comparison.failures, comparison.accepted
    out = []
    if failures:
        head = f"{len(failures)} performance regression{'s' if len(failures) != 1 else ''}"
    elif comparison.compared:
        head = "no performance regression"
    else:
        head = "nothing could be compared"
    out.append(f"### {head}: {_run_text(base)} → {_run_text(new)}")
    out.append("")
    counts: dict[str, int] = {}
    for r in comparison.rows:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    out.append(", ".join(f"{n} {v}" for v, n in sorted(counts.items(), key=lambda kv: _ORDER.index(kv[0])))
               + f" (cell × direction){'; ' + str(len(accepted)) + ' accepted' if accepted else ''}.")
    out.append("")
    out.append(f"A row is **slower** when the difference is significant (p < {ALPHA:g}) *and* the whole "
               f"{CONFIDENCE:.0%} interval of the ratio new/base lies above 1 + threshold "
               f"({_thresholds_text(comparison)}); **broken** when it ran in base and fails in new. "
               + _methods_text(comparison))
    for note in notes or []:
        out.append(f"{note}")
    out.append("")
    rows = _sorted(comparison.rows)
    table = [[r.layer, _cell_text(r), r.direction,
              _value(r, r.base_median) if r.base_median is not None else r.base_status,
              _value(r, r.new_median) if r.new_median is not None else r.new_status,
              (f"{r.ratio:.4f}×" if r.method == "instructions" else
               f"{fmt_ratio(r.ratio)} [{fmt_ratio(r.ci[0])}–{fmt_ratio(r.ci[1])}]") if r.ci else "–",
              fmt_p(r.p_value), f"{r.base_rounds}/{r.new_rounds}" if r.ratio is not None and r.method != "instructions" else "–",
              _verdict_text(r)] for r in rows]
    out.append(tabulate(table, headers=["layer", "cell", "direction", "base", "new",
                                        f"new/base [{CONFIDENCE:.0%} CI]", "p", "rounds", "verdict"],
                        tablefmt="github", disable_numparse=True))
    details = [r for r in rows if r.message and r.verdict not in ("same", "slower", "faster")]
    # (inconclusive rows say there why they could not fail)
    if details:
        out.append("")
        out.extend(f"- {r.layer} {r.direction} ({_cell_text(r)}): {r.verdict}: {r.message}" for r in details)
    if accepted:
        out.append("")
        out.append("**Accepted regressions** (by an explicit `Perf-Regression-Accepted` marker):")
        out.extend(f"- {r.layer} {r.direction} ({_cell_text(r)}): {fmt_ratio(r.ratio) if r.ratio else r.new_status}, "
                   f"accepted by `{r.accepted.pattern}` ({r.accepted.source}): {r.accepted.reason}" for r in accepted)
    for title, records in (("Only in base", comparison.only_base), ("Only in new", comparison.only_new)):
        if records:
            from ..sweep.cells import Cell

            out.append("")
            out.append(f"**{title}** (not compared): "
                       + "; ".join(f"{Cell.from_dict(r['cell']).label()} ({r.get('status', '?')})" for r in records))
    if comparison.unused_markers:
        out.append("")
        out.extend(f"- marker `{m.pattern}` ({m.source}) matched no regression" for m in comparison.unused_markers)
    return "\n".join(out) + "\n"


def _methods_text(comparison: Comparison) -> str:
    """How the rows' p-values and intervals were got (bench/regression/statistics.py explains both)."""
    methods = {r.method for r in comparison.compared}
    out = []
    if "rounds" in methods:
        out.append("Rows measured in several worker processes a side compare the processes' medians (Welch's t on "
                   "their logarithms; the ratio is that of the geometric means), so the spread between processes "
                   "counts.")
    if "samples" in methods:
        out.append("Rows with one process a side compare the samples (Mann–Whitney U; bootstrap interval of the "
                   "ratio of medians): that tells whether the two processes differed, not whether the code did, so "
                   f"such a row (like one whose samples the machine disturbed) fails only beyond "
                   f"{PROCESS_NOISE_BOUND:g}× and is **inconclusive** below; for a gate, measure both revisions with "
                   "`python -m bench ab`.")
    if "instructions" in methods:
        out.append("Rows counted in instructions (callgrind) compare two deterministic counts: slower beyond the "
                   "threshold, no interval needed.")
    return " ".join(out)


def to_json(comparison: Comparison) -> dict[str, Any]:
    return {
        "failures": len(comparison.failures),
        "rows": [{"key": r.key, "cell": r.cell, "label": r.label, "direction": r.direction, "verdict": r.verdict,
                  "failing": r.failing, "accepted": str(r.accepted) if r.accepted else None, "ratio": r.ratio,
                  "ci": list(r.ci) if r.ci else None, "p_value": r.p_value, "significant": r.significant,
                  "method": r.method or None,
                  "threshold": r.threshold, "base_median_ms": r.base_median, "new_median_ms": r.new_median,
                  "base_n": r.base_n, "new_n": r.new_n, "base_rounds": r.base_rounds, "new_rounds": r.new_rounds,
                  "base_status": r.base_status, "new_status": r.new_status, "message": r.message}
                 for r in comparison.rows],
        "only_base": [r["key"] for r in comparison.only_base],
        "only_new": [r["key"] for r in comparison.only_new],
    }
