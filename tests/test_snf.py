"""SNF: a same-padded convolution with a learned approximate inverse and a self-normalised gradient."""

from __future__ import annotations

import pytest
import torch
from helpers import dense_jacobian, density_gradcheck, perturb_

import layers
from layers import LayerError, UnsupportedError
from layers.snf import DENSE_LOGDET_MAX_DIM, SNF, dense_conv_matrix


def _layer(c: int, k: int, scale: float = 0.1, **options) -> SNF:
    return perturb_(layers.create("snf", c, kernel_size=k, **options).double(), scale)


def test_declares_what_is_approximate():
    info = layers.info("snf")
    assert not info.exact_inverse and not info.exact_logdet and info.kernel_sizes == "odd"
    with pytest.raises(UnsupportedError, match="snf: unsupported kernel_size=2; accepted: odd"):
        layers.create("snf", 3, kernel_size=2)


def test_default_forward_returns_zero_logdet_and_one_convolution():
    layer = _layer(3, 3)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    z, logdet = layer(x)
    assert torch.equal(logdet, torch.zeros(2, dtype=torch.float64))
    expected = torch.nn.functional.conv2d(x, layer.weight, layer.bias, padding=1)
    torch.testing.assert_close(z, expected)


@pytest.mark.parametrize(("c", "k", "size"), [(1, 1, (3, 3)), (2, 3, (3, 4)), (3, 5, (4, 3))])
def test_dense_logdet_is_exact_and_gradchecks(c, k, size):
    layer = _layer(c, k, logdet="dense")
    x = torch.randn(2, c, *size, dtype=torch.float64)
    _, logdet = layer(x)
    jac = dense_jacobian(lambda v: layer(v)[0], x[:1])
    torch.testing.assert_close(logdet, torch.linalg.slogdet(jac)[1].expand(2), rtol=1e-10, atol=1e-10)
    assert density_gradcheck(layer, x)


def test_dense_logdet_refuses_large_inputs():
    layer = layers.create("snf", 4, kernel_size=3, logdet="dense")
    side = int((DENSE_LOGDET_MAX_DIM / 4) ** 0.5) + 1
    with pytest.raises(UnsupportedError, match=rf"C·H·W <= {DENSE_LOGDET_MAX_DIM}.*logdet='skip'"):
        layer(torch.randn(1, 4, side, side))


@pytest.mark.parametrize(("k", "size"), [(1, (3, 4)), (3, (4, 5)), (5, (3, 4))])
def test_self_normalized_gradient_is_trace_of_r_times_t(k, size):
    """∂logdet/∂W becomes ∂ tr(R̂ T_W)/∂W: T⁻¹ in d log|det T| = tr(T⁻¹ dT) replaced by R's matrix."""
    c = 3
    layer = _layer(c, k, self_normalized=True)
    x = torch.randn(2, c, *size, dtype=torch.float64)
    _, logdet = layer(x)
    assert torch.equal(logdet.detach(), torch.zeros(2, dtype=torch.float64))  # the value is unchanged
    logdet.sum().backward()
    assert layer.inverse_weight.grad is None  # R is trained by the reconstruction loss, not by this

    w = layer.weight.detach().clone().requires_grad_()
    r_hat = dense_conv_matrix(layer.inverse_weight.detach(), *size)
    torch.trace(r_hat @ dense_conv_matrix(w, *size)).backward()
    torch.testing.assert_close(layer.weight.grad, 2 * w.grad)  # two samples


def test_self_normalized_gradient_is_exact_when_r_is_the_exact_inverse():
    """For a 1×1 convolution the exact inverse is a 1×1 convolution, so the estimate is exact."""
    c, size = 4, (3, 5)
    exact = _layer(c, 1, scale=0.3, logdet="dense")
    estimate = layers.create("snf", c, kernel_size=1, self_normalized=True, logdet="dense").double()
    estimate.load_state_dict(exact.state_dict())
    with torch.no_grad():
        estimate.inverse_weight[:, :, 0, 0] = torch.linalg.inv(estimate.weight[:, :, 0, 0])
    x = torch.randn(1, c, *size, dtype=torch.float64)
    for layer in (exact, estimate):
        layer(x)[1].sum().backward()
    torch.testing.assert_close(estimate.weight.grad, exact.weight.grad)
    torch.testing.assert_close(estimate(x)[1], exact(x)[1])  # dense value kept under the estimate


def test_reconstruction_loss_trains_the_approximate_inverse():
    layer = _layer(3, 3, scale=0.2)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer.reconstruction_loss(x),
                                   (x - layer.inverse(layer(x)[0])).pow(2).flatten(1).sum(1))
        before = (layer.inverse(layer(x)[0]) - x).abs().max().item()
    opt = torch.optim.Adam([layer.inverse_weight], lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        layer.reconstruction_loss(x).mean().backward()
        opt.step()
    with torch.no_grad():
        after = (layer.inverse(layer(x)[0]) - x).abs().max().item()
    assert after < before / 3, (before, after)


def test_initial_inverse_is_first_order_accurate():
    """R = 2δ − W inverts W = δ + ε up to O(ε²): far better than taking z itself for x."""
    layer = layers.create("snf", 8, kernel_size=3).double()
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        z = layer(x)[0]
        err = (layer.inverse(z) - x).abs().max().item()
        naive = (z - x).abs().max().item()
    assert err < 0.2 * naive, (err, naive)


@pytest.mark.parametrize(("c", "k"), [(1, 1), (3, 3), (12, 5)])
def test_parameter_count(c, k):
    layer = layers.create("snf", c, kernel_size=k)
    assert sum(p.numel() for p in layer.parameters()) == SNF.parameter_count(c, k) == 2 * c * c * k * k + c


def test_bad_options_name_the_accepted_values():
    with pytest.raises(LayerError, match="unknown logdet mode 'exact'; accepted: 'skip', 'dense'"):
        layers.create("snf", 3, logdet="exact")
    with pytest.raises(LayerError, match="self_normalized must be True or False"):
        layers.create("snf", 3, self_normalized="yes")
