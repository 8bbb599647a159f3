"""Woodbury transformations: channel and spatial (or height and width) low-rank updates."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_exact_layer, perturb_

import layers
from layers import LayerError
from layers.woodbury import Woodbury


def _layer(c: int, size: tuple[int, int], scale: float = 0.2, **options) -> Woodbury:
    return perturb_(layers.create("woodbury", c, input_size=size, **options).double(), scale)


@pytest.mark.parametrize("variant", ["standard", "me"])
@pytest.mark.parametrize(("c", "size", "ranks"), [(1, (3, 4), {}), (3, (4, 3), {}), (5, (2, 5), {}),
                                                  (6, (4, 4), {"channel_rank": 2, "spatial_rank": 3})])
def test_both_variants_pass_the_exact_layer_checks(variant, c, size, ranks):
    layer = _layer(c, size, variant=variant, **ranks)
    assert_exact_layer(layer, torch.randn(2, c, *size, dtype=torch.float64))


def test_logdet_by_sylvester_equals_the_full_size_determinants():
    c, (h, w) = 4, (3, 5)
    layer = _layer(c, (h, w))
    n = h * w
    full_channel = torch.eye(c, dtype=torch.float64) + layer.u_channel @ layer.v_channel
    full_spatial = torch.eye(n, dtype=torch.float64) + layer.u_spatial @ layer.v_spatial
    expected = n * torch.linalg.slogdet(full_channel)[1] + c * torch.linalg.slogdet(full_spatial)[1]
    _, logdet = layer(torch.randn(2, c, h, w, dtype=torch.float64))
    torch.testing.assert_close(logdet, expected.expand(2))


def test_me_variant_transforms_height_then_width():
    c, (h, w) = 2, (3, 4)
    layer = _layer(c, (h, w), variant="me")
    assert layer.transforms == ("channel", "height", "width")
    x = torch.randn(1, c, h, w, dtype=torch.float64)
    ch = torch.eye(c, dtype=torch.float64) + layer.u_channel @ layer.v_channel
    hh = torch.eye(h, dtype=torch.float64) + layer.u_height @ layer.v_height
    ww = torch.eye(w, dtype=torch.float64) + layer.u_width @ layer.v_width
    expected = torch.einsum("oc,hk,wl,bckl->bohw", ch, hh, ww, x)
    torch.testing.assert_close(layer(x)[0], expected)


@pytest.mark.parametrize(("variant", "c", "size", "ranks", "expected_ranks"), [
    ("standard", 3, (4, 4), {}, {"channel": 3, "spatial": 16}),
    ("standard", 32, (8, 8), {}, {"channel": 16, "spatial": 16}),
    ("standard", 32, (2, 3), {"channel_rank": 4}, {"channel": 4, "spatial": 6}),
    ("me", 12, (20, 5), {}, {"channel": 12, "height": 16, "width": 5}),
])
def test_ranks_default_to_16_clamped_to_the_dimension(variant, c, size, ranks, expected_ranks):
    layer = layers.create("woodbury", c, input_size=size, variant=variant, **ranks)
    got = {key: getattr(layer, f"v_{key}").shape[0] for key in layer.transforms}
    assert got == expected_ranks
    count = Woodbury.parameter_count(c, input_size=size, variant=variant, **ranks)
    assert sum(p.numel() for p in layer.parameters()) == count


def test_starts_near_identity():
    layer = layers.create("woodbury", 8, input_size=8)
    for p in layer.parameters():
        assert 0.005 < p.std().item() < 0.02
    x = torch.randn(2, 8, 8, 8)
    z, logdet = layer(x)
    assert ((z - x).norm() / x.norm()).item() < 0.05 and logdet.abs().max().item() < 1.0


def test_needs_input_size_and_checks_it():
    assert layers.info("woodbury").needs_input_size and not layers.info("woodbury").kernel_size_applies
    with pytest.raises(LayerError, match="woodbury: input_size is required"):
        layers.create("woodbury", 4)
    layer = layers.create("woodbury", 4, kernel_size=7, input_size=(4, 6))
    assert layer.kernel_size is None
    with pytest.raises(LayerError, match=r"spatial size \(6, 4\) but the layer was built for input_size=\(4, 6\)"):
        layer(torch.randn(1, 4, 6, 4))
    with pytest.raises(LayerError, match="parameter_count needs input_size"):
        Woodbury.parameter_count(4)


def test_bad_options_name_the_accepted_values():
    with pytest.raises(LayerError, match="unknown variant 'ME'; accepted: 'standard', 'me'"):
        layers.create("woodbury", 4, input_size=4, variant="ME")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(LayerError, match="channel_rank must be a positive integer"):
            layers.create("woodbury", 4, input_size=4, channel_rank=bad)
    with pytest.raises(LayerError, match="spatial_rank must be a positive integer"):
        layers.create("woodbury", 4, input_size=4, spatial_rank=0)
