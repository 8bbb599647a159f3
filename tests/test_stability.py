"""Numbers that hold on a shared machine: instability flagged, processes merged, instructions counted."""

from __future__ import annotations

import shutil
import threading

import pytest
from helpers import install_plugin

from bench.execution.runner import merge_processes
from bench.report import tables
from bench.sweep.cells import Cell
from bench.timing import measure
from bench.timing.clock import Clock

# ---------------------------------------------------------------------------------------------
# The instability detector, on synthetic samples


def test_tick_quantised_samples_are_unstable():
    # What a 2-thread 0.16 ms call measured while its second thread was descheduled: every
    # sample a whole number of 4 ms ticks.
    samples = [24.0, 20.0, 28.0, 24.0, 24.01, 16.0, 24.0, 20.0, 23.99, 28.0, 24.0, 12.0, 24.0]
    assert measure.tick_quantised(samples) == 4.0
    reasons = measure.unstable_reasons(samples, {"disturbed_calls": 0}, "cpu")
    assert reasons == ["the samples are whole multiples of the 4 ms scheduler tick"]


def test_calls_that_waited_for_a_cpu_are_unstable():
    samples = [0.9, 1.1, 1.0, 1.2, 0.95, 1.05, 1.0]
    reasons = measure.unstable_reasons(samples, {"disturbed_calls": 5, "wall_s": 1.0, "cpu_s": 0.2}, "cpu")
    assert reasons == ["5 of 7 calls waited for a CPU for over 20% of their time"]
    # A few disturbed calls leave the median alone: not unstable.
    assert measure.unstable_reasons(samples, {"disturbed_calls": 2}, "cpu") == []


def test_clean_and_steady_samples_are_stable():
    assert measure.unstable_reasons([0.158, 0.16, 0.157, 0.159, 0.161], {"disturbed_calls": 0}, "cpu") == []
    # A naturally steady 2 ms call sits on one multiple of the tick, not on several.
    assert measure.tick_quantised([2.0, 2.001, 1.999, 2.0, 2.0, 2.0]) is None
    # A call whose time really varies lands on ticks only by chance.
    assert measure.tick_quantised([3.1, 5.7, 4.4, 8.9, 6.2, 7.7, 5.05, 9.3]) is None
    # On a GPU the CPU clock says nothing about the samples.
    assert measure.unstable_reasons([24.0, 20.0, 28.0, 24.0, 16.0, 24.0], {"disturbed_calls": 6}, "cuda") == []


def test_a_quiet_measurement_records_its_usage_and_is_stable():
    import torch

    x = torch.randn(64, 64)
    m = measure.time_call(lambda: x @ x, Clock(torch.device("cpu"), False),
                          measure.TimingPolicy(warmup=2, warmup_time=0.0, repeat=20, min_time=0.0))
    for key in ("wall_s", "cpu_s", "thread_cpu_s", "involuntary_switches", "timed_s"):
        assert key in m.usage
    assert m.usage["wall_s"] >= m.usage["timed_s"] > 0
    assert 0 <= m.usage["disturbed_calls"] <= m.n


# ---------------------------------------------------------------------------------------------
# Processes merged into one record, and how the tables show it


def _process(samples, unstable=False):
    d = {"status": "ok", "samples_ms": samples, "first_call_ms": 5.0, "peak_mem_bytes": 100, "unstable": unstable}
    if unstable:
        d["unstable_reasons"] = ["the samples are whole multiples of the 4 ms scheduler tick"]
    return {"key": "k", "cell": {}, "status": "ok", "message": "", "directions": {"forward": d}}


def test_merge_takes_the_median_over_processes_and_keeps_each_process():
    merged = merge_processes([_process([1.0, 1.1, 0.9]), _process([2.0, 2.1, 1.9]), _process([1.2, 1.3, 1.1])])
    fwd = merged["directions"]["forward"]
    assert fwd["round_sizes"] == [3, 3, 3] and len(fwd["samples_ms"]) == 9
    assert fwd["process_medians_ms"] == [1.0, 2.0, 1.2] and fwd["median_ms"] == 1.2
    assert (fwd["process_min_ms"], fwd["process_max_ms"]) == (1.0, 2.0)
    assert merged["processes"] == 3 and not fwd["unstable"]


def test_one_unstable_process_of_three_leaves_the_median_standing_two_do_not():
    one = merge_processes([_process([1.0] * 3, True), _process([1.0] * 3), _process([1.1] * 3)])
    assert not one["directions"]["forward"]["unstable"] and one["directions"]["forward"]["unstable_processes"] == 1
    two = merge_processes([_process([24.0] * 3, True), _process([20.0] * 3, True), _process([1.1] * 3)])
    assert two["directions"]["forward"]["unstable"]
    assert two["directions"]["forward"]["unstable_reasons"] == [
        "the samples are whole multiples of the 4 ms scheduler tick"]


def _cell(layer="glow-1x1"):
    return {"layer": layer, "device": "cpu", "dtype": "float32", "batch": 8, "channels": 12, "height": 16,
            "width": 16, "kernel_size": None, "options": {}}


def test_tables_mark_unstable_times_and_warn_of_a_busy_machine():
    merged = merge_processes([_process([24.0] * 3, True), _process([20.0] * 3, True), _process([1.1] * 3)])
    merged["cell"] = _cell()
    table = tables.build_table([merged], [], "median", "forward")
    assert table.rows[0][1] == f"20.0 [1.10–24.0] {tables.UNSTABLE_MARK}"
    assert "processes" in table.title
    assert any(n.startswith(f"{tables.UNSTABLE_MARK} glow-1x1: unstable in 2 of 3 processes") for n in table.notes)
    config = {"device": "cpu", "dtype": "float32", "sweep": [], "repeat": 5, "min_time": 0.1, "warmup": 3,
              "warmup_time": 0.1, "processes": 3,
              "values": {"input_size": [16], "batch": [8], "kernel_size": [3], "channels": [12]}}
    env = {"cpu": {"model": "Test CPU", "logical_cpus": 2}, "load_average": {"start": 3.5, "end": 4.0}}
    lines = tables.describe_run(config, env)
    assert lines[0].startswith("Warning: the machine was busy (1-minute load average 3.5 at the start, 4.0 at the end")
    assert "3 fresh worker processes per cell" in " ".join(lines)
    quiet = {**env, "load_average": {"start": 0.3, "end": 1.4}}
    assert not tables.describe_run(config, quiet)[0].startswith("Warning")


# ---------------------------------------------------------------------------------------------
# The instruction metric (valgrind's callgrind, through torch's toggles)

needs_valgrind = pytest.mark.skipif(shutil.which("valgrind") is None,
                                    reason="valgrind is not installed (apt-get install valgrind); .ci/run installs it")

_TWICE = '''
from layers.inverse_flow import InverseFlow


class InverseFlowTwice(InverseFlow):
    """inverse-flow whose forward does all of its work twice (a 2x regression, on purpose)."""

    def _forward(self, x):
        super()._forward(x)
        return super()._forward(x)
'''


@needs_valgrind
def test_instruction_counts_repeat_and_see_doubled_work(tmp_path, monkeypatch):
    from bench.execution.instructions import count_cells

    install_plugin(tmp_path, monkeypatch, "twice_plugin", _TWICE, "twice-plugin",
                   {"inverse-flow-twice": "twice_plugin:InverseFlowTwice"})
    cells = [Cell(layer=name, device="cpu", dtype="float32", batch=2, channels=4, height=8, width=8, kernel_size=3)
             for name in ("inverse-flow", "inverse-flow-twice")]
    got: list[dict[str, dict]] = [{}, {}]

    def count(i):  # two valgrind processes at once: two independent counts of the same code
        count_cells(cells, ["forward"], lambda rec: got[i].__setitem__(rec["cell"]["layer"], rec), timeout=300)

    threads = [threading.Thread(target=count, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    first, second = ({k: r["directions"]["forward"]["instructions"] for k, r in g.items()} for g in got)
    for rec in (*got[0].values(), *got[1].values()):
        assert rec["status"] == "ok" and rec["metric"] == "instructions", rec
    # Identical code in two processes: within 0.5 %.
    assert first["inverse-flow"] == pytest.approx(second["inverse-flow"], rel=0.005)
    # Doing the work twice counts about twice (the call's fixed Python overhead is not doubled).
    ratio = first["inverse-flow-twice"] / first["inverse-flow"]
    assert 1.6 < ratio < 2.1, ratio


def test_a_missing_valgrind_says_how_to_install_it(monkeypatch):
    from bench.execution import instructions
    from helpers import bench_in_process

    monkeypatch.setattr(instructions.shutil, "which", lambda name: None)
    with pytest.raises(instructions.InstructionsUnavailable, match="apt-get install valgrind"):
        instructions.require_valgrind()
    res = bench_in_process("run", "--metric", "instructions", "--layers", "glow-1x1", "--device", "cpu",
                           "--no-plots", "--no-progress", "--out", "/nonexistent-never-created")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "valgrind is not installed" in res.stderr
