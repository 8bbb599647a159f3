"""`--executor`: option checks, the GPU pool (with fake slots on CPU cells), and where records say
they ran. The SLURM executor against a real SLURM is in tests/test_slurm.py."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import bench_in_process, install_plugin, scale_layer_plugin

from bench.execution import executors, runs
from bench.records import RESULTS
from bench.sweep.cells import SweepConfig, expand

SMALL = ["--layers", "glow-1x1", "--sweep", "input_size", "--input-size", "4,6", "--batch", "2", "--channels", "4",
         "--device", "cpu", "--repeat", "3", "--min-time", "0", "--max-time", "0.5", "--warmup", "1",
         "--warmup-time", "0", "--no-plots", "--no-progress"]

# A layer that reports, in its error message, the CUDA_VISIBLE_DEVICES its worker process saw.
REPORTS_GPU = scale_layer_plugin(
    "ReportsGpu", "test-reports-gpu",
    forward="raise RuntimeError(f\"worker saw CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')}\")",
    inverse="return z")


def config_of(layers, device="cpu", sweep=(), **values) -> SweepConfig:
    grid = {"batch": [2], "input_size": [4], "kernel_size": [3], "channels": [2], **values}
    return SweepConfig(layers=list(layers), sweep=list(sweep), values=grid, device=device, dtype="float32", repeat=1,
                       min_time=0, warmup=1, warmup_time=0, max_time=0.1, timeout=60, isolate=True, threads=1,
                       directions=["forward"])


def test_gpus_executor_refuses_on_a_machine_without_gpus(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    res = bench_in_process("run", *SMALL, "--executor", "gpus", "--out", str(tmp_path))
    assert res.returncode == 2
    assert "--executor gpus runs one worker per GPU, and torch sees no CUDA GPU on this machine" in res.stderr
    assert not any(tmp_path.iterdir())  # refused before a run folder was made


def test_gpus_executor_refuses_cpu_cells(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(Exception, match="measures cuda cells; this run's device is cpu"):
        executors.gpu_slots(config_of(["glow-1x1"], device="cpu"))


@pytest.mark.parametrize("flags, message", [
    (["--partition", "gpu"], "--partition applies to --executor slurm only (this run's executor is local)"),
    (["--executor", "gpus", "--time-limit", "5", "--dry-run"],
     "--time-limit, --dry-run apply to --executor slurm only (this run's executor is gpus)"),
    (["--executor", "slurm", "--sbatch", "account=x"], "expected an sbatch flag such as --account=NAME"),
    (["--executor", "slurm", "--sbatch=--array=0-3"], "--array is set by the executor itself"),
])
def test_bad_executor_options_are_refused_in_one_line(tmp_path, flags, message):
    res = bench_in_process("run", *SMALL, *flags, "--out", str(tmp_path))
    assert res.returncode == 2
    assert message in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_gpu_pool_pins_each_worker_to_its_slot(tmp_path, monkeypatch):
    """Two fake GPU slots on CPU cells: every cell measured once, each worker process saw the
    CUDA_VISIBLE_DEVICES of the slot its record names, and both slots worked."""
    plugin_dir = tmp_path / "plugins"
    plugin_dir.mkdir()
    install_plugin(plugin_dir, monkeypatch, "reports_gpu", REPORTS_GPU, "reports-gpu", {
        "test-reports-gpu": "reports_gpu:ReportsGpu"})
    try:
        config = config_of(["test-reports-gpu"], sweep=["batch"], batch=[1, 2, 3, 4])
        cells = expand(config)
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        slots = [executors.Slot("5", 5, "fake-a"), executors.Slot("7", 7, "fake-b")]
        started = []
        n = executors.run_gpus(cells, config, run_dir, set(), slots, on_start=started.append)
    finally:
        from layers import registry

        monkeypatch.undo()
        registry.refresh()
    assert n == 4 and len(started) == 4
    records = [json.loads(line) for line in (run_dir / RESULTS).read_text().splitlines()]
    assert sorted(r["key"] for r in records) == sorted(c.key() for c in cells)
    for r in records:
        w = r["where"]
        assert w["executor"] == "gpus" and w["host"]
        assert r["status"] == "error" and f"worker saw CUDA_VISIBLE_DEVICES={w['cuda_visible_devices']}" in r["message"]
        assert (w["gpu_index"], w["gpu_name"]) in ((5, "fake-a"), (7, "fake-b"))
    assert {r["where"]["cuda_visible_devices"] for r in records} == {"5", "7"}


def test_local_records_say_where_they_ran(tmp_path):
    res = bench_in_process("run", *SMALL, "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    run_dir = next(tmp_path.iterdir())
    records = runs.load_records(run_dir)
    assert len(records) == 2
    for r in records:
        assert r["where"]["executor"] == "local" and r["where"]["host"] and r["where"]["finished_utc"]
    assert json.loads((run_dir / executors.EXECUTOR_FILE).read_text())["executor"] == "local"


def test_groups_deal_cells_round_robin():
    keys = [str(i) for i in range(10)]
    assert executors.groups_of(keys, 4) == [["0", "3", "6", "9"], ["1", "4", "7"], ["2", "5", "8"]]
    assert executors.groups_of(keys[:1], 4) == [["0"]]


@pytest.mark.skipif(shutil.which("srun") is None, reason="submitit's SLURM executor needs srun on PATH")
def test_slurm_dry_run_prints_the_job_and_submits_nothing(tmp_path):
    res = bench_in_process("run", *SMALL, "--layers", "glow-1x1,inverse-flow", "--executor", "slurm", "--dry-run",
                           "--cells-per-task", "3", "--partition", "p1", "--time-limit", "7", "--gpus-per-task", "1",
                           "--array-parallelism", "2", "--sbatch=--account=proj", "--sbatch=--exclusive",
                           "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "# dry run: 4 cells in 2 array tasks" in out
    for line in ("#SBATCH --array=0-1%2", "#SBATCH --partition=p1", "#SBATCH --time=7", "#SBATCH --gpus-per-task=1",
                 "#SBATCH --account=proj", "#SBATCH --exclusive", "#SBATCH --signal=B:CONT@60"):
        assert line in out
    assert "USR2" not in out  # submitit's pre-timeout requeue signal is replaced
    assert out.count("# task ") == 2
    assert not any(tmp_path.iterdir())
