"""Ratio baselines: record, check, a regressed ratio named with its cell, acceptance, improvements."""

from __future__ import annotations

import json

import pytest
from helpers import bench_in_process

from bench.regression import baselines


bench = bench_in_process  # these commands measure nothing: no worker processes needed


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    path = tmp_path_factory.mktemp("baselines") / "cpu.json"
    res = bench("baseline", "record", "--device", "cpu", "--layers", "inverse-flow", "--file", str(path), "--quiet")
    assert res.returncode == 0, res.stderr
    return path


def test_record_writes_ratios_environment_and_thresholds(recorded):
    doc = json.loads(recorded.read_text())
    names = [r["name"] for r in doc["ratios"]]
    assert names == ["solve / conv2d @ B=8 C=12 16x16 k=3", "solve / conv2d @ B=8 C=12 32x32 k=3",
                     "inverse-flow forward / glow-1x1 @ B=8 C=12 16x16 k=3",
                     "inverse-flow sampling / glow-1x1 @ B=8 C=12 16x16 k=3",
                     "inverse-flow train / glow-1x1 @ B=8 C=12 16x16 k=3"]
    assert doc["device"] == "cpu" and doc["environment"]["torch"]["version"] and doc["how"]["threads"] == 1
    for r in doc["ratios"]:
        assert r["value"] > 0 and r["threshold"] >= baselines.MIN_THRESHOLDS["cpu"]
        assert len(r["repeats"]) == baselines.RECORD_REPEATS
    # The solve inverts the very convolution it is divided by, so it costs more (docs/math.md §8).
    # A plausible ratio, whichever solver ran (the native solve is about as fast as conv2d, the
    # pure-PyTorch one tens of times slower).
    assert 0.05 < doc["ratios"][0]["value"] < 1000


def _edited(recorded, tmp_path, **values):
    doc = json.loads(recorded.read_text())
    doc["ratios"] = [r for r in doc["ratios"] if r["name"].startswith(tuple(values))]
    for r in doc["ratios"]:
        r["value"] = next(v for k, v in values.items() if r["name"].startswith(k))
    path = tmp_path / "cpu.json"
    path.write_text(json.dumps(doc))
    return path


def test_unchanged_code_passes(recorded):
    res = bench("baseline", "check", "--device", "cpu", "--file", str(recorded), "--quiet")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "### ratio baselines: no regression" in res.stdout


def test_a_regressed_ratio_fails_naming_ratio_cell_and_values(recorded, tmp_path):
    # A baseline claiming inverse-flow's forward cost a hundredth of glow-1x1's: today's code is
    # "slower" than that by far, in every attempt.
    path = _edited(recorded, tmp_path, **{"inverse-flow forward": 0.01})
    res = bench("baseline", "check", "--device", "cpu", "--file", str(path), "--quiet")
    assert res.returncode == 1
    line = next(ln for ln in res.stderr.splitlines() if ln.startswith("BASELINE REGRESSION"))
    assert line.startswith("BASELINE REGRESSION: inverse-flow forward / glow-1x1 @ B=8 C=12 16x16 k=3, "
                           "cell inverse-flow B=8 C=12 16x16 k=3 cpu/float32: ratio ")
    assert "vs baseline 0.01" in line and "limit +" in line
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("| inverse-flow forward"))
    attempts = row.split("|")[5]
    assert "**regressed**" in row and attempts.count(",") == baselines.CHECK_ATTEMPTS - 1


def test_an_accepted_regression_passes_and_is_repeated(recorded, tmp_path):
    path = _edited(recorded, tmp_path, **{"inverse-flow forward": 0.01})
    res = bench("baseline", "check", "--device", "cpu", "--file", str(path), "--quiet",
                "--accept", "inverse-flow — the solve now validates its input")
    assert res.returncode == 0, res.stderr
    assert "accepted baseline regression: inverse-flow forward" in res.stderr
    assert "the solve now validates its input" in res.stdout


def test_an_improvement_is_reported_not_failed(recorded, tmp_path):
    path = _edited(recorded, tmp_path, **{"solve / conv2d @ B=8 C=12 16x16": 1e6})
    res = bench("baseline", "check", "--device", "cpu", "--file", str(path), "--quiet")
    assert res.returncode == 0 and "improved" in res.stdout and "re-record" in res.stderr


def test_missing_baseline_is_a_usage_error(tmp_path):
    res = bench("baseline", "check", "--device", "cpu", "--file", str(tmp_path / "none.json"))
    assert res.returncode == 2 and "baseline record" in res.stderr


def test_every_committed_cpu_baseline_is_readable_and_named_by_its_class():
    classes = baselines.recorded_classes("cpu")
    assert classes, "no CPU baseline is committed under results/baselines/"
    for machine in classes:
        doc, ratios = baselines.load(baselines.baseline_path("cpu", machine))
        assert doc["device"] == "cpu" and doc["machine_class"] == machine and ratios
        assert any(r.layer == "solve" for r in ratios) and any(r.name.startswith("inverse-flow") for r in ratios)


def test_the_machine_class_names_vendor_and_both_isas():
    machine = baselines.machine_class("cpu")
    assert "kernel-" in machine and "aten-" in machine
    assert baselines.baseline_path("cpu").name == f"cpu-{machine}.json"


def test_a_machine_class_without_a_baseline_reports_it_and_passes(monkeypatch):
    # A baseline recorded on another kind of machine says nothing about this one (an AVX2 EPYC's
    # solve / conv2d ratio failed on an AVX-512 Xeon by +74 % on unchanged code).
    monkeypatch.setattr(baselines, "machine_class", lambda device: "vendor-of-tomorrow-kernel-x-aten-y")
    res = bench("baseline", "check", "--device", "cpu", "--quiet")
    assert res.returncode == 0, res.stderr
    assert "no baseline recorded for this machine class (cpu-vendor-of-tomorrow-kernel-x-aten-y)" in res.stdout


def test_the_solver_note_reads_the_solver_actually_in_use(recorded, monkeypatch):
    # The check once looked solver_status up in layers.causal, where it does not live, and so
    # claimed the solver had changed to 'torch' whenever the native one was in use.
    from layers import native

    assert baselines.current_solver("cpu") == native.solver_status()["cpu"]["solver"]
    doc, ratios = baselines.load(recorded)
    rows, notes = baselines.check(doc, ratios[:1], attempts=1, rounds=1)
    assert not any("solver was" in n for n in notes), notes
    doc["environment"]["solvers"]["cpu"]["solver"] = "some-other-solver"
    rows, notes = baselines.check(doc, ratios[:1], attempts=1, rounds=1)
    assert any("solver was 'some-other-solver'" in n for n in notes), notes
