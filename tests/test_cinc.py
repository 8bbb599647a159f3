"""CInC: one causal convolution with a learnable centre diagonal and a bias."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_exact_layer, perturb_

import layers
from layers.cinc import CInC


def _layer(c: int, k: int, scale: float = 0.3, **options) -> CInC:
    return perturb_(layers.create("cinc", c, kernel_size=k, **options).double(), scale)


@pytest.mark.parametrize(("c", "k"), [(3, 3), (5, 2), (1, 1), (4, 5)])
def test_logdet_is_hw_times_sum_of_log_diagonal(c, k):
    layer = _layer(c, k)
    x = torch.randn(2, c, 3, 5, dtype=torch.float64)
    _, logdet = layer(x)
    centre = layer.weight()[:, :, k - 1, k - 1]
    expected = 15 * centre.diagonal().abs().log().sum()
    torch.testing.assert_close(logdet, expected.expand(2))
    torch.testing.assert_close(logdet, (15 * layer.log_diag.sum()).expand(2))


def test_centre_is_lower_triangular_with_nonzero_diagonal_for_any_parameters():
    layer = _layer(6, 3, scale=5.0)
    with torch.no_grad():
        layer.log_diag.copy_(torch.tensor([-30.0, -5.0, 0.0, 5.0, 20.0, -1.0]))
    centre = layer.weight()[:, :, 2, 2]
    assert torch.equal(torch.triu(centre, 1), torch.zeros_like(centre))
    assert torch.all(centre.diagonal() > 0)


def test_bias_is_added_and_removed():
    layer = _layer(4, 3)
    z, _ = layer(torch.zeros(1, 4, 3, 3, dtype=torch.float64))
    torch.testing.assert_close(z, layer.bias[:, None, None].expand(1, 4, 3, 3))
    no_bias = _layer(4, 3, bias=False)
    assert no_bias.bias is None
    assert torch.equal(no_bias(torch.zeros(1, 4, 3, 3, dtype=torch.float64))[0], torch.zeros(1, 4, 3, 3,
                                                                                           dtype=torch.float64))
    assert_exact_layer(no_bias, torch.randn(2, 4, 3, 4, dtype=torch.float64), gradcheck=False)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("c", "k"), [(1, 1), (3, 2), (12, 3)])
def test_parameter_count(c, k, bias):
    layer = layers.create("cinc", c, kernel_size=k, bias=bias)
    assert sum(p.numel() for p in layer.parameters()) == CInC.parameter_count(c, k, bias=bias)
    # (k²−1)·C² + C(C−1)/2 + C diagonal + C bias
    assert CInC.parameter_count(c, k, bias=bias) == (k * k - 1) * c * c + c * (c - 1) // 2 + c + (c if bias else 0)


def test_sampling_uses_the_shared_solve(monkeypatch):
    """The inverse is the one wavefront solve of layers.causal (fast path shared with FInC)."""
    import layers.causal
    import layers.cinc

    calls = []
    real = layers.causal.solve

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(layers.cinc, "solve", spy)
    layer = _layer(3, 3)
    layer.inverse(torch.randn(1, 3, 4, 4, dtype=torch.float64))
    assert calls == [{"assume_triangular": True}]
