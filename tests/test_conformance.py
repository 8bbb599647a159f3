"""The conformance suite: every registered layer, automatically (a new layer gets it for free).

For each layer, kernel size and channel count that the layer supports, after perturbing *all*
parameters randomly: inverse(forward(x)) ≈ x, log det equals the dense slogdet of the Jacobian
(float64), gradcheck of the density direction with respect to input and parameters, determinism
and no mutation of parameters, batch 1 and non-square images. Combinations a layer declares
unsupported must be refused with ``UnsupportedError``.

What a layer declares decides which checks apply, through the parameter lists (never by a skip
inside a test): the tight round trips and the inverse-Jacobian check run for ``exact_inverse``
layers; an approximate inverse gets its reconstruction error reported (printed and recorded as a
test property) and asserted finite, and asserted within ``inverse_tolerance`` where the layer
declares one (an iteration or a truncated series). The log det is compared with the dense
Jacobian for ``exact_logdet`` layers, per sample (it may depend on the data). Layers that declare
``triangular`` have the structure of their dense Jacobian checked in the order they give.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import dense_jacobian
from torch.func import functional_call

import layers
from layers import LayerError, UnsupportedError

KERNEL_SIZES = [1, 2, 3, 5]
# 1 and 3 catch implementations that silently process channels in groups of four.
CHANNELS = [1, 3, 4, 8, 12]
PERTURBATION = 0.05  # std of the random offset added to every parameter
SHAPES = [(1, 4, 7), (3, 6, 5)]  # (B, H, W): batch 1 and non-square in both orientations


def _cases():
    supported, unsupported = [], []
    for name in layers.available():
        info = layers.info(name)
        kernel_sizes = KERNEL_SIZES if info.kernel_size_applies else [None]
        for k in kernel_sizes + ([4] if info.kernel_size_applies else []):
            for c in CHANNELS + [6]:
                case = pytest.param(name, c, k, id=f"{name}-C{c}-k{k}")
                try:
                    # With an input size, so that layers built for a fixed size are not refused for lacking one.
                    info.check(c, k, (4, 4))
                except UnsupportedError:
                    unsupported.append(case)
                else:
                    if c in CHANNELS and k != 4:
                        supported.append(case)
    return supported, unsupported


SUPPORTED, UNSUPPORTED = _cases()


def _where(predicate) -> list:
    return [case for case in SUPPORTED if predicate(layers.info(case.values[0]))]


EXACT_INVERSE = _where(lambda info: info.exact_inverse)
APPROXIMATE_INVERSE = _where(lambda info: not info.exact_inverse)
EXACT_LOGDET = _where(lambda info: info.exact_logdet)
BOUNDED_INVERSE = _where(lambda info: not info.exact_inverse and info.inverse_tolerance is not None)
TRIANGULAR = _where(lambda info: info.triangular)


def build(name: str, channels: int, k: int | None, height: int, width: int, dtype=torch.float64, seed: int = 0):
    """The layer, in ``dtype``, with every parameter randomly perturbed away from its init."""
    torch.manual_seed(seed)
    layer = layers.create(name, channels, kernel_size=k, input_size=(height, width)).to(dtype)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * PERTURBATION)
    return layer


def _round_trips(layer, x):
    """Both round trips without grad: ``z, logdet = forward(x)``, ``inverse(z)`` and
    ``forward(inverse(z))``."""
    with torch.no_grad():
        z, logdet = layer(x)
        x_back = layer.inverse(z)
        z_back, _ = layer(layer.inverse(z))
    return z, logdet, x_back, z_back


@pytest.mark.parametrize(("name", "channels", "k"), EXACT_INVERSE)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}x{}x{}".format(*s))
def test_inverse_of_forward_is_identity(name, channels, k, shape):
    b, h, w = shape
    layer = build(name, channels, k, h, w)
    x = torch.randn(b, channels, h, w, dtype=torch.float64)
    z, logdet, x_back, z_back = _round_trips(layer, x)
    assert z.shape == x.shape and logdet.shape == (b,)
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all()
    torch.testing.assert_close(x_back, x, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(z_back, z, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("name", "channels", "k"), APPROXIMATE_INVERSE)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}x{}x{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_approximate_inverse_error_is_reported(name, channels, k, shape, dtype, record_property):
    """An approximate inverse is not asserted to be tight: its error is reported, and must be finite."""
    b, h, w = shape
    layer = build(name, channels, k, h, w, dtype=dtype)
    x = torch.randn(b, channels, h, w, dtype=dtype)
    with torch.no_grad():
        z, logdet = layer(x)
        x_back = layer.inverse(z)
    assert z.shape == x.shape and logdet.shape == (b,) and x_back.shape == x.shape
    assert torch.isfinite(z).all() and torch.isfinite(logdet).all() and torch.isfinite(x_back).all()
    err = (x_back - x).abs().max().item()
    record_property("max_abs_reconstruction_error", err)
    print(f"{name} C={channels} k={k} {dtype}: approximate inverse, max |x - inverse(forward(x))| = {err:.3g}")


@pytest.mark.parametrize(("name", "channels", "k"), BOUNDED_INVERSE)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}x{}x{}".format(*s))
def test_approximate_inverse_within_declared_tolerance(name, channels, k, shape):
    """An approximate inverse that promises a bound (``inverse_tolerance``) keeps it in float64,
    in both directions: inverse(forward(x)) ≈ x and forward(inverse(z)) ≈ z."""
    b, h, w = shape
    tol = layers.info(name).inverse_tolerance
    layer = build(name, channels, k, h, w)
    x = torch.randn(b, channels, h, w, dtype=torch.float64)
    z, _, x_back, z_again = _round_trips(layer, x)
    assert (x_back - x).abs().max().item() <= tol
    assert (z_again - z).abs().max().item() <= tol


@pytest.mark.parametrize(("name", "channels", "k"), TRIANGULAR)
def test_jacobian_is_triangular_in_declared_order(name, channels, k):
    """The dense Jacobian, permuted into the layer's order, is triangular (exact zeros on the
    other side), and its diagonal alone gives the log det."""
    h, w = 3, 4
    layer = build(name, channels, k, h, w)
    declared = layer.jacobian_order(h, w)
    assert declared is not None, f"{name} declares a triangular Jacobian but gives no order"
    order, kind = declared
    assert kind in ("lower", "upper")
    assert sorted(order.tolist()) == list(range(channels * h * w)), "the order is not a permutation"
    x = torch.randn(1, channels, h, w, dtype=torch.float64)
    jac = dense_jacobian(lambda v: layer(v)[0], x)[order][:, order]
    other_side = torch.triu(jac, 1) if kind == "lower" else torch.tril(jac, -1)
    assert torch.count_nonzero(other_side) == 0
    with torch.no_grad():
        _, logdet = layer(x)
    if layers.info(name).exact_logdet:
        torch.testing.assert_close(logdet[0], torch.diagonal(jac).abs().log().sum(), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(("name", "channels", "k"), EXACT_INVERSE)
def test_float32_round_trip(name, channels, k):
    layer = build(name, channels, k, 6, 5, dtype=torch.float32)
    x = torch.randn(2, channels, 6, 5)
    with torch.no_grad():
        x_back = layer.inverse(layer(x)[0])
    torch.testing.assert_close(x_back, x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("name", "channels", "k"), EXACT_LOGDET)
def test_logdet_matches_dense_jacobian(name, channels, k):
    h, w = 4, 5
    layer = build(name, channels, k, h, w)
    x = torch.randn(2, channels, h, w, dtype=torch.float64)
    with torch.no_grad():
        _, logdet = layer(x)
    for i in range(x.shape[0]):
        jac = dense_jacobian(lambda v: layer(v)[0], x[i : i + 1])
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(logdet[i], logabsdet, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(("name", "channels", "k"), EXACT_INVERSE)
def test_inverse_jacobian_is_inverse_of_forward_jacobian(name, channels, k):
    """The sampling direction's Jacobian times the density direction's is the identity."""
    h, w = 3, 4
    layer = build(name, channels, k, h, w)
    x = torch.randn(1, channels, h, w, dtype=torch.float64)
    with torch.no_grad():
        z, _ = layer(x)
    jf = dense_jacobian(lambda v: layer(v)[0], x)
    ji = dense_jacobian(layer.inverse, z)
    torch.testing.assert_close(ji @ jf, torch.eye(jf.shape[0], dtype=torch.float64), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize(("name", "channels", "k"), SUPPORTED)
def test_gradcheck_density_direction(name, channels, k):
    """Gradients of (z, logdet) w.r.t. input and every parameter, against finite differences."""
    h, w = 3, 4
    layer = build(name, channels, k, h, w)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = torch.randn(2, channels, h, w, dtype=torch.float64, requires_grad=True)

    def density(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    n_inputs = x.numel() + sum(p.numel() for p in params)
    # Full Jacobian comparison for small problems; random-projection (fast) mode above that.
    assert torch.autograd.gradcheck(density, (x, *params), fast_mode=n_inputs > 600)


@pytest.mark.parametrize(("name", "channels", "k"), SUPPORTED)
def test_deterministic_and_does_not_mutate(name, channels, k):
    layer = build(name, channels, k, 5, 6)
    state = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, channels, 5, 6, dtype=torch.float64)
    z1, ld1 = layer(x)
    z2, ld2 = layer(x)
    assert torch.equal(z1, z2) and torch.equal(ld1, ld2)
    x1 = layer.inverse(z1.detach())
    x2 = layer.inverse(z1.detach())
    assert torch.equal(x1, x2)
    loss = (z1**2).sum() + ld1.sum()
    if not layers.info(name).exact_inverse:
        # An approximate inverse has parameters of its own, trained by the reconstruction error.
        loss = loss + ((layer.inverse(z1) - x) ** 2).sum()
    loss.backward()
    for key, value in layer.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed by a forward/inverse/backward call"
    assert all(p.grad is not None for p in layer.parameters()), "a parameter gets no gradient"


@pytest.mark.parametrize(("name", "channels", "k"), SUPPORTED)
def test_batch_elements_are_independent(name, channels, k):
    layer = build(name, channels, k, 5, 4)
    x = torch.randn(3, channels, 5, 4, dtype=torch.float64)
    with torch.no_grad():
        z, logdet = layer(x)
        z1, logdet1 = layer(x[1:2])
    torch.testing.assert_close(z[1:2], z1, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(logdet[1:2], logdet1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("name", "channels", "k"), UNSUPPORTED)
def test_declared_unsupported_is_refused(name, channels, k):
    with pytest.raises(UnsupportedError, match=name):
        layers.create(name, channels, kernel_size=k, input_size=(4, 4))


# --- bad input, derived from each layer's declared capabilities --------------------------------


def _smallest_supported(name):
    info = layers.info(name)
    c = max(info.min_channels, info.channel_multiple)
    k = (3 if info.kernel_sizes in ("any", "odd") else None)
    return c, k


@pytest.mark.parametrize("name", layers.available())
def test_bad_input_gives_clear_errors(name):
    info = layers.info(name)
    c, k = _smallest_supported(name)
    layer = layers.create(name, c, kernel_size=k, input_size=(4, 4))
    x = torch.randn(2, c, 4, 4)
    with pytest.raises(LayerError, match=r"4-D tensor"):
        layer(x[0])
    with pytest.raises(LayerError, match=rf"{c + info.channel_multiple} channels but the layer was built for C={c}"):
        layer(torch.randn(2, c + info.channel_multiple, 4, 4))
    with pytest.raises(LayerError, match=r"4-D tensor"):
        layer.inverse(x[0])
    with pytest.raises(LayerError, match=r"floating-point"):
        layer(torch.ones(2, c, 4, 4, dtype=torch.int64))
    with pytest.raises(LayerError, match=r"float64 .* parameters are float32"):
        layer(x.double())
    with pytest.raises(LayerError, match=r"channels must be a positive integer"):
        layers.create(name, 0, kernel_size=k, input_size=4)
    with pytest.raises(LayerError, match="unknown option"):
        layers.create(name, c, kernel_size=k, input_size=4, no_such_option=1)
    if info.kernel_size_applies:
        for bad in (0, -1, 2.5):
            with pytest.raises(LayerError, match=r"kernel_size must be a positive integer"):
                layers.create(name, c, kernel_size=bad, input_size=4)
    if info.channel_multiple > 1:
        with pytest.raises(UnsupportedError, match=rf"C % {info.channel_multiple} == 0"):
            layers.create(name, info.channel_multiple + 2, kernel_size=k, input_size=4)
