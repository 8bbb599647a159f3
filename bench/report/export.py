"""A run's timings in the formats existing trackers read, instead of a dashboard of our own.

- ``github-action-benchmark``: the ``customSmallerIsBetter`` list read by
  https://github.com/benchmark-action/github-action-benchmark — one entry per (cell, direction)
  ``{"name", "unit": "ms", "value": median, "range": "± half the p20–p80 band", "extra"}``.
- ``pytest-benchmark``: the JSON that ``pytest --benchmark-save`` writes (timings in seconds,
  statistics computed by pytest-benchmark's own ``Stats``), so ``pytest-benchmark compare`` and
  ``--benchmark-compare`` can read a run next to the suite in ``tests/benchmarks``.

Only ``ok`` directions with samples are exported; a tracker has no notion of "error".
"""

from __future__ import annotations

import json
import platform
from typing import Any

from ..sweep.cells import Cell

FORMATS = ("github-action-benchmark", "pytest-benchmark")


def entry_name(cell: dict[str, Any], direction: str) -> str:
    """Stable across runs (a tracker keys its history by it): the cell's label, options, direction."""
    options = cell.get("options") or {}
    opts = f" {json.dumps(options, sort_keys=True, separators=(',', ':'))}" if options else ""
    return f"{Cell.from_dict(cell).label()}{opts} {direction}"


def _timed(records: list[dict[str, Any]]):
    for r in records:
        for direction, d in r.get("directions", {}).items():
            if d.get("status") == "ok" and d.get("samples_ms"):
                yield r, direction, d


def github_action_benchmark(records: list[dict[str, Any]], env: dict[str, Any]) -> list[dict[str, Any]]:
    git = (env.get("git") or {}).get("short") or "unknown"
    out = []
    for r, direction, d in _timed(records):
        out.append({
            "name": entry_name(r["cell"], direction),
            "unit": "ms",
            "value": d["median_ms"],
            "range": f"± {(d['p80_ms'] - d['p20_ms']) / 2:.4g}",
            "extra": (f"median of {d['n']} samples, p20–p80 {d['p20_ms']:.4g}–{d['p80_ms']:.4g} ms, "
                      f"mean {d['mean_ms']:.4g} ± {d['std_ms']:.4g} ms; commit {git}, "
                      f"{r.get('threads') or '?'} CPU threads"),
        })
    return out


def pytest_benchmark(records: list[dict[str, Any]], env: dict[str, Any]) -> dict[str, Any]:
    try:
        from pytest_benchmark import __version__ as version
        from pytest_benchmark.stats import Stats
    except ImportError:
        raise RuntimeError("--format pytest-benchmark needs pytest-benchmark (pip install -e '.[test]')") from None
    benchmarks = []
    for r, direction, d in _timed(records):
        stats = Stats()
        for ms in d["samples_ms"]:
            stats.update(ms / 1e3)
        name = entry_name(r["cell"], direction)
        benchmarks.append({
            "group": f"{r['cell']['layer']} {direction}", "name": name, "fullname": f"bench::{name}",
            "params": None, "param": None, "extra_info": {"cell": r["cell"], "direction": direction},
            "options": {"disable_gc": False, "timer": "perf_counter (CUDA events on a GPU)", "min_rounds": d["n"],
                        "max_time": None, "min_time": None, "warmup": True},
            "stats": {**stats.as_dict(), "iterations": 1},
        })
    git = env.get("git") or {}
    cpu = env.get("cpu") or {}
    return {
        "machine_info": {"node": env.get("host"), "processor": cpu.get("model"), "machine": platform.machine(),
                         "python_implementation": platform.python_implementation(),
                         "python_version": env.get("python"), "python_compiler": "", "release": "",
                         "system": env.get("platform"), "cpu": {"brand_raw": cpu.get("model"),
                                                               "count": cpu.get("logical_cpus")}},
        "commit_info": {"id": git.get("commit"), "time": None, "author_time": None, "dirty": git.get("dirty"),
                        "project": "invconv-bench", "branch": git.get("branch")},
        "benchmarks": benchmarks,
        "datetime": env.get("timestamp_utc"),
        "version": version,
    }


def export(records: list[dict[str, Any]], env: dict[str, Any], fmt: str) -> Any:
    if fmt == "github-action-benchmark":
        return github_action_benchmark(records, env)
    if fmt == "pytest-benchmark":
        return pytest_benchmark(records, env)
    raise ValueError(f"unknown format {fmt!r}; accepted: {', '.join(FORMATS)}")
