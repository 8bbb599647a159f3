"""Plots from a run's records (PNG): time (and peak memory) against the swept axis.

One panel per direction, one line per layer (and per value of any other varying axis), the
p20–p80 band shaded, log axes where the values span a decade or more. Layers whose kernel size
does not apply are drawn as a dashed horizontal line in kernel-size sweeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..records import axis_value
from .tables import AXIS_TITLES, DIRECTION_TITLES, layout
from ..sweep.cells import DIRECTIONS

_DECADE = 10.0


def _spans_decade(values: list[float]) -> bool:
    positive = [v for v in values if v and v > 0]
    return len(positive) > 1 and max(positive) / min(positive) >= _DECADE


def _series(records: list[dict[str, Any]], column: str, row_axes: list[str], direction: str, metric: str):
    """{label: [(x, y, lo, hi)]} plus {label: (y, lo, hi)} for layers without a kernel size."""
    lines: dict[str, list[tuple[float, float, float, float]]] = {}
    flat: dict[str, tuple[float, float, float]] = {}
    unstable: list[tuple[dict[str, Any], float]] = []
    for r in records:
        c = r["cell"]
        d = r["directions"].get(direction, {})
        if d.get("status") != "ok":
            continue
        if metric == "time":
            y, lo, hi = _time_band(d)
        else:
            y = d.get("peak_mem_bytes")
            y = None if y is None else y / 2**20
            lo = hi = y
        if y is None:
            continue
        if metric == "time" and d.get("unstable"):
            unstable.append((c, y))
        label = " ".join([c["layer"]] + [f"{AXIS_TITLES[a]}={axis_value(c, a)}" for a in row_axes
                                         if c.get(a) is not None])
        if column == "kernel_size" and c["kernel_size"] is None:
            flat[label + " (no kernel)"] = (y, lo, hi)
            continue
        x = axis_value(c, column)
        if not isinstance(x, (int, float)):
            x = c["height"] * c["width"]  # non-square sizes: plot against pixel count
        lines.setdefault(label, []).append((x, y, lo, hi))
    marks = [(axis_value(c, column) if isinstance(axis_value(c, column), (int, float)) else c["height"] * c["width"], y)
             for c, y in unstable if not (column == "kernel_size" and c["kernel_size"] is None)]
    return {k: sorted(v) for k, v in lines.items()}, flat, marks


def _time_band(d: dict[str, Any]) -> tuple[float | None, float | None, float | None]:
    """The median and its band: the smallest–largest process median when several processes
    measured the cell, else p20–p80 of the samples."""
    if d.get("process_min_ms") is not None:
        return d.get("median_ms"), d["process_min_ms"], d["process_max_ms"]
    return d.get("median_ms"), d.get("p20_ms"), d.get("p80_ms")


def plot_run(records: list[dict[str, Any]], sweep: list[str], out_dir: Path, title: str = "") -> list[Path]:
    """Write ``time.png`` and ``memory.png`` into ``out_dir``; returns the written paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    column, row_axes = layout(records, sweep)
    present = [d for d in DIRECTIONS if any(d in r.get("directions", {}) for r in records)]
    written = []
    processes = any(d.get("process_min_ms") is not None for r in records for d in r.get("directions", {}).values())
    band = "median of processes, min–max" if processes else "median with p20–p80"
    for metric, ylabel, fname in (("time", f"time (ms), {band}", "time.png"),
                                  ("memory", "peak memory (MiB)", "memory.png")):
        fig, axes = plt.subplots(1, len(present), figsize=(5.2 * len(present), 4.2), squeeze=False)
        any_data = False
        for ax, direction in zip(axes[0], present):
            if column is None:
                any_data |= _bars(ax, records, direction, metric)
            else:
                lines, flat, marks = _series(records, column, row_axes, direction, metric)
                xs_all = [p[0] for pts in lines.values() for p in pts]
                ys_all = [p[1] for pts in lines.values() for p in pts] + [v[0] for v in flat.values()]
                for label, pts in lines.items():
                    xs, ys, lo, hi = zip(*pts)
                    (line,) = ax.plot(xs, ys, marker="o", label=label)
                    ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
                for label, (y, lo, hi) in flat.items():
                    line = ax.axhline(y, linestyle="--", label=label)
                    if xs_all:
                        ax.fill_between([min(xs_all), max(xs_all)], lo, hi, color=line.get_color(), alpha=0.15,
                                        linewidth=0)
                if marks:  # the machine disturbed these: marked, not hidden
                    mx, my = zip(*marks)
                    ax.scatter(mx, my, marker="x", s=90, color="red", zorder=5,
                               label="unstable (disturbed by the machine)")
                any_data |= bool(ys_all)
                if _spans_decade(xs_all):
                    ax.set_xscale("log", base=2)
                if _spans_decade(ys_all):
                    ax.set_yscale("log")
                    # Label 1-2-5 steps so a panel spanning one or two decades still has readable values.
                    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
                    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
                    ax.yaxis.set_minor_formatter(NullFormatter())
                if xs_all and all(isinstance(x, int) for x in xs_all):
                    ticks = sorted(set(xs_all))
                    ax.set_xticks(ticks)
                    ax.set_xticklabels([str(t) for t in ticks])
                    ax.minorticks_off()
                ax.set_xlabel(AXIS_TITLES[column])
            ax.set_title(DIRECTION_TITLES[direction].split(" (")[0] + " — " + direction_hint(direction), fontsize=10)
            if column is None:
                ax.set_xlabel(ylabel)
            else:
                ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes[0][1:]:  # a marker that appears only in another panel still gets its legend entry
            for h, lab in zip(*ax.get_legend_handles_labels()):
                if lab not in labels:
                    handles.append(h)
                    labels.append(lab)
        if handles:
            fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 4), fontsize=8, frameon=False)
        if title:
            fig.suptitle(title, fontsize=10)
        fig.tight_layout(rect=(0, 0.1 + 0.03 * ((len(labels) - 1) // 4 if handles else 0), 1, 0.95))
        path = Path(out_dir) / fname
        if any_data:
            fig.savefig(path, dpi=130)
            written.append(path)
        plt.close(fig)
    return written


def direction_hint(direction: str) -> str:
    return {"forward": "x → z", "sampling": "z → x", "train": "forward + backward"}[direction]


def _bars(ax, records: list[dict[str, Any]], direction: str, metric: str) -> bool:
    names, values, errs = [], [], [[], []]
    for r in records:
        d = r["directions"].get(direction, {})
        if d.get("status") != "ok":
            continue
        if metric == "time":
            y, lo, hi = _time_band(d)
            if y is None:
                continue
        else:
            if d.get("peak_mem_bytes") is None:
                continue
            y = lo = hi = d["peak_mem_bytes"] / 2**20
        names.append(r["cell"]["layer"] + (" ⚠" if metric == "time" and d.get("unstable") else ""))
        values.append(y)
        errs[0].append(y - lo)
        errs[1].append(hi - y)
    if not names:
        return False
    ax.barh(names, values, xerr=errs)
    return True
