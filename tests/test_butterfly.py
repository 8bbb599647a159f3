"""Butterfly: channel butterfly factors with closed-form 2×2 inverses, for any C."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_exact_layer, perturb_

import layers
from layers import LayerError
from layers.butterfly import Butterfly, butterfly_plan


def _layer(c: int, scale: float = 0.3, **options) -> Butterfly:
    return perturb_(layers.create("butterfly", c, **options).double(), scale)


@pytest.mark.parametrize("mode", ["matrix", "factors"])
@pytest.mark.parametrize("c", [2, 5, 6, 7])
def test_channel_counts_that_are_not_powers_of_two(c, mode):
    assert_exact_layer(_layer(c, mode=mode), torch.randn(2, c, 2, 3, dtype=torch.float64))


def test_modes_compute_the_same_map():
    matrix = _layer(11)
    factors = layers.create("butterfly", 11, mode="factors").double()
    factors.load_state_dict(matrix.state_dict())
    x = torch.randn(2, 11, 3, 4, dtype=torch.float64)
    (zm, lm), (zf, lf) = matrix(x), factors(x)
    torch.testing.assert_close(zf, zm)
    torch.testing.assert_close(lf, lm)
    torch.testing.assert_close(factors.inverse(zm), matrix.inverse(zm))


def test_plan_pairs_at_stride_two_to_the_level():
    first, second, alone = butterfly_plan(6, 3)[1]
    assert list(zip(first, second)) == [(0, 2), (1, 3)] and alone == [4, 5]
    for c in (1, 3, 8, 12):
        for level, (first, second, alone) in enumerate(butterfly_plan(c, 3)):
            assert all(j - i == 2**level for i, j in zip(first, second))
            assert sorted(first + second + alone) == list(range(c))


@pytest.mark.parametrize("c", [2, 4, 8, 16])
def test_power_of_two_mixes_every_channel_with_every_channel(c):
    weight = _layer(c).weight()
    assert torch.all(weight != 0)


def test_fewer_levels_give_independent_blocks():
    weight = _layer(8, levels=2).weight()
    mask = torch.block_diag(*[torch.ones(4, 4)] * 2).bool()
    assert torch.all(weight[~mask] == 0) and torch.all(weight[mask] != 0)


def test_blocks_are_invertible_for_any_parameter_values():
    layer = _layer(6, scale=4.0)
    a, b, c, d, det = layer.block_entries()
    torch.testing.assert_close(a * d - b * c, det)
    assert torch.all(det != 0)
    weight = layer.weight()
    error = (weight @ layer.weight_inverse() - torch.eye(6, dtype=torch.float64)).abs().max()
    assert error < 1e-14 * torch.linalg.cond(weight)  # exact up to the conditioning of W


def test_logdet_is_sum_of_block_log_determinants():
    layer = _layer(5)
    a, b, c, d, _ = layer.block_entries()
    _, logdet = layer(torch.randn(2, 5, 3, 2, dtype=torch.float64))
    expected = 6 * ((a * d - b * c).abs().log().sum() + layer.log_scale.sum())
    torch.testing.assert_close(logdet, expected.expand(2))


def test_a_channel_swap_is_representable():
    layer = layers.create("butterfly", 2).double()
    with torch.no_grad():
        layer.blocks.copy_(torch.tensor([[-math.pi / 2, 0.0, 0.0, 0.0]]))
        layer.block_sign.fill_(-1)
    torch.testing.assert_close(layer.weight(), torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))


@pytest.mark.parametrize(("c", "levels"), [(1, None), (2, None), (3, None), (8, None), (12, None), (12, 2), (16, 1)])
def test_parameter_count(c, levels):
    layer = layers.create("butterfly", c, levels=levels)
    assert sum(p.numel() for p in layer.parameters()) == Butterfly.parameter_count(c, levels=levels)
    if c & (c - 1) == 0 and c > 1 and levels is None:
        assert Butterfly.parameter_count(c) == 2 * c * int(math.log2(c))


def test_bad_options_name_the_accepted_values():
    with pytest.raises(LayerError, match=r"levels must be an integer in 1 … 3 for C=8, got 4"):
        layers.create("butterfly", 8, levels=4)
    with pytest.raises(LayerError, match=r"levels must be an integer in 1 … 1 for C=1, got 0"):
        layers.create("butterfly", 1, levels=0)
    with pytest.raises(LayerError, match="unknown mode 'dense'; accepted: 'matrix', 'factors'"):
        layers.create("butterfly", 8, mode="dense")
