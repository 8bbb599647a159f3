"""The published architectures (MaCow's, MintNet's) as benchmark models, and how runs carry them."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_jacobian

import layers
from bench.sweep import presets
from bench.timing.diagnostics import collect_inverse_diagnostics, describe
from bench.timing.measure import TimingPolicy, measure_cell
from bench.sweep.models import MACOW_CIFAR_LEVELS, build_architecture, macow_model, mintnet_model
from bench.sweep.cells import Cell, SweepConfig, expand


def _perturb(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def _check_density(model, x):
    """log det of the whole model against the dense Jacobian of image -> all latents, per sample."""
    latents, logdet = model(x)
    assert [tuple(z.shape[1:]) for z in latents] == model.latent_shapes()
    for b in range(x.shape[0]):
        jac = dense_jacobian(lambda v: torch.cat([z.flatten(1) for z in model(v)[0]], 1), x[b:b + 1])
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac)[1], rtol=1e-8, atol=1e-8)


def test_macow_model_is_exact_and_its_logdet_is_the_dense_one():
    torch.manual_seed(0)
    # One level of two sub-blocks of one step (a split between them), on a small image.
    model = macow_model(3, (4, 4), kernel_size=3, levels=[[1, 1]], hidden_width=4).double()
    x = torch.rand(2, 3, 4, 4, dtype=torch.float64)
    model.initialize(x)
    _perturb(model)
    torch.testing.assert_close(model.inverse(model(x)[0]), x, rtol=1e-10, atol=1e-10)
    _check_density(model, x)
    # 2 steps of 2 units, each unit two macow layers (orders AB and CD), then a Glow step.
    macows = [m for m in model.modules() if isinstance(m, layers.macow.MaCow)]
    assert len(macows) == 2 * 2 * 2 and {m.order for m in macows} == {"AB", "CD"}
    assert model.latent_shapes() == [(6, 2, 2), (6, 2, 2)]
    # The published default: 4 levels, 64 steps of 8 MCFs = 512 MCFs.
    assert MACOW_CIFAR_LEVELS == [[4], [12, 12], [12, 12], [12]] and 8 * sum(map(sum, MACOW_CIFAR_LEVELS)) == 512


def test_mintnet_model_spreads_pairs_like_the_published_code_and_reports_its_inverse():
    torch.manual_seed(0)
    model = mintnet_model(1, (4, 4), kernel_size=3, pairs=4, scales=3, latent=1,
                          layer_options={"tolerance": 1e-11, "iterations": 500}).double()
    blocks = [m for m in model.modules() if isinstance(m, layers.mintnet.MintNet)]
    assert [b.channels for b in blocks] == [1, 1, 4, 4, 16, 16, 16, 16] and [b.type for b in blocks[:2]] == ["A", "B"]
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    _perturb(model)
    _check_density(model, x)
    x_back = model.inverse(model(x)[0])
    assert (x_back - x).abs().max() < 1e-9
    d = collect_inverse_diagnostics(model)
    assert d["layers"] == 8 and d["converged"] and d["residual"] <= 1e-11 and 1 <= d["iterations_min"] <= d["iterations"]
    assert "it./layer" in describe(d)
    assert "7x3x32x32, 7x12x16x16, 7x48x8x8" in describe_model(21, 3) and "6x1x28x28, 6x4x14x14, 8x16x7x7" in \
        describe_model(20, 1)


def describe_model(pairs, channels):
    """The description of the published layout, without building its (large) blocks."""
    import bench.sweep.models as models

    real = layers.create
    try:  # a stand-in for the block: the layout is what is checked here
        layers.create = lambda name, c, **kw: torch.nn.Identity()
        size = 32 if channels == 3 else 28
        return models.mintnet_model(channels, (size, size), pairs=pairs, latent=85).describe()
    finally:
        layers.create = real


def test_architecture_errors_are_clear():
    with pytest.raises(layers.LayerError, match="unknown architecture 'glow'; accepted: macow, mintnet"):
        build_architecture({"name": "glow"}, "macow", 3, (32, 32), 3, 128)
    with pytest.raises(layers.LayerError, match="built from the 'macow' layer, not 'finc'"):
        build_architecture({"name": "macow"}, "finc", 3, (32, 32), 3, 128)
    with pytest.raises(layers.UnsupportedError, match="cannot be squeezed 4 times"):
        build_architecture({"name": "macow"}, "macow", 3, (28, 28), 3, 128)
    with pytest.raises(layers.LayerError, match="bad settings for the mintnet architecture"):
        build_architecture({"name": "mintnet", "depth": 3}, "mintnet", 3, (32, 32), 3, None)


def _config(**kw):
    base = dict(layers=["mintnet"], sweep=[], values={"input_size": [8], "batch": [2], "kernel_size": [3],
                                                      "channels": [1]},
                device="cpu", dtype="float32", repeat=1, min_time=0.0, warmup=0, warmup_time=0.0, max_time=1.0,
                timeout=60, isolate=False, threads=1, scope="model",
                model={"levels": 1, "steps": 1, "hidden_width": 8, "mixing": "auto"})
    return SweepConfig(**{**base, **kw})


def test_architecture_cells_are_expanded_beside_the_glow_style_model():
    arch = {"name": "mintnet", "pairs": 3, "latent": 1}
    config = _config(architectures=[
        {"layer": "mintnet", "architecture": {**arch, "label": "fixed"}, "options": {"iterations": 3}},
        {"layer": "mintnet", "architecture": {**arch, "label": "tol"}, "options": {"tolerance": 1e-3}},
    ])
    cells = expand(config)
    assert [c.architecture and c.architecture["label"] for c in cells] == [None, "fixed", "tol"]
    assert len({c.key() for c in cells}) == 3 and '"architecture"' not in cells[0].key()
    assert Cell.from_dict(__import__("dataclasses").asdict(cells[1])).key() == cells[1].key()
    assert "[" not in cells[1].label() and "fixed" in cells[1].label()


def test_the_sampling_record_carries_the_iterations_and_residual():
    cell = expand(_config(architectures=[{"layer": "mintnet", "architecture": {"name": "mintnet", "pairs": 3,
                                                                                "latent": 1},
                                          "options": {"iterations": 5}}]))[1]
    out = []
    measure_cell(cell, TimingPolicy(warmup=0, warmup_time=0.0, repeat=1, min_time=0.0, max_time=1.0), out.append,
                 threads=1, directions=("forward", "sampling"))
    sampling = next(r for r in out if r.get("direction") == "sampling" and r["type"] == "direction")
    assert sampling["status"] == "ok"
    assert sampling["inverse_diagnostics"]["iterations"] == 5 and sampling["inverse_diagnostics"]["layers"] == 6
    forward = next(r for r in out if r.get("direction") == "forward" and r["type"] == "direction")
    assert "inverse_diagnostics" not in forward
    final = out[-1]
    assert final["type"] == "cell" and "MintNet's architecture: 3 pairs" in final["model"] and final["recon_error"] is not None


def test_presets_declare_the_published_architectures():
    cifar, mnist = presets.load("cifar"), presets.load("mnist")
    full = {(a["layer"], a["architecture"].get("pairs"), a["architecture"].get("latent"))
            for a in cifar.settings(False)["architectures"]}
    assert full == {("macow", None, None), ("mintnet", 21, 85)}
    assert {a["architecture"]["pairs"] for a in mnist.settings(False)["architectures"]} == {20}
    for p in (cifar, mnist):
        modes = [a.get("options", {}).get("tolerance") for a in p.settings(True)["architectures"]
                 if a["layer"] == "mintnet"]
        assert None in modes and any(modes), "MintNet sampled at fixed iterations and to a tolerance"
    text = (presets.PRESET_DIR / "cifar.toml").read_text()
    bad = text.replace('layer = "macow"\narchitecture', 'layer = "macow"\narch')
    with pytest.raises(presets.PresetError, match="an entry has layer and architecture"):
        presets.parse(_toml(bad))


def _toml(text):
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    return tomllib.loads(text)
