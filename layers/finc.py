"""FInC Flow: four oriented causal convolutions on the four channel quarters."""

from __future__ import annotations

import torch
from torch import nn

from .base import InvertibleLayer, LayerInfo, Paper
from .causal import ORIENTATIONS, assemble_weight, causal_conv2d, solve


class FInC(InvertibleLayer):
    r"""Four causal k×k convolutions, one per contiguous channel quarter, in the four orientations.

    Quarter ``i`` (channels ``i·C/4 … (i+1)·C/4 − 1``) is convolved causally in orientation
    TL, TR, BL, BR respectively, with a unit lower-triangular centre; there is no mixing across
    quarters inside the layer (after a squeeze the quarters are interleaved spatial positions).
    Density direction (``forward``): four convolutions. Sampling direction (``inverse``): four
    wavefront solves (sequential: H+W−1 dependent steps each). ``log|det| = 0``.

    Parameters: ``4·((k²−1)·q² + q(q−1)/2)`` with ``q = C/4`` — the free entries only (the paper
    counts ``4·q²·k²``, including the masked centre entries).

    Cost: forward ``2·B·H·W·C²·k²/4`` FLOPs as convolutions; inverse the same FLOPs in H+W−1
    dependent steps.

    Arguments:
        channels: C, a multiple of 4.
        kernel_size: k >= 1.
        init_scale: standard deviation of the initial off-centre and strictly-lower entries.

    References:
        A. Kallappa, S. Nagar, G. Varma. FInC Flow: Fast and Invertible k×k Convolutions for
        Normalizing Flows. VISAPP 2023. https://arxiv.org/abs/2301.09266
    """

    info = LayerInfo(
        name="finc",
        paper=Paper(
            title="FInC Flow: Fast and Invertible k×k Convolutions for Normalizing Flows",
            authors="A. Kallappa, S. Nagar, G. Varma",
            venue="VISAPP",
            year=2023,
            url="https://arxiv.org/abs/2301.09266",
        ),
        exact_inverse=True,
        sequential="inverse",
        kernel_sizes="any",
        channel_multiple=4,
        min_channels=4,
        summary="forward = 4 oriented causal convs on channel quarters (unit diagonal); inverse = 4 solves",
        options={"init_scale": "std of the initial off-centre taps and centre entries (default 0.05)"},
    )

    def __init__(self, channels: int, kernel_size: int = 3, input_size=None, init_scale: float = 0.05):
        super().__init__(channels, kernel_size, input_size)
        q, k = channels // 4, kernel_size
        self.off_centre = nn.Parameter(torch.randn(4, q, q, k * k - 1) * init_scale)
        self.lower = nn.Parameter(torch.randn(4, q * (q - 1) // 2) * init_scale)

    def weights(self) -> list[torch.Tensor]:
        """The effective (C/4, C/4, k, k) kernel of each quarter, in TL, TR, BL, BR order."""
        return [assemble_weight(self.off_centre[i], self.lower[i], orientation=o) for i, o in enumerate(ORIENTATIONS)]

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = x.chunk(4, dim=1)
        z = torch.cat([causal_conv2d(p, w, o) for p, w, o in zip(parts, self.weights(), ORIENTATIONS)], dim=1)
        return z, x.new_zeros(x.shape[0])

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        parts = z.chunk(4, dim=1)
        return torch.cat(
            [solve(p.contiguous(), w, o, unit_diagonal=True, assume_triangular=True)
             for p, w, o in zip(parts, self.weights(), ORIENTATIONS)],
            dim=1,
        )

    @staticmethod
    def parameter_count(channels: int, kernel_size: int) -> int:
        q = channels // 4
        return 4 * ((kernel_size**2 - 1) * q * q + q * (q - 1) // 2)
