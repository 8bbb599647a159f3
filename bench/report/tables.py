"""Tables from a run's records: Markdown, CSV (long format) and LaTeX (booktabs).

Rendering never measures; it reads records (``results.jsonl``) and the run's configuration, so a
finished run can be re-rendered at any time (``python -m bench table RUN_DIR``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tabulate import tabulate

from ..records import axis_value
from ..sweep.cells import AXES, DIRECTIONS

METRICS = ("median", "mean", "memory", "params", "recon_error")

DIRECTION_TITLES = {
    "forward": "Forward (density direction, x → z, log det)",
    "sampling": "Sampling (inverse direction, z → x)",
    "train": "Train step (density forward + backward of ½‖z‖² − log det)",
}
# Model cells (bench/sweep/models.py) time whole flows: the same three directions, model-level.
MODEL_DIRECTION_TITLES = {
    "forward": "Forward (model density pass giving log p(x))",
    "sampling": "Sampling (model sample(n): latents from N(0, I), every inverse)",
    "train": "Train step (model density pass + backward of −mean log p(x))",
}
METRIC_TITLES = {
    "median": "time in ms, median [p20–p80]",
    "mean": "time in ms, mean ± std",
    "memory": "peak memory above the baseline",
    "params": "Trainable parameters",
    "recon_error": "Reconstruction error max |x − inverse(forward(x))|",
}
AXIS_TITLES = {"input_size": "input size", "batch": "batch", "kernel_size": "kernel size", "channels": "channels"}

NO_KERNEL_MARK = "‡"
UNSTABLE_MARK = "⚠"
"""Beside a time whose samples the machine disturbed (``unstable`` in the record: see
``bench/timing/measure.py``): shown, never silently dropped, never presented as the code's cost."""


def fmt_count(v: float | None) -> str:
    """An instruction count: ``1.17 M``, ``842 k``."""
    if v is None:
        return "–"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {unit}"
    return f"{v:.0f}"


@dataclass
class Table:
    """A rendered-format-independent table: a title, headers, rows of strings and footnotes."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Number formatting


def fmt_number(v: float | None, most_decimals: int = 3) -> str:
    """About three significant digits: 0 decimals from 100, 1 from 10, 2 from 1, then 3, at most
    ``most_decimals``; "–" for no value."""
    if v is None:
        return "–"
    a = abs(v)
    decimals = 0 if a >= 100 else 1 if a >= 10 else 2 if a >= 1 else 3
    return f"{v:.{min(decimals, most_decimals)}f}"


def fmt_ms(v: float | None) -> str:
    return fmt_number(v)


def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "–"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{int(v)} B"


def fmt_params(v: int | None) -> str:
    if v is None:
        return "–"
    return f"{v / 1e6:.3f} M" if v >= 1_000_000 else f"{v:,}"


def fmt_error(v: float | None) -> str:
    return "–" if v is None else f"{v:.1e}"


# --------------------------------------------------------------------------------------------
# Pivoting records into tables


def _sort_key(v: Any) -> tuple:
    if v is None:
        return (2, 0, "")
    if isinstance(v, int):
        return (0, v, "")
    return (1, 0, str(v))


def layout(records: list[dict[str, Any]], sweep: list[str]) -> tuple[str | None, list[str]]:
    """(column axis, row axes): the first swept axis with several values becomes the columns;
    every other axis that varies becomes part of the row label."""
    varying = [a for a in AXES if len({axis_value(r["cell"], a) for r in records
                                       if not (a == "kernel_size" and r["cell"]["kernel_size"] is None)}) > 1]
    column = next((a for a in sweep if a in varying), varying[0] if varying else None)
    return column, [a for a in varying if a != column]


def _cell_text(record: dict[str, Any], metric: str, direction: str | None) -> str:
    if metric in ("params", "recon_error"):
        value = record.get(metric)
        if value is None:  # never built (unsupported, error) or the round trip failed
            return record.get("status", "–") if record.get("status") != "ok" else "–"
        return fmt_params(value) if metric == "params" else fmt_error(value)
    d = record["directions"].get(direction, {})
    status = d.get("status", "missing")
    if status == "ok" and d.get("instructions") is not None:
        return f"{fmt_count(d['instructions'])} instr" if metric in ("median", "mean") else "–"
    if status not in ("ok", "nonfinite") or d.get("median_ms") is None:
        return status
    mark = " (nonfinite)" if status == "nonfinite" else ""
    if d.get("unstable") and metric in ("median", "mean"):
        mark += f" {UNSTABLE_MARK}"
    if d.get("inverse_diagnostics") and metric in ("median", "mean"):
        from ..timing.diagnostics import describe  # an iterative inverse: what it did in the timed calls

        mark += f" ({describe(d['inverse_diagnostics'])})"
    if metric == "median":
        if d.get("process_min_ms") is not None:  # several processes: their medians' spread
            return f"{fmt_ms(d['median_ms'])} [{fmt_ms(d['process_min_ms'])}–{fmt_ms(d['process_max_ms'])}]{mark}"
        return f"{fmt_ms(d['median_ms'])} [{fmt_ms(d['p20_ms'])}–{fmt_ms(d['p80_ms'])}]{mark}"
    if metric == "mean":
        return f"{fmt_ms(d['mean_ms'])} ± {fmt_ms(d['std_ms'])}{mark}"
    if metric == "memory":
        return fmt_bytes(d.get("peak_mem_bytes")) + mark
    raise ValueError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")


def build_table(records: list[dict[str, Any]], sweep: list[str], metric: str, direction: str | None = None) -> Table:
    """Rows: layer (plus any other varying axes); columns: the first swept axis."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; accepted: {', '.join(METRICS)}")
    column, row_axes = layout(records, sweep)
    col_values = sorted({axis_value(r["cell"], column) for r in records
                         if not (column == "kernel_size" and r["cell"]["kernel_size"] is None)}
                        if column else {None}, key=_sort_key)
    grid: dict[tuple, dict[Any, str]] = {}
    notes: list[str] = []
    no_kernel = False
    for r in records:
        c = r["cell"]
        label = [_layer_label(c)] + ["n/a" if a == "kernel_size" and c["kernel_size"] is None else str(axis_value(c, a))
                                for a in row_axes]
        text = _cell_text(r, metric, direction)
        if column == "kernel_size" and c["kernel_size"] is None:
            label[0] += f" {NO_KERNEL_MARK}"
            no_kernel = True
            targets = col_values
        else:
            targets = [axis_value(c, column) if column else None]
        for t in targets:
            grid.setdefault(tuple(label), {})[t] = text
        if direction:
            status, msg = r["directions"].get(direction, {}).get("status"), r["directions"].get(direction, {}).get("message")
        else:  # params / recon error: only a failure to build or to run the round trip matters
            status, msg = (r.get("status"), r.get("message")) if r.get(metric) is None else (None, None)
        where = "" if column is None or targets != [axis_value(c, column)] else f" {AXIS_TITLES[column]}={targets[0]}"
        if status in ("error", "oom", "timeout", "nonfinite", "lost") and msg:
            notes.append(f"{' '.join(label)}{where}: {status}: {msg}")
        d = r["directions"].get(direction, {}) if direction else {}
        if d.get("unstable") and metric in ("median", "mean"):
            why = "; ".join(d.get("unstable_reasons", [])) or "disturbed by the machine"
            n = d.get("processes")
            notes.append(f"{UNSTABLE_MARK} {' '.join(label)}{where}: unstable"
                         + (f" in {d.get('unstable_processes')} of {n} processes" if n else "") + f": {why}")
    headers = ["layer"] + [AXIS_TITLES[a] for a in row_axes]
    headers += [str(v) for v in col_values] if column else [METRIC_TITLES[metric].split(",")[0]]
    rows = []
    for label in sorted(grid, key=lambda lab: tuple(_sort_key(_maybe_int(x)) for x in lab)):
        rows.append(list(label) + [grid[label].get(v, "–") for v in col_values])
    if no_kernel:
        notes.insert(0, f"{NO_KERNEL_MARK} kernel size does not apply to this layer: one measurement, shown in every column.")
    title = METRIC_TITLES[metric]
    if metric == "median" and direction and any(r["directions"].get(direction, {}).get("process_min_ms") is not None
                                                 for r in records):
        title = "time in ms, median over processes [smallest–largest process median]"
    if direction and all(r["directions"].get(direction, {}).get("instructions") is not None for r in records
                         if r["directions"].get(direction, {}).get("status") == "ok") and \
            any(r["directions"].get(direction, {}).get("instructions") is not None for r in records):
        title = "instructions per call (callgrind)" if metric in ("median", "mean") else title
    if direction:
        titles = MODEL_DIRECTION_TITLES if any(r["cell"].get("scope") == "model" for r in records) else DIRECTION_TITLES
        title = f"{titles[direction]} — {title}"
    if column:
        title += f", by {AXIS_TITLES[column]}"
    return Table(title, headers, rows, notes)


def _layer_label(cell: dict[str, Any]) -> str:
    """The layer, and the published architecture it was timed in, if any."""
    if cell.get("architecture"):
        from ..sweep.cells import architecture_label

        return f"{cell['layer']} [{architecture_label(cell['architecture'])}]"
    return cell["layer"]


def _maybe_int(x: str) -> Any:
    try:
        return int(x)
    except ValueError:
        return x


def build_tables(records: list[dict[str, Any]], sweep: list[str], metrics: list[str] | None = None,
           directions: list[str] | None = None) -> list[Table]:
    metrics = metrics or ["median", "memory", "params", "recon_error"]
    present = {d for r in records for d in r.get("directions", {})}
    directions = [d for d in (directions or DIRECTIONS) if d in present]
    out = []
    for metric in metrics:
        if metric in ("params", "recon_error"):
            out.append(build_table(records, sweep, metric))
        else:
            out.extend(build_table(records, sweep, metric, d) for d in directions)
    return out


# --------------------------------------------------------------------------------------------
# Formats


def hardware(config: dict[str, Any], env: dict[str, Any]) -> tuple[str, int | None]:
    """The device a run measured on (the GPU's name, or the CPU model) and its CPU thread count."""
    if config.get("device") == "cuda" and env.get("gpus"):
        hw = env["gpus"][0]["name"]
    else:
        hw = env.get("cpu", {}).get("model", "unknown CPU")
    return hw, config.get("threads") or env.get("torch", {}).get("threads")


def describe_run(config: dict[str, Any], env: dict[str, Any] | None) -> list[str]:
    """Lines saying what was measured where (shown above the tables)."""
    env = env or {}
    device = config["device"]
    hw, threads = hardware(config, env)
    git = env.get("git", {})
    model_scope = config.get("scope") == "model"
    axis_titles = {**AXIS_TITLES, "channels": "image channels"} if model_scope else AXIS_TITLES
    fixed = [f"{axis_titles[a]} {_fmt_values(config['values'][a])}" for a in AXES
             if a not in config.get("sweep", []) and len(config["values"][a]) == 1]
    lines = [
        *_busy_warning(env),
        f"Device: {device} ({hw}), dtype {config['dtype']}, torch {env.get('torch', {}).get('version', '?')}, "
        f"{threads} CPU threads.",
        f"Swept: {', '.join(AXIS_TITLES[a] for a in config.get('sweep', [])) or 'nothing'}; "
        f"fixed: {', '.join(fixed) or 'nothing'}.",
        f"Code: {git.get('short') or 'unknown'}{' (dirty)' if git.get('dirty') else ''}; "
        f"solver: {_solver_text(env, device)}.",
        *([_describe_model(config)] if model_scope else []),
        _describe_timing(config),
    ]
    if device == "cuda":
        lines.append("Memory: peak bytes allocated by torch above the allocation before the call (the CUDA "
                     "context, several hundred MB, is not counted).")
    else:
        lines.append("Memory: peak resident-set growth of the cell's process during one call"
                     + (" (isolated process per cell)." if config.get("isolate", True) else
                        " (--no-isolate: earlier cells' freed memory may be reused, so this can under-report)."))
    return lines


BUSY_LOAD_SHARE = 0.5
"""The run header warns when the 1-minute load average exceeded this share of the CPUs at the
start of the run, or that plus one (the run's own worker) at its end."""


def _busy_warning(env: dict[str, Any]) -> list[str]:
    load = env.get("load_average") or {}
    cpus = (env.get("cpu") or {}).get("logical_cpus") or 1
    start, end = load.get("start"), load.get("end")
    busy = (start is not None and start > BUSY_LOAD_SHARE * cpus) or \
        (end is not None and end > BUSY_LOAD_SHARE * cpus + 1)
    if not busy:
        return []
    at = ", ".join(f"{v:.1f} at the {k}" for k, v in (("start", start), ("end", end)) if v is not None)
    return [f"Warning: the machine was busy (1-minute load average {at}, on {cpus} CPUs): times are noisier than "
            f"on a quiet machine; {UNSTABLE_MARK} marks the directions whose samples were visibly disturbed."]


def _describe_timing(config: dict[str, Any]) -> str:
    if config.get("metric") == "instructions":
        from ..execution.instructions import CALLS, DUMPS, WARMUP_CALLS

        return (f"Metric: instructions executed per call under valgrind's callgrind (median of {DUMPS} counts of "
                f"{CALLS} calls after {WARMUP_CALLS} warm-up calls, every cell in one process), not time.")
    per = "≥ {r} samples and ≥ {t:g} s after ≥ {w} warm-up calls and ≥ {wt:g} s".format(
        r=config["repeat"], t=config["min_time"], w=config["warmup"], wt=config["warmup_time"])
    processes = config.get("processes") or 1
    if processes > 1:
        return (f"Timing: {processes} fresh worker processes per cell, each taking {per}; shown: the median over "
                "processes [the smallest–largest process median].")
    return f"Timing: median of {per}; band p20–p80."


def _describe_model(config: dict[str, Any]) -> str:
    m = config.get("model", {})
    preset = config.get("preset") or {}
    text = (f"Models: Glow-style flows around each layer (bench/sweep/models.py), {m.get('levels')} levels × "
            f"{m.get('steps')} steps of ActNorm → layer → [1×1] → affine coupling (hidden width "
            f"{m.get('hidden_width')}), 1×1 mixing {m.get('mixing', 'auto')}; channels and input size are the image's.")
    if preset:
        text += f" Preset {preset.get('name')}" + (f" --quick: {preset.get('quick_note')}." if preset.get("quick") else ".")
    return text


def _solver_text(env: dict[str, Any], device: str) -> str:
    s = env.get("solvers", {}).get(device)
    return s.get("solver", "?") if isinstance(s, dict) else "?"


def _fmt_values(values: list[Any]) -> str:
    return ", ".join(f"{v[0]}x{v[1]}" if isinstance(v, (list, tuple)) else str(v) for v in values)


def to_markdown(tbls: list[Table], preamble: list[str] | None = None, heading: str | None = None) -> str:
    parts = []
    if heading:
        parts.append(f"# {heading}\n")
    if preamble:
        parts.append("\n".join(preamble) + "\n")
    for t in tbls:
        parts.append(f"## {t.title}\n")
        parts.append(tabulate(t.rows, headers=t.headers, tablefmt="github", disable_numparse=True) + "\n")
        if t.notes:
            parts.append("\n".join(f"- {n}" for n in t.notes) + "\n")
    return "\n".join(parts)


def _latex_escape(text: str) -> str:
    for a, b in (("\\", r"\textbackslash{}"), ("&", r"\&"), ("%", r"\%"), ("$", r"\$"), ("#", r"\#"),
                 ("_", r"\_"), ("{", r"\{"), ("}", r"\}"), ("~", r"\textasciitilde{}"), ("^", r"\^{}")):
        text = text.replace(a, b)
    return (text.replace("–", "--").replace("±", r"$\pm$").replace("‖", r"$\|$").replace("→", r"$\to$")
            .replace("½", r"$\frac{1}{2}$").replace("−", "-").replace(NO_KERNEL_MARK, r"$^\ddagger$"))


def to_latex(tbls: list[Table], preamble: list[str] | None = None) -> str:
    """booktabs tables (``\\usepackage{booktabs}``), one ``table`` environment each."""
    parts = ["% Generated by invconv-bench; needs \\usepackage{booktabs}."]
    if preamble:
        parts += ["% " + line for line in preamble]
    for t in tbls:
        cols = "l" + "r" * (len(t.headers) - 1)
        body = [" & ".join(_latex_escape(h) for h in t.headers) + r" \\"]
        rows = [" & ".join(_latex_escape(c) for c in row) + r" \\" for row in t.rows]
        parts.append("\n".join([
            r"\begin{table}[t]",
            r"\centering",
            rf"\caption{{{_latex_escape(t.title)}}}",
            rf"\begin{{tabular}}{{{cols}}}",
            r"\toprule",
            *body,
            r"\midrule",
            *rows,
            r"\bottomrule",
            r"\end{tabular}",
            *([r"\par\footnotesize " + r" \\ ".join(_latex_escape(n) for n in t.notes)] if t.notes else []),
            r"\end{table}",
        ]))
    return "\n\n".join(parts) + "\n"


def to_csv(records: list[dict[str, Any]]) -> str:
    from ..execution.runs import long_frame

    return long_frame(records).to_csv(index=False)
