"""MintNet: masks, the analytic log det with the sign tie, and the Newton inverse's diagnostics."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_jacobian, density_gradcheck, perturb_

import layers
from layers import LayerError
from layers.mintnet import MintNet, block_mask


def _layer(c=3, k=3, size=(4, 5), scale=0.05, **options) -> MintNet:
    return perturb_(layers.create("mintnet", c, kernel_size=k, input_size=size, **options).double(), scale)


def test_declared_capabilities_and_options():
    info = layers.info("mintnet")
    assert not info.exact_inverse and info.exact_logdet and info.triangular and info.needs_input_size
    with pytest.raises(LayerError, match="input_size is required"):
        layers.create("mintnet", 3)
    for bad, match in (({"type": "C"}, "type must be 'A' or 'B'"), ({"tolerance": 0}, "tolerance must be"),
                       ({"iterations": 0}, "iterations must be"), ({"latent": 0}, "latent must be")):
        with pytest.raises(LayerError, match=match):
            layers.create("mintnet", 3, input_size=4, **bad)


def test_block_masks():
    a, b = block_mask(2, 3, "A"), block_mask(2, 3, "B")
    assert torch.equal(a[0, 0], torch.tensor([[1.0, 1, 1], [1, 1, 0], [0, 0, 0]]))
    assert torch.equal(a[1, 0], torch.ones(3, 3)) and torch.equal(a[0, 1], torch.zeros(3, 3))
    assert torch.equal(b, a.flip(0, 1, 2, 3))  # B is A with channels and space reversed


@pytest.mark.parametrize("kind", ["A", "B"])
def test_logdet_is_the_jacobian_diagonal_and_positive_with_the_sign_tie(kind):
    layer = _layer(3, 3, scale=0.5, type=kind, latent=3)  # large weights of every sign
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    z, logdet = layer(x)
    _, diag = layer._evaluate(x)
    for b in range(2):
        jac = dense_jacobian(lambda v: layer(v)[0], x[b:b + 1])
        other = torch.triu(jac, 1) if kind == "A" else torch.tril(jac, -1)
        assert torch.count_nonzero(other) == 0
        torch.testing.assert_close(torch.diagonal(jac), diag[b].flatten(), rtol=1e-10, atol=1e-12)
        assert (torch.diagonal(jac) > 0).all()
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(logdet[0], logdet[1]), "the log det should depend on the data"


def test_without_the_sign_tie_the_diagonal_could_vanish():
    """The tie is what keeps every path term >= 0: flipping one W2 centre sign by hand has no effect."""
    layer = _layer(2, 3, scale=0.5, latent=2)
    x = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    before = layer(x)[0]
    with torch.no_grad():
        layer.weight2[0, 0, 1, 1].neg_()  # a (c <- c) centre tap of W2
    torch.testing.assert_close(layer(x)[0], before)


def test_fixed_iterations_report_their_count_and_residual():
    layer = _layer(3, 3, iterations=7)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = layer.inverse(z)
    d = layer.inverse_diagnostics()
    assert d["iterations"] == 7 and d["converged"] is None
    assert d["residual"] == pytest.approx((layer(x)[0] - z).abs().max().item(), rel=1e-12, abs=1e-300)


def test_tolerance_mode_stops_early_and_meets_it():
    layer = _layer(3, 3, tolerance=1e-8, iterations=500)
    z = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    x = layer.inverse(z)
    d = layer.inverse_diagnostics()
    assert d["converged"] and 1 <= d["iterations"] < 500
    assert (layer(x)[0] - z).abs().max().item() <= 1e-8
    capped = _layer(3, 3, tolerance=1e-14, iterations=2)
    capped.inverse(z)
    assert capped.inverse_diagnostics()["iterations"] == 2 and capped.inverse_diagnostics()["converged"] is False


def test_gradients_and_parameter_count():
    layer = _layer(2, 3, size=(3, 3), latent=2)
    assert density_gradcheck(layer, torch.randn(2, 2, 3, 3, dtype=torch.float64))
    assert sum(p.numel() for p in layer.parameters()) == MintNet.parameter_count(2, 3, (3, 3), latent=2)
