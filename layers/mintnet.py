"""MintNet: a masked invertible block, inverted by a damped Newton-like fixed-point iteration."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import InvertibleLayer, LayerError, LayerInfo, Paper

TYPES = ("A", "B")
T_FLOOR = 1e-12  # t is used as max(|t|, 1e-12), as published: the diagonal can never reach zero


def block_mask(channels: int, kernel_size: int, kind: str) -> torch.Tensor:
    """``(C, C, k, k)`` mask of one (output group, input group) sub-kernel.

    Type A: output channel i reads input channels j < i fully, j > i not at all, and j = i
    raster-causally (the rows above the centre, and the centre row up to and including the
    centre). Type B mirrors it (j > i fully; j = i the rows below and the centre row from the
    centre on). The Jacobian of a block is then lower (A) or upper (B) triangular in
    (channel, row, column) order.
    """
    c, k, m = channels, kernel_size, kernel_size // 2
    spatial = torch.zeros(k, k)
    if kind == "A":
        spatial[:m] = 1
        spatial[m, : m + 1] = 1
        channel = torch.tril(torch.ones(c, c), diagonal=-1)
    else:
        spatial[m + 1:] = 1
        spatial[m, m:] = 1
        channel = torch.triu(torch.ones(c, c), diagonal=1)
    mask = channel[:, :, None, None].expand(c, c, k, k).clone()
    idx = torch.arange(c)
    mask[idx, idx] = spatial
    return mask


def elu_derivative(h: torch.Tensor) -> torch.Tensor:
    """ELU′(h): 1 for h > 0, exp(h) otherwise (the exponent clamped so it cannot overflow)."""
    return torch.where(h > 0, torch.ones_like(h), torch.exp(h.clamp(max=0)))


class MintNet(InvertibleLayer):
    r"""MintNet's masked invertible block: ``y = f(x) + t ⊙ x`` with a triangular Jacobian.

    ``f = W3 ∘ ELU ∘ W2 ∘ ELU ∘ W1``: three masked k×k convolutions with bias,
    C → L·C → L·C → C, the hidden channels grouped as (l, c) = ``l·C + c`` and every
    (output group, input group) sub-kernel masked by :func:`block_mask` (type A or B).
    ``t`` is a learned (C, H, W) tensor initialised to one, used as ``max(|t|, 1e-12)``; so the
    layer is built for one image size (``input_size``).

    Density direction (``forward``, parallel): ``z = f(x) + t ⊙ x``. ``log|det| = Σ log d``, d
    the Jacobian's diagonal, analytic: at (c, p)
    ``d = t + Σ_l2 a3[l2,c]·ELU′(h2[(l2,c),p]) · Σ_l1 a2[l2,l1,c]·ELU′(h1[(l1,c),p])·a1[l1,c]``
    with a1, a2, a3 the centre taps on the (c ← c) paths and h1, h2 the pre-activations. Before
    use each such W2 centre tap is replaced by ``sign(a1)·sign(a3)·|a2|`` (the sign tie), so
    every term is ≥ 0 and ``d ≥ t > 0``: the layer is invertible for any parameter values.
    The log det depends on the data (shape ``(B,)``).

    Sampling direction (``inverse``, **approximate**): ``x₀ = z / t``, then
    ``x ← x + (z − F(x)) / (s·d(x))``, F the forward map and s the step factor ``newton_lr``
    (the published 1.1 for CIFAR, 3.5 for MNIST). Each iteration is one forward pass (parallel
    over the image); iterations are dependent. Two modes:

    - ``tolerance=None`` (default): exactly ``iterations`` updates (the published code's 100,
      with no convergence check);
    - ``tolerance=ε``: stop as soon as ``max |F(x) − z| <= ε`` over the whole batch, after at
      most ``iterations`` updates (a check that reads one number from the device per iteration).

    Either way one more forward pass measures the final residual ``max |F(x) − z|`` of the
    returned x (in tolerance mode it is the pass that stops the loop). :meth:`inverse_diagnostics`
    returns ``{"iterations": updates made, "residual": that maximum, "converged": whether it is
    <= tolerance}`` for the last ``inverse`` call.

    The declared round-trip tolerance (``info.inverse_tolerance``) holds for the default options
    near initialisation (the conformance suite perturbs every parameter by 0.05); a trained or
    strongly perturbed block can need more iterations — the residual says so.

    Parameters: ``k²·(L·C² + L²·C² + L·C²)`` weights (the masked entries included, as stored) +
    ``2·L·C + C`` biases + ``C·H·W`` (t).

    Cost: forward three convolutions, ``2·B·H·W·k²·(2·L·C² + L²·C²)`` FLOPs, plus the diagonal;
    inverse (iterations + 1) forward passes.

    Arguments:
        channels: C >= 1.
        kernel_size: odd k >= 1 (the masks need a centre tap).
        input_size: (H, W) of the images, required (t is per pixel).
        type: ``"A"`` (default, lower triangular) or ``"B"`` (upper triangular).
        latent: the latent multiplier L (hidden channels L·C; default 4; the published models
            use 85 for CIFAR-10 and 45 for MNIST).
        iterations: the number of Newton updates (tolerance None), or their cap.
        tolerance: stop at ``max |F(x) − z| <= tolerance``; None (default) runs ``iterations``.
        newton_lr: the step factor s (default 1.1).

    References:
        Y. Song, C. Meng, S. Ermon. MintNet: Building Invertible Neural Networks with Masked
        Convolutions. NeurIPS 2019. https://arxiv.org/abs/1907.07945
    """

    info = LayerInfo(
        name="mintnet",
        paper=Paper(
            title="MintNet: Building Invertible Neural Networks with Masked Convolutions",
            authors="Y. Song, C. Meng, S. Ermon",
            venue="NeurIPS",
            year=2019,
            url="https://arxiv.org/abs/1907.07945",
        ),
        exact_inverse=False,
        sequential="inverse",
        kernel_sizes="odd",
        needs_input_size=True,
        inverse_tolerance=1e-6,
        triangular=True,
        summary="forward = f(x) + t⊙x, f three masked convs (analytic log det); "
                "inverse = damped Newton iteration (approximate; iterations and residual recorded)",
        options={
            "type": "'A' (lower triangular, default) or 'B' (upper triangular)",
            "latent": "latent multiplier L: hidden channels L·C (default 4)",
            "iterations": "Newton updates (default 100, as published), or their cap with tolerance",
            "tolerance": "stop once max|F(x) - z| <= tolerance (default None: run all iterations)",
            "newton_lr": "step factor s of x += (z - F(x)) / (s·d(x)) (default 1.1; published 1.1 CIFAR, 3.5 MNIST)",
        },
    )

    def __init__(self, channels: int, kernel_size: int = 3, input_size=None, type: str = "A", latent: int = 4,
                 iterations: int = 100, tolerance: float | None = None, newton_lr: float = 1.1):
        super().__init__(channels, kernel_size, input_size)
        if type not in TYPES:
            raise LayerError(f"mintnet: type must be 'A' or 'B', got {type!r}")
        _positive_int("latent", latent)
        _positive_int("iterations", iterations)
        if tolerance is not None and not (_is_number(tolerance) and tolerance > 0):
            raise LayerError(f"mintnet: tolerance must be a positive number or None, got {tolerance!r}")
        if not (_is_number(newton_lr) and newton_lr > 0):
            raise LayerError(f"mintnet: newton_lr must be a positive number, got {newton_lr!r}")
        c, k, lat = channels, kernel_size, latent
        self.type, self.latent = type, latent
        self.iterations, self.tolerance, self.newton_lr = iterations, tolerance, float(newton_lr)
        self._last: dict[str, Any] | None = None

        self.weight1 = nn.Parameter(torch.empty(lat * c, c, k, k))
        self.bias1 = nn.Parameter(torch.empty(lat * c))
        self.weight2 = nn.Parameter(torch.empty(lat * c, lat * c, k, k))
        self.bias2 = nn.Parameter(torch.empty(lat * c))
        self.weight3 = nn.Parameter(torch.empty(c, lat * c, k, k))
        self.bias3 = nn.Parameter(torch.empty(c))
        self.t = nn.Parameter(torch.ones(c, *self.input_size))
        for w, b in ((self.weight1, self.bias1), (self.weight2, self.bias2), (self.weight3, self.bias3)):
            # As published: small Xavier-normal weights (gain 0.01), so the block starts near t ⊙ x.
            nn.init.xavier_normal_(w, 0.01)
            bound = 1 / math.sqrt(w.shape[1] * k * k)
            nn.init.uniform_(b, -bound, bound)

        block = block_mask(c, k, type)
        self.register_buffer("mask1", block.repeat(lat, 1, 1, 1), persistent=False)
        self.register_buffer("mask2", block.repeat(lat, lat, 1, 1), persistent=False)
        self.register_buffer("mask3", block.repeat(1, lat, 1, 1), persistent=False)
        # The (c ← c) centre taps of W2, where the sign tie applies.
        centre2 = torch.zeros(lat * c, lat * c, k, k)
        groups = torch.arange(lat)[:, None] * c + torch.arange(c)[None, :]  # (L, C): index of (l, c)
        rows = groups[:, None, :].expand(lat, lat, c)
        cols = groups[None, :, :].expand(lat, lat, c)
        centre2[rows, cols, k // 2, k // 2] = 1
        self.register_buffer("centre2", centre2, persistent=False)

    # -- the map --------------------------------------------------------------------------------

    def _centre(self, w: torch.Tensor) -> torch.Tensor:
        m = self.kernel_size // 2
        return w[:, :, m, m]

    def masked_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The effective (masked, sign-tied) W1, W2, W3."""
        c, lat = self.channels, self.latent
        w1 = self.weight1 * self.mask1
        w3 = self.weight3 * self.mask3
        ar = torch.arange(c, device=w1.device)
        a1 = self._centre(w1).reshape(lat, c, c)[:, ar, ar]  # (L1, C)
        a3 = self._centre(w3).reshape(c, lat, c)[ar, :, ar].t()  # (L2, C)
        sign = torch.sign(a3)[:, None, :] * torch.sign(a1)[None, :, :]  # (L2, L1, C)
        # Spread over the (l2·C + c, l1·C + c) centre entries of W2; zero elsewhere (masked by centre2).
        sign_full = torch.diag_embed(sign).permute(0, 2, 1, 3).reshape(lat * c, lat * c)
        m = self.kernel_size // 2
        w2 = self.weight2 * (1 - self.centre2)
        tied = (sign_full * self.weight2[:, :, m, m].abs())[:, :, None, None] * self.centre2
        w2 = (w2 + tied) * self.mask2
        return w1, w2, w3

    def _prepare(self) -> tuple[torch.Tensor, ...]:
        """Everything ``_evaluate`` needs from the parameters: computed once per call (and once
        per ``inverse``, not once per iteration)."""
        c, lat = self.channels, self.latent
        w1, w2, w3 = self.masked_weights()
        ar = torch.arange(c, device=w1.device)
        a1 = self._centre(w1).reshape(lat, c, c)[:, ar, ar]  # (L1, C)
        a2 = self._centre(w2).reshape(lat, c, lat, c)[:, ar, :, ar]  # (C, L2, L1)
        a3 = self._centre(w3).reshape(c, lat, c)[ar, :, ar]  # (C, L2)
        t = self.t.abs().clamp(min=T_FLOOR)
        return w1, w2, w3, a1[None, :, :, None, None], a2, a3.t()[None, :, :, None, None], t

    def _evaluate(self, x: torch.Tensor, prepared: tuple[torch.Tensor, ...] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F(x), d(x))``: the forward map and its Jacobian's diagonal, both (B, C, H, W)."""
        b, c, h, w = x.shape
        lat, pad = self.latent, self.kernel_size // 2
        w1, w2, w3, a1, a2, a3, t = self._prepare() if prepared is None else prepared

        h1 = F.conv2d(x, w1, self.bias1, padding=pad)
        g1 = elu_derivative(h1).reshape(b, lat, c, h, w) * a1
        h2 = F.conv2d(F.elu(h1), w2, self.bias2, padding=pad)
        inner = torch.einsum("ckj,bjchw->bkchw", a2, g1)  # Σ_l1 a2[l2,l1,c]·ELU′(h1)·a1
        g2 = elu_derivative(h2).reshape(b, lat, c, h, w) * a3
        f = F.conv2d(F.elu(h2), w3, self.bias3, padding=pad)
        return f + t * x, t + (g2 * inner).sum(1)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z, diag = self._evaluate(x)
        return z, diag.log().flatten(1).sum(1)

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        prepared = self._prepare()
        x = z / prepared[-1]
        updates = 0
        while True:
            fx, diag = self._evaluate(x, prepared)
            residual = z - fx
            if self.tolerance is not None:
                worst = residual.abs().max().item()
                if worst <= self.tolerance or updates >= self.iterations:
                    break
            elif updates >= self.iterations:
                worst = residual.abs().max().item()
                break
            x = x + residual / (self.newton_lr * diag)
            updates += 1
        self._last = {"iterations": updates, "residual": worst,
                      "converged": worst <= self.tolerance if self.tolerance is not None else None}
        return x

    def inverse_diagnostics(self) -> dict[str, Any] | None:
        return None if self._last is None else dict(self._last)

    def jacobian_order(self, height: int, width: int) -> tuple[torch.Tensor, str] | None:
        # Natural (channel, row, column) order: the flattening of one (C, H, W) image.
        return torch.arange(self.channels * height * width), "lower" if self.type == "A" else "upper"

    def extra_repr(self) -> str:
        tol = "none" if self.tolerance is None else f"{self.tolerance:g}"
        return (f"{super().extra_repr()}, type={self.type!r}, latent={self.latent}, iterations={self.iterations}, "
                f"tolerance={tol}, newton_lr={self.newton_lr:g}")

    @staticmethod
    def parameter_count(channels: int, kernel_size: int, input_size: int | tuple[int, int], latent: int = 4) -> int:
        from .base import normalize_input_size

        c, k, lat = channels, kernel_size, latent
        height, width = normalize_input_size(input_size, "mintnet")
        return k * k * (2 * lat * c * c + lat * lat * c * c) + 2 * lat * c + c + c * height * width


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise LayerError(f"mintnet: {name} must be a positive integer, got {v!r}")
