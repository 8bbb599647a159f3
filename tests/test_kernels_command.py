"""``python -m bench kernels``: measurement records and the rendered table."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.timing.stats import Measurement

ROOT = Path(__file__).resolve().parent.parent


def test_measurement_statistics():
    m = Measurement([5.0, 1.0, 3.0, 2.0, 4.0])
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
                        "conv2d+wgrad", "inverse-flow forward"}  # no 1-thread op: --threads 1
    assert all(m["n"] >= 3 and len(m["samples_s"]) == m["n"] for m in ops.values())
    ratios = record["results"][0]["ratios"]
    assert ratios["solve / conv2d"] == pytest.approx(ops["native solve"]["median_s"] / ops["conv2d"]["median_s"])
    env = record["environment"]
    assert env["torch_threads"] == 1 and env["solver"]["cpu"]["solver"] == "native-cpu"
    table = res.stdout
    assert "| native solve " in table and "solve / conv2d" in table and "**Sweep (medians" in table
    assert out.with_suffix(".md").read_text().strip() == table.strip()
    # The arithmetic floor: measured clock and peak, the floor of each op from its FLOP.
    peak = env["peak"]
    assert peak["estimate"] is True and peak["isa"] == env["cpu_isa"]
    assert peak["measured_flops_per_thread"] > 0 and peak["flops_per_thread"] > 0
    floors = record["results"][0]["floors_s"]
    conv_flop = 2 * 1 * 6 * 5 * 4**2 * 2**2  # one convolution of B=1, C=4, 6×5, k=2
    solve_flop = 2 * 1 * 6 * 5 * (4**2 * 3 + 4 * 5 // 2)  # three dense taps, the triangular centre
    assert floors["conv2d"] == pytest.approx(conv_flop / peak["flops_per_thread"])
    assert floors["native solve"] == pytest.approx(solve_flop / peak["flops_per_thread"])
    assert floors["native solve+backward"] == pytest.approx(2 * floors["native solve"] + floors["conv2d"])
    assert floors["conv2d+wgrad"] == pytest.approx(2 * floors["conv2d"])
    assert "arithmetic floor (an estimate)" in table and "floor (est.)" in table
    assert len(env["load_average"]) == 3
    # One thread: no hand-over to measure, and no line about it.
    assert record["results"][0]["handover_ns"] == [] and "hand-over latency" not in table


@pytest.mark.skipif(shutil.which("c++") is None, reason="needs the native CPU build")
def test_kernels_command_sweeps_channels_and_kernel_sizes(tmp_path):
    """-C and -k lists: every combination, one row each in the sweep table with its ratios; with
    two threads the one-thread solve is timed too and its speed-up ratio reported."""
    out = tmp_path / "k.json"
    cmd = [sys.executable, "-m", "bench", "kernels", "-B", "1", "-C", "3,5", "-k", "1,3", "-H", "4",
           "--threads", "2", "--min-calls", "2", "--min-time", "0.005", "--rounds", "1", "--no-reference",
           "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    record = json.loads(out.read_text())
    shapes = [(r["shape"]["channels"], r["shape"]["kernel_size"]) for r in record["results"]]
    assert shapes == [(3, 1), (3, 3), (5, 1), (5, 3)]
    for r in record["results"]:
        ops = r["measurements"]
        assert "native solve, 1 thread" in ops and "torch solve" not in ops
        assert r["ratios"]["solve 1 thread / solve (thread speed-up)"] == pytest.approx(
            ops["native solve, 1 thread"]["median_s"] / ops["native solve"]["median_s"])
        assert r["floors_s"]["native solve, 1 thread"] == pytest.approx(2 * r["floors_s"]["native solve"])
        # Two threads: the hand-over latency after each round, printed under the shape's ratios.
        assert len(r["handover_ns"]) == 1 and r["handover_ns"][0] > 0
        assert r["handover_changed"] is False  # one round: nothing to compare
    assert res.stdout.count("thread hand-over latency (one way, after each of 1 rounds)") == 4
    sweep = res.stdout.split("**Sweep (medians")[1]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in sweep.splitlines()
            if line.startswith("|") and "×" in line]
    assert [(row[1], row[2]) for row in rows] == [("3", "1"), ("3", "3"), ("5", "1"), ("5", "3")]


@pytest.mark.parametrize("args,message", [
    (["-B", "x"], "--batch 'x': expected an integer or a comma-separated list of batch sizes (positive integers)"),
    (["-B", "0"], "--batch '0': batch sizes must be positive integers (>= 1), got 0"),
    (["-B", "-3"], "--batch '-3': batch sizes must be positive integers (>= 1), got -3"),
    (["-B", "2,0"], "--batch '2,0': batch sizes must be positive integers (>= 1), got 0"),
    (["-C", "0"], "--channels '0': channel counts must be positive integers (>= 1), got 0"),
    (["-k", "0"], "--kernel-size '0': kernel sizes must be positive integers (>= 1), got 0"),
    (["-k", "3,x"], "--kernel-size '3,x': expected an integer or a comma-separated list of kernel sizes"),
    (["--threads", "0"], "--threads 0: must be a positive integer (>= 1)"),
    (["-H", "0"], "--height/--width 0/None: must be positive integers (>= 1)"),
])
def test_kernels_command_rejects_bad_arguments(args, message):
    """One line naming the flag and the accepted values, exit status 2, no traceback."""
    res = subprocess.run([sys.executable, "-m", "bench", "kernels", *args], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert "Traceback" not in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_kernels_table_flags_a_changed_handover():
    """A shape whose hand-over latency moved by more than half between rounds is flagged: its
    multi-thread times mix two states of the machine. A steady one is printed plainly."""
    from bench.commands.kernels import render_markdown
    from bench.timing.kernels import Shape, ShapeResult

    shape = Shape("cpu", "float32", 1, 12, 32, 32, 3, "TL")
    ops = {"native solve": Measurement([40e-6, 41e-6]), "conv2d": Measurement([80e-6, 81e-6]),
           "native solve, 1 thread": Measurement([66e-6, 67e-6])}
    steady = ShapeResult(shape, ops, {}, [50.0, 52.0, 51.0])
    moved = ShapeResult(shape, ops, {}, [50.0, 52.0, 203.0])
    assert not steady.handover_changed() and moved.handover_changed()
    assert not ShapeResult(shape, ops, {}, []).handover_changed()
    env = {"command": "bench kernels", "torch": "2", "cpu": "cpu", "torch_threads": 2, "git_commit": "abc",
           "git_dirty": False, "utc": "now", "solver": {}}
    text = render_markdown(env, [steady])
    assert "thread hand-over latency (one way, after each of 3 rounds): 50–52 ns" in text
    assert "changed during the measurement" not in text
    text = render_markdown(env, [moved, steady])
    assert text.count("changed during the measurement") == 1
    sweep = text.split("**Sweep (medians")[1]
    assert "50–203 (changed)" in sweep and "50–52 " in sweep
    assert moved.as_dict()["handover_changed"] is True and moved.as_dict()["handover_ns"] == [50.0, 52.0, 203.0]



def test_each_op_is_timed_under_its_solver(monkeypatch):
    """The solver is switched around each block of timed calls: torch ops under the reference,
    native ops and the layer under the native solver, conv2d untouched; restored afterwards,
    also when the variable was unset."""
    from bench.timing import kernels
    from layers import native

    assert {name: kernels.op_solver(name) for name in kernels.OPS} == {
        "native solve": "native", "native solve+backward": "native", "torch solve": "torch",
        "torch solve+backward": "torch", "conv2d": None, "conv2d+wgrad": None,
        "native solve, 1 thread": "native", "inverse-flow forward": "native"}
    monkeypatch.delenv(native.SOLVER_ENV, raising=False)
    with kernels._solver("torch"):
        assert native.requested_mode() == "torch"
    assert native.SOLVER_ENV not in os.environ
    monkeypatch.setenv(native.SOLVER_ENV, "auto")
    with kernels._solver("native"):
        assert native.requested_mode() == "native"
    with kernels._solver(None):
        assert native.requested_mode() == "auto"
    assert os.environ[native.SOLVER_ENV] == "auto"


def test_each_op_is_timed_in_its_grad_mode(monkeypatch):
    """Grad mode is set around each block of timed calls, not inside each call: the forward-only
    ops (the layer's included, whose parameters want gradients) run with it off and build no
    graph, the ops with a backward with it on; the caller's mode is restored afterwards."""
    import torch

    from bench.timing import kernels

    real = kernels.make_ops
    seen: dict[str, set] = {}

    def recording_ops(*args, **kwargs):
        def wrap(name, fn):
            def call():
                out = fn()
                seen.setdefault(name, set()).add((torch.is_grad_enabled(),
                                                  isinstance(out, torch.Tensor) and out.requires_grad))
                return out
            return call
        return {name: wrap(name, fn) for name, fn in real(*args, **kwargs).items()}

    monkeypatch.setattr(kernels, "make_ops", recording_ops)
    shape = kernels.Shape("cpu", "float32", 1, 3, 8, 8, 3, "TL")
    with torch.enable_grad():
        kernels.measure_shape(shape, min_calls=2, min_seconds=0.0, rounds=1)
        assert torch.is_grad_enabled()
    assert set(seen) == set(real(shape))
    for name, modes in seen.items():
        want_grad = name in ("native solve+backward", "torch solve+backward", "conv2d+wgrad")
        assert {grad for grad, _ in modes} == {want_grad}, name
        if not want_grad:
            assert not any(graph for _, graph in modes), f"{name} built an autograd graph"
