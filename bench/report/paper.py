"""The papers' published tables, and ours rendered beside them in the papers' layout.

The published numbers live as data in ``results/paper/<id>.toml`` (one file per table: its
source, hardware, setting, columns and rows; see ``results/paper/README.md``). This module loads
them and renders a run's records beside them — rendering only: nothing here measures.

A published number is context, never a target (docs/math.md §7): the hardware, the software and the
timing methods differ, and some published timings wrapped asynchronous CUDA calls in host timers.
Every rendering says so, names both machines, and states how we read the paper's model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..locations import paper_table_ids, paper_tables_dir, read_toml
from ..records import axis_value, exact_inverse
from .tables import Table, fmt_ms, hardware

PAPER_DIR = paper_tables_dir()

LAYOUTS = ("methods", "axis")
AXES = ("input_size", "batch", "kernel_size")
# What an ``ours`` entry of a column may name.
OURS = ("forward", "sampling", "train", "params", "inverse", "memory:forward", "memory:sampling", "memory:train")
TIME_UNITS = {"ms": 1.0, "s": 1e3}
SECONDS_MARK = "*"

CONTEXT_NOTE = ("A published number is context, never a target: hardware, software and timing methods differ "
                "(docs/math.md §7).")
NOT_IMPLEMENTED = "not implemented"
NOT_RUN = "not in this run"


class PaperTableError(ValueError):
    """A paper-table file that is missing or malformed, or an unknown table id."""


@dataclass(frozen=True)
class Column:
    key: str
    title: str
    unit: str | None = None
    ours: str | None = None  # which of our measurements goes beside it (see OURS), or None

    def heading(self) -> str:
        return f"{self.title} ({self.unit})" if self.unit else self.title


@dataclass
class PaperTable:
    """One published table: metadata, columns and rows (values as published, as strings)."""

    id: str
    label: str
    title: str
    source: str
    hardware: str
    layout: str
    setting: str
    interpretation: str
    columns: list[Column]
    rows: list[dict[str, Any]]
    axis: str | None = None
    layer: str | None = None
    notes: list[str] = field(default_factory=list)
    delta: dict[str, Any] | None = None
    path: Path | None = None

    def layers(self) -> list[str]:
        """Our layer names that this table refers to."""
        if self.layout == "axis":
            return [self.layer] if self.layer else []
        return list(dict.fromkeys(r["layer"] for r in self.rows if r.get("layer")))


# ---------------------------------------------------------------------------------------------
# Loading


def load_table(table_id: str, directory: Path = PAPER_DIR) -> PaperTable:
    """The published table ``table_id``; ``PaperTableError`` naming the known ids otherwise."""
    path = Path(directory) / f"{table_id}.toml"
    if not path.exists():
        known = ", ".join(paper_table_ids(directory)) or "(none)"
        raise PaperTableError(f"unknown paper table {table_id!r}; known: {known} (files in {directory})")
    return parse_table(read_toml(path), path)


_REQUIRED = ("id", "label", "title", "source", "hardware", "layout", "setting", "interpretation", "columns", "rows")


def parse_table(d: dict[str, Any], path: Path | None = None) -> PaperTable:
    where = str(path) if path else "paper table"
    missing = [k for k in _REQUIRED if k not in d]
    if missing:
        raise PaperTableError(f"{where}: missing {', '.join(missing)}")
    if d["layout"] not in LAYOUTS:
        raise PaperTableError(f"{where}: layout must be one of {', '.join(LAYOUTS)}, got {d['layout']!r}")
    columns = []
    for c in d["columns"]:
        unknown = set(c) - {"key", "title", "unit", "ours"}
        if unknown or "key" not in c or "title" not in c:
            raise PaperTableError(f"{where}: a column needs key and title (and may have unit, ours), got {c}")
        if c.get("ours") is not None and c["ours"] not in OURS:
            raise PaperTableError(f"{where}: column {c['key']}: ours must be one of {', '.join(OURS)}")
        if c.get("ours") in ("forward", "sampling", "train") and c.get("unit") not in TIME_UNITS:
            raise PaperTableError(f"{where}: column {c['key']}: a time needs unit 'ms' or 's'")
        columns.append(Column(**c))
    keys = {c.key for c in columns}
    if d["layout"] == "axis":
        if d.get("axis") not in AXES or not d.get("layer"):
            raise PaperTableError(f"{where}: an axis table needs axis (one of {', '.join(AXES)}) and layer")
        if any("value" not in r for r in d["rows"]):
            raise PaperTableError(f"{where}: every row of an axis table needs a value")
    elif any("method" not in r for r in d["rows"]):
        raise PaperTableError(f"{where}: every row of a methods table needs a method")
    for r in d["rows"]:
        for k, v in r.items():
            base = k.removesuffix("_pm").removesuffix("_unit")
            if k not in ("value", "method", "layer", "input", "architecture") and base not in keys:
                raise PaperTableError(f"{where}: row field {k!r} matches no column")
            if k.endswith("_unit") and v not in TIME_UNITS:
                raise PaperTableError(f"{where}: {k} must be one of {', '.join(TIME_UNITS)}")
    delta = d.get("delta")
    if delta is not None and (delta.get("column") not in keys or "reference" not in delta):
        raise PaperTableError(f"{where}: delta needs column (a column key) and reference (an axis value)")
    return PaperTable(
        id=d["id"], label=d["label"], title=d["title"], source=d["source"], hardware=d["hardware"],
        layout=d["layout"], setting=d["setting"], interpretation=d["interpretation"], columns=columns,
        rows=[dict(r) for r in d["rows"]], axis=d.get("axis"), layer=d.get("layer"),
        notes=list(d.get("notes", [])), delta=delta, path=path,
    )


# ---------------------------------------------------------------------------------------------
# Formatting


def _decimals(text: str) -> int:
    return len(text.split(".", 1)[1]) if "." in text else 0


def _paper_text(row: dict[str, Any], col: Column) -> str:
    value = row.get(col.key)
    if value is None:
        return "–"
    text = str(value)
    if row.get(f"{col.key}_unit") == "s" and col.unit == "ms":
        text += SECONDS_MARK
    pm = row.get(f"{col.key}_pm")
    return f"{text} ± {pm}" if pm is not None else text


def _fmt_time(ms: float, unit: str) -> str:
    if unit == "s":
        v = ms / 1e3
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return fmt_ms(ms)


def _axis_text(axis: str, value: Any) -> str:
    if axis == "input_size":
        return f"{value}x{value}"
    if axis == "kernel_size":
        return f"{value}x{value}"
    return str(value)


def _shape(cell: dict[str, Any]) -> str:
    return f"{cell['channels']}x{cell['height']}x{cell['width']}"


def _ours_text(record: dict[str, Any] | None, col: Column, missing: str, row_unit: str | None = None) -> str:
    """Our value for ``col``; a time in the row's own unit where the paper printed it in another
    (MintNet's CIFAR ST in seconds), marked like the published one."""
    if record is None:
        return missing
    what = col.ours
    if what == "inverse":
        exact = exact_inverse(record)
        return "?" if exact is None else "exact" if exact else "approx"
    if what == "params":
        p = record.get("params")
        return f"{p / 1e6:.3f}" if p is not None else record.get("status", "–")
    direction = what.split(":")[-1]
    d = record.get("directions", {}).get(direction)
    if d is None:
        return "not measured"
    if d.get("status") != "ok" or d.get("mean_ms") is None:
        return d.get("status", "–")
    if what.startswith("memory:"):
        b = d.get("peak_mem_bytes")
        return "–" if b is None else f"{b / 2**30:.3f}"
    unit = row_unit or col.unit
    mark = SECONDS_MARK if unit == "s" and col.unit == "ms" else ""
    return f"{_fmt_time(d['mean_ms'], unit)}{mark} ± {_fmt_time(d['std_ms'], unit)}"


def _ours_heading(col: Column) -> str:
    unit = {"GB": "GiB", "M": "M"}.get(col.unit or "", col.unit)
    return f"{col.title} ({unit}) ours" if unit else f"{col.title} ours"


# ---------------------------------------------------------------------------------------------
# Matching our records to the published rows


def _model_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted((r for r in records if r["cell"].get("scope") == "model"), key=lambda r: r["key"])


def _architecture_name(cell: dict[str, Any]) -> str | None:
    return (cell.get("architecture") or {}).get("name")


def _match_methods(table: PaperTable, records: list[dict[str, Any]], notes: list[str]):
    """{row index: [records]} (empty: nothing of ours), plus our records no published row refers to.

    A row that names an ``architecture`` (a published model of ours, ``bench.sweep.models``) gets
    every record of that architecture (e.g. MintNet sampled at 100 iterations and to a
    tolerance), then the layer's records in our Glow-style model; a row without one gets the
    first Glow-style record of its layer (and a note if there were several).
    """
    matched: dict[int, list[dict[str, Any]]] = {}
    used: set[str] = set()
    for i, row in enumerate(table.rows):
        layer = row.get("layer")
        if not layer:
            matched[i] = []
            continue
        found = [r for r in records if r["cell"]["layer"] == layer
                 and ("input" not in row or _shape(r["cell"]) == row["input"])]
        glow = [r for r in found if _architecture_name(r["cell"]) is None]
        if row.get("architecture"):
            own = [r for r in found if _architecture_name(r["cell"]) == row["architecture"]]
            matched[i] = own + glow
            used.update(r["key"] for r in own + glow)
            continue
        matched[i] = glow[:1]
        if len(glow) > 1:
            first = glow[0]["cell"]
            notes.append(f"{row['method']}: {len(glow)} of our cells match; showing batch {first['batch']}, "
                         f"input {_shape(first)}, kernel size {first['kernel_size']}")
        used.update(r["key"] for r in glow)
    extra = [r for r in records if r["key"] not in used]
    return matched, extra


def _layer_text(record: dict[str, Any]) -> str:
    """Our layer, which architecture was timed, and what an iterative inverse did."""
    from ..timing.diagnostics import describe
    from ..sweep.cells import architecture_label

    cell = record["cell"]
    text = cell["layer"]
    if cell.get("architecture"):
        text += f" in {architecture_label(cell['architecture'])}"
    elif cell.get("scope") == "model":
        text += " in our Glow-style model"
    diag = describe(record.get("directions", {}).get("sampling", {}).get("inverse_diagnostics"))
    return f"{text} (sampling: {diag})" if diag else text


def _match_axis(table: PaperTable, records: list[dict[str, Any]], notes: list[str]):
    """{axis value: record} for the table's layer (first cell per value), in sorted order."""
    by_value: dict[Any, list[dict[str, Any]]] = {}
    for r in records:
        if r["cell"]["layer"] == table.layer:
            by_value.setdefault(axis_value(r["cell"], table.axis), []).append(r)
    for v, rs in by_value.items():
        if len(rs) > 1:
            notes.append(f"{_axis_text(table.axis, v)}: {len(rs)} of our cells match; showing the first")
    return {v: rs[0] for v, rs in by_value.items()}


# ---------------------------------------------------------------------------------------------
# The rendering


def _describe_ours(config: dict[str, Any], env: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    env = env or {}
    device = config.get("device", "?")
    hw, threads = hardware(config, env)
    git = env.get("git", {})
    when = (env.get("timestamp_utc") or "")[:10]
    lines = [f"Ours: {device} ({hw}), {config.get('dtype', '?')}, torch {env.get('torch', {}).get('version', '?')}, "
             f"threads {threads}; code {git.get('short') or 'unknown'}{' (dirty)' if git.get('dirty') else ''}"
             + (f"; measured {when}." if when else ".")]
    values = config.get("values", {})
    model = config.get("model", {})
    if config.get("scope") == "model":
        cells = [r["cell"] for r in records]
        mixing = sorted({(r["cell"]["layer"], tuple(r.get("mixing_used") or [])) for r in records
                         if r.get("mixing_used") is not None and not r["cell"].get("architecture")})
        mix_text = "; ".join(f"{layer} {'+1x1' if any(m) else 'no 1x1'}" for layer, m in mixing) or "per layer"
        shapes = sorted({_shape(c) for c in cells}) or [f"{values.get('channels', ['?'])[0]}x?"]
        lines.append(
            f"Our model: {model.get('levels')} levels × {model.get('steps')} steps of ActNorm → layer → "
            f"[1×1 where the layer does not mix channels] → affine coupling (hidden width {model.get('hidden_width')}); "
            f"input {', '.join(shapes)}; batch {_values_text(values.get('batch'))}; kernel size "
            f"{_values_text(values.get('kernel_size'))}; 1×1 mixing: {mix_text}.")
    else:
        lines.append("Our run measured single layers, not models: the published tables time whole flows, so the "
                     "two are not the same quantity (use --scope model or a preset).")
    lines.append("Times: paper as published (mean ± std); ours mean ± std over the samples of each cell "
                 "(medians with p20–p80 are in table.md).")
    return lines


def _values_text(values: Any) -> str:
    if not values:
        return "?"
    return ", ".join(f"{v[0]}x{v[1]}" if isinstance(v, (list, tuple)) else str(v) for v in values)


def render_paper(table: PaperTable, config: dict[str, Any], env: dict[str, Any] | None,
                 records: list[dict[str, Any]]) -> Table:
    """The published ``table`` with our measurements beside each of its measured columns, in
    the paper's row order, with notes naming both machines and our reading of the model."""
    notes: list[str] = []
    ours = _model_records(records) if config.get("scope") == "model" else sorted(records, key=lambda r: r["key"])
    headers: list[str] = []
    if table.layout == "axis":
        headers.append({"input_size": "input size", "batch": "batch size", "kernel_size": "kernel size"}[table.axis])
    else:
        headers += ["Method", "ours: layer"]
    for col in table.columns:
        if col.ours is None:
            headers.append(f"{col.heading()} paper")
        else:
            headers += [f"{col.heading()} paper", _ours_heading(col)]
        if table.delta and table.delta["column"] == col.key:
            title = table.delta.get("title", "Δ")
            headers += [f"{title} paper", f"{title} ours"]

    body: list[list[str]] = []
    if table.layout == "axis":
        matched = _match_axis(table, ours, notes)
        paper_values = [r["value"] for r in table.rows]
        extra_values = sorted((v for v in matched if v not in paper_values), key=lambda v: (isinstance(v, str), v),
                              reverse=True)
        ref_row = next((r for r in table.rows if table.delta and r["value"] == table.delta["reference"]), None)
        ref_rec = matched.get(table.delta["reference"]) if table.delta else None
        for row in table.rows + [{"value": v} for v in extra_values]:
            rec = matched.get(row["value"])
            label = _axis_text(table.axis, row["value"]) + ("" if row["value"] in paper_values else " (ours only)")
            body.append([label] + _row_cells(table, row, rec, NOT_RUN, ref_row, ref_rec))
    else:
        matched, extra = _match_methods(table, ours, notes)
        for i, row in enumerate(table.rows):
            layer = row.get("layer")
            missing = NOT_IMPLEMENTED if not layer else NOT_RUN
            recs = matched[i]
            if not recs or not row.get("architecture"):
                body.append([row["method"], layer or NOT_IMPLEMENTED] + _row_cells(table, row, recs[0] if recs else None,
                                                                                missing))
                continue
            for j, rec in enumerate(recs):  # the published values once, then our variants below them
                units_only = {k: v for k, v in row.items() if k.endswith("_unit")}
                body.append([row["method"] if j == 0 else "", _layer_text(rec)]
                            + _row_cells(table, row if j == 0 else units_only, rec, missing))
            for rec in recs:
                if rec["cell"].get("architecture") and rec.get("model"):
                    notes.append(f"{row['method']}: timed {rec['model']}.")
        for rec in extra:
            body.append(["–", rec["cell"]["layer"] + " (not in the paper's table)"]
                        + _row_cells(table, {}, rec, NOT_RUN))
        pairs = [f"{r['method']} → {r.get('layer') or NOT_IMPLEMENTED}" for r in table.rows]
        notes.insert(0, "Paper method → our layer: " + ", ".join(dict.fromkeys(pairs)) + ".")

    if any(r.get(f"{c.key}_unit") == "s" for r in table.rows for c in table.columns if c.unit == "ms"):
        notes.append(f"{SECONDS_MARK} time in seconds (as published); every other time in the column's unit.")
    head = [f"Paper: {table.source}. Hardware: {table.hardware}. Setting: {table.setting}.",
            *_describe_ours(config, env or {}, ours),
            f"Interpretation: {table.interpretation}"]
    preset = config.get("preset") or {}
    if preset.get("quick"):
        head.insert(0, f"QUICK RUN (--quick): {preset.get('quick_note') or 'reduced settings'}. This is not the "
                       "paper's setting: compare trends and parameter counts, not times.")
    notes = head + list(dict.fromkeys(notes)) + list(table.notes) + [CONTEXT_NOTE]
    return Table(f"{table.label} (paper) beside our measurements: {table.title}", headers, body, notes)


def _row_cells(table: PaperTable, row: dict[str, Any], rec: dict[str, Any] | None, missing: str,
               ref_row: dict[str, Any] | None = None, ref_rec: dict[str, Any] | None = None) -> list[str]:
    cells: list[str] = []
    for col in table.columns:
        cells.append(_paper_text(row, col) if row else "–")
        if col.ours is not None:
            cells.append(_ours_text(rec, col, missing, row.get(f"{col.key}_unit") if row else None))
        if table.delta and table.delta["column"] == col.key:
            cells += [_paper_delta(row, ref_row, col.key), _ours_delta(rec, ref_rec)]
    return cells


def _paper_delta(row: dict[str, Any], ref: dict[str, Any] | None, key: str) -> str:
    if not row or ref is None or row.get(key) is None or ref.get(key) is None:
        return "–"
    a, b = str(row[key]), str(ref[key])
    return f"{float(a) - float(b):+.{max(_decimals(a), _decimals(b))}f}"


def _ours_delta(rec: dict[str, Any] | None, ref: dict[str, Any] | None) -> str:
    if rec is None or ref is None or rec.get("params") is None or ref.get("params") is None:
        return "–"
    return f"{(rec['params'] - ref['params']) / 1e6:+.4f}"


def published_differences(table: PaperTable, key: str = "params") -> dict[Any, float]:
    """Each row's published ``key`` minus the delta reference row's (in the published unit)."""
    if table.delta is None:
        raise PaperTableError(f"{table.id}: has no delta reference")
    ref = next(r for r in table.rows if r["value"] == table.delta["reference"])
    return {r["value"]: float(r[key]) - float(ref[key]) for r in table.rows}


# Characters of the notes that pdfLaTeX does not take as they are (applied after render's
# escaping, so what they produce is LaTeX markup, not text to escape).
_LATEX_UNICODE = {"Δ": r"$\Delta$", "×": r"$\times$", "·": r"$\cdot$", "²": r"$^2$", "…": r"\ldots{}",
                  "≥": r"$\geq$", "≤": r"$\leq$", "—": "---", "§": r"\S{}", "’": "'"}


def to_latex(table: Table) -> str:
    """booktabs LaTeX of a paper-layout table, pdfLaTeX-safe."""
    from .tables import to_latex as render_latex

    text = render_latex([table])
    for a, b in _LATEX_UNICODE.items():
        text = text.replace(a, b)
    return text


def to_csv(table: Table) -> str:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(table.headers)
    writer.writerows(table.rows)
    return buf.getvalue()
