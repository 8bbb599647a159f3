"""The layer interface: declared capabilities, the errors they raise, and the base class."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

__all__ = [
    "InvertibleLayer",
    "LayerError",
    "LayerInfo",
    "LayerUnavailableError",
    "Paper",
    "UnknownLayerError",
    "UnsupportedError",
    "normalize_input_size",
]


class LayerError(ValueError):
    """Invalid request to a layer: bad shape, bad argument value, bad name."""


class UnsupportedError(LayerError):
    """A valid request outside what a layer declares it supports.

    The benchmark harness records these cells as "unsupported" rather than as errors.
    """


class UnknownLayerError(LayerError):
    """No layer is registered under the requested name."""


class LayerUnavailableError(LayerError):
    """The layer is registered but cannot be loaded (e.g. a plugin that fails to import)."""


@dataclass(frozen=True)
class Paper:
    """Bibliographic reference of the paper that introduced a layer."""

    title: str
    authors: str
    venue: str
    year: int
    url: str = ""

    def __str__(self) -> str:
        return f"{self.authors}, {self.venue} {self.year}"


KernelSizes = Literal["any", "odd", "n/a"]
FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
Sequential = Literal["forward", "inverse", "none"]

_KERNEL_SIZE_TEXT = {
    "any": "any integer k >= 1",
    "odd": "odd integers k >= 1",
    "n/a": "kernel size does not apply",
}


@dataclass(frozen=True)
class LayerInfo:
    """What a layer declares about itself, readable without building it.

    Arguments:
        name: registry name.
        paper: the paper that introduced the layer.
        exact_inverse: whether ``inverse(forward(x)) == x`` up to rounding.
        sequential: the direction that contains a sequential (wavefront) solve:
            ``"forward"`` (density direction), ``"inverse"`` (sampling direction) or ``"none"``.
        kernel_sizes: ``"any"`` (k >= 1), ``"odd"``, or ``"n/a"`` when the layer has no spatial
            kernel (a kernel-size sweep then runs it once instead of once per k).
        channel_multiple: the channel count must be a multiple of this.
        min_channels: the smallest supported channel count.
        needs_input_size: whether the layer must be built for a fixed (H, W).
        devices: device types the layer runs on.
        summary: one line on what the layer computes.
        options: layer-specific keyword options, name -> one-line description.
        exact_logdet: whether the ``logdet`` that ``forward`` returns is ``log|det J|`` of the
            forward map up to rounding (the conformance suite compares it with the dense
            Jacobian only where this is true). A layer that returns something else must say
            in its docstring what it returns.
        dtypes: the floating-point dtypes the layer runs in (forward, inverse and backward), as
            names; others raise ``UnsupportedError``. Most layers need a triangular solve or a
            determinant, which torch implements for float32 and float64 only.
        inverse_tolerance: for a layer without an exact inverse whose error is bounded by its
            construction (an iteration or a truncated series rather than a learned inverse):
            the largest ``max |x − inverse(forward(x))|`` it promises in float64, with its default
            options, on inputs of unit variance; the conformance suite asserts it. ``None``: no
            promise (the error is only reported).
        triangular: whether the forward Jacobian is triangular in an order the layer gives by
            ``jacobian_order(height, width)`` (see :class:`InvertibleLayer`); the conformance
            suite checks the structure against the dense Jacobian.
    """

    name: str
    paper: Paper
    exact_inverse: bool
    sequential: Sequential
    kernel_sizes: KernelSizes = "any"
    channel_multiple: int = 1
    min_channels: int = 1
    needs_input_size: bool = False
    devices: tuple[str, ...] = ("cpu", "cuda")
    summary: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    exact_logdet: bool = True
    dtypes: tuple[str, ...] = ("float32", "float64")
    inverse_tolerance: float | None = None
    triangular: bool = False

    def __post_init__(self) -> None:
        if not self.dtypes or not all(d in FLOAT_DTYPES for d in self.dtypes):
            raise ValueError(f"dtypes must be a non-empty tuple of {', '.join(FLOAT_DTYPES)}, got {self.dtypes!r}")
        if self.sequential not in ("forward", "inverse", "none"):
            raise ValueError(f"sequential must be 'forward', 'inverse' or 'none', got {self.sequential!r}")
        if self.kernel_sizes not in _KERNEL_SIZE_TEXT:
            raise ValueError(f"kernel_sizes must be one of {sorted(_KERNEL_SIZE_TEXT)}, got {self.kernel_sizes!r}")

    @property
    def kernel_size_applies(self) -> bool:
        return self.kernel_sizes != "n/a"

    def describe_kernel_sizes(self) -> str:
        return _KERNEL_SIZE_TEXT[self.kernel_sizes]

    def describe_channels(self) -> str:
        if self.channel_multiple > 1:
            return f"C % {self.channel_multiple} == 0, C >= {max(self.min_channels, self.channel_multiple)}"
        return f"C >= {self.min_channels}"

    def check_dtype(self, dtype: Any) -> None:
        """``UnsupportedError`` naming the supported dtypes if ``dtype`` (a name or a
        ``torch.dtype``) is not among them."""
        name = _dtype(dtype) if isinstance(dtype, torch.dtype) else str(dtype)
        if name not in self.dtypes:
            raise UnsupportedError(f"{self.name}: unsupported dtype {name}; accepted: {', '.join(self.dtypes)}")

    def check(self, channels: Any, kernel_size: Any = None, input_size: Any = None, device: Any = None,
              dtype: Any = None) -> None:
        """Raise a clear error if the request is invalid or outside the declared capabilities.

        ``LayerError`` for values that no layer accepts (kernel size 0, a string for channels);
        ``UnsupportedError`` for valid values this layer does not support (C = 6 for a layer
        that needs C % 4 == 0, an even kernel for a layer that needs odd ones).
        """
        if not _is_int(channels) or channels < 1:
            raise LayerError(f"{self.name}: channels must be a positive integer, got {channels!r}")
        if channels < self.min_channels or channels % self.channel_multiple:
            raise UnsupportedError(
                f"{self.name}: unsupported channel count C={channels}; accepted: {self.describe_channels()}"
            )
        if self.kernel_size_applies:
            if not _is_int(kernel_size) or kernel_size < 1:
                raise LayerError(
                    f"{self.name}: kernel_size must be a positive integer, got {kernel_size!r}; "
                    f"accepted: {self.describe_kernel_sizes()}"
                )
            if self.kernel_sizes == "odd" and kernel_size % 2 == 0:
                raise UnsupportedError(
                    f"{self.name}: unsupported kernel_size={kernel_size}; accepted: {self.describe_kernel_sizes()}"
                )
        elif kernel_size is not None and (not _is_int(kernel_size) or kernel_size < 1):
            # Ignored by this layer, but a nonsense value is a mistake worth naming.
            raise LayerError(f"{self.name}: kernel_size must be None or a positive integer (it does not apply to "
                             f"this layer and is ignored), got {kernel_size!r}")
        if self.needs_input_size and input_size is None:
            raise LayerError(f"{self.name}: input_size is required (an int or (H, W)) because the layer "
                             "is built for a fixed image size")
        if input_size is not None:
            normalize_input_size(input_size, self.name)
        if dtype is not None:
            self.check_dtype(dtype)
        if device is not None:
            dev_type = torch.device(device).type
            if dev_type not in self.devices:
                raise UnsupportedError(
                    f"{self.name}: unsupported device {dev_type!r}; accepted: {', '.join(self.devices)}"
                )

    def as_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (for `bench list` and run records)."""
        d = asdict(self)
        d["paper"]["citation"] = str(self.paper)
        d["devices"] = list(self.devices)
        d["dtypes"] = list(self.dtypes)
        d["kernel_sizes_text"] = self.describe_kernel_sizes()
        d["channels_text"] = self.describe_channels()
        return d


def _dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def normalize_input_size(input_size: Any, name: str = "layer") -> tuple[int, int] | None:
    """``None``, ``n`` or ``(H, W)`` -> ``None`` or ``(H, W)``, with a clear error otherwise."""
    if input_size is None:
        return None
    if _is_int(input_size):
        size = (input_size, input_size)
    elif isinstance(input_size, (tuple, list)) and len(input_size) == 2 and all(map(_is_int, input_size)):
        size = (int(input_size[0]), int(input_size[1]))
    else:
        raise LayerError(f"{name}: input_size must be an int or a pair (H, W) of ints, got {input_size!r}")
    if min(size) < 1:
        raise LayerError(f"{name}: input_size must be positive, got {input_size!r}")
    return size


class InvertibleLayer(nn.Module):
    """Base class of every layer: validates inputs, then calls ``_forward`` / ``_inverse``.

    Subclasses set the class attribute ``info`` and implement

    - ``_forward(x) -> (z, logdet)``: the density direction; ``logdet`` has shape ``(B,)``;
    - ``_inverse(z) -> x``: the sampling direction.

    Optional hooks, for layers that declare them:

    - ``jacobian_order(height, width) -> (order, "lower" | "upper") | None``: a permutation of the
      ``C·H·W`` indices of one image flattened as (c, h, w), in which the forward Jacobian is
      triangular (layers with ``info.triangular``; ``None`` for options that break the structure);
    - ``inverse_diagnostics() -> dict | None``: what the last ``inverse`` call did, for an
      iterative inverse (e.g. ``{"iterations": 100, "residual": 3e-7}``); the benchmark runner
      copies it into the sampling record.

    Plugins do not have to derive from this class (the registry needs only ``info``, a
    ``forward`` returning ``(z, logdet)`` and an ``inverse``), but doing so gives them the
    same input checks and error messages as the built-in layers.
    """

    info: ClassVar[LayerInfo]

    def __init__(self, channels: int, kernel_size: int | None = 3, input_size: int | tuple[int, int] | None = None):
        super().__init__()
        self.info.check(channels, kernel_size, input_size)
        self.channels = channels
        self.kernel_size = kernel_size if self.info.kernel_size_applies else None
        self.input_size = normalize_input_size(input_size, self.info.name)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input(x, "x")
        return self._forward(x)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        self._check_input(z, "z")
        return self._inverse(z)

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def jacobian_order(self, height: int, width: int) -> tuple[torch.Tensor, str] | None:
        """See the class docstring; ``None``: no triangular structure is declared."""
        return None

    def inverse_diagnostics(self) -> dict[str, Any] | None:
        """See the class docstring; ``None``: the inverse is not iterative."""
        return None

    def _inverse(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_input(self, t: Any, what: str) -> None:
        name = self.info.name
        if not isinstance(t, torch.Tensor):
            raise LayerError(f"{name}: {what} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise LayerError(f"{name}: {what} must be a 4-D tensor (B, C, H, W), got shape {tuple(t.shape)}")
        if t.shape[1] != self.channels:
            raise LayerError(
                f"{name}: {what} has {t.shape[1]} channels but the layer was built for C={self.channels} "
                f"(shape {tuple(t.shape)})"
            )
        if not t.is_floating_point():
            raise LayerError(f"{name}: {what} must be a floating-point tensor, got {_dtype(t.dtype)}")
        self.info.check_dtype(t.dtype)
        param = next(iter(self.parameters()), None)
        if param is not None and (param.dtype != t.dtype or param.device != t.device):
            raise LayerError(
                f"{name}: {what} is {_dtype(t.dtype)} on {t.device} but the layer's parameters are "
                f"{_dtype(param.dtype)} on {param.device}; move one to the other (e.g. layer.to(x))"
            )
        if t.shape[0] == 0 or t.shape[2] == 0 or t.shape[3] == 0:
            raise LayerError(f"{name}: {what} has an empty dimension, shape {tuple(t.shape)}")
        if self.input_size is not None and self.info.needs_input_size and tuple(t.shape[2:]) != self.input_size:
            raise LayerError(
                f"{name}: {what} has spatial size {tuple(t.shape[2:])} but the layer was built for "
                f"input_size={self.input_size}"
            )

    def extra_repr(self) -> str:
        parts = [f"channels={self.channels}"]
        if self.kernel_size is not None:
            parts.append(f"kernel_size={self.kernel_size}")
        if self.input_size is not None and self.info.needs_input_size:
            parts.append(f"input_size={self.input_size}")
        return ", ".join(parts)
