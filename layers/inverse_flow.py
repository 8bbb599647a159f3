"""Inverse-Flow: the density direction is the inverse of a causal convolution."""

from __future__ import annotations

import torch
from torch import nn

from .base import InvertibleLayer, LayerInfo, Paper
from .causal import assemble_weight, causal_conv2d, solve_masked


class InverseFlow(InvertibleLayer):
    r"""Inverse of a TL-causal k×k convolution with a unit lower-triangular centre.

    Density direction (``forward``): ``z = T⁻¹ x`` by the wavefront solve (sequential: H+W−1
    dependent steps). Sampling direction (``inverse``): ``x = T z``, one causal convolution.
    ``T`` mixes all C channels. ``log|det| = 0`` (volume preserving).

    Parameters: ``(k²−1)·C²`` off-centre taps plus ``C(C−1)/2`` strictly-lower centre entries
    (the diagonal is fixed to one and the upper triangle is not stored).

    Cost: forward ``2·B·H·W·C²·k²`` FLOPs in H+W−1 dependent steps; inverse the same FLOPs as
    one convolution; a training step is two solves and one weight-gradient convolution.

    Arguments:
        channels: C >= 1.
        kernel_size: k >= 1.
        init_scale: standard deviation of the initial off-centre and strictly-lower entries.

    References:
        S. Nagar, G. Varma. Inverse-Flow: Parallel Backpropagation for Inverse of a Convolution
        with Application to Normalizing Flows. AISTATS 2025. https://arxiv.org/abs/2410.14634
    """

    info = LayerInfo(
        name="inverse-flow",
        paper=Paper(
            title="Parallel Backpropagation for Inverse of a Convolution with Application to Normalizing Flows",
            authors="S. Nagar, G. Varma",
            venue="AISTATS",
            year=2025,
            url="https://arxiv.org/abs/2410.14634",
        ),
        exact_inverse=True,
        sequential="forward",
        kernel_sizes="any",
        summary="forward = solve of a TL causal conv (all channels mixed, unit diagonal); inverse = one causal conv",
        options={"init_scale": "std of the initial off-centre taps and centre entries (default 0.02)"},
    )

    def __init__(self, channels: int, kernel_size: int = 3, input_size=None, init_scale: float = 0.02):
        super().__init__(channels, kernel_size, input_size)
        c, k = channels, kernel_size
        self.off_centre = nn.Parameter(torch.randn(c, c, k * k - 1) * init_scale)
        self.lower = nn.Parameter(torch.randn(c * (c - 1) // 2) * init_scale)

    def weight(self) -> torch.Tensor:
        """The effective (C, C, k, k) kernel of ``T``."""
        return assemble_weight(self.off_centre, self.lower, orientation="TL")

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # One operator call with the native solver: the weight is assembled inside it.
        z = solve_masked(x, self.off_centre, self.lower, None, "TL")
        return z, x.new_zeros(x.shape[0])

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        return causal_conv2d(z, self.weight(), "TL")

    @staticmethod
    def parameter_count(channels: int, kernel_size: int) -> int:
        return (kernel_size**2 - 1) * channels**2 + channels * (channels - 1) // 2

