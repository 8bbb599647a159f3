"""Published tables (results/paper/), presets (bench/sweep/presets/), and the paper-layout renderings
against golden files (regenerate with UPDATE_GOLDEN=1 after checking the diff)."""

from __future__ import annotations

import pytest
from helpers import check_golden

import layers
from bench import records
from bench.locations import paper_table_ids, read_toml
from bench.report import paper
from bench.report.write import render_paper_table
from bench.sweep import presets


# Every layer of docs/math.md §5: a published row may name one that is not merged into this checkout yet.
SPEC_LAYERS = {"butterfly", "cinc", "emerging", "finc", "glow-1x1", "inverse-flow", "snf", "woodbury", "macow", "mintnet",
               "convexp"}
TABLES = paper_table_ids()
PRESETS = presets.names()


# ---------------------------------------------------------------------------------------------
# Published data


def test_every_seed_table_is_shipped():
    assert {"mnist", "cifar", "ablation-input-size", "ablation-batch-size", "ablation-kernel-size", "finc"} <= set(TABLES)


@pytest.mark.parametrize("table_id", TABLES)
def test_paper_table_parses_and_names_known_layers(table_id):
    table = paper.load_table(table_id)
    assert table.id == table_id and "1080 Ti" in table.hardware and table.source and table.interpretation
    assert set(table.layers()) <= SPEC_LAYERS
    text_columns = {"inverse", "dataset"}
    for row in table.rows:
        for key, value in row.items():
            if key.removesuffix("_pm") in {c.key for c in table.columns} - text_columns:
                assert isinstance(value, str) and float(value) >= 0, (key, value)  # as published, parseable


def test_published_values_are_the_slides():
    """Spot checks against the published slides, so a typo in the data files shows."""
    cifar = {r["method"]: r for r in paper.load_table("cifar").rows}
    assert (cifar["MintNet"]["st"], cifar["MintNet"]["st_unit"], cifar["MintNet"]["params"]) == ("25.0", "s", "12.466")
    assert (cifar["Inverse-Flow"]["st"], cifar["Inverse-Flow"]["st_pm"], cifar["Inverse-Flow"]["ft"]) == ("91.6", "6.5", "722")
    mnist = {r["method"]: r for r in paper.load_table("mnist").rows}
    assert (mnist["Emerging"]["st"], mnist["Emerging"]["nll"], mnist["FIncFlow"]["layer"]) == ("814", "640", "finc")
    rows = {r["value"]: r for r in paper.load_table("ablation-input-size").rows}
    assert rows[256]["memory"] == "8.025" and rows[16]["st"] == "15.55"
    rows = {r["value"]: r for r in paper.load_table("ablation-batch-size").rows}
    assert sorted(rows) == [1, 2, 4, 8, 16, 32, 64, 128] and rows[128]["ft"] == "487"
    rows = {r["value"]: r for r in paper.load_table("ablation-kernel-size").rows}
    assert [rows[k]["params"] for k in (2, 3, 5, 7, 9, 11)] == ["3.372", "3.487", "3.856", "4.407", "5.146", "6.068"]


def test_malformed_paper_table_is_refused():
    good = read_toml(paper.PAPER_DIR / "cifar.toml")
    with pytest.raises(paper.PaperTableError, match="missing hardware"):
        paper.parse_table({k: v for k, v in good.items() if k != "hardware"})
    with pytest.raises(paper.PaperTableError, match="matches no column"):
        paper.parse_table({**good, "rows": [{"method": "X", "speed": "1"}]})
    with pytest.raises(paper.PaperTableError, match="unknown paper table 'nope'; known: ablation-batch-size"):
        paper.load_table("nope")


# ---------------------------------------------------------------------------------------------
# Presets


def test_every_table_has_a_preset():
    assert {presets.load(n).paper_table for n in PRESETS} >= {"mnist", "cifar", "ablation-input-size",
                                                              "ablation-batch-size", "ablation-kernel-size"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses_and_references_valid_layers_and_tables(name):
    p = presets.load(name)
    assert presets.validate(p) == []
    assert p.paper_table in TABLES
    table = paper.load_table(p.paper_table)
    full, quick = p.settings(False), p.settings(True)
    if p.layers != presets.ALL:
        assert set(table.layers()) <= set(p.layers)
    if table.layout == "axis":
        # The full preset sweeps exactly the published axis values.
        assert p.sweep == [table.axis] and sorted(full["values"][table.axis]) == sorted(r["value"] for r in table.rows)
    assert p.quick["note"]

    def cost(s):  # a rough work estimate: pixels × batch × steps, summed over the grid
        v = s["values"]
        return (sum(n * n for n in v["input_size"]) * sum(v["batch"]) * len(v["kernel_size"])
                * s["model"].get("steps", 1) * s["model"].get("levels", 1))

    assert cost(quick) < cost(full) / 10, "--quick must shrink the preset substantially"
    assert quick["timing"].get("threads") == 1  # see the [quick] sections: 2-thread OpenMP on a shared CPU stalls


def test_malformed_preset_is_refused(tmp_path):
    text = (presets.PRESET_DIR / "cifar.toml").read_text()
    bad = tmp_path / "cifar.toml"
    bad.write_text(text.replace('sweep = []', 'sweep = ["depth"]'))
    with pytest.raises(presets.PresetError, match="sweep axes must be among"):
        presets.load("cifar", tmp_path)
    bad.write_text(text.split("[quick]")[0])
    with pytest.raises(presets.PresetError, match=r"\[quick\] section"):
        presets.load("cifar", tmp_path)
    with pytest.raises(presets.PresetError, match="unknown preset 'x'; known: cifar"):
        presets.load("x", tmp_path)


# ---------------------------------------------------------------------------------------------
# Paper-layout renderings (golden files)

ENV_CPU = {"cpu": {"model": "Test CPU"}, "torch": {"version": "2.13.0", "threads": 1},
           "git": {"short": "abc1234", "dirty": False}, "timestamp_utc": "2026-11-22T10:00:00+00:00"}
ENV_GPU = {**ENV_CPU, "gpus": [{"name": "NVIDIA H100 80GB HBM3"}]}


def _direction(mean, std, mem=3 << 29, status="ok", message=""):
    if status != "ok":
        return {"status": status, "message": message}
    return {"status": "ok", "n": 5, "median_ms": mean, "p20_ms": mean * 0.9, "p80_ms": mean * 1.1, "mean_ms": mean,
            "std_ms": std, "peak_mem_bytes": mem}


def _record(layer, k, params, dirs, channels=3, size=32, batch=4, mixing=(False, False)):
    cell = {"layer": layer, "device": "cpu", "dtype": "float32", "batch": batch, "channels": channels,
            "height": size, "width": size, "kernel_size": k, "options": {}, "scope": "model", "levels": 2,
            "steps": 32, "hidden_width": 128, "mixing": "auto"}
    return {"key": f"{layer}-{k}-{size}", "cell": cell, "directions": dirs, "status": "ok", "message": "",
            "params": params, "recon_error": 1e-6, "mixing_used": list(mixing)}


def _kernel_config():
    return {"scope": "model", "device": "cpu", "dtype": "float32", "threads": 1, "sweep": ["kernel_size"],
            "values": {"input_size": [16], "batch": [4], "kernel_size": [2, 3, 4, 5], "channels": [3]},
            "model": {"levels": 2, "steps": 32, "hidden_width": 128, "mixing": "auto"},
            "preset": {"name": "ablation-kernel-size", "paper_table": "ablation-kernel-size", "quick": True,
                       "quick_note": "CPU: 3x16x16 images and batch 4"}}


def _kernel_records():
    base = 3_139_136
    per_k = 32 * (12**2 + 24**2)
    out = []
    for k, st, ft in ((2, 236.0, 235.0), (3, 223.4, 319.2), (4, 250.0, 400.0), (5, 294.1, 471.0)):
        dirs = {"forward": _direction(ft, ft * 0.1), "sampling": _direction(st, 9.5),
                "train": _direction(ft * 3, 10.0, mem=(k + 1) << 28)}
        if k == 5:
            dirs["forward"] = _direction(0, 0, status="timeout", message="cell exceeded --timeout 600 s")
        out.append(_record("inverse-flow", k, base + per_k * (k * k - 4), dirs, size=16))
    return out


def _cifar_config():
    return {"scope": "model", "device": "cuda", "dtype": "float32", "threads": None, "sweep": [],
            "values": {"input_size": [32], "batch": [100], "kernel_size": [3], "channels": [3]},
            "model": {"levels": 2, "steps": 16, "hidden_width": 128, "mixing": "auto"},
            "preset": {"name": "cifar", "paper_table": "cifar", "quick": False, "quick_note": None}}


def _cifar_records():
    return [
        _record("inverse-flow", 3, 1_627_168, {"forward": _direction(65.25, 1.5), "sampling": _direction(4.125, 0.25)},
                batch=100),
        _record("finc", 3, 1_565_248, {"forward": _direction(3.5, 0.125), "sampling": _direction(43.0, 2.0)},
                batch=100, mixing=(True, True)),
        _record("glow-1x1", None, 1_541_056, {"forward": _direction(1.25, 0.0625), "sampling": _direction(1.5, 0.0625)},
                batch=100),
    ]


def test_paper_kernel_size_markdown_golden():
    check_golden("paper_kernel_size.md",
           render_paper_table("ablation-kernel-size", _kernel_config(), ENV_CPU, _kernel_records(), "md"))


def test_paper_kernel_size_latex_golden():
    check_golden("paper_kernel_size.tex",
           render_paper_table("ablation-kernel-size", _kernel_config(), ENV_CPU, _kernel_records(), "latex"))


def test_paper_cifar_markdown_golden():
    check_golden("paper_cifar.md", render_paper_table("cifar", _cifar_config(), ENV_GPU, _cifar_records(), "md"))


def test_paper_cifar_latex_golden():
    check_golden("paper_cifar.tex", render_paper_table("cifar", _cifar_config(), ENV_GPU, _cifar_records(), "latex"))


def test_paper_layout_content():
    """What the goldens must show, stated directly (so a golden regenerated carelessly still fails)."""
    md = render_paper_table("ablation-kernel-size", _kernel_config(), ENV_CPU, _kernel_records(), "md")
    lines = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
             for line in md.splitlines() if line.startswith("| ") and "x" in line.split("|")[1]}
    # rows in the paper's order, ours beside theirs; Δ vs 2x2 of ours is exact
    assert list(lines)[:6] == ["11x11", "9x9", "7x7", "5x5", "3x3", "2x2"]
    assert lines["3x3"][:2] == ["18.11 ± 0.20", "223 ± 9.50"] and lines["3x3"][-2:] == ["+0.115", "+0.1152"]
    assert lines["11x11"][1] == paper.NOT_RUN
    assert lines["4x4 (ours only)"][0] == "–"
    assert lines["5x5"][3] == "timeout"
    assert "QUICK RUN (--quick)" in md and "1080 Ti" in md and "Test CPU" in md and paper.CONTEXT_NOTE in md
    md = render_paper_table("cifar", _cifar_config(), ENV_GPU, _cifar_records(), "md")
    assert "| MintNet" in md and "25.0* ± 1.5" in md and "MintNet → mintnet" in md and "MaCow → macow" in md
    mintnet_row = next(line for line in md.splitlines() if line.startswith("| MintNet"))
    assert paper.NOT_RUN in mintnet_row and paper.NOT_IMPLEMENTED not in md
    assert "glow-1x1 (not in the paper's table)" in md and "NVIDIA H100" in md and "QUICK" not in md
    assert "| SNF" in md and paper.NOT_RUN in md
    tex = render_paper_table("cifar", _cifar_config(), ENV_GPU, _cifar_records(), "latex")
    assert r"\toprule" in tex and "Δ" not in tex and "×" not in tex


def test_layer_scope_run_is_flagged_in_the_paper_layout():
    config = {**_cifar_config(), "scope": "layer", "preset": None}
    records = [{**r, "cell": {**r["cell"], "scope": "layer"}} for r in _cifar_records()]
    md = render_paper_table("cifar", config, ENV_GPU, records, "md")
    assert "measured single layers, not models" in md


def test_layers_known_to_the_registry_get_their_inverse_kind():
    md = render_paper_table("mnist", {**_cifar_config(), "preset": None}, ENV_GPU,
                            [_record("inverse-flow", 3, 1, {"sampling": _direction(1.0, 0.1)}, channels=1, size=28)],
                            "md")
    row = next(line for line in md.splitlines() if line.startswith("| Inverse-Flow"))
    assert row.count("exact") == 2 and layers.info("inverse-flow").exact_inverse


def test_the_inverse_kind_comes_from_the_record_not_from_what_is_installed_now():
    """A run renders as it was measured: the record's ``exact_inverse`` wins over the registry;
    the registry answers only for records written before runs stored it, and "?" where neither
    knows the layer."""
    def row(record):
        md = render_paper_table("mnist", {**_cifar_config(), "preset": None}, ENV_GPU, [record], "md")
        line = next(line for line in md.splitlines() if line.startswith("| Inverse-Flow"))
        return line.rstrip(" |").rsplit("|", 1)[-1].strip()  # our inverse column is the last


    rec = _record("inverse-flow", 3, 1, {"sampling": _direction(1.0, 0.1)}, channels=1, size=28)
    assert layers.info("inverse-flow").exact_inverse
    assert row({**rec, "exact_inverse": False}) == "approx"
    assert row({**rec, "exact_inverse": True}) == "exact"
    assert row(rec) == "exact"  # an old record without the field: the registry's answer
    assert records.exact_inverse({**rec, "exact_inverse": False}) is False
    assert records.exact_inverse({"cell": {"layer": "no-such-layer"}}) is None
    assert records.exact_inverse({"cell": {"layer": "no-such-layer"}, "exact_inverse": True}) is True


def _architecture_record(label, options, mean_ms, diagnostics, params=2_000_000):
    rec = _record("mintnet", 3, params, {"sampling": {**_direction(mean_ms, mean_ms / 100),
                                                       "inverse_diagnostics": diagnostics},
                                         "forward": _direction(900.0, 9.0)})
    rec["cell"] = {**rec["cell"], "options": options,
                   "architecture": {"name": "mintnet", "pairs": 21, "latent": 85, "label": label}}
    rec["key"] = f"mintnet-{label}"
    rec["model"] = f"MintNet's architecture ({label})"
    return rec


def test_published_architecture_rows_show_every_setting_with_its_iterations():
    """MintNet's row: its own model at 100 iterations and to a tolerance (one line each, with the
    iterations and residual, ST in seconds as published), then mintnet in our Glow-style model."""
    fixed = _architecture_record("fixed", {"iterations": 100}, 30_000.0,
                                 {"layers": 42, "iterations": 100, "iterations_min": 100, "residual": 2.5e-7})
    tol = _architecture_record("tol", {"tolerance": 1e-5}, 4_000.0,
                               {"layers": 42, "iterations": 14, "iterations_min": 9, "residual": 9e-6,
                                "converged": True})
    glow = _record("mintnet", 3, 1_000_000, {"sampling": _direction(500.0, 5.0)})
    md = render_paper_table("cifar", _cifar_config(), ENV_GPU, _cifar_records() + [fixed, tol, glow], "md")
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    i = next(j for j, line in enumerate(lines) if line.startswith("| MintNet"))
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in lines[i:i + 3]]
    assert rows[0][1] == "mintnet in fixed (sampling: 100 it./layer, residual 2.5e-07)"
    assert rows[0][4] == "30.0* ± 0.300" and rows[0][3] == "25.0* ± 1.5"
    assert rows[1][:2] == ["", "mintnet in tol (sampling: 9–14 it./layer, residual 9.0e-06)"]
    assert rows[1][3] == "–" and rows[1][4] == "4.000* ± 0.040"
    assert rows[2][1] == "mintnet in our Glow-style model" and rows[2][4] == "0.500* ± 0.005"
    assert "MintNet: timed MintNet's architecture (fixed)." in md
    assert "mintnet (not in the paper's table)" not in md
