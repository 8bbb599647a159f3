"""``bench ab`` end to end: a throwaway repository whose last commit slows a layer down on purpose."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A tiny grid: the deliberate slowdown (+50 ms per call on a sub-millisecond op) dwarfs any noise.
TINY = ["--input-size", "8", "--batch", "2", "--channels", "4", "--directions", "forward", "--repeat", "3",
        "--min-time", "0.05", "--warmup", "1", "--warmup-time", "0", "--no-progress"]
SLEEP = "        __import__('time').sleep(0.05)  # deliberately slower (tests/test_bench_ab.py)\n"


def git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", "-C", str(repo), "-c", "user.name=test", "-c", "user.email=test@example.com", *args],
                         capture_output=True, text=True, check=True)
    return out.stdout


def make_repo(tmp_path: Path, change: str) -> Path:
    """A git repository holding this checkout's code (working tree, committed or not) as HEAD~1
    and, as HEAD, either a harmless change or glow-1x1 sleeping in its forward pass."""
    repo = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for part in ("bench", "layers", "csrc"):
        shutil.copytree(ROOT / part, repo / part, ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", repo)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    if change == "slow":
        glow = repo / "layers" / "glow.py"
        text = glow.read_text()
        anchor = "    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:\n"
        assert anchor in text
        glow.write_text(text.replace(anchor, anchor + SLEEP))
        message = "glow-1x1: slower on purpose\n\nPerf-Regression-Accepted: glow-1x1 — a test of the marker"
    else:
        (repo / "NOTES.md").write_text("a change that does not touch the code\n")
        message = "notes only"
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return repo


def bench(repo: Path, *args: str, timeout: float = 300):
    return subprocess.run([sys.executable, "-m", "bench", *args], capture_output=True, text=True, cwd=repo,
                          timeout=timeout, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


def pair_dir(out: Path) -> Path:
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def worktrees(repo: Path) -> list[str]:
    return [ln for ln in git(repo, "worktree", "list", "--porcelain").splitlines() if ln.startswith("worktree ")]


def test_ab_catches_a_deliberately_slowed_layer(tmp_path):
    repo = make_repo(tmp_path, "slow")
    out = tmp_path / "runs"
    # Three rounds: over two, the t interval between processes has about 1 degree of freedom.
    res = bench(repo, "ab", "--base", "HEAD~1", "--layers", "glow-1x1,inverse-flow", "--rounds", "3",
                "--out", str(out), *TINY)
    assert res.returncode == 1, res.stdout + res.stderr
    failures = [ln for ln in res.stderr.splitlines() if ln.startswith("REGRESSION:")]
    assert len(failures) == 1, res.stderr
    # The layer, the cell and the ratio.
    assert failures[0].startswith("REGRESSION: glow-1x1 forward, cell glow-1x1 B=2 C=4 8x8 k=n/a cpu/float32: ")
    assert "× slower" in failures[0]
    assert len(worktrees(repo)) == 1, "the temporary worktree of the base revision was not removed"

    pair = pair_dir(out)
    rows = {r["label"].split()[0]: r for r in json.loads((pair / "comparison.json").read_text())["rows"]}
    assert rows["glow-1x1"]["verdict"] == "slower" and rows["glow-1x1"]["ratio"] > 10
    assert rows["inverse-flow"]["verdict"] == "same"
    assert rows["glow-1x1"]["base_rounds"] == rows["glow-1x1"]["new_rounds"] == 3
    assert rows["glow-1x1"]["method"] == "rounds"
    assert (pair / "comparison.md").read_text().startswith("### 1 performance regression")
    # Both sides are normal run folders, measured by their own code.
    base_env = json.loads((pair / "base" / "env.json").read_text())
    new_env = json.loads((pair / "new" / "env.json").read_text())
    assert base_env["git"]["commit"] == git(repo, "rev-parse", "HEAD~1").strip()
    assert new_env["git"]["commit"] == git(repo, "rev-parse", "HEAD").strip()
    assert base_env["ab"]["role"] == "base" and new_env["ab"]["role"] == "new"
    table = bench(repo, "table", str(pair / "new"))
    assert table.returncode == 0 and "| glow-1x1" in table.stdout

    # The commit's Perf-Regression-Accepted trailer accepts it, and the report repeats it.
    res = bench(repo, "compare", str(pair / "base"), str(pair / "new"), "--accept-from", "HEAD")
    assert res.returncode == 0, res.stderr
    assert "accepted regression: glow-1x1 forward" in res.stderr and "a test of the marker" in res.stderr
    assert "**Accepted regressions**" in res.stdout


def test_ab_passes_unchanged_code(tmp_path):
    repo = make_repo(tmp_path, "notes")
    out = tmp_path / "runs"
    # Five rounds, as the gate: on the 2-core CI machine a 0.1 ms call runs ~2x slower in some
    # worker processes than in others (bench/regression/statistics.py); with two rounds a side, both new
    # processes land in the slow mode and both base ones in the fast mode often enough to fail.
    res = bench(repo, "ab", "--base", "HEAD~1", "--layers", "glow-1x1", "--rounds", "5", "--out", str(out), *TINY)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "### no performance regression" in res.stdout
    rows = json.loads((pair_dir(out) / "comparison.json").read_text())["rows"]
    assert [r["verdict"] for r in rows] == ["same"] and rows[0]["base_rounds"] == 5
    assert rows[0]["method"] == "rounds" and "compare the processes' medians" in res.stdout
    assert "note: with" not in res.stderr  # five rounds: no warning about a wide interval
    assert len(worktrees(repo)) == 1


def test_ab_with_two_rounds_says_its_interval_is_wide(tmp_path):
    repo = make_repo(tmp_path, "notes")
    res = bench(repo, "ab", "--base", "HEAD~1", "--layers", "glow-1x1", "--rounds", "2",
                "--out", str(tmp_path / "runs"), *TINY)
    assert res.returncode in (0, 1), res.stderr
    assert "note: with 2 rounds a side the interval between processes is very wide" in res.stderr


def test_ab_cleans_up_on_interrupt(tmp_path):
    repo = make_repo(tmp_path, "notes")
    proc = subprocess.Popen([sys.executable, "-m", "bench", "ab", "--base", "HEAD~1", "--layers", "glow-1x1",
                             "--rounds", "50", "--out", str(tmp_path / "runs"), *TINY], cwd=repo,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not list((tmp_path / "runs").glob("*/base/rounds.jsonl")):
        time.sleep(0.2)  # wait until measuring has started (the base worktree exists by then)
    assert len(worktrees(repo)) == 2
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert len(worktrees(repo)) == 1, "the temporary worktree survived Ctrl-C"
    assert "interrupted" in stderr


@pytest.mark.parametrize(("args", "message"), [
    (["--base", "no-such-rev"], "--base no-such-rev: no such commit"),
    (["--base", "HEAD", "--no-isolate"], "--no-isolate"),
    (["--base", "HEAD", "--rounds", "1"], "--rounds must be >= 2"),
])
def test_ab_bad_arguments(tmp_path, args, message):
    res = subprocess.run([sys.executable, "-m", "bench", "ab", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=120)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert message in res.stderr


def test_merge_rounds_keeps_every_sample_and_the_worst_status():
    from bench.regression.ab import merge_rounds

    def ok(samples):
        return {"status": "ok", "samples_ms": samples, "n": len(samples), "median_ms": 0.0, "first_call_ms": 9.0,
                "peak_mem_bytes": 100 * len(samples)}

    cell = {"layer": "finc", "device": "cpu", "dtype": "float32", "batch": 2, "channels": 4, "height": 8,
            "width": 8, "kernel_size": 3, "options": {}}
    r1 = {"key": "k", "cell": cell, "status": "ok", "message": "",
          "directions": {"forward": ok([1.0, 2.0, 3.0]), "train": ok([5.0, 6.0])}}
    r2 = {"key": "k", "cell": cell, "status": "timeout", "message": "cell exceeded --timeout 1 s",
          "directions": {"forward": ok([4.0, 5.0]), "train": {"status": "timeout", "message": "cell exceeded"}}}
    m = merge_rounds([r1, r2])
    fwd = m["directions"]["forward"]
    assert fwd["samples_ms"] == [1.0, 2.0, 3.0, 4.0, 5.0] and fwd["round_sizes"] == [3, 2]
    # The median over processes: of the round medians 2.0 and 4.5.
    assert fwd["median_ms"] == 3.25 and fwd["n"] == 5 and fwd["peak_mem_bytes"] == 300
    assert fwd["process_medians_ms"] == [2.0, 4.5] and fwd["process_min_ms"] == 2.0
    assert m["directions"]["train"]["status"] == "timeout" and m["directions"]["train"]["rounds_ok"] == 1
    assert m["status"] == "timeout" and m["rounds"] == 2 and m["message"] == "cell exceeded"
