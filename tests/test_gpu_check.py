"""`python -m bench gpu-check`: the command's machinery (cases, worker, watchdog, comparisons,
report) run on the CPU kernel, so that the GPU command is not untested code; and its refusal,
in one line with exit status 2, on a machine without a GPU."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import native_check as gpu_check

ROOT = Path(__file__).resolve().parent.parent
HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the command would run")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2():
    out = subprocess.run([sys.executable, "-m", "bench", "gpu-check"], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "no GPU here" in out.stderr


def test_the_case_list_covers_what_the_gpu_check_promises():
    cases = gpu_check.default_cases("cuda", device_count=2)
    solves = [c for c in cases if c["kind"] == "solve"]
    assert {c["dtype"] for c in solves} == {"float32", "float64"}
    assert {c["orientation"] for c in solves} == {"TL", "TR", "BL", "BR"}
    ks = {c["k"] for c in solves}
    assert min(ks) == 1 and max(ks) == 11
    channels = {c["shape"][1] for c in solves}
    assert min(channels) == 3 and max(channels) == 96
    sizes = {c["shape"][2] for c in solves} | {c["shape"][3] for c in solves}
    assert min(sizes) == 16 and max(sizes) == 256
    assert max(c["shape"][0] for c in solves) == 128
    assert {c["layout"] for c in solves} == {"contiguous", "noncontiguous", "channels_last"}
    assert any(c["ring"] and c["k"] == 1 for c in solves) and any(c["max_rows"] and not c["ring"] for c in solves)
    kinds = {c["kind"] for c in cases}
    assert {"determinism", "stream", "device2", "fallback", "layer", "graph", "compile"} <= kinds
    assert "device2" not in {c["kind"] for c in gpu_check.default_cases("cuda", device_count=1)}
    assert len({c["id"] for c in cases}) == len(cases)
    json.dumps(cases)  # sent to the worker as JSON


@pytest.fixture(scope="module")
def cpu_native():
    if not HAS_CXX:
        pytest.skip("no C++ compiler on PATH: the native CPU solver cannot be built here")
    from layers import native

    assert native.load("cpu").available


def test_check_machinery_on_the_cpu_kernel(cpu_native, tmp_path):
    """The same worker, watchdog and comparisons as on a GPU: small solve cases pass, a hung case
    is reported as a timeout and the next case runs in a fresh worker."""
    cases = [gpu_check._solve_case(2, 3, 6, 5, 3, "float64", "TR", False),
             gpu_check._solve_case(1, 4, 8, 9, 1, "float32", "BL", True, layout="channels_last"),
             {"kind": "sleep", "seconds": 600},
             {"kind": "determinism", "shape": [2, 4, 8, 8], "k": 2, "dtype": "float32", "repeats": 3}]
    for i, case in enumerate(cases):
        case["id"] = f"{i}-{gpu_check.case_label(case)}"
    results = gpu_check.check_cases(cases, "cpu", timeout=40, log_path=tmp_path / "worker.log")
    assert [r["status"] for r in results] == ["pass", "pass", "timeout", "pass"], results
    first = results[0]["checks"]
    assert {"residual T x - y", "residual T^T lam - g", "solve vs reference", "adjoint vs reference",
            "grad y vs reference", "grad W vs reference", "solve vs dense"} <= set(first)
    assert all(c["err"] < 1e-9 for c in first.values())
    assert results[1]["checks"]["same bits as contiguous input"]["ok"]
    assert "a hang" in results[2]["message"]
    summary = gpu_check.render_summary({"command": "test"}, results, [], "test build", 1.0)
    assert "| 2-sleep 600s" in summary and "TIMEOUT" in summary


def test_a_wrong_result_fails_its_case(cpu_native, monkeypatch):
    """The comparisons can fail: a solve that returns y + 1e-3 fails the residual and reference checks."""
    real = gpu_check._raw_solve
    monkeypatch.setattr(gpu_check, "_raw_solve", lambda *a, **kw: real(*a, **kw) + 1e-3)
    record = gpu_check.run_case(dict(gpu_check._solve_case(1, 3, 5, 5, 2, "float64"), id="x"), "cpu")
    assert record["status"] == "fail"
    assert not record["checks"]["residual T x - y"]["ok"] and not record["checks"]["solve vs reference"]["ok"]


def test_the_command_end_to_end_on_cpu(cpu_native, tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench", "gpu-check", "--device", "cpu", "--smoke", "--no-timings",
                          "--out", str(tmp_path / "check")], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "check"
    assert {p.name for p in folder.iterdir()} >= {"env.json", "cases.jsonl", "summary.md", "worker.log"}
    records = [json.loads(line) for line in (folder / "cases.jsonl").read_text().splitlines()]
    assert records and all(r["status"] == "pass" for r in records)
    env = json.loads((folder / "env.json").read_text())
    assert env["native_build"]["available"] and "solvers" in env
    assert "| case" in (folder / "summary.md").read_text()
