"""The runner end to end: CLI, run folder, failing cells, interrupt and resume, bad arguments."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SCALE_LAYERS, install_plugin, only_run_dir
from helpers import raw_records as records
from helpers import run_bench as bench

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--repeat", "2", "--min-time", "0", "--warmup", "1", "--warmup-time", "0", "--no-progress"]

MISBEHAVING = SCALE_LAYERS + '''

class FailsInTrain(_Scale):
    info = _info("test-raises")

    def _forward(self, x):
        if torch.is_grad_enabled():
            raise RuntimeError("deliberate failure in the train direction")
        return super()._forward(x)


class SleepsInSampling(_Scale):
    info = _info("test-sleeps")

    def _inverse(self, z):
        time.sleep(float(os.environ.get("TEST_SLEEP", "60")))
        return super()._inverse(z)


class OutOfMemory(_Scale):
    info = _info("test-oom")

    def _forward(self, x):
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1000000000000 bytes")


class NotFinite(_Scale):
    info = _info("test-nan")

    def _forward(self, x):
        z, ld = super()._forward(x)
        return z * float("nan"), ld


class Crashes(_Scale):
    info = _info("test-crash")

    def _inverse(self, z):
        os.kill(os.getpid(), signal.SIGSEGV)


class OddOnly(_Scale):
    info = _info("test-odd", kernel_sizes="odd")
'''

ENTRIES = {"test-raises": "misbehaving:FailsInTrain", "test-sleeps": "misbehaving:SleepsInSampling",
           "test-oom": "misbehaving:OutOfMemory", "test-nan": "misbehaving:NotFinite",
           "test-crash": "misbehaving:Crashes", "test-odd": "misbehaving:OddOnly"}


@pytest.fixture
def plugins(tmp_path, monkeypatch):
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    install_plugin(plugin_dir, monkeypatch, "misbehaving", MISBEHAVING, "misbehaving-layers", ENTRIES)
    yield
    from layers import registry

    monkeypatch.undo()
    sys.modules.pop("misbehaving", None)
    registry.refresh()


def test_end_to_end_cpu_run(tmp_path):
    out = tmp_path / "runs"
    res = bench("run", "--sweep", "input_size", "--input-size", "4,6", "--batch", "2", "--channels", "4",
                "--layers", "inverse-flow,glow-1x1", "--device", "cpu", "--out", str(out), *FAST)
    assert res.returncode == 0, res.stderr
    run_dir = only_run_dir(out)
    assert {"env.json", "config.json", "results.jsonl", "table.md", "table.csv", "table.tex", "time.png",
            "memory.png"} <= {p.name for p in run_dir.iterdir()}
    assert f"results: {run_dir}" in res.stdout
    assert "| inverse-flow |" in res.stdout  # the Markdown tables are printed at the end
    recs = records(run_dir)
    assert len(recs) == 4 and all(r["status"] == "ok" for r in recs)
    for r in recs:
        assert set(r["directions"]) == {"forward", "sampling", "train"}
        assert r["params"] > 0 and r["recon_error"] < 1e-4
        assert r["exact_inverse"] is True  # stored for rendering later (both layers invert exactly)
        for d in r["directions"].values():
            assert len(d["samples_ms"]) >= 2 and d["p20_ms"] <= d["median_ms"] <= d["p80_ms"]
            assert d["peak_mem_bytes"] is not None
    env = json.loads((run_dir / "env.json").read_text())
    assert env["torch"]["version"] and "solvers" in env and env["git"]
    config = json.loads((run_dir / "config.json").read_text())
    assert config["sweep"] == ["input_size"] and config["values"]["input_size"] == [4, 6]
    import pandas as pd

    df = pd.read_csv(run_dir / "table.csv")
    assert len(df) == 12 and set(df.direction) == {"forward", "sampling", "train"}
    assert r"\toprule" in (run_dir / "table.tex").read_text()
    # Re-rendering a finished run needs no measuring.
    res = bench("table", str(run_dir), "--format", "csv")
    assert res.returncode == 0 and res.stdout.splitlines()[0].startswith("layer,device,dtype,batch")
    res = bench("plot", str(run_dir), "--out", str(tmp_path))
    assert res.returncode == 0 and (tmp_path / "time.png").exists()


def test_failing_cells_are_recorded_and_the_sweep_continues(tmp_path, plugins):
    out = tmp_path / "runs"
    res = bench("run", "--sweep", "kernel_size", "--kernel-size", "2,3", "--input-size", "4", "--batch", "2",
                "--channels", "2", "--layers", "test-raises,test-sleeps,test-oom,test-nan,test-crash,test-odd,glow-1x1",
                "--timeout", "6", "--out", str(out), *FAST, env={"TEST_SLEEP": "60"})
    assert res.returncode == 0, res.stderr
    recs = {(r["cell"]["layer"], r["cell"]["kernel_size"]): r for r in records(only_run_dir(out))}
    # Layers without a kernel size run once in a kernel-size sweep; test-odd runs at k=3 only.
    assert set(recs) == {("test-raises", None), ("test-sleeps", None), ("test-oom", None), ("test-nan", None),
                         ("test-crash", None), ("test-odd", 2), ("test-odd", 3), ("glow-1x1", None)}

    r = recs[("test-raises", None)]
    assert r["directions"]["forward"]["status"] == "ok" and r["directions"]["sampling"]["status"] == "ok"
    assert r["directions"]["train"]["status"] == "error"
    assert "deliberate failure" in r["directions"]["train"]["message"]

    r = recs[("test-sleeps", None)]
    assert r["directions"]["forward"]["status"] == "ok", "finished directions must survive a timeout"
    assert r["directions"]["sampling"]["status"] == "timeout" and r["status"] == "timeout"

    assert recs[("test-oom", None)]["directions"]["forward"]["status"] == "oom"
    assert recs[("test-nan", None)]["directions"]["forward"]["status"] == "nonfinite"

    r = recs[("test-crash", None)]
    assert r["directions"]["forward"]["status"] == "ok"
    assert r["directions"]["sampling"]["status"] == "error" and "signal 11" in r["directions"]["sampling"]["message"]

    r = recs[("test-odd", 2)]
    assert r["status"] == "unsupported" and "odd" in r["message"]
    assert all(d["status"] == "unsupported" for d in r["directions"].values())
    assert recs[("test-odd", 3)]["status"] == "ok"
    assert recs[("glow-1x1", None)]["status"] == "ok"

    table = (only_run_dir(out) / "table.md").read_text()
    assert "timeout" in table and "oom" in table and "unsupported" in table


def test_interrupted_run_resumes_without_repeating_cells(tmp_path, plugins):
    out = tmp_path / "runs"
    args = [sys.executable, "-m", "bench", "run", "--sweep", "input_size", "--input-size", "4", "--batch", "1",
            "--channels", "2", "--layers", "glow-1x1,test-sleeps,test-raises", "--out", str(out), *FAST]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "TEST_SLEEP": "120"})
    deadline = time.time() + 120
    results = None
    while time.time() < deadline:  # wait until the first cell is on disk and the second is in flight
        found = list(out.glob("*/results.jsonl")) if out.exists() else []
        if found and found[0].read_text().count("\n") >= 1:
            results = found[0]
            break
        time.sleep(0.2)
    assert results is not None, "first cell never finished"
    time.sleep(2.0)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "resume with: python -m bench run --resume" in stderr
    first = results.read_text().splitlines()
    assert len(first) == 1 and json.loads(first[0])["cell"]["layer"] == "glow-1x1"
    assert (results.parent / "table.md").exists(), "a partial run is rendered too"

    res = bench("run", "--resume", str(results.parent), "--no-progress", env={"TEST_SLEEP": "0"})
    assert res.returncode == 0, res.stderr
    lines = results.read_text().splitlines()
    assert len(lines) == 3
    assert lines[0] == first[0], "the finished cell was not measured again"
    assert [json.loads(x)["cell"]["layer"] for x in lines] == ["glow-1x1", "test-sleeps", "test-raises"]


@pytest.mark.parametrize(("args", "message"), [
    (["run", "--layers", "no-such-layer"], "unknown layer 'no-such-layer'; known layers: "),
    (["run", "--sweep", "depth"], "unknown sweep axis 'depth'; accepted: input_size, batch, kernel_size"),
    (["run", "--batch", "-4"], "-4 is not a positive integer"),
    (["run", "--kernel-size", "three"], "'three' is not an integer"),
    (["run", "--device", "tpu"], "invalid choice: 'tpu'"),
    (["table", "/nonexistent/run"], "is not a run folder"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
])
def test_bad_arguments_give_one_line_and_nonzero_exit(args, message):
    res = bench(*args, timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert message in lines[0]


def test_resume_refuses_conflicting_settings(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    res = bench("run", "--resume", str(tmp_path), "--batch", "4", timeout=60)
    assert res.returncode == 2 and "drop --batch" in res.stderr


def test_help_on_every_subcommand():
    for cmd in ("run", "list", "env", "table", "plot"):
        res = bench(cmd, "--help", timeout=60)
        assert res.returncode == 0 and "usage:" in res.stdout, cmd


def test_list_and_env_commands():
    res = bench("list", timeout=60)
    assert res.returncode == 0 and "inverse-flow" in res.stdout and "sequential" in res.stdout
    res = bench("env", timeout=60)
    assert res.returncode == 0 and "torch" in res.stdout and "solver" in res.stdout
