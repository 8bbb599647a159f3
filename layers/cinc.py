"""CInC Flow: one causal convolution with a learnable centre diagonal."""

from __future__ import annotations

import torch
from torch import nn

from .base import InvertibleLayer, LayerInfo, Paper
from .causal import assemble_weight, causal_conv2d, solve


class CInC(InvertibleLayer):
    r"""A TL-causal k×k convolution whose centre block is lower triangular with a learnable diagonal.

    Density direction (``forward``): ``z = T x + b``, one causal convolution with bias.
    Sampling direction (``inverse``): ``x = T⁻¹ (z − b)`` by the shared wavefront solve
    (sequential: H+W−1 dependent steps, dividing by the diagonal at each pixel) — the same
    solver as FInC's, on any device, instead of the paper's CPU-only Cython loop.

    ``T`` mixes all C channels. Its centre block is ``L + diag(exp(log_diag))`` with ``L``
    strictly lower triangular, so ``log|det| = H·W·Σ_c log_diag[c]``. The diagonal is
    ``exp(log_diag)``: positive and never exactly zero, so any parameter values give an exactly
    invertible layer; its sign is fixed (a preceding ActNorm or 1×1 convolution supplies signs).

    Parameters: ``(k²−1)·C²`` off-centre taps, ``C(C−1)/2`` strictly-lower centre entries, ``C``
    diagonal entries and ``C`` biases: ``(k²−1)·C² + C(C+3)/2`` in all (``− C`` without bias).

    Cost: forward ``2·B·H·W·C²·k²`` FLOPs as one convolution; inverse the same FLOPs in H+W−1
    dependent steps.

    Arguments:
        channels: C >= 1.
        kernel_size: k >= 1.
        init_scale: standard deviation of the initial off-centre taps and strictly-lower entries
            (the diagonal starts at one and the bias at zero).
        bias: whether the layer has a learnable bias.

    References:
        S. Nagar, M. Dufraisse, G. Varma. CInC Flow: Characterizable Invertible 3×3 Convolution.
        TPM@UAI 2021. https://arxiv.org/abs/2107.01358
    """

    info = LayerInfo(
        name="cinc",
        paper=Paper(
            title="CInC Flow: Characterizable Invertible 3x3 Convolution",
            authors="S. Nagar, M. Dufraisse, G. Varma",
            venue="TPM@UAI",
            year=2021,
            url="https://arxiv.org/abs/2107.01358",
        ),
        exact_inverse=True,
        sequential="inverse",
        kernel_sizes="any",
        summary="forward = one TL causal conv with learnable centre diagonal and bias; inverse = solve",
        options={
            "init_scale": "std of the initial off-centre taps and centre entries (default 0.05)",
            "bias": "learnable per-channel bias (default True)",
        },
    )

    def __init__(self, channels: int, kernel_size: int = 3, input_size=None, init_scale: float = 0.05,
                 bias: bool = True):
        super().__init__(channels, kernel_size, input_size)
        c, k = channels, kernel_size
        self.off_centre = nn.Parameter(torch.randn(c, c, k * k - 1) * init_scale)
        self.lower = nn.Parameter(torch.randn(c * (c - 1) // 2) * init_scale)
        self.log_diag = nn.Parameter(torch.zeros(c))
        self.register_parameter("bias", nn.Parameter(torch.zeros(c)) if bias else None)

    def weight(self) -> torch.Tensor:
        """The effective (C, C, k, k) kernel of ``T``."""
        return assemble_weight(self.off_centre, self.lower, self.log_diag.exp(), orientation="TL")

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = causal_conv2d(x, self.weight(), "TL", self.bias)
        logdet = (x.shape[2] * x.shape[3]) * self.log_diag.sum()
        return z, logdet.expand(x.shape[0])

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        if self.bias is not None:
            z = z - self.bias[:, None, None]
        return solve(z.contiguous(), self.weight(), "TL", assume_triangular=True)

    @staticmethod
    def parameter_count(channels: int, kernel_size: int, bias: bool = True) -> int:
        c = channels
        return (kernel_size**2 - 1) * c * c + c * (c - 1) // 2 + c + (c if bias else 0)
