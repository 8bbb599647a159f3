"""`--executor slurm` against a real SLURM (the single-node cluster of .ci/slurm-up, which declares
two fake GPUs). Skipped with the reason where no SLURM answers, except under
INVCONV_REQUIRE_SLURM=1 (.ci/run), where that is a failure."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time

import pytest
from helpers import bench_in_process, install_plugin, only_run_dir, run_bench, scale_layer_plugin

from bench import records
from bench.execution import runs

FAST = ["--repeat", "3", "--min-time", "0", "--max-time", "0.5", "--warmup", "1", "--warmup-time", "0",
        "--no-plots", "--no-progress", "--threads", "1"]
# The acceptance sweep: 4 cells.
SWEEP = ["--sweep", "input_size", "--layers", "glow-1x1,inverse-flow", "--input-size", "8,16", "--batch", "2",
         "--channels", "4", "--device", "cpu"]


def _why_no_slurm() -> str | None:
    missing = [c for c in ("sbatch", "squeue", "sinfo", "srun") if shutil.which(c) is None]
    if missing:
        return f"no SLURM client here ({', '.join(missing)} not on PATH); .ci/slurm-up starts a local cluster"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if out.returncode != 0:
        return f"no SLURM controller answers ({out.stderr.strip().splitlines()[-1:]}); .ci/slurm-up starts one"
    if not {"idle", "mixed"} & set(out.stdout.split()):
        return f"no SLURM node takes jobs (sinfo: {out.stdout.split()})"
    return None


_REASON = _why_no_slurm()
if _REASON and os.environ.get("INVCONV_REQUIRE_SLURM") == "1":
    raise RuntimeError(f"INVCONV_REQUIRE_SLURM=1 but {_REASON}")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def bench(*args, env=None, timeout=600):
    return run_bench(*args, env=env, timeout=timeout)


def test_slurm_sweep_matches_the_local_run_and_array_tasks_get_different_gpus(tmp_path):
    local = bench("run", *SWEEP, *FAST, "--out", str(tmp_path / "local"))
    assert local.returncode == 0, local.stderr
    # Two tasks of two cells, one CPU and one (fake) GPU each: both run at once on the test node,
    # so SLURM must give them different GPUs.
    res = bench("run", *SWEEP, *FAST, "--executor", "slurm", "--gpus-per-task", "1", "--cpus-per-task", "1",
                "--cells-per-task", "2", "--time-limit", "10", "--out", str(tmp_path / "slurm"))
    assert res.returncode == 0, res.stderr
    local_dir, slurm_dir = only_run_dir(tmp_path / "local"), only_run_dir(tmp_path / "slurm")
    assert not (slurm_dir / records.RESULTS).exists()  # every record is in a task's shard
    assert sorted(p.name for p in (slurm_dir / "shards").iterdir()) == [f"{p.stem}.jsonl" for p in
                                                                      sorted((slurm_dir / "shards").iterdir())]
    local_recs, slurm_recs = runs.load_records(local_dir), runs.load_records(slurm_dir)
    assert sorted(r["key"] for r in slurm_recs) == sorted(r["key"] for r in local_recs)
    assert len(slurm_recs) == 4 and all(r["status"] == "ok" for r in slurm_recs)
    wheres = [r["where"] for r in slurm_recs]
    assert all(w["executor"] == "slurm" and w["slurm_job_id"] and w["host"] for w in wheres)
    assert len({w["slurm_array_job_id"] for w in wheres}) == 1
    tasks = {w["slurm_array_task_id"] for w in wheres}
    assert tasks == {"0", "1"}
    gpu_of_task = {w["slurm_array_task_id"]: w["cuda_visible_devices"] for w in wheres}
    assert sorted(gpu_of_task.values()) == ["0", "1"], gpu_of_task
    assert all(str(w["gpu_index"]) == w["cuda_visible_devices"] for w in wheres)

    # The readers take the sharded run like any other.
    table = bench_in_process("table", str(slurm_dir))
    assert table.returncode == 0 and "| inverse-flow |" in table.stdout
    compare = bench_in_process("compare", str(local_dir), str(slurm_dir))
    assert compare.returncode in (0, 1), compare.stderr  # 1: noise may call a row slower; it compared
    assert compare.stdout.count("glow-1x1") >= 2 and "no cell" not in compare.stdout
    export = bench_in_process("export", str(slurm_dir))
    assert export.returncode == 0 and len(json.loads(export.stdout)) == 4 * 3


SLOW_LAYER = scale_layer_plugin(
    "SlowForward", "test-slow", doc="Sleeps TEST_CELL_SLEEP seconds in every density call: cells of a predictable length.",
    forward='time.sleep(float(os.environ.get("TEST_CELL_SLEEP", "0")))\n'
            'return x * self.scale[:, None, None], (x.shape[2] * x.shape[3] * self.scale.log().sum()).expand(x.shape[0])')


def test_time_limit_keeps_finished_cells_and_resume_submits_only_the_lost(tmp_path, monkeypatch):
    """One array task of ten ~15 s cells under SLURM's smallest time limit (1 minute; SLURM kills
    it 60–90 s in): the cells it finished stay, the rest are recorded lost, and --resume submits
    exactly the lost ones."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    install_plugin(plugin_dir, monkeypatch, "slow_layer", SLOW_LAYER, "slow-layer", {"test-slow": "slow_layer:SlowForward"})
    out = tmp_path / "runs"
    start = time.monotonic()
    res = bench("run", "--layers", "test-slow", "--sweep", "batch", "--batch", "1,2,3,4,5,6,7,8,9,10",
                "--input-size", "4", "--channels", "2", "--device", "cpu", "--directions", "forward", *FAST,
                "--executor", "slurm", "--time-limit", "1", "--cells-per-task", "10", "--cpus-per-task", "1",
                "--out", str(out), env={"TEST_CELL_SLEEP": "2"})
    took = time.monotonic() - start
    assert res.returncode == 3, res.stderr  # 3: some cells were lost
    # SLURM kills the task 60-90 s in; the rest is starting bench (slow on a loaded machine).
    assert took < 180, f"the time-limit run took {took:.0f} s"
    run_dir = only_run_dir(out)
    first = runs.load_records(run_dir)
    assert len(first) == 10
    ok = {r["key"]: r for r in first if r["status"] == "ok"}
    lost = {r["key"]: r for r in first if r["status"] == "lost"}
    assert ok and lost and len(ok) + len(lost) == 10, [r["status"] for r in first]
    assert all("--resume runs it again" in r["message"] for r in lost.values())
    logs = "".join(p.read_text(errors="replace") for p in (run_dir / "slurm").rglob("*_log.err"))
    assert "DUE TO TIME LIMIT" in logs  # SLURM, not something else, ended the task
    assert f"{len(lost)} cells were lost" in res.stderr and f"--resume {run_dir}" in res.stderr

    again = bench("run", "--resume", str(run_dir), "--time-limit", "10", env={"TEST_CELL_SLEEP": "0"})
    assert again.returncode == 0, again.stderr
    assert "submitted SLURM job array" in again.stderr and f": {len(lost)} cells in 1 tasks" in again.stderr
    conflicts: list = []
    from bench.execution.shards import read_records

    final = read_records(run_dir, conflicts)
    assert conflicts == []
    assert len(final) == 10 and all(r["status"] == "ok" for r in final)
    by_key = {r["key"]: r for r in final}
    for key, r in ok.items():  # what the killed task finished is kept as it was
        assert by_key[key] == r
    # a job of one task is no array: SLURM sets no array ids then
    jobs = {r["where"]["slurm_array_job_id"] or r["where"]["slurm_job_id"] for r in final}
    assert len(jobs) == 2
    assert json.loads((run_dir / "executor.json").read_text())["jobs"] == sorted(jobs, key=int)
