"""Self Normalizing Flows: an unconstrained convolution with a learned approximate inverse."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .base import InvertibleLayer, LayerError, LayerInfo, Paper, UnsupportedError

LOGDET_MODES: tuple[str, ...] = ("skip", "dense")

DENSE_LOGDET_MAX_DIM = 4096
"""Largest ``C·H·W`` for which ``logdet="dense"`` builds the Jacobian.

The dense Jacobian has ``(C·H·W)²`` entries (128 MiB in float64 at this limit) and its slogdet
costs ``O((C·H·W)³)`` (seconds on a CPU at this limit), so beyond small test images it would
dominate everything the layer does; the paper computes it only to evaluate trained models.
"""


def dense_conv_matrix(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Matrix ``T`` of the same-padded convolution ``x ↦ conv2d(x, weight)`` on one C×H×W image.

    ``vec(conv(x)) = T vec(x)`` with ``vec`` flattening (C, H, W) in that order. Differentiable.
    """
    c, k = weight.shape[1], weight.shape[-1]
    d = c * height * width
    basis = torch.eye(d, dtype=weight.dtype, device=weight.device).reshape(d, c, height, width)
    return F.conv2d(basis, weight, padding=k // 2).reshape(d, -1).t()


def tap_multiplicity(kernel_size: int, height: int, width: int, dtype: torch.dtype,
                     device: torch.device) -> torch.Tensor:
    """``(k, k)``: how many output pixels of an H×W same-padded convolution read each tap in bounds."""
    offsets = torch.arange(kernel_size, device=device) - kernel_size // 2
    rows = (height - offsets.abs()).clamp(min=0)
    cols = (width - offsets.abs()).clamp(min=0)
    return (rows[:, None] * cols[None, :]).to(dtype)


class SNF(InvertibleLayer):
    r"""A k×k convolution ``z = W * x + b`` (same padding) with a learned approximate inverse ``R``.

    Density direction (``forward``): one convolution. Sampling direction (``inverse``):
    ``x ≈ R * (z − b)``, one convolution with a separate learned kernel ``R``: **approximate**,
    its error is whatever training made it (at initialisation ``R = 2·δ − W``, the first-order
    inverse of ``W = δ + ε``, so the error is ``O(ε²)``). Nothing is sequential.

    ``W`` is unconstrained, so the layer is invertible only generically (a singular ``W`` is a
    measure-zero event that the log-likelihood's log det term pushes away from); nothing makes
    ``R`` the inverse except training with :meth:`reconstruction_loss`.

    **What forward returns as ``logdet``** (``LayerInfo.exact_logdet`` is false):

    - ``logdet="skip"`` (default): zeros. The exact value ``log|det J|`` of a zero-padded
      convolution has no closed form and the layer does not compute it — this is what the
      paper's training forward does, so the forward time is the cost of one convolution.
    - ``logdet="dense"``: the exact ``log|det J|`` from the dense ``(C·H·W)²`` Jacobian, with
      exact autograd through ``slogdet``; refused (``UnsupportedError``) above
      ``C·H·W = DENSE_LOGDET_MAX_DIM``. For evaluating small models and for tests.

    **Gradients.** By default autograd is exact for whatever value forward returns (so
    ``gradcheck`` holds: with ``"skip"`` the log det contributes no gradient). With
    ``self_normalized=True`` the returned ``logdet`` carries the paper's self-normalised
    gradient instead: ``∂ logdet / ∂W`` is replaced by ``∂ tr(R̂ T_W) / ∂W``, i.e. ``T⁻¹`` in
    ``∂ log|det T| = tr(T⁻¹ ∂T)`` replaced by the matrix ``R̂`` of the convolution with ``R``;
    per tap that is ``R[i, o, k−1−a, k−1−b]`` times the number of output pixels that read tap
    ``(a, b)`` in bounds. The value is unchanged, ``R`` receives no gradient from it (``R`` is
    trained by :meth:`reconstruction_loss`), and ``gradcheck`` does not hold by design. The
    published code additionally halves the update of ``W`` and gives ``R`` a mirrored likelihood
    gradient; that training recipe is not reproduced here.

    Parameters: ``C²·k²`` (``W``) + ``C`` (``b``) + ``C²·k²`` (``R``) = ``2·C²·k² + C``.

    Cost: ``2·B·H·W·C²·k²`` FLOPs in each direction (one convolution); a training step adds the
    reconstruction loss (two more convolutions and their backward).

    Arguments:
        channels: C >= 1.
        kernel_size: odd k >= 1 ("same" padding needs an odd kernel).
        init_scale: standard deviation of the initial deviation of ``W`` from the identity kernel.
        logdet: ``"skip"`` or ``"dense"``, see above.
        self_normalized: give ``logdet`` the self-normalised gradient, see above.

    References:
        T. A. Keller, J. W. T. Peters, P. Jaini, E. Hoogeboom, P. Forré, M. Welling. Self
        Normalizing Flows. ICML 2021. https://arxiv.org/abs/2011.07248
    """

    info = LayerInfo(
        name="snf",
        paper=Paper(
            title="Self Normalizing Flows",
            authors="T. A. Keller, J. W. T. Peters, P. Jaini, E. Hoogeboom, P. Forré, M. Welling",
            venue="ICML",
            year=2021,
            url="https://arxiv.org/abs/2011.07248",
        ),
        exact_inverse=False,
        exact_logdet=False,
        sequential="none",
        kernel_sizes="odd",
        dtypes=("float16", "bfloat16", "float32", "float64"),  # convolutions only (logdet="dense" needs 32/64 bits)
        summary="forward = k×k conv (same padding); inverse = conv with a learned approximate inverse kernel",
        options={
            "init_scale": "std of the initial deviation of W from the identity kernel (default 0.01)",
            "logdet": "'skip' (forward returns zeros; default) or 'dense' (exact, small inputs only)",
            "self_normalized": "logdet carries the self-normalised gradient from R (default False)",
        },
    )

    def __init__(self, channels: int, kernel_size: int = 3, input_size=None, init_scale: float = 0.01,
                 logdet: Literal["skip", "dense"] = "skip", self_normalized: bool = False):
        super().__init__(channels, kernel_size, input_size)
        if logdet not in LOGDET_MODES:
            raise LayerError(f"snf: unknown logdet mode {logdet!r}; accepted: {', '.join(map(repr, LOGDET_MODES))}")
        if not isinstance(self_normalized, bool):
            raise LayerError(f"snf: self_normalized must be True or False, got {self_normalized!r}")
        self.logdet_mode = logdet
        self.self_normalized = self_normalized
        c, k = channels, kernel_size
        identity = nn.init.dirac_(torch.empty(c, c, k, k))
        noise = torch.randn(c, c, k, k) * init_scale
        self.weight = nn.Parameter(identity + noise)
        self.bias = nn.Parameter(torch.zeros(c))
        self.inverse_weight = nn.Parameter(identity - noise)

    def _conv(self, t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.conv2d(t, weight, bias, padding=self.kernel_size // 2)

    def exact_logdet(self, height: int, width: int) -> torch.Tensor:
        """``log|det J|`` of the forward map on an H×W image, from the dense Jacobian (differentiable)."""
        dim = self.channels * height * width
        if dim > DENSE_LOGDET_MAX_DIM:
            raise UnsupportedError(
                f"snf: the dense log det needs C·H·W <= {DENSE_LOGDET_MAX_DIM}, got "
                f"{self.channels}·{height}·{width} = {dim}; use logdet='skip' for larger inputs"
            )
        return torch.linalg.slogdet(dense_conv_matrix(self.weight, height, width))[1]

    def self_normalized_logdet_grad(self, height: int, width: int) -> torch.Tensor:
        """The paper's estimate of ``∂ log|det J| / ∂W``: ``∂ tr(R̂ T_W) / ∂W`` (see the class docstring)."""
        r = self.inverse_weight.detach()
        mult = tap_multiplicity(self.kernel_size, height, width, r.dtype, r.device)
        return r.flip(2, 3).transpose(0, 1) * mult

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        height, width = x.shape[2:]
        z = self._conv(x, self.weight, self.bias)
        if self.logdet_mode == "dense":
            value = self.exact_logdet(height, width)
        else:
            value = x.new_zeros(())
        if self.self_normalized:
            surrogate = (self.weight * self.self_normalized_logdet_grad(height, width)).sum()
            value = value.detach() + (surrogate - surrogate.detach())
        return z, value.expand(x.shape[0])

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        return self._conv(z - self.bias[:, None, None], self.inverse_weight)

    def reconstruction_loss(self, x: torch.Tensor) -> torch.Tensor:
        """``‖x − inverse(forward(x))‖²`` per sample, shape ``(B,)``: what trains ``R`` (and ``W``).

        The paper adds ``λ·`` this to the negative log-likelihood.
        """
        self._check_input(x, "x")
        x_hat = self._conv(self._conv(x, self.weight), self.inverse_weight)
        return (x - x_hat).pow(2).flatten(1).sum(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, logdet={self.logdet_mode!r}, self_normalized={self.self_normalized}"

    @staticmethod
    def parameter_count(channels: int, kernel_size: int) -> int:
        return 2 * channels * channels * kernel_size * kernel_size + channels
