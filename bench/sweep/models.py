"""Benchmark flow models: a multi-scale Glow-style flow around any registered layer (docs/math.md §6).

The papers time whole flows, not single layers. :class:`FlowModel` builds the model that their
tables describe, for whichever layer is under test::

    for level in 1..L:
        squeeze                      2×2 space-to-depth: (C, H, W) -> (4C, H/2, W/2)
        K × step                     ActNorm -> layer under test -> [1×1 mixing] -> affine coupling
        split (if level < L)         keep the first half of the channels, factor out the rest
    prior N(0, I) on every factored-out part and on the final latent

Every module maps ``x -> (y, logdet)`` in the density direction and has an exact ``inverse``
(the layer under test may be approximate, e.g. ``snf``); the model's log-determinant is the sum
of its modules'. Sampling draws every latent from N(0, I) and runs every module's inverse in
reverse order.

**1×1 mixing rule.** A step adds Glow's LU 1×1 convolution (the registered ``glow-1x1`` layer)
after the layer under test unless that layer already mixes every channel with every other
(:func:`mixes_all_channels`):

=================  =========  ===============================================================
layer              1×1 added  why
=================  =========  ===============================================================
``inverse-flow``   no         full C×C×k×k causal kernel
``cinc``           no         full C×C×k×k causal kernel
``emerging``       no         contains its own 1×1 convolution
``woodbury``       no         channel transform ``I + U_c V_c`` is dense
``snf``            no         full C×C×k×k convolution
``butterfly``      no         ``ceil(log2 C)`` butterfly levels connect every pair of channels
                              (yes when built with fewer ``levels``)
``glow-1x1``       no         it *is* the 1×1 mixing
``convexp``        no         full C×C×k×k kernel (inside the exponential)
``mintnet``        no         masked C -> L·C -> L·C -> C convolutions, channel-triangular
``finc``           yes        mixes only inside each of its four channel quarters
``macow``          yes        scales and shifts each channel; channels meet only in the
                              conditioner
anything else      yes        unknown plugins: a step whose channels never mix is not a model
=================  =========  ===============================================================

``mixing="always"`` / ``"never"`` overrides the rule.

**ActNorm** (Glow) initialises itself from the first batch it sees (per-channel mean 0, std 1)
and never again; :meth:`FlowModel.initialize` does that once, before anything is timed.

**Affine coupling** (RealNVP / Glow): the first half of the channels conditions the second
through ``3×3 conv (C/2 -> width), ReLU, 1×1 conv (width -> width), ReLU, 3×3 conv (width -> C)``,
the last convolution zero-initialised (the coupling starts as the identity); its outputs are a
log-scale, squashed to ``2·tanh(s/2)`` so a step can never scale by more than e², and a shift.

References:
    D. P. Kingma, P. Dhariwal. Glow: Generative Flow with Invertible 1x1 Convolutions.
    NeurIPS 2018. https://arxiv.org/abs/1807.03039

    L. Dinh, J. Sohl-Dickstein, S. Bengio. Density estimation using Real NVP. ICLR 2017.
    https://arxiv.org/abs/1605.08803

Example:
    >>> model = FlowModel("inverse-flow", image_channels=3, input_size=32, levels=2, steps=4)
    >>> x = torch.rand(8, 3, 32, 32)
    >>> model.initialize(x)          # ActNorm's data-dependent initialisation, once
    >>> model.log_prob(x).shape      # density pass: log p(x) per image, in nats
    torch.Size([8])
    >>> model.sample(8).shape        # sampling pass
    torch.Size([8, 3, 32, 32])
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import layers

from .cells import MIXING_MODES

__all__ = [
    "ActNorm",
    "AffineCoupling",
    "FlowModel",
    "FlowStep",
    "LevelShape",
    "MIXING_MODES",
    "Squeeze",
    "check_model",
    "level_shapes",
    "mixes_all_channels",
]

MIXING_LAYER = "glow-1x1"

_LOG_2PI = math.log(2 * math.pi)


def _butterfly_mixes(channels: int, options: dict[str, Any]) -> bool:
    levels = options.get("levels")
    return levels is None or levels >= max(1, math.ceil(math.log2(channels)))


# Whether layer X's forward map already mixes every channel with every other (see the module
# docstring). A callable decides per (channels, options) where a layer option changes the answer.
_MIXES_ALL_CHANNELS: dict[str, bool | Callable[[int, dict[str, Any]], bool]] = {
    "inverse-flow": True,
    "cinc": True,
    "emerging": True,
    "woodbury": True,
    "snf": True,
    "butterfly": _butterfly_mixes,
    "glow-1x1": True,
    "finc": False,
    "convexp": True,  # full C×C×k×k kernel
    "mintnet": True,  # every output channel reads every lower (type A) or higher (B) channel
    "macow": False,  # an affine map per channel: channels meet only in the conditioner
}


def mixes_all_channels(layer: str, channels: int, options: dict[str, Any] | None = None) -> bool:
    """Whether ``layer`` (built with ``options``) mixes all channels, so that a step needs no 1×1.

    A layer may declare it itself with a boolean ``mixes_channels`` attribute on its
    ``LayerInfo``; otherwise the table above decides, and unknown layers count as not mixing.
    """
    declared = getattr(layers.info(layer), "mixes_channels", None)
    if isinstance(declared, bool):
        return declared
    rule = _MIXES_ALL_CHANNELS.get(layer, False)
    return rule(channels, options or {}) if callable(rule) else rule


# ---------------------------------------------------------------------------------------------
# Shapes


@dataclass(frozen=True)
class LevelShape:
    """The activation shape (C, H, W) that the steps of one level see, after its squeeze."""

    channels: int
    height: int
    width: int


def level_shapes(image_channels: int, input_size: int | tuple[int, int], levels: int) -> list[LevelShape]:
    """The per-level shapes of the model; ``UnsupportedError`` if the image cannot be squeezed
    ``levels`` times (H and W must be multiples of ``2**levels``)."""
    height, width = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
    if not isinstance(levels, int) or levels < 1:
        raise layers.LayerError(f"model: levels must be a positive integer, got {levels!r}")
    if not isinstance(image_channels, int) or image_channels < 1:
        raise layers.LayerError(f"model: image channels must be a positive integer, got {image_channels!r}")
    factor = 2**levels
    if height % factor or width % factor:
        raise layers.UnsupportedError(
            f"model: a {height}x{width} image cannot be squeezed {levels} times "
            f"(height and width must be multiples of {factor})")
    shapes = []
    c, h, w = image_channels, height, width
    for level in range(levels):
        c, h, w = 4 * c, h // 2, w // 2
        shapes.append(LevelShape(c, h, w))
        if level < levels - 1:
            c = c // 2  # the split keeps the first half (C is a multiple of 4 after a squeeze)
    return shapes


def check_model(layer: str, image_channels: int, input_size: int | tuple[int, int], levels: int,
                kernel_size: int | None = 3, device: Any = None) -> list[LevelShape]:
    """Raise ``UnsupportedError`` if ``layer`` cannot be built at some level of the model
    (e.g. ``finc`` at a level whose channel count is not a multiple of 4, ``emerging`` with an
    even kernel), without building anything. Returns the per-level shapes."""
    shapes = level_shapes(image_channels, input_size, levels)
    info = layers.info(layer)
    for i, s in enumerate(shapes):
        try:
            info.check(s.channels, kernel_size, (s.height, s.width), device)
        except layers.UnsupportedError as exc:
            raise layers.UnsupportedError(f"model level {i + 1} ({s.channels}x{s.height}x{s.width}): {exc}") from None
    return shapes


# ---------------------------------------------------------------------------------------------
# Modules (each: forward(x) -> (y, logdet[B]), inverse(y) -> x)


class Squeeze(nn.Module):
    """2×2 space-to-depth: ``y[:, c·4 + 2·dy + dx, i, j] = x[:, c, 2i + dy, 2j + dx]`` (log det 0)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        b, c4, h, w = y.shape
        c = c4 // 4
        return y.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c, 2 * h, 2 * w)


class ActNorm(nn.Module):
    """Per-channel affine ``y = (x + loc)·exp(log_scale)`` with data-dependent initialisation.

    The first forward call sets ``loc`` and ``log_scale`` so that the batch it sees has zero mean
    and unit variance per channel; later calls (and later batches) never change them. ``inverse``
    before any forward uses the current (identity) parameters. ``log|det| = H·W·Σ log_scale``.
    """

    EPS = 1e-6

    def __init__(self, channels: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        # The flag is a buffer so that it travels with state_dict(); a Python mirror is what
        # forward reads, because reading a CUDA buffer on every call would synchronise the device.
        self.register_buffer("initialized", torch.tensor(False))
        self._initialized = False

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        std = x.std(dim=(0, 2, 3), keepdim=True, unbiased=False)
        self.loc.copy_(-mean)
        self.log_scale.copy_(-torch.log(std + self.EPS))
        self.initialized.fill_(True)
        self._initialized = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._initialized = bool(self.initialized)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self._initialized:
            self.initialize(x)
        y = (x + self.loc) * self.log_scale.exp()
        logdet = (x.shape[2] * x.shape[3]) * self.log_scale.sum()
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * (-self.log_scale).exp() - self.loc


class AffineCoupling(nn.Module):
    """Affine coupling: the first ``C//2`` channels condition the other ``C − C//2``.

    ``y_b = x_b·exp(s) + t`` with ``(s_raw, t) = NN(x_a)`` and ``s = 2·tanh(s_raw/2)``;
    ``log|det| = Σ s``. NN is ``3×3 conv (C//2 -> width), ReLU, 1×1 conv (width -> width), ReLU,
    3×3 conv (width -> 2·(C − C//2))``, the last one zero-initialised.
    """

    def __init__(self, channels: int, width: int):
        super().__init__()
        if channels < 2:
            raise layers.UnsupportedError(f"coupling: needs at least 2 channels, got {channels}")
        self.split = channels // 2
        out = 2 * (channels - self.split)
        self.net = nn.Sequential(
            nn.Conv2d(self.split, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 1), nn.ReLU(),
            nn.Conv2d(width, out, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, xa: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raw_s, t = self.net(xa).chunk(2, dim=1)
        return 2.0 * torch.tanh(raw_s / 2.0), t

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xa, xb = x[:, : self.split], x[:, self.split:]
        s, t = self._scale_shift(xa)
        y = torch.cat([xa, xb * s.exp() + t], dim=1)
        return y, s.flatten(1).sum(1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        ya, yb = y[:, : self.split], y[:, self.split:]
        s, t = self._scale_shift(ya)
        return torch.cat([ya, (yb - t) * (-s).exp()], dim=1)


class FlowStep(nn.Module):
    """ActNorm -> layer under test -> [1×1 mixing] -> affine coupling."""

    def __init__(self, layer: nn.Module, channels: int, width: int, mixing: nn.Module | None):
        super().__init__()
        self.actnorm = ActNorm(channels)
        self.layer = layer
        self.mixing = mixing
        self.coupling = AffineCoupling(channels, width)

    def transforms(self) -> list[nn.Module]:
        """The step's modules in density order."""
        return [m for m in (self.actnorm, self.layer, self.mixing, self.coupling) if m is not None]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for m in self.transforms():
            x, ld = m(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for m in reversed(self.transforms()):
            y = m.inverse(y)
        return y


# ---------------------------------------------------------------------------------------------
# The model


def _check_input(model: nn.Module, x: torch.Tensor) -> None:
    """``x`` is a batch of the model's images, or a :class:`layers.LayerError` saying what was expected."""
    if x.dim() != 4 or x.shape[1] != model.image_channels or tuple(x.shape[2:]) != model.input_size:
        raise layers.LayerError(
            f"model: expected input (B, {model.image_channels}, {model.input_size[0]}, {model.input_size[1]}), "
            f"got {tuple(x.shape)}")


class FlowModel(nn.Module):
    """Multi-scale Glow-style flow of ``levels`` levels of ``steps`` steps around ``layer``.

    Arguments:
        layer: a registered layer name (:func:`layers.available`).
        image_channels: channels of the input image (3 for CIFAR, 1 for MNIST).
        input_size: ``N`` or ``(H, W)`` of the input image; multiples of ``2**levels``.
        levels: L, the number of squeeze levels.
        steps: K, steps per level.
        width: hidden channels of the coupling networks.
        kernel_size: the layer's kernel size (ignored by layers without one).
        layer_options: keyword options for ``layers.create``.
        mixing: ``"auto"`` (the rule of :func:`mixes_all_channels`), ``"always"`` or ``"never"``.

    Raises:
        layers.UnsupportedError: the layer cannot be built at some level (the benchmark runner
            records such a cell as "unsupported"); layers.LayerError for invalid values.
    """

    def __init__(self, layer: str, image_channels: int = 3, input_size: int | tuple[int, int] = 32,
                 levels: int = 2, steps: int = 16, width: int = 128, kernel_size: int | None = 3,
                 layer_options: dict[str, Any] | None = None, mixing: str = "auto"):
        super().__init__()
        if mixing not in MIXING_MODES:
            raise layers.LayerError(f"model: mixing must be one of {', '.join(MIXING_MODES)}, got {mixing!r}")
        for name, value in (("steps", steps), ("width", width)):
            if not isinstance(value, int) or value < 1:
                raise layers.LayerError(f"model: {name} must be a positive integer, got {value!r}")
        options = dict(layer_options or {})
        self.layer_name = layer
        self.image_channels = image_channels
        self.input_size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        self.levels_shape = check_model(layer, image_channels, self.input_size, levels, kernel_size)
        self.squeeze = Squeeze()
        self.levels = nn.ModuleList()
        self.mixing_used: list[bool] = []
        for shape in self.levels_shape:
            c, size = shape.channels, (shape.height, shape.width)
            add_mixing = {"always": True, "never": False}.get(mixing, not mixes_all_channels(layer, c, options))
            self.mixing_used.append(add_mixing)
            self.levels.append(nn.ModuleList(
                FlowStep(layers.create(layer, c, kernel_size=kernel_size, input_size=size, **options), c, width,
                         layers.create(MIXING_LAYER, c, input_size=size) if add_mixing else None)
                for _ in range(steps)
            ))

    # -- shapes ---------------------------------------------------------------------------------

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, H, W) of each latent, in the order :meth:`forward` returns them: the part
        factored out at each split, then the final latent."""
        out = []
        for i, s in enumerate(self.levels_shape):
            if i < len(self.levels_shape) - 1:
                out.append((s.channels - s.channels // 2, s.height, s.width))
            else:
                out.append((s.channels, s.height, s.width))
        return out

    # -- density direction ----------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Density direction: ``x -> (latents, log|det J|)``, the log det of shape ``(B,)``."""
        _check_input(self, x)
        logdet = x.new_zeros(x.shape[0])
        latents = []
        for i, steps in enumerate(self.levels):
            x, _ = self.squeeze(x)
            for step in steps:
                x, ld = step(x)
                logdet = logdet + ld
            if i < len(self.levels) - 1:
                keep = x.shape[1] // 2
                latents.append(x[:, keep:])
                x = x[:, :keep]
        latents.append(x)
        return latents, logdet

    @staticmethod
    def prior_log_prob(latents: list[torch.Tensor]) -> torch.Tensor:
        """Σ log N(z; 0, I) over every latent, per image."""
        return sum(-0.5 * (z.flatten(1) ** 2 + _LOG_2PI).sum(1) for z in latents)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) in nats per image (change of variables: prior log density + log|det J|)."""
        latents, logdet = self(x)
        return self.prior_log_prob(latents) + logdet

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        """ActNorm's data-dependent initialisation: one density pass over ``x``. Later calls
        change nothing (each ActNorm initialises only once)."""
        self(x)

    # -- sampling direction ---------------------------------------------------------------------

    def inverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        """Sampling direction: latents (as :meth:`forward` returns them) -> image, every module's
        inverse in reverse order."""
        x = latents[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                x = torch.cat([x, latents[i]], dim=1)
            for step in reversed(self.levels[i]):
                x = step.inverse(x)
            x = self.squeeze.inverse(x)
        return x

    def sample(self, n: int, temperature: float = 1.0) -> torch.Tensor:
        """``n`` images: every latent drawn from N(0, temperature²·I), then :meth:`inverse`."""
        p = next(self.parameters())
        latents = [torch.randn(n, *shape, device=p.device, dtype=p.dtype) * temperature
                   for shape in self.latent_shapes()]
        return self.inverse(latents)

    # -- bookkeeping ----------------------------------------------------------------------------

    def transforms(self) -> list[nn.Module]:
        """Every module with a log det, in density order (squeezes and splits have none)."""
        return [m for steps in self.levels for step in steps for m in step.transforms()]

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def describe(self) -> str:
        shapes = " -> ".join(f"{s.channels}x{s.height}x{s.width}" for s in self.levels_shape)
        mix = ", ".join(f"L{i + 1}: {'+1x1' if m else 'no 1x1'}" for i, m in enumerate(self.mixing_used))
        return (f"{len(self.levels)} levels x {len(self.levels[0])} steps of {self.layer_name} on "
                f"{self.image_channels}x{self.input_size[0]}x{self.input_size[1]} (levels {shapes}; {mix})")


# ---------------------------------------------------------------------------------------------
# Published architectures (the MaCow and MintNet rows of the comparison tables)


class GlowStep(nn.Module):
    """Glow's step: ActNorm -> LU 1×1 convolution -> affine coupling (MaCow's step ends with one)."""

    def __init__(self, channels: int, width: int, size: tuple[int, int]):
        super().__init__()
        self.parts = nn.ModuleList([ActNorm(channels), layers.create(MIXING_LAYER, channels, input_size=size),
                                    AffineCoupling(channels, width)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for m in self.parts:
            x, ld = m(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for m in reversed(self.parts):
            y = m.inverse(y)
        return y


class StagedFlow(nn.Module):
    """A flow given as a list of stages: ``"squeeze"``, ``"split"`` (factor out the second half of
    the channels under N(0, I)) or a module mapping ``x -> (y, logdet)`` with an ``inverse``.

    Same interface as :class:`FlowModel` (``forward``, ``log_prob``, ``initialize``, ``inverse``,
    ``sample``, ``latent_shapes``, ``parameter_count``, ``describe``), so the runner times both
    the same way.
    """

    def __init__(self, layer: str, image_channels: int, input_size: tuple[int, int], stages: list[Any],
                 description: str):
        super().__init__()
        self.layer_name = layer
        self.image_channels = image_channels
        self.input_size = tuple(input_size)
        self.kinds = [s if isinstance(s, str) else "module" for s in stages]
        self.modules_ = nn.ModuleList(s for s in stages if not isinstance(s, str))
        self.squeeze = Squeeze()
        self.mixing_used: list[bool] = []
        self._description = description
        c, (h, w) = image_channels, self.input_size
        self._latent_shapes = []
        for kind in self.kinds:
            if kind == "squeeze":
                c, h, w = 4 * c, h // 2, w // 2
            elif kind == "split":
                self._latent_shapes.append((c - c // 2, h, w))
                c = c // 2
        self._latent_shapes.append((c, h, w))

    def latent_shapes(self) -> list[tuple[int, int, int]]:
        return list(self._latent_shapes)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        _check_input(self, x)
        logdet = x.new_zeros(x.shape[0])
        latents = []
        modules = iter(self.modules_)
        for kind in self.kinds:
            if kind == "squeeze":
                x, _ = self.squeeze(x)
            elif kind == "split":
                keep = x.shape[1] // 2
                latents.append(x[:, keep:])
                x = x[:, :keep]
            else:
                x, ld = next(modules)(x)
                logdet = logdet + ld
        latents.append(x)
        return latents, logdet

    prior_log_prob = staticmethod(FlowModel.prior_log_prob)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        latents, logdet = self(x)
        return self.prior_log_prob(latents) + logdet

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> None:
        self(x)

    def inverse(self, latents: list[torch.Tensor]) -> torch.Tensor:
        latents = list(latents)
        x = latents.pop()
        modules = list(self.modules_)
        for kind in reversed(self.kinds):
            if kind == "squeeze":
                x = self.squeeze.inverse(x)
            elif kind == "split":
                x = torch.cat([x, latents.pop()], dim=1)
            else:
                x = modules.pop().inverse(x)
        return x

    sample = FlowModel.sample

    def parameter_count(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def describe(self) -> str:
        return self._description


# MaCow's published CIFAR-10 model: 4 levels; a nested list is sub-blocks of steps separated by
# a split (our reading of its "fine-grained" levels). 64 steps of 2 units (8 MCFs) = 512 MCFs.
MACOW_CIFAR_LEVELS = [[4], [12, 12], [12, 12], [12]]


def macow_model(image_channels: int, input_size: tuple[int, int], kernel_size: int | None = 3,
                levels: list[list[int]] | None = None, hidden_width: int = 128,
                layer_options: dict[str, Any] | None = None) -> StagedFlow:
    """MaCow's architecture (Ma et al. 2019) around the ``macow`` layer.

    Per level: squeeze, then sub-blocks of steps (a split between sub-blocks), then a split if
    it is not the last level. A step is two MaCow units and a Glow step; a unit is
    ``ActNorm -> MCF-A -> MCF-B -> ActNorm -> MCF-C -> MCF-D``; a Glow step is
    ``ActNorm -> LU 1×1 -> affine coupling`` (hidden ``hidden_width``). ``levels`` defaults to
    the published CIFAR-10 model, :data:`MACOW_CIFAR_LEVELS`.
    """
    levels = MACOW_CIFAR_LEVELS if levels is None else levels
    if (not isinstance(levels, list) or not levels
            or not all(isinstance(lv, list) and lv and all(isinstance(n, int) and n >= 1 for n in lv)
                       for lv in levels)):
        raise layers.LayerError(f"macow model: levels must be a list of non-empty lists of positive step counts "
                                f"(e.g. {MACOW_CIFAR_LEVELS}), got {levels!r}")
    options = {k: v for k, v in (layer_options or {}).items() if k != "order"}
    h, w = input_size
    factor = 2 ** len(levels)
    if h % factor or w % factor:
        raise layers.UnsupportedError(f"macow model: a {h}x{w} image cannot be squeezed {len(levels)} times "
                                      f"(height and width must be multiples of {factor})")
    stages: list[Any] = []
    c = image_channels
    shapes = []
    for i, level in enumerate(levels):
        stages.append("squeeze")
        c, h, w = 4 * c, h // 2, w // 2
        for j, steps in enumerate(level):
            if j:
                stages.append("split")
                c = c // 2
            shapes.append(f"{steps}x{c}x{h}x{w}")
            for _ in range(steps):
                for _unit in range(2):
                    for orders in ("AB", "CD"):
                        stages.append(ActNorm(c))
                        stages.append(layers.create("macow", c, kernel_size=kernel_size, input_size=(h, w),
                                                    order=orders, **options))
                stages.append(GlowStep(c, hidden_width, (h, w)))
        if i < len(levels) - 1:
            stages.append("split")
            c = c // 2
    n_steps = sum(map(sum, levels))
    desc = (f"MaCow's architecture: {len(levels)} levels, steps {levels} ({n_steps} steps of 2 units + a Glow step; "
            f"{8 * n_steps} MCFs), steps x C x H x W per block {', '.join(shapes)}; conditioner kernel "
            f"{layers.macow.conditioner_kernel(kernel_size)}, coupling width {hidden_width}")
    return StagedFlow("macow", image_channels, input_size, stages, desc)


def mintnet_model(image_channels: int, input_size: tuple[int, int], kernel_size: int | None = 3,
                  pairs: int = 21, scales: int = 3, latent: int = 85,
                  layer_options: dict[str, Any] | None = None) -> StagedFlow:
    """MintNet's architecture (Song et al. 2019): ``pairs`` (type A block, type B block) pairs at
    ``scales`` scales, a squeeze between scales and no channel split-off, no ActNorm.

    The pairs are spread as the published code does: a squeeze before pair
    ``(pairs // scales)·i`` for i = 1 … scales − 1 (21 pairs: 7 + 7 + 7; 20: 6 + 6 + 8).
    Published: CIFAR-10 21 pairs, latent multiplier 85; MNIST 20 pairs, multiplier 45.
    """
    for name, value in (("pairs", pairs), ("scales", scales), ("latent", latent)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise layers.LayerError(f"mintnet model: {name} must be a positive integer, got {value!r}")
    if pairs < scales:
        raise layers.LayerError(f"mintnet model: needs at least one pair per scale, got {pairs} pairs for {scales} scales")
    h, w = input_size
    factor = 2 ** (scales - 1)
    if h % factor or w % factor:
        raise layers.UnsupportedError(f"mintnet model: a {h}x{w} image cannot be squeezed {scales - 1} times")
    options = {k: v for k, v in (layer_options or {}).items() if k not in ("type", "latent")}
    gap = pairs // scales
    anchors = {gap * (i + 1) for i in range(scales - 1)}
    stages: list[Any] = []
    c = image_channels
    per_scale: list[str] = []
    count = 0
    for p in range(pairs):
        if p in anchors:
            per_scale.append(f"{count}x{c}x{h}x{w}")
            stages.append("squeeze")
            c, h, w, count = 4 * c, h // 2, w // 2, 0
        for kind in ("A", "B"):
            stages.append(layers.create("mintnet", c, kernel_size=kernel_size, input_size=(h, w), type=kind,
                                        latent=latent, **options))
        count += 1
    per_scale.append(f"{count}x{c}x{h}x{w}")
    desc = (f"MintNet's architecture: {pairs} pairs of (A, B) blocks at {scales} scales (pairs x C x H x W: "
            f"{', '.join(per_scale)}), latent multiplier {latent}, no split-off, kernel {kernel_size}")
    return StagedFlow("mintnet", image_channels, input_size, stages, desc)


ARCHITECTURES: dict[str, Callable[..., StagedFlow]] = {"macow": macow_model, "mintnet": mintnet_model}
"""Published architectures by name: the ``name`` of a cell's ``architecture``."""


def build_architecture(architecture: dict[str, Any], layer: str, image_channels: int,
                       input_size: tuple[int, int], kernel_size: int | None, hidden_width: int | None,
                       layer_options: dict[str, Any] | None = None) -> StagedFlow:
    """The published architecture ``architecture["name"]`` around ``layer`` (which must be the
    layer it is built from); its other keys (but ``label``) are the builder's settings."""
    name = architecture.get("name")
    if name not in ARCHITECTURES:
        raise layers.LayerError(f"model: unknown architecture {name!r}; accepted: {', '.join(ARCHITECTURES)}")
    if layer != name:
        raise layers.LayerError(f"model: the {name} architecture is built from the {name!r} layer, not {layer!r}")
    settings = {k: v for k, v in architecture.items() if k not in ("name", "label")}
    if name == "macow" and hidden_width is not None:
        settings.setdefault("hidden_width", hidden_width)
    try:
        return ARCHITECTURES[name](image_channels, tuple(input_size), kernel_size=kernel_size,
                                   layer_options=layer_options, **settings)
    except TypeError as exc:
        raise layers.LayerError(f"model: bad settings for the {name} architecture: {exc}") from None
