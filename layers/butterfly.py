"""Butterfly Flow: channel mixing by a product of butterfly factors with closed-form inverses."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

from .base import InvertibleLayer, LayerError, LayerInfo, Paper
from .lu import apply_channel_matrix

MODES: tuple[str, ...] = ("matrix", "factors")


def max_levels(channels: int) -> int:
    """``ceil(log2 C)`` (at least 1): enough butterfly factors to connect every pair of channels."""
    return max(1, math.ceil(math.log2(channels)))


def butterfly_plan(channels: int, levels: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Per level ℓ: ``(first, second, alone)`` channel indices.

    Channel ``i`` with bit ℓ clear is paired with ``i + 2^ℓ`` (the butterfly's stride-2^ℓ
    pairs); a channel whose partner would be ``>= C`` is ``alone`` at that level.
    """
    plan = []
    for level in range(levels):
        stride = 1 << level
        first = [i for i in range(channels) if not i & stride and i + stride < channels]
        second = [i + stride for i in first]
        paired = set(first) | set(second)
        plan.append((first, second, [i for i in range(channels) if i not in paired]))
    return plan


class Butterfly(InvertibleLayer):
    r"""A product of butterfly factors over the channel dimension, shared by all pixels.

    Level ``ℓ = 0 … L−1`` pairs channel ``i`` (bit ℓ of ``i`` clear) with ``i + 2^ℓ`` and mixes
    each pair by its own invertible 2×2 block ``M``; the forward applies level 0 first. When C is
    not a power of two, a channel whose partner falls outside ``0 … C−1`` is multiplied by a
    learnable scale ``exp(log_scale)`` at that level instead, so any C >= 1 works.
    ``L = ceil(log2 C)`` by default: for C a power of two every output channel then depends on
    every input channel; otherwise channels left unpaired at some level may not reach each other
    (for C = 6, outputs 2 and 3 do not read inputs 4 and 5). Fewer levels give a block-diagonal
    butterfly: independent blocks of ``2^L`` channels.

    Each block is ``M = Rot(θ)·[[σ·exp(s₁), u], [0, exp(s₂)]]`` (a rotation times an upper
    triangular matrix with positive diagonal, i.e. a QR factorisation): ``det M = σ·exp(s₁+s₂)``
    can never vanish, so any parameter values give an exactly invertible layer, and every
    invertible 2×2 matrix whose determinant has sign σ is reachable. ``σ`` is a fixed buffer,
    +1 by default (set entries of ``block_sign`` to −1 for reflections such as a channel swap).

    ``log|det| = H·W·(Σ_blocks (s₁ + s₂) + Σ log_scale)``. Sampling direction (``inverse``):
    the closed-form 2×2 inverses ``M⁻¹ = [[d, −b], [−c, a]] / det M`` and ``exp(−log_scale)``, in
    reverse level order: exact, nothing sequential. The kernel size does not apply.

    ``mode="matrix"`` (default) composes the factors into a C×C matrix (and its inverse from the
    inverse factors) once per call and applies it as a 1×1 convolution, which is faster than
    ``L`` sparse passes for the channel counts of image flows; ``mode="factors"`` applies the
    factors one by one to the activations, the ``O(C log C)``-per-pixel form of the paper.

    Parameters: 4 per block and 1 per unpaired channel and level; ``Σ_ℓ (C + 2·p_ℓ)`` with
    ``p_ℓ`` the pairs of level ℓ, which is ``2·C·log2(C)`` when C is a power of two.

    Cost: ``matrix``: ``2·B·H·W·C²`` FLOPs per direction plus ``O(L·C²)`` to compose the matrix;
    ``factors``: about ``3·B·H·W·C·L`` FLOPs per direction (plus one gather and scatter per level).

    Arguments:
        channels: C >= 1.
        kernel_size: ignored (does not apply).
        levels: number of butterfly factors, ``1 … ceil(log2 C)`` (default: all of them).
        mode: ``"matrix"`` or ``"factors"``, see above.
        init_scale: standard deviation of the initial angles θ and off-diagonal entries u
            (``s₁``, ``s₂`` and the scales start at zero, i.e. near the identity).

    References:
        C. Meng, L. Zhou, K. Choi, T. Dao, S. Ermon. ButterflyFlow: Building Invertible Layers
        with Butterfly Matrices. ICML 2022. https://arxiv.org/abs/2209.13774
    """

    info = LayerInfo(
        name="butterfly",
        paper=Paper(
            title="ButterflyFlow: Building Invertible Layers with Butterfly Matrices",
            authors="C. Meng, L. Zhou, K. Choi, T. Dao, S. Ermon",
            venue="ICML",
            year=2022,
            url="https://arxiv.org/abs/2209.13774",
        ),
        exact_inverse=True,
        sequential="none",
        kernel_sizes="n/a",
        dtypes=("float16", "bfloat16", "float32", "float64"),  # no solve or determinant
        summary="forward = product of channel butterfly factors (2×2 blocks at stride 2^l); inverse = closed-form 2×2 inverses",
        options={
            "levels": "number of butterfly factors, 1 … ceil(log2 C) (default: all)",
            "mode": "'matrix' (compose once, apply as 1x1 conv; default) or 'factors' (apply level by level)",
            "init_scale": "std of the initial block angles and off-diagonal entries (default 0.05)",
        },
    )

    def __init__(self, channels: int, kernel_size: int | None = None, input_size=None, levels: int | None = None,
                 mode: Literal["matrix", "factors"] = "matrix", init_scale: float = 0.05):
        super().__init__(channels, kernel_size, input_size)
        most = max_levels(channels)
        if levels is None:
            levels = most
        if not isinstance(levels, int) or isinstance(levels, bool) or not 1 <= levels <= most:
            raise LayerError(f"butterfly: levels must be an integer in 1 … {most} for C={channels}, got {levels!r}")
        if mode not in MODES:
            raise LayerError(f"butterfly: unknown mode {mode!r}; accepted: {', '.join(map(repr, MODES))}")
        self.levels, self.mode = levels, mode
        # Per level: the channel order [first | second | alone] and back, and which blocks and scales.
        self._slices: list[tuple[slice, slice]] = []
        n_blocks = n_alone = 0
        for level, (first, second, alone) in enumerate(butterfly_plan(channels, levels)):
            order = torch.tensor(first + second + alone)
            self.register_buffer(f"gather_{level}", order, persistent=False)
            self.register_buffer(f"scatter_{level}", torch.argsort(order), persistent=False)
            self._slices.append((slice(n_blocks, n_blocks + len(first)), slice(n_alone, n_alone + len(alone))))
            n_blocks, n_alone = n_blocks + len(first), n_alone + len(alone)
        # Per block: (θ, s₁, s₂, u).
        blocks = torch.zeros(n_blocks, 4)
        blocks[:, 0] = torch.randn(n_blocks) * init_scale
        blocks[:, 3] = torch.randn(n_blocks) * init_scale
        # Only C = 1 has no blocks, and only powers of two have no unpaired channels: no empty parameters.
        self.register_parameter("blocks", nn.Parameter(blocks) if n_blocks else None)
        self.register_buffer("block_sign", torch.ones(n_blocks))
        self.register_parameter("log_scale", nn.Parameter(torch.zeros(n_alone)) if n_alone else None)

    def _reference(self) -> torch.Tensor:
        return next(self.parameters())

    def block_entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, c, d, det)`` of every 2×2 block ``[[a, b], [c, d]]``, each of shape (n_blocks,)."""
        if self.blocks is None:
            empty = self._reference().new_zeros(0)
            return empty, empty, empty, empty, empty
        theta, s1, s2, u = self.blocks.unbind(1)
        sign = self.block_sign.to(self.blocks.dtype)
        cos, sin = theta.cos(), theta.sin()
        p, q = sign * s1.exp(), s2.exp()
        return cos * p, cos * u - sin * q, sin * p, sin * u + cos * q, sign * (s1 + s2).exp()

    def _apply_levels(self, t: torch.Tensor, inverse: bool) -> torch.Tensor:
        """The butterfly factors (or their inverses, in reverse order) on dimension 1 of ``t``."""
        a, b, c, d, det = self.block_entries()
        if inverse:
            a, b, c, d = d / det, -b / det, -c / det, a / det
        scale = None
        if self.log_scale is not None:
            scale = (-self.log_scale if inverse else self.log_scale).exp()
        shape = (-1,) + (1,) * (t.dim() - 2)
        for level in reversed(range(self.levels)) if inverse else range(self.levels):
            blocks, alone = self._slices[level]
            pairs = blocks.stop - blocks.start
            gathered = t.index_select(1, getattr(self, f"gather_{level}"))
            x1, x2, rest = gathered.split([pairs, pairs, alone.stop - alone.start], dim=1)
            ab, bb, cb, db = (e[blocks].reshape(shape) for e in (a, b, c, d))
            parts = [ab * x1 + bb * x2, cb * x1 + db * x2]
            if scale is not None:
                parts.append(rest * scale[alone].reshape(shape))
            t = torch.cat(parts, dim=1).index_select(1, getattr(self, f"scatter_{level}"))
        return t

    def weight(self) -> torch.Tensor:
        """The C×C matrix of the forward map."""
        ref = self._reference()
        eye = torch.eye(self.channels, dtype=ref.dtype, device=ref.device)
        return self._apply_levels(eye, inverse=False).t()  # row j is the image of e_j

    def weight_inverse(self) -> torch.Tensor:
        """The C×C matrix of the inverse map, from the closed-form inverse factors."""
        ref = self._reference()
        eye = torch.eye(self.channels, dtype=ref.dtype, device=ref.device)
        return self._apply_levels(eye, inverse=True).t()

    def _log_abs_det(self) -> torch.Tensor:
        # log|det M| = s₁ + s₂ per block: exact, no determinant is formed.
        total = self._reference().new_zeros(())
        if self.blocks is not None:
            total = total + self.blocks[:, 1:3].sum()
        if self.log_scale is not None:
            total = total + self.log_scale.sum()
        return total

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = apply_channel_matrix(self.weight(), x) if self.mode == "matrix" else self._apply_levels(x, inverse=False)
        logdet = (x.shape[2] * x.shape[3]) * self._log_abs_det()
        return z, logdet.expand(x.shape[0])

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        if self.mode == "matrix":
            return apply_channel_matrix(self.weight_inverse(), z)
        return self._apply_levels(z, inverse=True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, levels={self.levels}, mode={self.mode!r}"

    @staticmethod
    def parameter_count(channels: int, kernel_size: int | None = None, levels: int | None = None) -> int:
        plan = butterfly_plan(channels, max_levels(channels) if levels is None else levels)
        return sum(4 * len(first) + len(alone) for first, _, alone in plan)
