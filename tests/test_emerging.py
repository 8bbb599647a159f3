"""Emerging convolutions: 1×1, TL causal m×m, BR causal m×m with m = (k+1)/2."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_jacobian, perturb_

import layers
from layers import UnsupportedError
from layers.emerging import Emerging
from layers.lu import LUMatrix


def _layer(c: int, k: int, scale: float = 0.3) -> Emerging:
    return perturb_(layers.create("emerging", c, kernel_size=k).double(), scale)


@pytest.mark.parametrize("k", [2, 4, 6])
def test_even_kernel_is_declared_unsupported(k):
    with pytest.raises(UnsupportedError, match=rf"emerging: unsupported kernel_size={k}; accepted: odd"):
        layers.create("emerging", 4, kernel_size=k)
    with pytest.raises(UnsupportedError):
        layers.info("emerging").check(4, k, None)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_receptive_field_is_k_by_k(k):
    """Output pixel (h, w) reads exactly the k×k window centred on it (2m − 1 = k)."""
    c, size = 2, 7
    layer = _layer(c, k)
    x = torch.randn(1, c, size, size, dtype=torch.float64)
    jac = dense_jacobian(lambda v: layer(v)[0], x).reshape(c, size, size, c, size, size)
    reads = jac[:, 3, 3].abs().sum(dim=(0, 1)) != 0
    r = k // 2
    expected = torch.zeros(size, size, dtype=torch.bool)
    expected[3 - r : 4 + r, 3 - r : 4 + r] = True
    assert torch.equal(reads, expected)


def test_second_convolution_is_mirrored_in_channels():
    """Centre of the TL conv is lower triangular, the BR conv's (in channel order) upper triangular."""
    layer = _layer(5, 3)
    first, second = layer.causal_weights()
    tl_centre = first[:, :, 1, 1]
    br_centre = second.flip(0, 1)[:, :, 0, 0]  # the kernel the forward applies
    assert torch.equal(torch.triu(tl_centre, 1), torch.zeros_like(tl_centre))
    assert torch.equal(torch.tril(br_centre, -1), torch.zeros_like(br_centre))
    assert torch.all(tl_centre.diagonal() > 0) and torch.all(br_centre.diagonal() > 0)


def test_logdet_formula():
    layer = _layer(4, 3)
    x = torch.randn(3, 4, 2, 5, dtype=torch.float64)
    _, logdet = layer(x)
    expected = 10 * (torch.linalg.slogdet(layer.mix.matrix())[1] + layer.log_diag.sum())
    torch.testing.assert_close(logdet, expected.expand(3))


@pytest.mark.parametrize(("c", "k"), [(1, 1), (3, 3), (12, 5)])
def test_parameter_count(c, k):
    layer = layers.create("emerging", c, kernel_size=k)
    m = (k + 1) // 2
    assert sum(p.numel() for p in layer.parameters()) == Emerging.parameter_count(c, k) == 2 * m * m * c * c + c


def test_reuses_the_shared_lu_matrix():
    assert isinstance(layers.create("emerging", 3).mix, LUMatrix)
