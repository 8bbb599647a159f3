"""``python -m bench kernels``: measurement records and the rendered table."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.opbench import Measurement

ROOT = Path(__file__).resolve().parent.parent


def test_measurement_statistics():
    m = Measurement("op", [5.0, 1.0, 3.0, 2.0, 4.0])
    assert m.median == 3.0
    assert m.p20 == pytest.approx(1.8)
    assert m.p80 == pytest.approx(4.2)
    assert m.mean == 3.0
    assert m.std == pytest.approx(1.5811388)


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs the native CPU build")
def test_kernels_command_smoke(tmp_path):
    out = tmp_path / "k.json"
    cmd = [sys.executable, "-m", "bench", "kernels", "-B", "1,2", "-C", "4", "-H", "6", "-W", "5", "-k", "2",
           "--threads", "1", "--min-calls", "3", "--min-time", "0.01", "--rounds", "1", "--out", str(out)]
    env = dict(os.environ, INVCONV_SOLVER="auto")  # the record reports the solver choice of the environment
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stderr
    record = json.loads(out.read_text())
    assert [r["shape"]["batch"] for r in record["results"]] == [1, 2]
    ops = record["results"][0]["measurements"]
    assert set(ops) == {"native solve", "native solve+backward", "torch solve", "torch solve+backward", "conv2d",
                        "conv2d+wgrad"}
    assert all(m["n"] >= 3 and len(m["samples_s"]) == m["n"] for m in ops.values())
    ratios = record["results"][0]["ratios"]
    assert ratios["solve / conv2d"] == pytest.approx(ops["native solve"]["median_s"] / ops["conv2d"]["median_s"])
    env = record["environment"]
    assert env["torch_threads"] == 1 and env["solver"]["cpu"]["solver"] == "native-cpu"
    table = res.stdout
    assert "| native solve " in table and "solve / conv2d" in table and "**Batch sweep (medians)**" in table
    assert out.with_suffix(".md").read_text().strip() == table.strip()


def test_kernels_command_rejects_bad_batch():
    res = subprocess.run([sys.executable, "-m", "bench", "kernels", "-B", "x"], capture_output=True, text=True,
                         cwd=ROOT)
    assert res.returncode == 2 and "expected an integer" in res.stderr
