"""Glow's invertible 1×1 convolution, LU-parameterised."""

from __future__ import annotations

import torch

from .base import InvertibleLayer, LayerInfo, Paper
from .lu import LUMatrix, apply_channel_matrix


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
        self.lu = LUMatrix(channels)

    def weight(self) -> torch.Tensor:
        return self.lu.matrix()

    def weight_inverse(self) -> torch.Tensor:
        return self.lu.inverse_matrix()

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = apply_channel_matrix(self.weight(), x)
        logdet = (x.shape[2] * x.shape[3]) * self.lu.log_abs_det()
        return z, logdet.expand(x.shape[0])

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        return apply_channel_matrix(self.weight_inverse(), z)

    @staticmethod
    def parameter_count(channels: int, kernel_size: int | None = None) -> int:
        return LUMatrix.parameter_count(channels)
