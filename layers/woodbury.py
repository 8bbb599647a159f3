"""Woodbury transformations: low-rank updates of the identity along channels and space."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .base import InvertibleLayer, LayerError, LayerInfo, Paper, normalize_input_size

VARIANTS: tuple[str, ...] = ("standard", "me")
DEFAULT_RANK = 16  # the rank of each transform when none is given (reduced to the dimension if smaller)


def _low_rank_apply(x: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """``(I + U V)`` applied along dimension ``dim`` of ``x``: ``x + U (V x)``."""
    moved = x.movedim(dim, -1)
    return (moved + (moved @ v.t()) @ u.t()).movedim(-1, dim)


def _low_rank_solve(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """``(I + U V)⁻¹`` applied along ``dim`` by the Woodbury identity ``I − U (I + V U)⁻¹ V``."""
    d = v.shape[0]
    capacitance = torch.eye(d, dtype=v.dtype, device=v.device) + v @ u
    # One d×d solve per call, independent of the batch: M = (I + V U)⁻¹ V, then y − U (M y).
    m = torch.linalg.solve(capacitance, v)
    moved = y.movedim(dim, -1)
    return (moved - (moved @ m.t()) @ u.t()).movedim(-1, dim)


def _log_abs_det(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``log|det(I_n + U V)| = log|det(I_d + V U)|`` (Sylvester's identity): a d×d determinant."""
    d = v.shape[0]
    return torch.linalg.slogdet(torch.eye(d, dtype=v.dtype, device=v.device) + v @ u)[1]


class Woodbury(InvertibleLayer):
    r"""Channel and spatial Woodbury transformations ``x ↦ (I + U V) x`` with low-rank ``U V``.

    Density direction (``forward``), on an image ``x ∈ R^{C×H×W}`` seen as ``C × N`` with
    ``N = H·W``:

    - channel transform: ``(I_C + U_c V_c)`` on the C channels of every pixel,
      ``U_c ∈ R^{C×d_c}``, ``V_c ∈ R^{d_c×C}``;
    - spatial transform: ``(I_N + U_s V_s)`` on the N pixels of every channel,
      ``U_s ∈ R^{N×d_s}``, ``V_s ∈ R^{d_s×N}``.

    ``log|det| = N·log|det(I + V_c U_c)| + C·log|det(I + V_s U_s)|`` by Sylvester's determinant
    identity (d×d determinants instead of C×C and N×N ones).

    The memory-efficient variant ``variant="me"`` replaces the spatial transform by a height
    transform ``(I_H + U_h V_h)`` along H and then a width transform ``(I_W + U_w V_w)`` along W,
    adding ``C·W·log|det(I + V_h U_h)| + C·H·log|det(I + V_w U_w)|`` to the log det.

    Sampling direction (``inverse``): the transforms undone in reverse order by the Woodbury
    identity ``(I + U V)⁻¹ = I − U (I + V U)⁻¹ V``: exact, with one d×d solve per transform and
    nothing sequential over pixels. Because the spatial factors span the whole image, the layer
    is built for one input size; the kernel size does not apply.

    Invertibility: ``I + U V`` is invertible exactly when ``I + V U`` is. That is not enforced by
    the parameterisation (the paper does not either). At the ``N(0, 0.01²)`` initialisation the
    entries of ``V U`` have standard deviation ``√n·10⁻⁴`` (n = C, H·W, H or W), so ``I + V U``
    starts next to the identity; a singular ``I + V U`` is a measure-zero event that would make
    the inverse raise and the log det ``-inf``.

    Ranks: ``d_c = min(channel_rank, C)``; ``d_s = min(spatial_rank, H·W)`` (standard) or
    ``d_h = min(spatial_rank, H)``, ``d_w = min(spatial_rank, W)`` (ME).

    Parameters: ``2·(C·d_c + H·W·d_s)``; ME: ``2·(C·d_c + H·d_h + W·d_w)``.

    Cost (FLOPs per direction): channel ``4·B·H·W·C·d_c``; spatial ``4·B·C·H·W·d_s``; ME height
    ``4·B·C·H·W·d_h`` and width ``4·B·C·H·W·d_w``; plus the d×d determinants (forward) or solves
    (inverse), independent of the batch.

    Arguments:
        channels: C >= 1.
        kernel_size: ignored (does not apply).
        input_size: ``H`` or ``(H, W)``, required.
        variant: ``"standard"`` (channel + spatial) or ``"me"`` (channel + height + width).
        channel_rank: ``d_c``, 1 … C (default: 16 or C if smaller).
        spatial_rank: ``d_s`` (standard), 1 … H·W, or ``d_h`` and ``d_w`` (ME), 1 … min(H, W)
            (default: 16, or the dimension if smaller). A given rank larger than its dimension
            is an error, not silently reduced.
        init_scale: standard deviation of the initial ``U`` and ``V`` entries.

    References:
        Y. Lu, B. Huang. Woodbury Transformations for Deep Generative Flows. NeurIPS 2020.
        https://arxiv.org/abs/2002.12229
    """

    info = LayerInfo(
        name="woodbury",
        paper=Paper(
            title="Woodbury Transformations for Deep Generative Flows",
            authors="Y. Lu, B. Huang",
            venue="NeurIPS",
            year=2020,
            url="https://arxiv.org/abs/2002.12229",
        ),
        exact_inverse=True,
        sequential="none",
        kernel_sizes="n/a",
        needs_input_size=True,
        summary="forward = channel (I + U_c V_c) then spatial (I + U_s V_s); inverse = Woodbury identity",
        options={
            "variant": "'standard' (channel + spatial over H·W) or 'me' (channel + height + width)",
            "channel_rank": "rank d_c of the channel transform, 1 … C (default: 16 or C if smaller)",
            "spatial_rank": "rank of the spatial (or height and width) transforms (default: 16 or the size if smaller)",
            "init_scale": "std of the initial U and V entries (default 0.01)",
        },
    )

    def __init__(self, channels: int, kernel_size: int | None = None, input_size=None,
                 variant: Literal["standard", "me"] = "standard", channel_rank: int | None = None,
                 spatial_rank: int | None = None, init_scale: float = 0.01):
        super().__init__(channels, kernel_size, input_size)
        name = self.info.name
        if variant not in VARIANTS:
            raise LayerError(f"{name}: unknown variant {variant!r}; accepted: {', '.join(map(repr, VARIANTS))}")
        for option, rank in (("channel_rank", channel_rank), ("spatial_rank", spatial_rank)):
            if rank is not None and (not isinstance(rank, int) or isinstance(rank, bool) or rank < 1):
                raise LayerError(f"{name}: {option} must be a positive integer, got {rank!r}")
        self.variant = variant
        height, width = self.input_size
        ranks = self.ranks(channels, self.input_size, variant, channel_rank, spatial_rank)
        sizes = {"channel": channels, "spatial": height * width, "height": height, "width": width}
        self.transforms = tuple(ranks)  # in the order the forward applies them
        for key, d in ranks.items():
            n = sizes[key]
            self.register_parameter(f"u_{key}", nn.Parameter(torch.randn(n, d) * init_scale))
            self.register_parameter(f"v_{key}", nn.Parameter(torch.randn(d, n) * init_scale))

    @staticmethod
    def ranks(channels: int, input_size: tuple[int, int], variant: str = "standard",
              channel_rank: int | None = None, spatial_rank: int | None = None) -> dict[str, int]:
        """The rank of each transform, in the order the forward applies them: a given rank, or
        the default 16 reduced to the dimension; ``LayerError`` for a given rank above it."""
        height, width = input_size

        def rank(option: str, given: int | None, n: int, what: str) -> int:
            if given is None:
                return min(DEFAULT_RANK, n)
            if given > n:
                raise LayerError(f"woodbury: {option}={given} exceeds {what} = {n}; accepted: 1 … {n}")
            return given

        ranks = {"channel": rank("channel_rank", channel_rank, channels, "the channel count C")}
        if variant == "me":
            ranks["height"] = rank("spatial_rank", spatial_rank, height, "the height H")
            ranks["width"] = rank("spatial_rank", spatial_rank, width, "the width W")
        else:
            ranks["spatial"] = rank("spatial_rank", spatial_rank, height * width, "H·W")
        return ranks

    def _factors(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"u_{key}"), getattr(self, f"v_{key}")

    def _transform(self, t: torch.Tensor, key: str, inverse: bool) -> torch.Tensor:
        u, v = self._factors(key)
        fn = _low_rank_solve if inverse else _low_rank_apply
        if key == "spatial":
            b, c, h, w = t.shape
            return fn(t.reshape(b, c, h * w), u, v, dim=2).reshape(b, c, h, w)
        return fn(t, u, v, dim={"channel": 1, "height": 2, "width": 3}[key])

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, h, w = x.shape[1:]
        # How many independent copies of each transform act on one sample.
        copies = {"channel": h * w, "spatial": c, "height": c * w, "width": c * h}
        z = x
        logdet = x.new_zeros(())
        for key in self.transforms:
            z = self._transform(z, key, inverse=False)
            logdet = logdet + copies[key] * _log_abs_det(*self._factors(key))
        return z, logdet.expand(x.shape[0])

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        x = z
        for key in reversed(self.transforms):
            x = self._transform(x, key, inverse=True)
        return x

    def extra_repr(self) -> str:
        ranks = ", ".join(f"d_{key}={self._factors(key)[1].shape[0]}" for key in self.transforms)
        return f"{super().extra_repr()}, variant={self.variant!r}, {ranks}"

    @staticmethod
    def parameter_count(channels: int, kernel_size: int | None = None,
                        input_size: int | tuple[int, int] | None = None, variant: str = "standard",
                        channel_rank: int | None = None, spatial_rank: int | None = None) -> int:
        size = normalize_input_size(input_size, "woodbury")
        if size is None:
            raise LayerError("woodbury: parameter_count needs input_size (an int or (H, W))")
        sizes = {"channel": channels, "spatial": size[0] * size[1], "height": size[0], "width": size[1]}
        ranks = Woodbury.ranks(channels, size, variant, channel_rank, spatial_rank)
        return sum(2 * sizes[key] * d for key, d in ranks.items())
