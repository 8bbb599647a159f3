"""The convolution exponential: the series, its inverse, the trace log det and the norm bound."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_jacobian, density_gradcheck, perturb_

import layers
from layers import LayerError
from layers.convexp import ConvExp, round_trip_bound, series_bound
from layers.snf import dense_conv_matrix


def _layer(c=3, k=3, scale=0.3, **options) -> ConvExp:
    return perturb_(layers.create("convexp", c, kernel_size=k, **options).double(), scale)


def test_declared_capabilities():
    info = layers.info("convexp")
    assert not info.exact_inverse and info.exact_logdet and info.inverse_tolerance is not None
    with pytest.raises(LayerError, match="terms must be a positive integer"):
        layers.create("convexp", 3, terms=0)


def test_rescaled_kernel_has_operator_norm_below_the_coefficient():
    layer = _layer(3, 3, scale=1.0)  # far above the bound: the rescaling is active
    m = dense_conv_matrix(layer.kernel(), 5, 4)
    assert torch.linalg.matrix_norm(m, ord=2) <= layer.coefficient + 1e-12
    assert layer.norm_bound(layer.kernel()).item() == pytest.approx(layer.coefficient)


def test_forward_is_the_matrix_exponential_and_logdet_its_trace():
    layer = _layer(2, 3, terms=20)
    h, w = 3, 4
    x = torch.randn(2, 2, h, w, dtype=torch.float64)
    z, logdet = layer(x)
    expm = torch.linalg.matrix_exp(dense_conv_matrix(layer.kernel(), h, w))
    torch.testing.assert_close(z.reshape(2, -1), x.reshape(2, -1) @ expm.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet, torch.logdet(expm).expand(2), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("terms", [2, 4, 6, 13])
def test_round_trip_error_stays_within_the_truncation_bound(terms):
    """The error shrinks with the series length and never exceeds the stated bound."""
    layer = _layer(3, 3, scale=1.0, terms=terms)
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    err = torch.linalg.vector_norm((layer.inverse(layer(x)[0]) - x).flatten(1), dim=1)
    bound = round_trip_bound(layer.coefficient, terms) * torch.linalg.vector_norm(x.flatten(1), dim=1)
    assert (err <= bound + 1e-13).all()
    # ... and the truncated map differs from exp(M) by at most the series bound.
    expm = torch.linalg.matrix_exp(dense_conv_matrix(layer.kernel(), 6, 5))
    gap = torch.linalg.matrix_norm(dense_jacobian(lambda v: layer(v)[0], x[:1]) - expm, ord=2)
    assert gap <= series_bound(layer.coefficient, terms) + 1e-13
    if terms <= 4:
        assert err.max() > 1e-6, "a short series should show its truncation"


def test_gradients_and_parameter_count():
    layer = _layer(2, 3, scale=1.0, terms=4)
    assert density_gradcheck(layer, torch.randn(2, 2, 3, 3, dtype=torch.float64))
    assert sum(p.numel() for p in layer.parameters()) == ConvExp.parameter_count(2, 3)
