"""MaCow: masked convolutional flows, affine autoregressive maps along one image axis."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import InvertibleLayer, LayerError, LayerInfo, Paper

ORDERS = ("A", "B", "C", "D")
_ORDER_TEXT = {"A": "rows top to bottom", "B": "rows bottom to top", "C": "columns left to right",
               "D": "columns right to left"}
SIGMOID_SHIFT = 2.0  # σ = sigmoid(ℓ + 2): a unit starts as a contraction by sigmoid(2) ≈ 0.88, as published


def hidden_width(channels: int) -> int:
    """The conditioner's hidden channels as the published code sizes them: 4C up to C = 96,
    then min(2C, 512)."""
    return 4 * channels if channels <= 96 else min(2 * channels, 512)


def conditioner_kernel(kernel_size: int) -> tuple[int, int]:
    """``(kH, kW)`` of the conditioner for the layer's kernel size k (odd): ``((k+1)/2, k)``.

    k = 3 gives (2, 3), the published kernel; k = 1 gives (1, 1), a conditioner that reads one
    pixel of the row before.
    """
    return (kernel_size + 1) // 2, kernel_size


def _to_canonical(t: torch.Tensor, order: str) -> torch.Tensor:
    """The image in the frame where ``order`` walks rows top to bottom (order A)."""
    if order == "A":
        return t
    if order == "B":
        return t.flip(2)
    if order == "C":
        return t.transpose(2, 3)
    return t.transpose(2, 3).flip(2)


def _from_canonical(t: torch.Tensor, order: str) -> torch.Tensor:
    if order == "A":
        return t
    if order == "B":
        return t.flip(2)
    if order == "C":
        return t.transpose(2, 3)
    return t.flip(2).transpose(2, 3)


class MCF(nn.Module):
    """One masked convolutional flow in its canonical frame (order A, rows top to bottom).

    ``y = σ ⊙ x + μ`` with ``(μ, ℓ) = split(conv1x1(ELU(shifted_conv(x))))`` and
    ``σ = sigmoid(ℓ + 2)``; the shifted convolution reads rows ``h − kH … h − 1`` only (in a
    ``kW``-wide centred window), so row h's scale and shift depend on the rows above it.
    """

    def __init__(self, channels: int, kernel: tuple[int, int], hidden: int):
        super().__init__()
        self.kh, self.kw = kernel
        self.pad_w = (self.kw - 1) // 2
        self.conv = nn.Conv2d(channels, hidden, kernel)
        self.out = nn.Conv2d(hidden, 2 * channels, 1)
        # Zero-initialised as published: μ = 0 and ℓ = 0 at start, whatever the input.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _scale_shift(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, log_scale = self.out(F.elu(hidden)).chunk(2, dim=1)
        return mu, log_scale + SIGMOID_SHIFT

    def scale_shift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, ℓ + 2)`` for every row at once (the density direction)."""
        height = x.shape[2]
        padded = F.pad(x, (self.pad_w, self.pad_w, self.kh, 0))
        # H + 1 output rows; the last one reads rows H − kH … H − 1 and belongs to no pixel.
        return self._scale_shift(self.conv(padded)[:, :, :height])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, pre = self.scale_shift(x)
        return torch.sigmoid(pre) * x + mu, F.logsigmoid(pre).flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        # Row by row, one conditioner call per row on the kH rows solved before it. The rows are
        # kept in a list and concatenated (no in-place writes), so autograd can run through it.
        b, c, height, width = y.shape
        zero_row = y.new_zeros(b, c, 1, width + 2 * self.pad_w)
        rows = [zero_row] * self.kh
        out = []
        for h in range(height):
            window = torch.cat(rows[h:h + self.kh], dim=2)
            mu, pre = self._scale_shift(self.conv(window))
            x_h = (y[:, :, h:h + 1] - mu) / torch.sigmoid(pre)
            out.append(x_h)
            rows.append(F.pad(x_h, (self.pad_w, self.pad_w)))
        return torch.cat(out, dim=2)


class MaCow(InvertibleLayer):
    r"""Masked convolutional flow: an affine autoregressive map along one image axis.

    Density direction (``forward``, parallel): ``y = σ ⊙ x + μ`` with ``σ = sigmoid(ℓ + 2)`` and
    ``(μ, ℓ)`` from a conditioner that, for order A, reads only the rows above each pixel:
    ``h = ELU(shifted_conv(x))`` (kernel ``kH × kW``, input rows ``h − kH … h − 1``, a ``kW``-wide
    centred window), ``(μ, ℓ) = split(conv1x1(h))``. ``log|det| = Σ log σ`` over C·H·W: it
    depends on the data (shape ``(B,)``, different per sample).

    Sampling direction (``inverse``, sequential, exact): row by row in the order's direction, one
    conditioner call on the ``kH`` rows already solved, then ``x_h = (y_h − μ_h)/σ_h``: H
    dependent conditioner calls (W for orders C and D). Nothing is approximate.

    Orders: A = rows top to bottom, B = rows bottom to top, C = columns left to right,
    D = columns right to left (B–D are A in flipped or transposed coordinates). ``order`` may
    also name several, applied in sequence (``"ABCD"`` is the four MCFs of MaCow's unit without
    its ActNorms; the unit itself is in the benchmark models).

    Jacobian: for a single order, triangular with a diagonal of σ in the order (row in the
    order's direction, channel, column) for A/B and (column, channel, row) for C/D:
    :meth:`jacobian_order`. Several orders compose to a dense Jacobian.

    Kernel size: the layer's k (odd) gives the conditioner kernel ``(kH, kW) = ((k+1)/2, k)``,
    so k = 3 is the published (2, 3).

    Parameters per order: ``kH·kW·C·hidden + hidden`` (shifted conv) plus ``2C·hidden + 2C``
    (1×1), hidden = 4C up to C = 96, then min(2C, 512). The published 1×1 is weight-normalised;
    here it is a plain zero-initialised convolution (the same map and cost; weight
    normalisation only changes how training moves it).

    Cost: forward one conditioner over the image; inverse the same FLOPs in H (or W) dependent
    calls on one row each.

    Arguments:
        channels: C >= 1.
        kernel_size: odd k >= 1, see above.
        order: ``"A"`` (default), ``"B"``, ``"C"``, ``"D"`` or a sequence such as ``"ABCD"``.
        hidden: conditioner hidden channels (default: the published rule above).

    References:
        X. Ma, X. Kong, S. Zhang, E. Hovy. MaCow: Masked Convolutional Generative Flow.
        NeurIPS 2019. https://arxiv.org/abs/1902.04208
    """

    info = LayerInfo(
        name="macow",
        paper=Paper(
            title="MaCow: Masked Convolutional Generative Flow",
            authors="X. Ma, X. Kong, S. Zhang, E. Hovy",
            venue="NeurIPS",
            year=2019,
            url="https://arxiv.org/abs/1902.04208",
        ),
        exact_inverse=True,
        sequential="inverse",
        kernel_sizes="odd",
        triangular=True,
        summary="forward = affine autoregressive map along rows/columns (parallel, data-dependent log det); "
                "inverse = one conditioner call per row",
        options={
            "order": "'A', 'B', 'C', 'D' (rows down/up, columns right/left) or a sequence such as 'ABCD' (default 'A')",
            "hidden": "conditioner hidden channels (default 4C up to C = 96, then min(2C, 512))",
        },
    )

    def __init__(self, channels: int, kernel_size: int = 3, input_size=None, order: str = "A",
                 hidden: int | None = None):
        super().__init__(channels, kernel_size, input_size)
        if not isinstance(order, str) or not order or any(o not in ORDERS for o in order):
            raise LayerError(f"macow: order must be a non-empty string of {', '.join(ORDERS)} "
                             f"(e.g. 'A' or 'ABCD'), got {order!r}")
        if hidden is None:
            hidden = hidden_width(channels)
        if not isinstance(hidden, int) or isinstance(hidden, bool) or hidden < 1:
            raise LayerError(f"macow: hidden must be a positive integer, got {hidden!r}")
        self.order = order
        self.kernel = conditioner_kernel(kernel_size)
        self.hidden = hidden
        self.flows = nn.ModuleList(MCF(channels, self.kernel, hidden) for _ in order)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for o, flow in zip(self.order, self.flows):
            y, ld = flow(_to_canonical(x, o))
            x = _from_canonical(y, o)
            logdet = logdet + ld
        return x, logdet

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        for o, flow in zip(reversed(self.order), reversed(self.flows)):
            z = _from_canonical(flow.inverse(_to_canonical(z, o)), o)
        return z

    def jacobian_order(self, height: int, width: int) -> tuple[torch.Tensor, str] | None:
        if len(self.order) != 1:
            return None
        idx = torch.arange(self.channels * height * width).reshape(self.channels, height, width)
        # Pixels in the order the inverse solves them; inside one row (column) the Jacobian block
        # is diagonal, so any order of channels and of the other axis works.
        canonical = _to_canonical(idx[None], self.order)[0]  # (C, rows in solve order, other axis)
        return canonical.permute(1, 0, 2).reshape(-1), "lower"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, order={self.order!r}, kernel={self.kernel}, hidden={self.hidden}"

    @staticmethod
    def parameter_count(channels: int, kernel_size: int, orders: int = 1, hidden: int | None = None) -> int:
        kh, kw = conditioner_kernel(kernel_size)
        hid = hidden or hidden_width(channels)
        return orders * (kh * kw * channels * hid + hid + 2 * channels * hid + 2 * channels)
