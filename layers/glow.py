"""Glow's invertible 1×1 convolution, LU-parameterised."""

from __future__ import annotations

import torch
from torch import nn

from .base import InvertibleLayer, LayerInfo, Paper


class Glow1x1(InvertibleLayer):
    r"""Invertible 1×1 convolution ``z = W x`` with ``W = P·L·(U + diag(sign·exp(log_s)))``.

    ``P`` is a fixed permutation, ``L`` unit lower triangular, ``U`` strictly upper triangular;
    ``sign`` is fixed and ``log_s`` trainable, so ``W`` is invertible for any parameter values.
    Density direction (``forward``): one 1×1 convolution, ``log|det| = H·W·Σ log_s``. Sampling
    direction (``inverse``): a 1×1 convolution with ``W⁻¹`` (two triangular solves of size C,
    once per call). Nothing is sequential over pixels. The kernel size does not apply.

    Parameters: ``C²`` (``C(C−1)/2`` in ``L``, ``C(C−1)/2`` in ``U``, ``C`` in ``log_s``).

    Cost: ``2·B·H·W·C²`` FLOPs in each direction.

    Arguments:
        channels: C >= 1.

    References:
        D. P. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
        NeurIPS 2018. https://arxiv.org/abs/1807.03039
    """

    info = LayerInfo(
        name="glow-1x1",
        paper=Paper(
            title="Glow: Generative Flow with Invertible 1x1 Convolutions",
            authors="D. P. Kingma, P. Dhariwal",
            venue="NeurIPS",
            year=2018,
            url="https://arxiv.org/abs/1807.03039",
        ),
        exact_inverse=True,
        sequential="none",
        kernel_sizes="n/a",
        summary="forward = 1x1 conv W = P L (U + diag(s)); inverse = 1x1 conv with W^-1",
    )

    def __init__(self, channels: int, kernel_size: int | None = None, input_size=None):
        super().__init__(channels, kernel_size, input_size)
        c = channels
        # Start from a random rotation, as Glow does, so the layer mixes channels from step one.
        q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
        p, lower, upper = torch.linalg.lu(q)
        s = upper.diagonal()
        self.register_buffer("perm", p.float())
        self.register_buffer("sign_s", torch.sign(s).float())
        self.lower = nn.Parameter(lower[self._strict_lower()].float())
        self.upper = nn.Parameter(upper[self._strict_upper()].float())
        self.log_s = nn.Parameter(s.abs().log().float())

    def _strict_lower(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tril_indices(self.channels, self.channels, offset=-1))

    def _strict_upper(self) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.triu_indices(self.channels, self.channels, offset=1))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.channels
        lower = torch.eye(c, dtype=self.log_s.dtype, device=self.log_s.device)
        lower = lower.index_put(self._on_device(self._strict_lower()), self.lower)
        upper = torch.diag(self.sign_s * self.log_s.exp())
        upper = upper.index_put(self._on_device(self._strict_upper()), self.upper)
        return lower, upper

    def _on_device(self, idx: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(i.to(self.log_s.device) for i in idx)

    def weight(self) -> torch.Tensor:
        lower, upper = self._factors()
        return self.perm @ lower @ upper

    def weight_inverse(self) -> torch.Tensor:
        lower, upper = self._factors()
        eye = torch.eye(self.channels, dtype=lower.dtype, device=lower.device)
        # W⁻¹ = U⁻¹ L⁻¹ Pᵀ, by triangular solves rather than a general inverse.
        l_inv = torch.linalg.solve_triangular(lower, eye, upper=False, unitriangular=True)
        return torch.linalg.solve_triangular(upper, l_inv, upper=True) @ self.perm.t()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = torch.einsum("oc,bchw->bohw", self.weight(), x)
        logdet = (x.shape[2] * x.shape[3]) * self.log_s.sum()
        return z, logdet.expand(x.shape[0])

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        return torch.einsum("oc,bchw->bohw", self.weight_inverse(), z)

    @staticmethod
    def parameter_count(channels: int, kernel_size: int | None = None) -> int:
        return channels * channels
