"""Emerging convolutions: a 1×1 convolution, then two opposite causal convolutions."""

from __future__ import annotations

import torch
from torch import nn

from .base import InvertibleLayer, LayerInfo, Paper
from .causal import assemble_weight, causal_conv2d, solve
from .lu import LUMatrix, apply_channel_matrix


class Emerging(InvertibleLayer):
    r"""A k×k invertible convolution that emerges from a 1×1 and two causal m×m convolutions.

    Density direction (``forward``)::

        y = W x                       # 1×1 convolution, LU-parameterised (layers.lu.LUMatrix)
        u = T_TL y                    # TL-causal m×m, centre L1 + diag(exp(log_d1))
        z = T_BR u                    # BR-causal m×m, centre upper triangular, diagonal exp(log_d2)

    with ``m = (k+1)/2``: output pixel (h, w) reads rows and columns ``h−m+1 … h+m−1``, a k×k
    receptive field (``2m−1 = k``), so even k cannot be built and is declared unsupported.
    The second convolution is the first one mirrored in both spatial axes *and* in the channel
    order, as in the paper, so its centre block is upper triangular and the two centres compose
    like an LU factorisation. It is stored as a BR convolution with a lower-triangular centre in
    reversed channel coordinates, so the shared solve applies: ``T_BR = R·T'_BR·R`` with ``R`` the
    channel reversal. ``log|det| = H·W·(Σ log_s + Σ log_d1 + Σ log_d2)``.

    Sampling direction (``inverse``): two wavefront solves (BR, then TL; sequential: H+W−1
    dependent steps each) and the 1×1 convolution with ``W⁻¹``.

    Both causal diagonals are ``exp(log_d)``: positive and never exactly zero, so any parameter
    values give an exactly invertible layer.

    Parameters: ``C²`` (1×1) plus, per causal convolution, ``(m²−1)·C²`` off-centre taps,
    ``C(C−1)/2`` strictly-lower centre entries and ``C`` diagonal entries: ``2·m²·C² + C`` in all.

    Cost: forward ``2·B·H·W·C²·(1 + 2m²)`` FLOPs (three convolutions); inverse the same FLOPs,
    of which the ``4·B·H·W·C²·m²`` of the two solves run in ``2·(H+W−1)`` dependent steps.

    Arguments:
        channels: C >= 1.
        kernel_size: odd k >= 1 (the receptive field).
        init_scale: standard deviation of the initial off-centre taps and strictly-lower entries
            of the causal convolutions (their diagonals start at one).

    References:
        E. Hoogeboom, R. van den Berg, M. Welling. Emerging Convolutions for Generative Normalizing
        Flows. ICML 2019. https://arxiv.org/abs/1901.11137
    """

    info = LayerInfo(
        name="emerging",
        paper=Paper(
            title="Emerging Convolutions for Generative Normalizing Flows",
            authors="E. Hoogeboom, R. van den Berg, M. Welling",
            venue="ICML",
            year=2019,
            url="https://arxiv.org/abs/1901.11137",
        ),
        exact_inverse=True,
        sequential="inverse",
        kernel_sizes="odd",
        summary="forward = 1x1 conv, TL causal m×m, BR causal m×m (m = (k+1)/2); inverse = 2 solves + 1x1 inverse",
        options={"init_scale": "std of the initial causal off-centre taps and centre entries (default 0.05)"},
    )

    def __init__(self, channels: int, kernel_size: int = 3, input_size=None, init_scale: float = 0.05):
        super().__init__(channels, kernel_size, input_size)
        c = channels
        m = self.causal_size = (kernel_size + 1) // 2
        self.mix = LUMatrix(c)
        self.off_centre = nn.Parameter(torch.randn(2, c, c, m * m - 1) * init_scale)
        self.lower = nn.Parameter(torch.randn(2, c * (c - 1) // 2) * init_scale)
        self.log_diag = nn.Parameter(torch.zeros(2, c))

    def causal_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_TL, W'_BR)``: the (C, C, m, m) kernels, both with lower-triangular centres.

        ``W'_BR`` acts in reversed channel order; the BR convolution of the layer is
        ``W'_BR.flip(0, 1)``, whose centre is upper triangular.
        """
        diag = self.log_diag.exp()
        first = assemble_weight(self.off_centre[0], self.lower[0], diag[0], orientation="TL")
        second = assemble_weight(self.off_centre[1], self.lower[1], diag[1], orientation="BR")
        return first, second

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first, second = self.causal_weights()
        y = apply_channel_matrix(self.mix.matrix(), x)
        u = causal_conv2d(y, first, "TL")
        # Reversing the kernel's channels on both sides is R·conv(R·u): no data is flipped here.
        z = causal_conv2d(u, second.flip(0, 1), "BR")
        logdet = (x.shape[2] * x.shape[3]) * (self.mix.log_abs_det() + self.log_diag.sum())
        return z, logdet.expand(x.shape[0])

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        first, second = self.causal_weights()
        u = solve(z.flip(1), second, "BR", assume_triangular=True).flip(1)
        y = solve(u, first, "TL", assume_triangular=True)
        return apply_channel_matrix(self.mix.inverse_matrix(), y)

    @staticmethod
    def parameter_count(channels: int, kernel_size: int) -> int:
        m = (kernel_size + 1) // 2
        return 2 * m * m * channels * channels + channels
