"""Model-level runs end to end: `run --scope model`, `run --preset ... --quick`, `table --paper`,
and the compatibility of layer cells and old run folders with the model fields."""

from __future__ import annotations

import json
import os
import subprocess

import pandas as pd
from helpers import raw_records as records
from helpers import run_bench as bench

from bench.sweep.cells import Cell, SweepConfig, expand

FAST = ["--repeat", "2", "--min-time", "0", "--warmup", "1", "--warmup-time", "0", "--no-progress", "--threads", "1",
        "--device", "cpu"]


def test_model_scope_run(tmp_path):
    from bench.sweep.models import FlowModel

    out = tmp_path / "runs"
    res = bench("run", "--scope", "model", "--layers", "inverse-flow,finc", "--sweep", "input_size",
                "--input-size", "8,6", "--batch", "2", "--levels", "2", "--steps", "1", "--width", "8",
                "--kernel-size", "2", "--out", str(out), *FAST)
    assert res.returncode == 0, res.stderr
    (run_dir,) = out.iterdir()
    recs = {(r["cell"]["layer"], r["cell"]["height"]): r for r in records(run_dir)}
    assert set(recs) == {("inverse-flow", 8), ("inverse-flow", 6), ("finc", 8), ("finc", 6)}
    for layer, mixing in (("inverse-flow", [False, False]), ("finc", [True, True])):
        r = recs[(layer, 8)]
        assert r["status"] == "ok", r
        assert r["cell"]["scope"] == "model" and r["cell"]["channels"] == 3
        assert (r["cell"]["levels"], r["cell"]["steps"], r["cell"]["hidden_width"]) == (2, 1, 8)
        assert r["params"] == FlowModel(layer, 3, 8, levels=2, steps=1, width=8, kernel_size=2).parameter_count()
        assert r["mixing_used"] == mixing and r["recon_error"] < 1e-4
        assert set(r["directions"]) == {"forward", "sampling", "train"}
        assert all(d["status"] == "ok" and d["n"] >= 2 for d in r["directions"].values())
        # 6x6 cannot be squeezed twice: recorded as unsupported, the sweep goes on
        assert recs[(layer, 6)]["status"] == "unsupported" and "multiples of 4" in recs[(layer, 6)]["message"]
    table = (run_dir / "table.md").read_text()
    assert "Models: Glow-style flows" in table and "model density pass" in table
    df = pd.read_csv(run_dir / "table.csv")
    assert set(df.scope) == {"model"} and set(df.steps) == {1}
    config = json.loads((run_dir / "config.json").read_text())
    assert config["scope"] == "model" and config["model"]["hidden_width"] == 8 and config["preset"] is None


def test_preset_quick_run_renders_the_paper_table(tmp_path):
    out = tmp_path / "quick"
    # The preset's --quick settings, shrunk further by explicit options (they override the preset).
    args = ["run", "--preset", "ablation-kernel-size", "--quick", "--steps", "1", "--width", "8", "--input-size", "8",
            "--batch", "2", "--kernel-size", "2,3", "--directions", "forward,sampling", "--out", str(out),
            "--name", "{preset}", "--no-plots", *FAST]
    res = bench(*args)
    assert res.returncode == 0, res.stderr
    run_dir = out / "ablation-kernel-size"
    assert {"paper.md", "paper.tex", "table.md", "results.jsonl"} <= {p.name for p in run_dir.iterdir()}
    assert "--quick: CPU:" in res.stderr and "Table 10 (paper) beside our measurements" in res.stdout
    config = json.loads((run_dir / "config.json").read_text())
    assert config["preset"]["name"] == "ablation-kernel-size" and config["preset"]["quick"] is True
    assert config["model"]["levels"] == 2 and config["model"]["steps"] == 1 and config["threads"] == 1
    md = (run_dir / "paper.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| 3x3"))
    assert "18.11 ± 0.20" in row and "+0.115" in row and f"+{1 * (12**2 + 24**2) * (9 - 4) / 1e6:.4f}" in row  # 1 step
    assert "QUICK RUN (--quick)" in md and "not in this run" in md

    res = bench("table", str(run_dir), "--paper", "preset", "--format", "latex", timeout=60)
    assert res.returncode == 0 and r"\begin{tabular}" in res.stdout and "1080 Ti" in res.stdout
    res = bench("table", str(run_dir), "--paper", "cifar", timeout=60)  # any table renders; rows not run say so
    assert res.returncode == 0 and "not in this run" in res.stdout
    res = bench("table", str(run_dir), "--paper", "nope", timeout=60)
    assert res.returncode == 2 and "unknown paper table 'nope'" in res.stderr and len(res.stderr.splitlines()) == 1

    res = bench(*args)  # the named folder exists: refused, nothing lost
    assert res.returncode == 2 and "--overwrite" in res.stderr
    assert (run_dir / "paper.md").read_text() == md


def test_presets_are_listed():
    res = bench("presets", timeout=60)
    assert res.returncode == 0
    for name in ("ablation-input-size", "ablation-batch-size", "ablation-kernel-size", "cifar", "mnist"):
        assert name in res.stdout
    assert "--quick:" in res.stdout
    res = bench("run", "--list-presets", timeout=60)
    assert res.returncode == 0 and "ablation-kernel-size" in res.stdout


def test_bad_model_and_preset_arguments():
    for args, message in (
        (["run", "--quick"], "--quick shrinks a preset"),
        (["run", "--steps", "4"], "--steps describe a model: add --scope model"),
        (["run", "--preset", "nope"], "unknown preset 'nope'; known: ablation-batch-size"),
        (["run", "--scope", "galaxy"], "invalid choice: 'galaxy'"),
        (["run", "--preset", "all", "--name", "fixed"], "--name needs '{preset}'"),
    ):
        res = bench(*args, timeout=60)
        assert res.returncode == 2, (args, res.stderr)
        assert len(res.stderr.strip().splitlines()) == 1 and message in res.stderr, res.stderr


# ---------------------------------------------------------------------------------------------
# Compatibility with runs written before model cells existed


def test_layer_cell_key_is_unchanged():
    cell = Cell("finc", "cpu", "float32", 8, 12, 32, 32, 3)
    assert cell.key() == ('{"batch":8,"channels":12,"device":"cpu","dtype":"float32","height":32,"kernel_size":3,'
                          '"layer":"finc","options":{},"width":32}')
    model = Cell("finc", "cpu", "float32", 8, 3, 32, 32, 3, scope="model", levels=2, steps=4, hidden_width=64,
                 mixing="auto")
    assert model.key() != cell.key() and '"scope":"model"' in model.key()
    old = {k: v for k, v in json.loads(cell.key()).items()}
    assert Cell.from_dict(old) == cell and Cell.from_dict(old).scope == "layer"


def test_old_config_loads_and_expands_to_layer_cells():
    old = {"layers": ["inverse-flow"], "sweep": ["kernel_size"],
           "values": {"input_size": [32], "batch": [8], "kernel_size": [2, 3], "channels": [12]},
           "device": "cpu", "dtype": "float32", "repeat": 5, "min_time": 0.3, "warmup": 3, "warmup_time": 0.2,
           "max_time": 5.0, "timeout": 300.0, "isolate": True, "threads": 2, "seed": 0, "cold_cache": False,
           "directions": ["forward", "sampling", "train"], "options": {}}
    config = SweepConfig.from_json(old)
    assert config.scope == "layer" and config.preset is None
    cells = expand(config)
    assert [c.kernel_size for c in cells] == [2, 3] and all(c.scope == "layer" and c.levels is None for c in cells)


def test_kept_results_do_not_mark_the_code_dirty(tmp_path):
    """`--preset all` writes each preset's run folder under results/ before the next starts."""
    from bench.git import git_state

    def git(*args):
        subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@t"})

    git("init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", "code.py")
    git("commit", "-q", "-m", "c")
    (tmp_path / "results" / "quick" / "cifar").mkdir(parents=True)
    kept = tmp_path / "results" / "quick" / "cifar" / "results.jsonl"
    kept.write_text("{}\n")
    assert git_state(tmp_path)["dirty"] is False  # a new run folder ("?? results/...")
    git("add", "-A")
    git("commit", "-q", "-m", "kept")
    kept.write_text("{}\n{}\n")
    # A committed run folder regenerated: " M results/..." is the first porcelain line, whose
    # leading space once got stripped (the path then read "esults/...": dirty).
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty"] is True
