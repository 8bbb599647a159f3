"""Exporters: github-action-benchmark's customSmallerIsBetter list and pytest-benchmark JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_regression import bench, pair_of_runs

ROOT = Path(__file__).resolve().parent.parent



def test_export_github_action_benchmark(tmp_path):
    base, _ = pair_of_runs(tmp_path)
    res = bench("export", str(base), "--format", "github-action-benchmark")
    assert res.returncode == 0, res.stderr
    entries = json.loads(res.stdout)
    assert len(entries) == 6
    e = entries[0]
    assert set(e) == {"name", "unit", "value", "range", "extra"} and e["unit"] == "ms"
    assert e["name"] == "glow-1x1 B=8 C=12 16x16 k=3 cpu/float32 forward" and e["range"].startswith("± ")
    assert len({x["name"] for x in entries}) == 6


def test_export_pytest_benchmark_is_readable_by_pytest_benchmark(tmp_path):
    base, new = pair_of_runs(tmp_path, factor=2.0)
    for name, run in (("0001_base.json", base), ("0002_new.json", new)):
        assert bench("export", str(run), "--format", "pytest-benchmark", "-o", str(tmp_path / name)).returncode == 0
    data = json.loads((tmp_path / "0001_base.json").read_text())
    assert len(data["benchmarks"]) == 6 and data["benchmarks"][0]["stats"]["median"] == pytest.approx(
        np.median(json.loads((base / "results.jsonl").read_text().splitlines()[0])["directions"]["forward"]
                  ["samples_ms"]) / 1e3)
    res = subprocess.run([sys.executable, "-m", "pytest_benchmark", "compare", str(tmp_path / "0001_base.json"),
                          str(tmp_path / "0002_new.json"), "--group-by", "name"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert "glow-1x1 B=8 C=12 16x16 k=3 cpu/float32 forward" in res.stdout


def test_help_of_the_regression_commands():
    for args in (["compare"], ["ab"], ["baseline", "record"], ["baseline", "check"], ["export"]):
        res = bench(*args, "--help")
        assert res.returncode == 0 and "usage:" in res.stdout, args


def test_benchmark_suite_is_not_in_the_default_run():
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0 and "tests/test_export.py" in out.stdout and "tests/benchmarks" not in out.stdout
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/benchmarks"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0 and "test_solve[cpu-16x16]" in out.stdout and "test_layer[cpu-glow-1x1-train]" in out.stdout
