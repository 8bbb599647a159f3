"""Regression statistics and ``bench compare`` on synthetic runs; accept markers."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import bench_in_process

from bench.regression import accept, statistics as regression
from bench.regression.statistics import Samples, compare_records, median_ratio_interval

ROOT = Path(__file__).resolve().parent.parent


bench = bench_in_process  # these commands measure nothing: no worker processes needed


def _cell(layer, device="cpu", size=16, k=3):
    return {"layer": layer, "device": device, "dtype": "float32", "batch": 8, "channels": 12, "height": size,
            "width": size, "kernel_size": k, "options": {}}


def _direction(samples, round_sizes=None):
    a = np.asarray(samples, dtype=float)
    d = {"status": "ok", "samples_ms": a.tolist(), "n": int(a.size), "median_ms": float(np.median(a)),
         "p20_ms": float(np.percentile(a, 20)), "p80_ms": float(np.percentile(a, 80)), "mean_ms": float(a.mean()),
         "std_ms": float(a.std(ddof=1)), "peak_mem_bytes": 1024, "first_call_ms": 3.0}
    if round_sizes:
        d["round_sizes"] = list(round_sizes)
    return d


def _record(cell, directions, status="ok"):
    key = json.dumps(cell, sort_keys=True, separators=(",", ":"))
    return {"schema": 1, "key": key, "cell": cell, "status": status, "message": "", "directions": directions,
            "params": 144, "recon_error": 1e-7, "threads": 1}


def _noisy(rng, median, n=200, sigma=0.08):
    """Timing-like samples: log-normal scatter plus a few large outliers (context switches)."""
    x = median * rng.lognormal(0.0, sigma, n)
    x[rng.random(n) < 0.03] *= 5
    return x


def write_run(path: Path, records, device="cpu", sha="abc1234"):
    path.mkdir(parents=True)
    config = {"layers": sorted({r["cell"]["layer"] for r in records}), "sweep": [],
              "values": {"input_size": [16], "batch": [8], "kernel_size": [3], "channels": [12]},
              "device": device, "dtype": "float32", "repeat": 5, "min_time": 0.3, "warmup": 3, "warmup_time": 0.2,
              "max_time": 5.0, "timeout": 300.0, "isolate": True, "threads": 1}
    (path / "config.json").write_text(json.dumps(config))
    (path / "env.json").write_text(json.dumps({"git": {"short": sha, "dirty": False}, "cpu": {"model": "Test CPU"},
                                               "torch": {"version": "2.13.0"}, "host": "test", "python": "3.11"}))
    (path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _processes(rng, median, processes):
    """Samples of ``processes`` worker processes (40 each), each process a little faster or slower
    as a whole, and their round sizes; one process: plain samples, no round sizes."""
    if processes == 1:
        return _noisy(rng, median), None
    parts = [_noisy(rng, median * rng.lognormal(0.0, 0.05), n=40) for _ in range(processes)]
    return np.concatenate(parts), [40] * processes


def pair_of_runs(tmp_path, factor=1.0, seed=0, layers=("glow-1x1", "inverse-flow"), slow="glow-1x1", processes=1):
    rng = np.random.default_rng(seed)
    base, new = [], []
    for layer in layers:
        cell = _cell(layer)
        dirs_b, dirs_n = {}, {}
        for direction, median in (("forward", 0.3), ("sampling", 0.4), ("train", 1.0)):
            dirs_b[direction] = _direction(*_processes(rng, median, processes))
            dirs_n[direction] = _direction(*_processes(rng, median * (factor if layer == slow else 1.0), processes))
        base.append(_record(cell, dirs_b))
        new.append(_record(cell, dirs_n))
    return write_run(tmp_path / "base", base), write_run(tmp_path / "new", new, sha="def5678")


# ---------------------------------------------------------------------------------------------
# Statistics


def test_identical_samples_are_the_same():
    s = Samples.of(np.linspace(1.0, 2.0, 50))
    out = regression.compare_samples(s, s, 0.25)
    assert out["verdict"] == "same" and out["p_value"] == 1.0 and out["ratio"] == 1.0
    lo, hi = out["ci"]
    assert lo <= 1.0 <= hi


def test_constant_samples_do_not_divide_by_zero():
    s = Samples.of([2.0] * 10)
    assert regression.compare_samples(s, s, 0.25)["verdict"] == "same"


def test_interval_is_reproducible_and_brackets_the_ratio():
    rng = np.random.default_rng(1)
    b, n = Samples.of(_noisy(rng, 1.0)), Samples.of(_noisy(rng, 1.5))
    assert median_ratio_interval(b, n) == median_ratio_interval(b, n)  # fixed seed
    lo, hi = median_ratio_interval(b, n)
    assert lo < n.median / b.median < hi and 1.3 < lo and hi < 1.7


def test_round_structure_widens_the_interval():
    """Samples from a few processes that disagree as a whole are less evidence than as many
    independent samples: with rounds, the process is the unit and the interval says so."""
    rng = np.random.default_rng(2)
    levels = [0.8, 1.0, 1.25, 0.9, 1.1]  # per-process level (load, memory layout)
    values = np.concatenate([lvl * rng.lognormal(0, 0.03, 40) for lvl in levels])
    new_values = np.concatenate([lvl * 1.1 * rng.lognormal(0, 0.03, 40) for lvl in reversed(levels)])
    flat = regression.estimate(Samples.of(values), Samples.of(new_values))
    nested = regression.estimate(Samples.of(values, [40] * 5), Samples.of(new_values, [40] * 5))
    assert flat.method == "samples" and nested.method == "rounds"
    assert nested.ci[1] - nested.ci[0] > 2 * (flat.ci[1] - flat.ci[0])
    assert nested.ci[0] < 1.1 < nested.ci[1] and nested.ratio == pytest.approx(1.1, rel=0.03)


def _bimodal_rounds(rng, modes, n=300):
    """What the 2-core CI machine does to a 0.1 ms call: each worker process runs all its calls
    at one of two speeds, about 2x apart, whatever the code."""
    values = [m * rng.lognormal(0, 0.04, n) for m in modes]
    return Samples.of(np.concatenate(values), [n] * len(modes))


def test_two_unlucky_processes_are_not_a_regression():
    """The CI failure this method replaced: unchanged code, both base processes in the fast
    mode and both new ones in the slow mode. Pooling the samples called it 1.65x slower with
    p < 1e-6; per process it is two observations a side, which prove nothing."""
    rng = np.random.default_rng(11)
    base, new = _bimodal_rounds(rng, [0.10, 0.11]), _bimodal_rounds(rng, [0.19, 0.21])
    pooled = regression.per_sample(base, new)
    assert pooled.p_value < 1e-6 and pooled.ci[0] > 1.25  # what the old gate saw
    out = regression.compare_samples(base, new, 0.25)
    assert out["method"] == "rounds" and out["verdict"] == "same", out


def test_a_real_slowdown_beats_the_spread_between_processes():
    rng = np.random.default_rng(12)
    base = _bimodal_rounds(rng, [0.10, 0.19, 0.10, 0.20, 0.11])
    slow = _bimodal_rounds(rng, [50.1, 50.2, 50.1])  # a 50 ms sleep, three rounds
    out = regression.compare_samples(base, slow, 0.25)
    assert out["method"] == "rounds" and out["verdict"] == "slower" and out["ci"][0] > 10
    double = _bimodal_rounds(rng, [0.4, 0.42, 0.39, 0.41, 0.40])  # 4x, steady processes
    steady = _bimodal_rounds(rng, [0.10, 0.11, 0.10, 0.105, 0.10])
    assert regression.compare_samples(steady, double, 0.25)["verdict"] == "slower"
    assert regression.compare_samples(double, steady, 0.25)["verdict"] == "faster"


def test_rounds_with_identical_medians_do_not_divide_by_zero():
    same = Samples.of([1.0, 1.0, 1.0, 1.0], [2, 2])
    assert regression.per_round(same, same) == regression.Estimate(1.0, (1.0, 1.0), 1.0, "rounds")
    shifted = Samples.of([2.0, 2.0, 2.0, 2.0], [2, 2])
    e = regression.per_round(same, shifted)
    assert e.ratio == e.ci[0] == e.ci[1] == 2.0 and e.p_value == 0.0


def test_many_samples_are_thinned_not_dropped():
    rng = np.random.default_rng(3)
    big = Samples.of(_noisy(rng, 1.0, n=6000))
    lo, hi = median_ratio_interval(big, big)
    assert lo < 1.0 < hi and hi - lo < 0.2


def test_inconsistent_round_sizes_fall_back_to_one_round():
    assert Samples.of([1.0, 2.0, 3.0], [2, 2]).round_sizes == (3,)


def test_slower_needs_the_whole_interval_beyond_the_threshold():
    rng = np.random.default_rng(4)
    b = Samples.of(_noisy(rng, 1.0))
    # +12 %: clearly significant with 200 samples each, but under a 25 % threshold.
    out = regression.compare_samples(b, Samples.of(_noisy(rng, 1.12)), 0.25)
    assert out["significant"] and out["verdict"] == "same"
    # One process a side: a 2× shift is within what process-to-process noise produces here, so it
    # cannot fail ("inconclusive"); beyond PROCESS_NOISE_BOUND it can.
    assert regression.compare_samples(b, Samples.of(_noisy(rng, 2.0)), 0.25)["verdict"] == "inconclusive"
    assert regression.compare_samples(b, Samples.of(_noisy(rng, 5.0)), 0.25)["verdict"] == "slower"
    assert regression.compare_samples(b, Samples.of(_noisy(rng, 0.5)), 0.25)["verdict"] == "faster"
    # Five processes a side: the spread between processes is measured, and 2× fails.
    bp = Samples.of(*_processes(rng, 1.0, 5))
    assert regression.compare_samples(bp, Samples.of(*_processes(rng, 2.0, 5)), 0.25)["verdict"] == "slower"
    # ... unless a side's samples were disturbed by the machine.
    assert regression.compare_samples(bp, Samples.of(*_processes(rng, 2.0, 5)), 0.25,
                                      unstable=True)["verdict"] == "inconclusive"


def test_default_threshold_depends_on_the_device():
    rng = np.random.default_rng(5)
    records = {}
    for device in ("cpu", "cuda"):
        cell = _cell("glow-1x1", device)
        b = _record(cell, {"forward": _direction(rng.normal(1.0, 0.01, 100), [20] * 5)})
        n = _record(cell, {"forward": _direction(rng.normal(1.18, 0.01, 100), [20] * 5)})
        records[device] = compare_records([b], [n]).rows[0]
    assert records["cuda"].verdict == "slower" and records["cuda"].threshold == 0.10
    assert records["cpu"].verdict == "same" and records["cpu"].threshold == 0.25


def test_status_changes():
    ok = _direction(np.linspace(1, 2, 20))
    cases = {
        "broken": ("ok", {"status": "timeout", "message": "cell exceeded --timeout 300 s"}),
        "fixed": ("error", ok),
        "unsupported": ("ok", {"status": "unsupported", "message": "odd kernels only"}),
        "not compared": ("error", {"status": "oom", "message": "out of memory"}),
    }
    for expected, (base_status, new_dir) in cases.items():
        base_dir = ok if base_status == "ok" else {"status": base_status, "message": "boom"}
        cell = _cell("finc")
        row = compare_records([_record(cell, {"train": base_dir})], [_record(cell, {"train": new_dir})]).rows[0]
        assert row.verdict == expected, (expected, row)
        assert row.failing == (expected == "broken")


def test_too_few_samples_are_not_compared():
    cell = _cell("finc")
    row = compare_records([_record(cell, {"forward": _direction([1.0, 1.1])})],
                          [_record(cell, {"forward": _direction([9.0, 9.1])})]).rows[0]
    assert row.verdict == "not compared" and "too few samples" in row.message


# ---------------------------------------------------------------------------------------------
# bench compare on synthetic runs


def test_compare_identical_runs_pass(tmp_path):
    base, _ = pair_of_runs(tmp_path)
    res = bench("compare", str(base), str(base), "--json", str(tmp_path / "c.json"))
    assert res.returncode == 0, res.stderr
    assert "### no performance regression" in res.stdout
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert len(rows) == 6 and {r["verdict"] for r in rows} == {"same"}
    # One process per cell: compared sample by sample, and the report says what that can show.
    assert {r["method"] for r in rows} == {"samples"} and "not whether the code did" in res.stdout


def test_compare_fails_on_a_2x_slowdown_naming_layer_cell_and_ratio(tmp_path):
    base, new = pair_of_runs(tmp_path, factor=2.0, processes=5)
    res = bench("compare", str(base), str(new), "--markdown", str(tmp_path / "comment.md"))
    assert res.returncode == 1, res.stderr
    failures = [ln for ln in res.stderr.splitlines() if ln.startswith("REGRESSION:")]
    assert len(failures) == 3  # forward, sampling, train of glow-1x1
    line = next(ln for ln in failures if " forward," in ln)
    assert "glow-1x1 forward, cell glow-1x1 B=8 C=12 16x16 k=3 cpu/float32" in line
    assert "2.0" in line.split("×")[0] or "1.9" in line.split("×")[0]  # the ratio, ≈ 2×
    md = (tmp_path / "comment.md").read_text()
    assert md.startswith("### 3 performance regressions") and "**slower**" in md
    assert md.count("| inverse-flow") == 3 and "| same" in md
    assert "Perf-Regression-Accepted" in res.stderr  # says how to accept an intended slowdown


def test_compare_passes_a_small_noisy_shift(tmp_path):
    base, new = pair_of_runs(tmp_path, factor=1.03, seed=7)
    res = bench("compare", str(base), str(new))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "slower" not in res.stdout.replace("**slower** when", "")


def test_compare_reports_cells_in_only_one_run(tmp_path):
    rng = np.random.default_rng(8)
    shared = _record(_cell("glow-1x1"), {"forward": _direction(_noisy(rng, 1.0))})
    gone = _record(_cell("finc"), {"forward": _direction(_noisy(rng, 1.0))})
    added = _record(_cell("inverse-flow"), {"forward": _direction(_noisy(rng, 1.0))})
    base = write_run(tmp_path / "base", [shared, gone])
    new = write_run(tmp_path / "new", [shared, added])
    res = bench("compare", str(base), str(new))
    assert res.returncode == 0, res.stderr
    assert "**Only in base** (not compared): finc B=8 C=12 16x16 k=3 cpu/float32 (ok)" in res.stdout
    assert "**Only in new** (not compared): inverse-flow B=8" in res.stdout


def test_compare_with_no_cell_in_common_is_an_error(tmp_path):
    rng = np.random.default_rng(9)
    base = write_run(tmp_path / "base", [_record(_cell("finc"), {"forward": _direction(_noisy(rng, 1.0))})])
    new = write_run(tmp_path / "new", [_record(_cell("glow-1x1"), {"forward": _direction(_noisy(rng, 1.0))})])
    res = bench("compare", str(base), str(new))
    assert res.returncode == 2 and "no cell in common" in res.stderr


def test_compare_broken_cell_fails(tmp_path):
    rng = np.random.default_rng(10)
    cell = _cell("inverse-flow")
    base = write_run(tmp_path / "base", [_record(cell, {"forward": _direction(_noisy(rng, 1.0))})])
    new = write_run(tmp_path / "new", [_record(cell, {"forward": {"status": "error", "message": "RuntimeError: x"}},
                                               status="error")])
    res = bench("compare", str(base), str(new))
    assert res.returncode == 1
    assert "REGRESSION: inverse-flow forward, cell inverse-flow B=8 C=12 16x16 k=3 cpu/float32: ok in base, " \
           "error in new (RuntimeError: x)" in res.stderr


def test_accepted_regression_passes_and_is_repeated(tmp_path):
    base, new = pair_of_runs(tmp_path, factor=2.0, processes=5)
    res = bench("compare", str(base), str(new), "--accept", "glow-1x1 — exact W⁻¹ in float64")
    assert res.returncode == 0, res.stderr
    assert "**Accepted regressions**" in res.stdout and "exact W⁻¹ in float64" in res.stdout
    assert res.stderr.count("accepted regression: glow-1x1") == 3
    # A pattern naming one direction accepts only that one.
    res = bench("compare", str(base), str(new), "--accept", "*forward -- only the forward")
    assert res.returncode == 1 and res.stderr.count("REGRESSION:") == 2


def test_threshold_option(tmp_path):
    base, new = pair_of_runs(tmp_path, factor=2.0)
    assert bench("compare", str(base), str(new), "--threshold", "150%").returncode == 0
    res = bench("compare", str(base), str(new), "--threshold", "10")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1 and "ambiguous" in res.stderr


# ---------------------------------------------------------------------------------------------
# Accept markers


def test_marker_parsing():
    m = accept.parse("inverse-flow — the solve now checks for NaN")
    assert (m.pattern, m.reason) == ("inverse-flow", "the solve now checks for NaN")
    assert accept.parse("glow-1x1*sampling -- float64").pattern == "glow-1x1*sampling"
    for bad in ("inverse-flow", "— a reason without a pattern", "inverse-flow —  "):
        with pytest.raises(accept.MarkerError):
            accept.parse(bad)


def test_markers_from_a_commit_message(tmp_path):
    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)

    git("init", "-q")
    (tmp_path / "f").write_text("x")
    git("add", "f")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "Slower on purpose\n\nBody.\n\n"
        "Perf-Regression-Accepted: glow-1x1 — exact inverse\nPerf-Regression-Accepted: finc*train -- checks")
    markers = accept.from_commit("HEAD", tmp_path)
    assert [(m.pattern, m.reason) for m in markers] == [("glow-1x1", "exact inverse"), ("finc*train", "checks")]
    assert markers[0].source.startswith("commit ")
    with pytest.raises(accept.MarkerError):
        accept.from_commit("no-such-rev", tmp_path)


# ---------------------------------------------------------------------------------------------
# Evidence that cannot tell code from process noise, and instruction counts


def test_single_process_runs_whose_processes_differ_2x_do_not_fail(tmp_path):
    # Two `bench run`s of identical code, one process per cell, where one run's processes all ran
    # in the machine's slow mode (a 2× difference between processes seen on the shared 2-core
    # machines): every row is inconclusive, none fails.
    base, new = pair_of_runs(tmp_path, factor=2.0)
    res = bench("compare", str(base), str(new), "--json", str(tmp_path / "c.json"))
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads((tmp_path / "c.json").read_text())["rows"]
    assert {r["verdict"] for r in rows if r["cell"]["layer"] == "glow-1x1"} == {"inconclusive"}
    assert "cannot be told from process noise" in res.stdout


def test_a_slowdown_beyond_process_noise_fails_even_with_one_process(tmp_path):
    # E.g. INVCONV_SOLVER=torch against the native solve: tens of times slower.
    base, new = pair_of_runs(tmp_path, factor=20.0)
    res = bench("compare", str(base), str(new))
    assert res.returncode == 1 and res.stderr.count("REGRESSION: glow-1x1") == 3


def _counted(cell, instructions):
    rec = _record(cell, {"forward": {"status": "ok", "instructions": instructions, "calls": 3}})
    rec["metric"] = "instructions"
    return rec


def test_instruction_counts_compare_without_statistics():
    cell = _cell("inverse-flow")
    same = compare_records([_counted(cell, 1_000_000)], [_counted(cell, 1_004_000)]).rows[0]
    assert same.verdict == "same" and same.method == "instructions" and same.threshold == 0.03
    slower = compare_records([_counted(cell, 1_000_000)], [_counted(cell, 1_050_000)]).rows[0]
    assert slower.verdict == "slower" and slower.failing and slower.ratio == pytest.approx(1.05)
    mixed = compare_records([_counted(cell, 1_000_000)], [_record(cell, {"forward": _direction([1.0] * 5)})]).rows[0]
    assert mixed.verdict == "not compared" and "instructions" in mixed.message


def test_compare_names_an_instruction_regression(tmp_path):
    cell = _cell("inverse-flow")
    base = write_run(tmp_path / "b", [_counted(cell, 1_000_000)])
    new = write_run(tmp_path / "n", [_counted(cell, 1_060_000)], sha="def5678")
    res = bench("compare", str(base), str(new))
    assert res.returncode == 1
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("REGRESSION:"))
    assert "inverse-flow forward, cell inverse-flow B=8 C=12 16x16 k=3" in line and "+6 % instructions" in line
