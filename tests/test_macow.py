"""MaCow: each order's structure, the data-dependent log det, the row-by-row exact inverse."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_jacobian, density_gradcheck, perturb_

import layers
from layers import LayerError, UnsupportedError
from layers.macow import MaCow, conditioner_kernel, hidden_width


def _layer(c=3, k=3, scale=0.2, **options) -> MaCow:
    return perturb_(layers.create("macow", c, kernel_size=k, **options).double(), scale)


def test_declared_capabilities_and_published_sizes():
    info = layers.info("macow")
    assert info.exact_inverse and info.exact_logdet and info.triangular and info.sequential == "inverse"
    assert conditioner_kernel(3) == (2, 3) and conditioner_kernel(1) == (1, 1)
    assert [hidden_width(c) for c in (3, 96, 97, 300)] == [12, 384, 194, 512]
    with pytest.raises(UnsupportedError, match="macow: unsupported kernel_size=2"):
        layers.create("macow", 3, kernel_size=2)
    with pytest.raises(LayerError, match="order must be a non-empty string of A, B, C, D"):
        layers.create("macow", 3, order="AE")


def test_starts_as_the_published_constant_contraction():
    """The 1×1 is zero-initialised: μ = 0 and σ = sigmoid(2) everywhere, log det C·H·W·log σ(2)."""
    layer = layers.create("macow", 2, kernel_size=3).double()
    x = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    z, logdet = layer(x)
    s = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(z, s * x)
    torch.testing.assert_close(logdet, torch.full((2,), 40 * torch.log(s).item(), dtype=torch.float64))


@pytest.mark.parametrize("order", ["A", "B", "C", "D"])
def test_each_order_reads_only_earlier_rows_or_columns(order):
    """Output pixel p depends on input pixel q only if q is solved before p in the order (or q = p,
    channel to itself): checked on the dense Jacobian, with the log det per sample."""
    c, h, w = 2, 4, 3
    layer = _layer(c, 3, order=order)
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    _, logdet = layer(x)
    rank = {"A": lambda i, j: i, "B": lambda i, j: h - 1 - i, "C": lambda i, j: j, "D": lambda i, j: w - 1 - j}[order]
    for b in range(2):
        jac = dense_jacobian(lambda v: layer(v)[0], x[b:b + 1]).reshape(c, h, w, c, h, w)
        for i in range(h):
            for j in range(w):
                for i2 in range(h):
                    for j2 in range(w):
                        block = jac[:, i, j, :, i2, j2]
                        if rank(i2, j2) > rank(i, j) or (rank(i2, j2) == rank(i, j) and (i, j) != (i2, j2)):
                            assert torch.count_nonzero(block) == 0
                        elif (i, j) == (i2, j2):
                            assert torch.count_nonzero(block - torch.diag(torch.diagonal(block))) == 0
        full = jac.reshape(c * h * w, c * h * w)
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(full)[1], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(logdet[0], logdet[1]), "the log det should depend on the data"


def test_unit_of_four_orders_round_trips_and_logdet_is_exact():
    layer = _layer(3, 3, order="ABCD")
    assert layer.jacobian_order(4, 5) is None  # the composition is dense
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    z, logdet = layer(x)
    torch.testing.assert_close(layer.inverse(z), x, rtol=1e-12, atol=1e-12)
    jac = dense_jacobian(lambda v: layer(v)[0], x[:1])
    torch.testing.assert_close(logdet[0], torch.linalg.slogdet(jac)[1], rtol=1e-10, atol=1e-10)


def test_inverse_makes_one_conditioner_call_per_row():
    layer = _layer(2, 3, order="C")
    calls = []
    layer.flows[0].conv.register_forward_hook(lambda *a: calls.append(1))
    layer.inverse(torch.randn(1, 2, 3, 7, dtype=torch.float64))
    assert len(calls) == 7  # order C walks the 7 columns


@pytest.mark.parametrize("k", [1, 5])
def test_gradients_and_parameter_count(k):
    layer = _layer(2, k, order="BD")
    assert density_gradcheck(layer, torch.randn(2, 2, 3, 4, dtype=torch.float64))
    assert sum(p.numel() for p in layer.parameters()) == MaCow.parameter_count(2, k, orders=2)
