"""The runner never loses, mixes or hangs: every way a run was found broken, reproduced.

The misbehaving layers and the helpers that break runs are in ``tests/faults.py``. Subprocess
tests use tiny cells and the fast timing flags, and check that no process outlives the run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from faults import (
    FAST,
    TINY,
    alive,
    assert_none_alive,
    bench,
    cleanup,
    install_faulty_plugins,
    kill_parent,
    noted_pids,
    race,
    start_bench,
    tear_last_line,
    wait_until,
)
from helpers import bench_in_process

import layers
from bench import records
from bench.execution import runs
from bench.sweep.cells import Cell, SweepConfig


@pytest.fixture
def faulty(tmp_path, monkeypatch):
    """The misbehaving plugin layers, installed; yields the folder their pids are noted in."""
    pids = install_faulty_plugins(tmp_path, monkeypatch)
    yield pids
    from layers import registry

    monkeypatch.undo()
    for name in ("faulty_layers", "faulty_exit"):
        sys.modules.pop(name, None)
    registry.refresh()
    # Whatever a test started must be gone, even when the test failed half-way.
    # (In-process tests note this very process: not one to wait for.)
    assert_none_alive([p for p in noted_pids(pids) if p != os.getpid()], within=10)


def run_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines() if line.strip()]


def only_dir(out: Path) -> Path:
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def record(layer: str, status: str = "ok", batch: int = 2) -> dict:
    cell = Cell(layer=layer, device="cpu", dtype="float32", batch=batch, channels=2, height=4, width=4,
                kernel_size=None)
    return {"key": cell.key(), "cell": asdict(cell), "status": status, "message": "",
            "directions": {"forward": {"status": status, "median_ms": 1.0, "p20_ms": 0.9, "p80_ms": 1.1,
                                       "mean_ms": 1.0, "std_ms": 0.1, "n": 3, "samples_ms": [0.9, 1.0, 1.1]}}}


def config(**kw) -> SweepConfig:
    base = dict(layers=["fault-good"], sweep=[], values={"input_size": [4], "batch": [2], "kernel_size": [3],
                                                         "channels": [2]},
                device="cpu", dtype="float32", repeat=3, min_time=0.0, warmup=1, warmup_time=0.0, max_time=0.5,
                timeout=30.0, isolate=True, threads=1)
    return SweepConfig(**{**base, **kw})


def cell(layer: str, batch: int = 2, dtype: str = "float32") -> Cell:
    return Cell(layer=layer, device="cpu", dtype=dtype, batch=batch, channels=2, height=4, width=4,
                kernel_size=None)


# --- 1. a torn last line is repaired, not glued to the next record ---------------------------------


@pytest.mark.parametrize("how", ["half", "nul"])
def test_append_after_a_torn_last_line_starts_a_fresh_line(tmp_path, how):
    records.append(tmp_path, record("a"))
    records.append(tmp_path, record("b"))
    tear_last_line(tmp_path, how)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tear itself is warned about; the point is what survives
        records.append(tmp_path, record("c"))
        got = [r["cell"]["layer"] for r in records.read(tmp_path)]
    assert got == (["a", "c"] if how == "half" else ["a", "b", "c"])
    # What is on disk now is whole lines only: nothing more to skip.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        records.read(tmp_path)
    assert (tmp_path / "results.jsonl").read_bytes().endswith(b"\n")


def test_resume_after_a_torn_line_measures_the_lost_cell_again(tmp_path, faulty):
    out = tmp_path / "runs"
    res = bench("run", "--layers", "fault-good", "--sweep", "batch", "--batch", "1,2,3", "--channels", "2",
                "--input-size", "4", "--directions", "forward", "--no-isolate", "--out", str(out), *FAST)
    assert res.returncode == 0, res.stderr
    run_dir = only_dir(out)
    tear_last_line(run_dir, "half")
    (run_dir / "results.jsonl").write_bytes((run_dir / "results.jsonl").read_bytes() + b"\0" * 50)
    res = bench("run", "--resume", str(run_dir), "--no-plots", "--no-progress")
    assert res.returncode == 0, res.stderr
    assert "1 already finished" not in res.stderr and "2 already finished" in res.stderr
    recs = records.read(run_dir)
    assert sorted(r["cell"]["batch"] for r in recs) == [1, 2, 3]
    assert all(r["status"] == "ok" for r in recs)


# --- 2. a run folder is locked for the lifetime of a run ---------------------------------------


def test_a_second_lock_is_refused_with_the_holders_pid(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with runs.RunLock(tmp_path):
        with pytest.raises(runs.RunLockedError, match=rf"in use by another run \(pid {os.getpid()}\)"):
            runs.RunLock(tmp_path).acquire()
        with pytest.raises(runs.RunLockedError, match="in use"):
            runs.new_run_dir(tmp_path.parent, name=tmp_path.name, overwrite=True)
    assert (tmp_path / "config.json").exists(), "a refused --overwrite must delete nothing"
    path, lock = runs.new_run_dir(tmp_path.parent, name=tmp_path.name, overwrite=True)  # free again
    lock.release()
    assert path == tmp_path and not (tmp_path / "config.json").exists()


def hanging_run_args(out: Path, name: str) -> list[str]:
    """A run that saves one cell, then hangs in the second until it is stopped (in-process, so
    that it is quick to start)."""
    return ["run", "--layers", "fault-good,fault-hangs", *TINY, "--directions", "forward", "--no-isolate",
            "--timeout", "0", "--out", str(out), "--name", name, *FAST]


def stop(proc) -> str:
    kill_parent(proc, signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    return err


def test_overwrite_of_a_folder_another_run_writes_is_refused(tmp_path, faulty):
    out = tmp_path / "runs"
    run_dir = out / "same"
    a, b = race(hanging_run_args(out, "same"), hanging_run_args(out, "same") + ["--overwrite"],
                ready=lambda: (run_dir / "results.jsonl").exists())
    try:
        assert b.returncode == 2 and f"in use by another run (pid {a.pid})" in b.stderr, b.stderr
        assert len(b.stderr.strip().splitlines()) == 1
        stop(a)
    finally:
        cleanup(a)
    assert [r["cell"]["layer"] for r in run_records(run_dir)] == ["fault-good"]
    assert (run_dir / "config.json").exists() and (run_dir / "table.md").exists()


def test_two_resumes_of_one_folder_do_not_both_measure(tmp_path, faulty):
    out = tmp_path / "runs"
    run_dir = out / "r"
    first = start_bench(*hanging_run_args(out, "r"))
    try:
        wait_until(lambda: (run_dir / "results.jsonl").exists(), 60, "the first record")
        stop(first)
    finally:
        cleanup(first)
    resume = ["run", "--resume", str(run_dir), "--no-plots", "--no-progress"]
    a = start_bench(*resume)
    try:
        # The first resume holds the lock (it is measuring the hanging cell) ...
        wait_until(lambda: a.pid in noted_pids(faulty, "worker"), 60, "the first resume to measure")
        b = bench(*resume)  # ... so the second is refused instead of measuring the same cells
        assert b.returncode == 2 and f"in use by another run (pid {a.pid})" in b.stderr, b.stderr
        stop(a)
    finally:
        cleanup(a)
    keys = [r["key"] for r in run_records(run_dir)]
    assert len(keys) == len(set(keys)) == 1, "no cell measured twice"


# --- 3, 5. timeouts and a killed runner leave no process behind --------------------------------


def test_timeout_kills_the_cells_whole_process_group(tmp_path, faulty):
    out = tmp_path / "runs"
    t0 = time.monotonic()
    res = bench("run", "--layers", "fault-spawns", *TINY, "--timeout", "2", "--out", str(out), *FAST)
    took = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    (rec,) = run_records(only_dir(out))
    assert rec["status"] == "timeout" and "--timeout 2" in rec["message"]
    assert took < 30, f"a 2 s timeout took {took:.0f} s (waiting for the layer's child?)"
    assert noted_pids(faulty, "child"), "the layer did not start its child"
    assert_none_alive(noted_pids(faulty), within=2)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killing_bench_run_kills_its_worker_and_the_workers_children(tmp_path, faulty, sig):
    out = tmp_path / "runs with space"
    proc = start_bench("run", "--layers", "fault-good,fault-spawns", *TINY, "--timeout", "300", "--out", str(out),
                       "--name", "r", *FAST)
    try:
        wait_until(lambda: noted_pids(faulty, "child"), 60, "the layer's child to start")
        kill_parent(proc, sig)
        _, err = proc.communicate(timeout=30)
    finally:
        cleanup(proc)
    assert_none_alive(noted_pids(faulty), within=5)
    if sig == signal.SIGTERM:
        assert proc.returncode == 143, err
        quoted = f"'{out / 'r'}'"
        assert "interrupted (SIGTERM): 1 of 2 cells are saved" in err and f"--resume {quoted}" in err, err
        assert (out / "r" / "table.md").exists()
    assert [r["cell"]["layer"] for r in run_records(out / "r")] == ["fault-good"]


def test_a_worker_exits_when_its_parent_dies(tmp_path, faulty):
    """The worker alone (no bench run around it): its parent is killed with SIGKILL."""
    request = json.dumps({"cell": asdict(cell("fault-spawns")), "policy": {"repeat": 3}, "directions": ["forward"]})
    code = ("import os, subprocess, sys; "
            "p = subprocess.Popen([sys.executable, '-m', 'bench.worker'], stdin=subprocess.PIPE, "
            "env={**os.environ, 'INVCONV_BENCH_PARENT_PID': str(os.getpid())}, start_new_session=True); "
            f"p.stdin.write({request!r}.encode()); p.stdin.close(); "
            "import time; time.sleep(600)")
    import subprocess

    parent = subprocess.Popen([sys.executable, "-c", code], cwd=Path(__file__).parent.parent,
                              start_new_session=True)
    try:
        wait_until(lambda: noted_pids(faulty, "child"), 60, "the layer's child to start")
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=10)
        assert_none_alive(noted_pids(faulty), within=5)
    finally:
        cleanup(parent)


# --- 4, 13. the timeout with and without isolation ----------------------------------------------


def test_no_isolate_timeout_ends_the_cell_and_is_recorded_as_timeout(faulty):
    from bench.execution.runner import run_in_process

    t0 = time.monotonic()
    rec = run_in_process(cell("fault-hangs"), config(timeout=0.5, isolate=False))
    assert time.monotonic() - t0 < 10
    assert rec["status"] == "timeout" and "--timeout 0.5" in rec["message"]
    assert {d["status"] for d in rec["directions"].values()} == {"timeout"}
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_timeout_zero_means_no_limit_with_and_without_isolation(faulty):
    from bench.execution.runner import run_in_process, run_isolated

    for run in (run_in_process, run_isolated):
        rec = run(cell("fault-good"), config(timeout=0.0, isolate=run is run_isolated, directions=["forward"]))
        assert rec["status"] == "ok", (run.__name__, rec)


def test_the_timeout_does_not_count_the_workers_start(faulty):
    from bench.execution.runner import run_isolated

    # Starting a worker (a fresh interpreter importing torch) takes longer than this on its own.
    rec = run_isolated(cell("fault-good"), config(timeout=0.6, directions=["forward"]))
    assert rec["status"] == "ok", rec


# --- 6. a plugin that exits at import ------------------------------------------------------------


def test_a_plugin_calling_sys_exit_at_import_breaks_nothing_else(faulty):
    assert "fault-exits" not in layers.available() and "fault-good" in layers.available()
    assert "SystemExit: 3" in layers.unavailable()["fault-exits"]
    res = bench("list")
    assert res.returncode == 0 and "fault-exits" in res.stdout + res.stderr and "inverse-flow" in res.stdout


# --- 7. the layer contract ----------------------------------------------------------------------


@pytest.mark.parametrize(("layer", "broken", "what"), [
    ("fault-logdet-2d", {"forward", "train"}, "logdet of shape (2,)"),
    ("fault-logdet-0d", {"forward", "train"}, "logdet of shape (2,)"),
    ("fault-bare", {"forward", "train"}, "required: (z, logdet)"),
    ("fault-inverse-shape", {"sampling"}, "required: a tensor of shape (2, 2, 4, 4)"),
])
def test_a_broken_contract_is_an_error_naming_what_is_required(faulty, layer, broken, what):
    from bench.timing.measure import TimingPolicy, measure_cell

    messages: list[dict] = []
    measure_cell(cell(layer), TimingPolicy(warmup=1, warmup_time=0, repeat=3, min_time=0, max_time=0.5),
                 messages.append)
    got = {m["direction"]: m for m in messages if m["type"] == "direction"}
    assert {d for d, m in got.items() if m["status"] == "error"} == broken
    for d in broken:
        assert "ContractError" in got[d]["message"] and what in got[d]["message"], got[d]["message"]
        assert "median_ms" not in got[d], "a broken direction must not be timed"
    for d in set(got) - broken:
        assert got[d]["status"] == "ok"


def test_nan_is_nonfinite(faulty):
    from bench.timing.measure import TimingPolicy, measure_cell

    messages: list[dict] = []
    measure_cell(cell("fault-nan"), TimingPolicy(warmup=1, warmup_time=0, repeat=3, min_time=0, max_time=0.5),
                 messages.append, directions=("forward",))
    assert [m["status"] for m in messages if m["type"] == "direction"] == ["nonfinite"]


def test_segfault_oom_and_a_persons_kill_are_told_apart(tmp_path, faulty):
    out = tmp_path / "runs"
    res = bench("run", "--layers", "fault-segfault,fault-allocates,fault-killed,fault-prints", *TINY,
                "--directions", "forward,sampling", "--out", str(out), *FAST, timeout=240)
    assert res.returncode == 0, res.stderr
    recs = {r["cell"]["layer"]: r for r in run_records(only_dir(out))}
    seg = recs["fault-segfault"]["directions"]
    assert seg["forward"]["status"] == "ok" and "signal 11" in seg["sampling"]["message"]
    assert recs["fault-allocates"]["directions"]["forward"]["status"] == "oom"
    killed = recs["fault-killed"]
    assert killed["status"] != "oom" and "SIGKILL" in killed["message"], killed
    assert recs["fault-prints"]["status"] == "ok"


# --- 8. JSON lines that are not records ----------------------------------------------------------


def test_json_lines_that_are_not_records_are_skipped_with_a_warning(tmp_path):
    res = bench_in_process("run", "--layers", "glow-1x1", *TINY, "--directions", "forward", "--no-isolate",
                           "--out", str(tmp_path), "--name", "r", *FAST)
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "r"
    with open(run_dir / "results.jsonl", "a") as fh:
        fh.write('{"foo": 1}\n42\n[1, 2]\n{"key": 3, "cell": {}, "directions": {}, "status": "ok"}\n')
    with pytest.warns(UserWarning, match="not a record") as caught:
        recs = records.read(run_dir)
    assert len(recs) == 1 and len(caught) == 4
    for args in (["table", str(run_dir)], ["export", str(run_dir), "--format", "pytest-benchmark"],
                 ["compare", str(run_dir), str(run_dir)], ["plot", str(run_dir), "--out", str(tmp_path)]):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = bench_in_process(*args)
        assert res.returncode in (0, 1) and "Traceback" not in res.stderr + res.stdout, (args, res)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = bench_in_process("run", "--resume", str(run_dir), "--no-plots", "--no-progress")
    assert res.returncode == 0 and "1 already finished" in res.stderr, res.stderr


def test_validate_names_the_missing_field():
    for bad, why in (({"foo": 1}, "no key"), (42, "not a record"), ({**record("a"), "directions": []}, "directions")):
        with pytest.raises(records.RecordError, match=why):
            records.validate(bad)
    assert records.validate({**record("a"), "per_process": [1, 2]})  # extra fields are fine
    with pytest.raises(records.RecordError):
        records.append(Path("/nonexistent"), {"foo": 1})


def test_status_priority_is_defined_once():
    assert records.worst_status(["ok", "nonfinite", "timeout"]) == "timeout"
    assert records.worst_status(["ok", "unsupported"]) == "unsupported"
    assert records.worst_status(["ok", "something-new"]) == "something-new"


def test_records_from_another_configuration_are_warned_about(tmp_path):
    res = bench_in_process("run", "--layers", "glow-1x1", *TINY, "--directions", "forward", "--no-isolate",
                           "--out", str(tmp_path), "--name", "r", *FAST)
    assert res.returncode == 0, res.stderr
    records.append(tmp_path / "r", record("inverse-flow", batch=64))
    with pytest.warns(UserWarning, match="1 record.* do not belong to this run's configuration"):
        bench_in_process("table", str(tmp_path / "r"))


@pytest.mark.parametrize("preset", ["cifar", "mnist"])
def test_a_runs_published_architecture_cells_belong_to_it(preset):
    """The committed quick runs of the presets with published architectures: every record —
    MintNet's architecture cells carry that entry's options on top of the layer's — belongs to
    the run's configuration (they were reported as copied from another run)."""
    run_dir = Path(__file__).resolve().parent.parent / "results" / "quick" / preset
    config, recs = runs.load_config(run_dir), runs.load_records(run_dir)
    assert any(r["cell"].get("architecture") and r["cell"].get("options") for r in recs)
    assert records.foreign(recs, config) == []


def test_architecture_cells_with_other_options_or_architectures_are_foreign():
    config = {"layers": ["mintnet"], "device": "cpu", "dtype": "float32", "scope": "model",
              "values": {"input_size": [8], "batch": [2], "kernel_size": [3], "channels": [3]},
              "options": {"mintnet": {"newton_lr": 1.0}},
              "architectures": [{"layer": "mintnet", "architecture": {"name": "mintnet", "pairs": 1},
                                 "options": {"iterations": 100}}]}
    cell = {"layer": "mintnet", "device": "cpu", "dtype": "float32", "batch": 2, "channels": 3,
            "kernel_size": 3, "height": 8, "width": 8, "scope": "model"}
    glow_style = {**cell, "options": {"newton_lr": 1.0}}
    arch = {**cell, "architecture": {"name": "mintnet", "pairs": 1}, "options": {"newton_lr": 1.0, "iterations": 100}}
    other_options = {**arch, "options": {"iterations": 100}}
    other_architecture = {**arch, "architecture": {"name": "mintnet", "pairs": 2}}
    recs = [{"cell": c} for c in (glow_style, arch, other_options, other_architecture)]
    assert [r["cell"] for r in records.foreign(recs, config)] == [other_options, other_architecture]


# --- 9. presets ---------------------------------------------------------------------------------


def preset_dict(**changes):
    from bench.sweep import presets

    d = {"name": "p", "title": "t", "paper_table": "cifar", "description": "d", "scope": "layer",
         "layers": ["glow-1x1"], "sweep": [], "directions": ["forward"],
         "values": {"input_size": [4], "batch": [2], "kernel_size": [3], "channels": [2]},
         "quick": {"note": "n"}}
    for key, value in changes.items():
        section, _, sub = key.partition(".")
        if sub:
            d.setdefault(section, {})[sub] = value
        else:
            d[key] = value
    return presets.parse(d)


@pytest.mark.parametrize(("change", "message"), [
    ({"timing.timeout": -1}, "timing.timeout must be a number of seconds >= 0"),
    ({"timing.timeout": "soon"}, "timing.timeout must be a number"),
    ({"timing.repeat": "many"}, "timing.repeat must be a positive integer"),
    ({"timing.min_time": math.nan}, "timing.min_time must be a number"),
    ({"model.mixing": "bogus"}, "model.mixing must be one of auto, always, never"),
    ({"model.levels": 0}, "model.levels must be a positive integer"),
    ({"title": 3}, "title must be a non-empty string"),
])
def test_a_bad_preset_value_is_refused_when_loaded(change, message):
    from bench.sweep import presets

    with pytest.raises(presets.PresetError, match=message):
        preset_dict(**change)


def test_a_preset_path_is_refused_and_an_unknown_paper_table_before_measuring(tmp_path, monkeypatch):
    from bench.sweep import presets

    (tmp_path / "mine.toml").write_text("")
    for name in (str(tmp_path / "mine"), "../presets/cifar", "cifar.toml"):
        res = bench_in_process("run", "--preset", name, "--out", str(tmp_path))
        assert res.returncode == 2 and "takes a preset's name, not a path" in res.stderr, res.stderr
    monkeypatch.setattr(presets, "load", lambda name, directory=None: preset_dict(paper_table="nope"))
    res = bench_in_process("run", "--preset", "p", "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "paper table 'nope' is not in results/paper/" in res.stderr, res.stderr
    assert not (tmp_path / "o").exists(), "refused before a run folder was made"


# --- 10, 13. pre-flight checks of the run command -------------------------------------------------


@pytest.mark.parametrize(("args", "env", "message"), [
    (["--layers", "inverse-flow", "--option", "inverse-flow:bogus=1"], {},
     "--option: inverse-flow: unknown option(s) bogus; accepted: init_scale"),
    (["--layers", "inverse-flow"], {"INVCONV_SOLVER": "bogus"}, "INVCONV_SOLVER='bogus' is not valid"),
    (["--layers", ""], {}, "--layers names no layer"),
    (["--layers", "inverse-flow", "--min-time", "nan"], {}, "--min-time must be a finite number >= 0, got nan"),
    (["--layers", "inverse-flow", "--timeout", "inf"], {}, "--timeout must be a finite number"),
    (["--layers", "inverse_flow"], {}, "did you mean 'inverse-flow'?"),
])
def test_what_can_be_checked_is_checked_before_the_first_cell(tmp_path, monkeypatch, args, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = bench_in_process("run", *FAST, *args, "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_an_unsupported_dtype_is_unsupported_with_a_reason(tmp_path):
    res = bench_in_process("run", "--layers", "inverse-flow,butterfly", *TINY, "--dtype", "float16",
                           "--directions", "forward", "--out", str(tmp_path), "--name", "r", *FAST)
    assert res.returncode == 0, res.stderr
    recs = {r["cell"]["layer"]: r for r in records.read(tmp_path / "r")}
    assert recs["inverse-flow"]["status"] == "unsupported"
    assert "unsupported dtype float16; accepted: float32, float64" in recs["inverse-flow"]["message"]
    assert recs["butterfly"]["status"] == "ok"


def test_several_values_of_an_axis_are_swept(tmp_path):
    res = bench_in_process("run", "--layers", "glow-1x1", "--batch", "1,2", "--channels", "2", "--input-size", "4",
                           "--directions", "forward", "--no-isolate", "--out", str(tmp_path), "--name", "r", *FAST)
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "r" / "config.json").read_text())["sweep"] == ["batch"]
    assert "Swept: nothing" not in res.stdout and "Swept: batch" in res.stdout


def test_resume_refuses_out(tmp_path):
    res = bench_in_process("run", "--resume", str(tmp_path), "--out", str(tmp_path / "elsewhere"))
    assert res.returncode == 2 and "drop --out" in res.stderr


# --- 12. file-system problems are one-line messages ------------------------------------------------


def one_line_error(res, *fragments):
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr, res.stderr
    for f in fragments:
        assert f in res.stderr, res.stderr


def test_file_system_problems_are_one_line_messages(tmp_path, monkeypatch):
    base = ["run", "--layers", "glow-1x1", *TINY, "--no-isolate", *FAST]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    one_line_error(bench_in_process(*base, "--out", str(a_file)), "is a file, not a folder")
    one_line_error(bench_in_process(*base, "--out", str(a_file / "sub")), "is a file, not a folder")
    one_line_error(bench_in_process(*base, "--out", str(tmp_path), "--name", "n" * 300), "choose a shorter --name")
    if Path("/sys/fs").is_dir():  # a read-only file system, even for root
        one_line_error(bench_in_process(*base, "--out", "/sys/fs/invconv-bench-test"), "cannot create")
    real_mkdir = Path.mkdir

    def denied(self, *a, **k):
        if "readonly" in str(self):
            raise PermissionError(13, "Permission denied", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", denied)
    one_line_error(bench_in_process(*base, "--out", str(tmp_path / "readonly")), "Permission denied")
    monkeypatch.undo()
    # --overwrite of a symbolic link to a run: the link's target is not deleted.
    res = bench_in_process(*base, "--out", str(tmp_path / "out"), "--name", "real")
    assert res.returncode == 0, res.stderr
    (tmp_path / "out" / "link").symlink_to(tmp_path / "out" / "real")
    one_line_error(bench_in_process(*base, "--out", str(tmp_path / "out"), "--name", "link", "--overwrite"),
                   "is a symbolic link")
    assert (tmp_path / "out" / "real" / "results.jsonl").exists()


@pytest.mark.parametrize(("damage", "message"), [
    (lambda text: text[: len(text) // 2], "is not valid JSON (truncated?)"),
    (lambda text: json.dumps({**json.loads(text), "surprise": 1}), "unknown key(s) surprise"),
    (lambda text: "[]", "must hold a JSON object"),
])
def test_a_damaged_config_is_a_one_line_error(tmp_path, damage, message):
    res = bench_in_process("run", "--layers", "glow-1x1", *TINY, "--no-isolate", "--out", str(tmp_path),
                           "--name", "r", *FAST)
    assert res.returncode == 0, res.stderr
    config_path = tmp_path / "r" / "config.json"
    config_path.write_text(damage(config_path.read_text()))
    one_line_error(bench_in_process("run", "--resume", str(tmp_path / "r")), message)
    one_line_error(bench_in_process("table", str(tmp_path / "r")), message)


# --- 11. the layers' API ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cinc", "emerging", "finc", "glow-1x1", "inverse-flow", "woodbury"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_is_unsupported_naming_the_supported_dtypes(name, dtype):
    info = layers.info(name)
    assert info.dtypes == ("float32", "float64")
    layer = layers.create(name, 4, kernel_size=3, input_size=4).to(dtype)
    x = torch.randn(2, 4, 4, 4, dtype=dtype)
    for call in (lambda: layer(x), lambda: layer.inverse(x)):
        with pytest.raises(layers.UnsupportedError, match=r"unsupported dtype \w+16; accepted: float32, float64"):
            call()


def test_layers_declaring_low_precision_run_in_it():
    for name in ("butterfly", "snf"):
        assert "float16" in layers.info(name).dtypes
        layer = layers.create(name, 4, kernel_size=3).to(torch.bfloat16)
        z, logdet = layer(torch.randn(2, 4, 4, 4, dtype=torch.bfloat16))
        assert layer.inverse(z).shape == (2, 4, 4, 4) and logdet.shape == (2,)


@pytest.mark.parametrize("name", ["glow-1x1", "butterfly", "woodbury"])
@pytest.mark.parametrize("k", [-1, 0, 2.5, "3"])
def test_a_kernel_size_that_does_not_apply_must_still_make_sense(name, k):
    with pytest.raises(layers.LayerError, match="kernel_size must be None or a positive integer"):
        layers.create(name, 4, kernel_size=k, input_size=4)


@pytest.mark.parametrize("name", ["inverse-flow", "butterfly", "woodbury", "snf"])
@pytest.mark.parametrize("scale", [math.nan, math.inf, -0.1, "big"])
def test_init_scale_must_be_a_finite_number(name, scale):
    with pytest.raises(layers.LayerError, match="init_scale must be a finite number >= 0"):
        layers.create(name, 4, kernel_size=3, input_size=4, init_scale=scale)


def test_woodbury_refuses_a_rank_above_its_dimension():
    with pytest.raises(layers.LayerError, match=r"channel_rank=1000 exceeds the channel count C = 12; accepted: 1 … 12"):
        layers.create("woodbury", 12, input_size=4, channel_rank=1000)
    with pytest.raises(layers.LayerError, match="spatial_rank=17 exceeds H·W = 16"):
        layers.create("woodbury", 12, input_size=4, spatial_rank=17)
    assert layers.create("woodbury", 12, input_size=4).v_channel.shape[0] == 12  # the default still fits


def test_register_of_a_non_class_and_did_you_mean():
    with pytest.raises(layers.LayerError, match="target must be a layer class or a 'module:Class' string, got int"):
        layers.register("x", 42)
    with pytest.raises(layers.UnknownLayerError, match="did you mean 'inverse-flow'"):
        layers.info("inverse_flow")
    with pytest.raises(layers.UnknownLayerError) as err:
        layers.info("zzzz")
    assert "did you mean" not in str(err.value)


def test_the_worker_processes_are_alive_helper_sees_zombies_as_dead():
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    wait_until(lambda: not alive(p.pid), 30, "a zombie")  # exited, not yet reaped
    p.wait()
