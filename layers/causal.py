"""Causal convolutions and their exact inverse (the wavefront solve), in one place.

Every layer that needs a causal convolution or its inverse uses this module (docs/math.md §1–4).

- :func:`causal_conv2d` — a k×k convolution that reads only one quadrant of the image
  (orientation ``"TL"``, ``"TR"``, ``"BL"`` or ``"BR"``).
- :func:`solve` — ``x`` such that ``causal_conv2d(x, weight, orientation) == y``, for a weight
  whose centre block (the C×C matrix at the tap that reads the output pixel itself) is lower
  triangular. Differentiable; the backward uses the adjoint formulation (a second solve with the
  flipped, channel-reversed kernel, then the ordinary convolution weight gradient) and saves only
  the solve's output.
- :func:`assemble_weight` — the effective weight of a masked causal convolution from its free
  parameters, so that any parameter values give an exactly invertible map.
- :func:`solve_masked` — :func:`solve` of that weight straight from the free parameters: with the
  native solver one operator call that assembles the weight inside and whose backward splits
  the weight gradient back onto the parameters (what a layer's forward should call).

The solve's implementation is chosen per call by :func:`solver_for` (and the backward's by
:func:`adjoint_solver_for`) under ``INVCONV_SOLVER`` (``auto``, ``torch`` or ``native``; see
:mod:`layers.native`): the native C++ / CUDA kernels of ``csrc/`` where they build, else the
pure-PyTorch reference in this file (one gather and two matmuls per anti-diagonal).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from . import native

__all__ = [
    "ORIENTATIONS",
    "adjoint_reference",
    "adjoint_solve",
    "adjoint_solver_for",
    "assemble_weight",
    "causal_conv2d",
    "causal_padding",
    "centre_tap",
    "solve",
    "solve_masked",
    "solve_reference",
    "solver_for",
]

ORIENTATIONS: tuple[str, ...] = ("TL", "TR", "BL", "BR")

# Which image axes an orientation mirrors relative to TL (dims of an NCHW tensor / CoutCinkk kernel).
_FLIP_DIMS = {"TL": (), "TR": (3,), "BL": (2,), "BR": (2, 3)}
# The transpose of an orientation-O convolution reads the opposite quadrant.
_OPPOSITE = {"TL": "BR", "TR": "BL", "BL": "TR", "BR": "TL"}


def _check_orientation(orientation: str) -> None:
    if orientation not in _FLIP_DIMS:
        raise ValueError(f"unknown orientation {orientation!r}; accepted: {', '.join(ORIENTATIONS)}")


def causal_padding(kernel_size: int, orientation: str = "TL") -> tuple[int, int, int, int]:
    """``F.pad`` padding (left, right, top, bottom) of a causal convolution (docs/math.md §1)."""
    _check_orientation(orientation)
    p = kernel_size - 1
    left, top = ("L" in orientation, "T" in orientation)
    return (p if left else 0, 0 if left else p, p if top else 0, 0 if top else p)


def centre_tap(kernel_size: int, orientation: str = "TL") -> tuple[int, int]:
    """Kernel tap (row, col) that reads the output pixel itself."""
    _check_orientation(orientation)
    p = kernel_size - 1
    return (p if "T" in orientation else 0, p if "L" in orientation else 0)


def causal_conv2d(x: torch.Tensor, weight: torch.Tensor, orientation: str = "TL",
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Causal k×k convolution: output pixel (h, w) reads only the quadrant named by ``orientation``.

    Arguments:
        x: input ``(B, C_in, H, W)``.
        weight: ``(C_out, C_in, k, k)`` in PyTorch's cross-correlation layout.
        orientation: ``"TL"`` (rows <= h, cols <= w), ``"TR"``, ``"BL"`` or ``"BR"``.
        bias: optional ``(C_out,)``.
    """
    _check_orientation(orientation)
    k = weight.shape[-1]
    if k == 1:
        return F.conv2d(x, weight, bias)
    return F.conv2d(F.pad(x, causal_padding(k, orientation)), weight, bias)


def assemble_weight(off_centre: torch.Tensor, lower: torch.Tensor, diagonal: torch.Tensor | None = None,
                    orientation: str = "TL") -> torch.Tensor:
    """Effective weight of a causal convolution whose centre block is lower triangular.

    This is the mask ``Ŵ = M ⊙ W + E`` of docs/math.md §2 applied in the forward computation, with
    the masked entries not stored at all: the parameters are exactly the free entries, so the
    parameter count is the true number of trainable values and no optimiser, weight decay or
    direct assignment can make the layer non-invertible.

    Arguments:
        off_centre: ``(..., C, C, k*k - 1)`` — every tap except the centre, raster order.
        lower: ``(..., C*(C-1)/2)`` — strictly-lower centre entries, in ``torch.tril_indices``
            order.
        diagonal: ``(..., C)`` centre diagonal, or ``None`` for a unit diagonal.
        orientation: where the centre tap sits (see :func:`centre_tap`).

    Returns:
        ``(..., C, C, k, k)``.
    """
    *lead, c, c2, taps = off_centre.shape
    k = round((taps + 1) ** 0.5)
    if c != c2 or k * k != taps + 1:
        raise ValueError(f"off_centre must have shape (..., C, C, k*k-1), got {tuple(off_centre.shape)}")
    rows, cols = torch.tril_indices(c, c, offset=-1, device=off_centre.device)
    centre = off_centre.new_zeros(*lead, c, c)
    centre[..., rows, cols] = lower
    if diagonal is None:
        centre = centre + torch.eye(c, dtype=off_centre.dtype, device=off_centre.device)
    else:
        centre = centre + torch.diag_embed(diagonal)
    a, b = centre_tap(k, orientation)
    pos = a * k + b
    flat = torch.cat([off_centre[..., :pos], centre.unsqueeze(-1), off_centre[..., pos:]], dim=-1)
    return flat.reshape(*lead, c, c, k, k)


# ----------------------------------------------------------------------------------------------
# The solve


def _check_solve_args(y: torch.Tensor, weight: torch.Tensor, orientation: str) -> None:
    # Runs on every solve: each shape and dtype is read once (a Tensor.shape is 0.1 µs).
    _check_orientation(orientation)
    ys = y.shape if isinstance(y, torch.Tensor) else ()
    if len(ys) != 4:
        raise ValueError(f"solve: y must be a 4-D tensor (B, C, H, W), got shape {tuple(getattr(y, 'shape', ()))}")
    ws = weight.shape if isinstance(weight, torch.Tensor) else ()
    if len(ws) != 4 or ws[0] != ws[1] or ws[2] != ws[3]:
        raise ValueError(f"solve: weight must be a tensor of shape (C, C, k, k), got {tuple(ws) or type(weight).__name__}")
    if ws[0] != ys[1]:
        raise ValueError(f"solve: weight is for C={ws[0]} channels but y has {ys[1]} (shape {tuple(ys)})")
    dtype = y.dtype
    if dtype != weight.dtype or not ((y.is_cpu and weight.is_cpu) or y.device == weight.device):
        raise ValueError(f"solve: y ({dtype}, {y.device}) and weight ({weight.dtype}, {weight.device}) "
                         "must share dtype and device")
    if not dtype.is_floating_point:
        raise ValueError(f"solve: floating-point tensors required, got {dtype}")


def _check_centre(weight: torch.Tensor, orientation: str, unit_diagonal: bool) -> None:
    a, b = centre_tap(weight.shape[-1], orientation)
    centre = weight[:, :, a, b]
    if torch.triu(centre, diagonal=1).any():
        raise ValueError("solve: the centre block of the weight must be lower triangular "
                         f"(tap {(a, b)} for orientation {orientation})")
    if unit_diagonal and not bool((centre.diagonal() == 1).all()):
        raise ValueError("solve: unit_diagonal=True but the centre block's diagonal is not all ones")


def solve(y: torch.Tensor, weight: torch.Tensor, orientation: str = "TL", *, unit_diagonal: bool = False,
          assume_triangular: bool = False) -> torch.Tensor:
    """Exact inverse of :func:`causal_conv2d`: ``x`` with ``causal_conv2d(x, weight, orientation) == y``.

    Arguments:
        y: ``(B, C, H, W)``.
        weight: ``(C, C, k, k)`` whose centre block is lower triangular (upper entries zero).
        orientation: ``"TL"``, ``"TR"``, ``"BL"`` or ``"BR"``.
        unit_diagonal: the centre diagonal is all ones (skips the division; the caller promises).
        assume_triangular: skip the check that the centre block is lower triangular (and unit,
            if ``unit_diagonal``). Layers that build the weight with :func:`assemble_weight` pass
            ``True``; the check reads the weight on the host, which costs a device sync.

    Differentiable with respect to ``y`` and ``weight`` (first order).
    """
    _check_solve_args(y, weight, orientation)
    if not assume_triangular:
        _check_centre(weight, orientation, unit_diagonal)
    mode = native.requested_mode()
    if mode != "torch":
        # The native kernels are registered operators with their autograd node in C++ (and fake
        # kernels for torch.compile); the reference keeps the Python autograd.Function below.
        op = native.differentiable_solve(y, weight.shape[-1], mode)
        if op is not None:
            return op(y, weight, native.ORIENTATION_CODES[orientation], unit_diagonal)
    return _CausalSolve.apply(y, weight, orientation, unit_diagonal)


def solve_masked(y: torch.Tensor, off_centre: torch.Tensor, lower: torch.Tensor,
                 diagonal: torch.Tensor | None = None, orientation: str = "TL") -> torch.Tensor:
    """``solve(y, assemble_weight(off_centre, lower, diagonal, orientation), orientation)``.

    Arguments are those of :func:`assemble_weight` (no leading batch dimensions) and ``y``
    ``(B, C, H, W)``; ``diagonal=None`` is a unit diagonal. Differentiable with respect to ``y``
    and the parameters (first order).

    With the native solver this is one operator (``invconv_{cpu,cuda}::masked_solve``): the
    weight is assembled inside it (one loop on the CPU) and its C++ autograd node saves the
    parameters and the output, whose backward reassembles the weight, runs the adjoint solve and
    the weight gradient, and splits that gradient onto ``off_centre``, ``lower`` and
    ``diagonal``. Nothing is cached between calls, so parameters updated in place (an
    optimiser step) are always read afresh. The reference assembles the weight with
    :func:`assemble_weight` and calls :func:`solve`.
    """
    k = _check_masked_args(y, off_centre, lower, diagonal, orientation)
    mode = native.requested_mode()
    if mode != "torch":
        op = native.differentiable_masked_solve(y, k, mode)
        if op is not None:
            return op(y, off_centre, lower, diagonal, native.ORIENTATION_CODES[orientation])
    weight = assemble_weight(off_centre, lower, diagonal, orientation)
    return solve(y, weight, orientation, unit_diagonal=diagonal is None, assume_triangular=True)


def _check_masked_args(y: torch.Tensor, off_centre: torch.Tensor, lower: torch.Tensor,
                       diagonal: torch.Tensor | None, orientation: str) -> int:
    """The kernel size, after checking the arguments of :func:`solve_masked` (on every layer call:
    each shape, dtype and device is read once)."""
    _check_orientation(orientation)
    if not isinstance(y, torch.Tensor) or y.dim() != 4:
        raise ValueError(f"solve_masked: y must be a 4-D tensor (B, C, H, W), got shape "
                         f"{tuple(getattr(y, 'shape', ()))}")
    c = y.shape[1]
    shape = off_centre.shape
    k = math.isqrt(shape[-1] + 1) if len(shape) == 3 else 0
    if len(shape) != 3 or shape[0] != c or shape[1] != c or k * k != shape[-1] + 1:
        raise ValueError(f"solve_masked: off_centre must have shape (C, C, k*k-1) with C={c} (y's channels), "
                         f"got {tuple(shape)}")
    if lower.shape != (c * (c - 1) // 2,):
        raise ValueError(f"solve_masked: lower must have shape (C*(C-1)/2,) = ({c * (c - 1) // 2},), "
                         f"got {tuple(lower.shape)}")
    if diagonal is not None and diagonal.shape != (c,):
        raise ValueError(f"solve_masked: diagonal must have shape (C,) = ({c},) or be None, got {tuple(diagonal.shape)}")
    dtype, device = y.dtype, y.device
    for name, t in (("off_centre", off_centre), ("lower", lower), ("diagonal", diagonal)):
        if t is not None and (t.dtype != dtype or t.device != device):
            raise ValueError(f"solve_masked: y ({dtype}, {device}) and {name} ({t.dtype}, {t.device}) "
                             "must share dtype and device")
    if not dtype.is_floating_point:
        raise ValueError(f"solve_masked: floating-point tensors required, got {dtype}")
    return k


def adjoint_solve(g: torch.Tensor, weight: torch.Tensor, orientation: str = "TL", *,
                  unit_diagonal: bool = False) -> torch.Tensor:
    """``T⁻ᵀ g`` where ``T`` is the causal convolution (docs/math.md §4), by the same solver.

    ``Tᵀ`` is a causal convolution of the opposite orientation with the channel-transposed,
    spatially flipped kernel; its centre is ``Lᵀ`` (upper triangular), so the channel order is
    reversed as well to make it lower triangular again. The native kernels do this by index
    arithmetic; :func:`adjoint_reference` with flipped copies.
    """
    return adjoint_solver_for(g)(g, weight, orientation, unit_diagonal)


def adjoint_reference(g: torch.Tensor, weight: torch.Tensor, orientation: str = "TL",
                      unit_diagonal: bool = False) -> torch.Tensor:
    """Pure-PyTorch ``T⁻ᵀ g``: :func:`solve_reference` on flipped, channel-reversed copies."""
    kernel = weight.flip(0, 1).transpose(0, 1).flip(2, 3)
    lam = solve_reference(g.flip(1), kernel, _OPPOSITE[orientation], unit_diagonal)
    return lam.flip(1)


def conv_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size: int, orientation: str) -> torch.Tensor:
    """``∂L/∂W`` of ``causal_conv2d(x, W)`` for output gradient ``grad_out``, by the ordinary
    convolution weight-gradient routine (no ``B·C·k²·H·W`` buffer). The backward of the solve
    uses it on GPUs (cuDNN) and under ``INVCONV_SOLVER=torch``; the native CPU backend has its
    own (``torch.ops.invconv_cpu.weight_grad``, about 2.5× faster than oneDNN's on 12 channels)."""
    c_out, c_in = grad_out.shape[1], x.shape[1]
    xp = F.pad(x, causal_padding(kernel_size, orientation)) if kernel_size > 1 else x
    shape = [c_out, c_in, kernel_size, kernel_size]
    return torch.ops.aten.convolution_backward(
        grad_out, xp, x.new_empty(shape), None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [False, True, False]
    )[1]


class _CausalSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, orientation, unit_diagonal):
        x = _solve_impl(y, weight, orientation, unit_diagonal)
        ctx.save_for_backward(weight, x)
        ctx.orientation = orientation
        ctx.unit_diagonal = unit_diagonal
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_x):
        weight, x = ctx.saved_tensors
        need_y, need_w = ctx.needs_input_grad[:2]
        if not (need_y or need_w):
            return None, None, None, None
        impl = _implementation(x)
        grad_x = grad_x.contiguous()
        if impl.backward is not None:  # adjoint solve + weight gradient in one native pass
            lam, grad_w = impl.backward(grad_x, weight, x, ctx.orientation, ctx.unit_diagonal, need_w)
        else:
            lam = impl.adjoint(grad_x, weight, ctx.orientation, ctx.unit_diagonal)
            # x = T⁻¹ y  =>  dL/dT = -λ xᵀ, the convolution weight gradient of input x and output grad -λ
            # (negated on the small weight gradient rather than on λ).
            grad_w = impl.weight_grad(x, lam, weight.shape[-1], ctx.orientation).neg_() if need_w else None
        return (lam if need_y else None), grad_w, None, None


def _solve_impl(y: torch.Tensor, weight: torch.Tensor, orientation: str, unit_diagonal: bool) -> torch.Tensor:
    return solver_for(y)(y, weight, orientation, unit_diagonal)


class _Implementation(NamedTuple):
    solve: Callable
    adjoint: Callable
    weight_grad: Callable
    backward: Callable | None  # adjoint + weight gradient in one call, where the backend has it


def _implementation(t: torch.Tensor) -> _Implementation:
    """The kernels for tensors like ``t`` (see :func:`solver_for`)."""
    mode = native.requested_mode()
    if mode != "torch":
        kernels = native.kernels_for(t.device, t.dtype, required=(mode == "native"))
        if kernels is not None:
            return _Implementation(kernels.solve, kernels.adjoint, kernels.weight_grad or conv_weight_grad,
                                   kernels.backward)
    return _Implementation(solve_reference, adjoint_reference, conv_weight_grad, None)


def solver_for(y: torch.Tensor):
    """The solve implementation used for tensors like ``y``: ``(y, weight, orientation,
    unit_diagonal) -> x``, without autograd.

    Chosen per call from ``INVCONV_SOLVER`` (``auto`` — default — the native kernel of ``y``'s
    device where it builds, else the reference; ``torch``; ``native``, an error when
    unavailable) and ``y``'s device and dtype. The first call that wants a native kernel
    compiles it (see :mod:`layers.native`). :func:`layers.native.solver_status` says which one
    is used and why.
    """
    return _implementation(y).solve


def adjoint_solver_for(g: torch.Tensor):
    """The ``T⁻ᵀ g`` implementation for tensors like ``g`` (same signature and choice as
    :func:`solver_for`)."""
    return _implementation(g).adjoint


# ----------------------------------------------------------------------------------------------
# The pure-PyTorch reference solver


@functools.lru_cache(maxsize=64)
def _wavefront_plan(height: int, width: int, k: int, device: torch.device):
    """Index tensors of the TL wavefront on the zero-padded (H+k-1)×(W+k-1) plane.

    Returns ``(order, bounds, patches, centres)``: ``order`` lists the H·W pixel indices by
    anti-diagonal; diagonal ``d`` is ``order[bounds[d]:bounds[d+1]]``, its pixels' k×k windows
    are ``patches[bounds[d]:bounds[d+1]]`` and the padded-plane positions of the pixels
    themselves are ``centres[...]``.
    """
    wp = width + k - 1
    h = torch.arange(height).repeat_interleave(width)
    w = torch.arange(width).repeat(height)
    key = (h + w) * height + h  # sort by anti-diagonal, then by row
    order = torch.argsort(key)
    h, w = h[order], w[order]
    counts = torch.bincount(h + w, minlength=height + width - 1)
    bounds = [0] + torch.cumsum(counts, 0).tolist()
    taps = torch.arange(k)
    window = (taps[:, None] * wp + taps[None, :]).reshape(-1)  # offsets of a k×k window
    top_left = h * wp + w  # window of pixel (h, w) starts at padded (h, w)
    patches = top_left[:, None] + window[None, :]
    centres = (h + k - 1) * wp + (w + k - 1)
    return order.to(device), bounds, patches.to(device), centres.to(device)


def solve_reference(y: torch.Tensor, weight: torch.Tensor, orientation: str = "TL",
                    unit_diagonal: bool = False) -> torch.Tensor:
    """Pure-PyTorch wavefront solve (no autograd; use :func:`solve`).

    Orientations other than TL are solved as TL in mirrored coordinates. Per anti-diagonal:
    one gather of the k×k windows, one matmul with the off-centre taps (pre-multiplied by the
    centre block's inverse, computed once), one scatter. No loop over channels.
    """
    dims = _FLIP_DIMS[orientation]
    if dims:
        return solve_reference(y.flip(dims), weight.flip(dims), "TL", unit_diagonal).flip(dims)

    b, c, height, width = y.shape
    k = weight.shape[-1]
    centre = weight[:, :, k - 1, k - 1]
    eye = torch.eye(c, dtype=y.dtype, device=y.device)
    l_inv = torch.linalg.solve_triangular(centre, eye, upper=False, unitriangular=unit_diagonal)
    # x_p = L⁻¹ y_p − Σ_t (L⁻¹ W_t) x_{p+t}: fold L⁻¹ into the taps and the right-hand side once.
    y_folded = torch.einsum("oc,bchw->bohw", l_inv, y)
    if k == 1:
        return y_folded.contiguous()
    taps = weight.reshape(c, c, k * k).clone()
    taps[:, :, -1] = 0  # the centre reads the pixel being solved, which is still zero
    taps = torch.einsum("oi,ict->oct", l_inv, taps).reshape(c, c * k * k)

    order, bounds, patches, centres = _wavefront_plan(height, width, k, y.device)
    rhs = y_folded.reshape(b, c, height * width)[:, :, order]
    xp = y.new_zeros(b, c, (height + k - 1) * (width + k - 1))
    for d in range(height + width - 1):
        s, e = bounds[d], bounds[d + 1]
        window = xp[:, :, patches[s:e]]  # (B, C, n, k*k)
        window = window.permute(0, 2, 1, 3).reshape(b, e - s, c * k * k)
        x_d = rhs[:, :, s:e] - (window @ taps.t()).transpose(1, 2)
        xp[:, :, centres[s:e]] = x_d
    return xp.view(b, c, height + k - 1, width + k - 1)[:, :, k - 1:, k - 1:].contiguous()
