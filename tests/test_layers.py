"""Layer-specific properties beyond the conformance suite."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_jacobian

import layers
from layers.causal import ORIENTATIONS


def _perturbed(name, c, k, scale=0.5):
    layer = layers.create(name, c, kernel_size=k).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * scale)
    return layer


@pytest.mark.parametrize(("name", "c", "k"), [("inverse-flow", 6, 3), ("inverse-flow", 5, 2), ("finc", 8, 3),
                                             ("glow-1x1", 5, None), ("cinc", 5, 2), ("emerging", 6, 5),
                                             ("snf", 3, 3), ("butterfly", 12, None)])
def test_parameter_count_is_the_free_entries(name, c, k):
    layer = layers.create(name, c, kernel_size=k)
    assert sum(p.numel() for p in layer.parameters()) == type(layer).parameter_count(c, k)


@pytest.mark.parametrize("name", layers.available())
def test_every_layer_states_its_parameter_count(name):
    """A static ``parameter_count`` that agrees with the trainable parameters of a default build."""
    info = layers.info(name)
    c = max(info.min_channels, info.channel_multiple, 4)
    k = 3 if info.kernel_size_applies else None
    size = (5, 6)
    layer = layers.create(name, c, kernel_size=k, input_size=size)
    count = type(layer).parameter_count(c, k, input_size=size) if info.needs_input_size else \
        type(layer).parameter_count(c, k)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == count


def test_inverse_flow_parameter_formula():
    # (k²−1)·C² + C(C−1)/2 (docs/math.md §5)
    assert layers.create("inverse-flow", 12, kernel_size=3).__class__.parameter_count(12, 3) == 8 * 144 + 66


def test_inverse_flow_sampling_map_is_unit_lower_triangular_for_any_parameters():
    """Masks live in the forward computation: even large arbitrary parameters keep T triangular."""
    c, h, w = 5, 3, 4
    layer = _perturbed("inverse-flow", c, 3, scale=3.0)
    z = torch.randn(1, c, h, w, dtype=torch.float64)
    t = dense_jacobian(layer.inverse, z)  # rows/cols ordered (c, h, w)
    # Reorder to raster pixel order with channels inside a pixel.
    perm = torch.arange(c * h * w).reshape(c, h * w).t().reshape(-1)
    t = t[perm][:, perm]
    assert torch.equal(torch.triu(t, 1), torch.zeros_like(t))
    assert torch.equal(t.diagonal(), torch.ones(c * h * w, dtype=torch.float64))


@pytest.mark.parametrize("c", [1, 2, 3, 5, 9])
def test_inverse_flow_mixes_all_channels(c):
    """Every output channel depends on every input channel at lower index in the same pixel
    (the published kernel worked in independent groups of four and returned zeros for C < 4)."""
    layer = _perturbed("inverse-flow", c, 3)
    z = torch.randn(1, c, 3, 3, dtype=torch.float64)
    jac = dense_jacobian(layer.inverse, z).reshape(c, 3, 3, c, 3, 3)
    centre = jac[:, 2, 2, :, 2, 2]
    assert torch.all(torch.tril(centre, -1)[torch.tril(torch.ones(c, c), -1).bool()] != 0)
    x = torch.randn(2, c, 4, 4, dtype=torch.float64)
    assert layer(x)[0].abs().sum() > 0


def test_finc_quarters_do_not_mix_and_read_their_quadrant():
    c, h, w = 8, 4, 4
    layer = _perturbed("finc", c, 2)
    x = torch.randn(1, c, h, w, dtype=torch.float64)
    jac = dense_jacobian(lambda v: layer(v)[0], x).reshape(4, c // 4, h, w, 4, c // 4, h, w)
    for qo in range(4):
        for qi in range(4):
            if qo != qi:
                assert torch.all(jac[qo, :, :, :, qi] == 0)
    for q, o in enumerate(ORIENTATIONS):
        block = jac[q, :, 1, 1, q]  # output pixel (1, 1): which input pixels does it read?
        reads = block.abs().sum(dim=(0, 1)) != 0
        rows = torch.tensor([0, 1]) if "T" in o else torch.tensor([1, 2])
        cols = torch.tensor([0, 1]) if "L" in o else torch.tensor([1, 2])
        expected = torch.zeros(h, w, dtype=torch.bool)
        expected[rows[:, None], cols[None, :]] = True
        assert torch.equal(reads, expected), o


def test_glow_logdet_formula_and_weight_inverse():
    layer = _perturbed("glow-1x1", 6, None)
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    _, logdet = layer(x)
    expected = 15 * torch.linalg.slogdet(layer.weight())[1]
    torch.testing.assert_close(logdet, expected.expand(2))
    torch.testing.assert_close(layer.weight() @ layer.weight_inverse(), torch.eye(6, dtype=torch.float64))


def test_layers_start_near_identity():
    x = torch.randn(2, 8, 6, 6)
    for name in ("inverse-flow", "finc", "cinc", "snf", "butterfly", "woodbury"):
        z, _ = layers.create(name, 8, kernel_size=3, input_size=6)(x)
        assert ((z - x).norm() / x.norm()).item() < 0.5, name
