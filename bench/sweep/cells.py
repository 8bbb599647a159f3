"""Sweeps: axes and their grids, expanded into cells (one layer at one shape)."""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from typing import Any

AXES = ("input_size", "batch", "kernel_size", "channels")
SWEEPABLE = ("input_size", "batch", "kernel_size")

# The papers' ablation axes (docs/math.md §6, seed slides): input size 16…256, batch 1…128, k 2…11.
PAPER_GRID: dict[str, list[int]] = {
    "input_size": [16, 32, 64, 128, 256],
    "batch": [1, 2, 4, 8, 16, 32, 64, 128],
    "kernel_size": [2, 3, 5, 7, 9, 11],
}
# A grid that a 2-core CPU finishes in a few minutes with every layer (pure-PyTorch solves
# take milliseconds per anti-diagonal step there, so the large sizes are left to --full).
CPU_GRID: dict[str, list[int]] = {
    "input_size": [16, 32, 64],
    "batch": [1, 4, 16],
    "kernel_size": [2, 3, 5, 7],
}
# Values of the axes that are not swept. 12 channels = a 3-channel image after one squeeze,
# the first level of the papers' models; batch 100 is the papers' sampling batch.
FIXED_GPU: dict[str, int] = {"input_size": 32, "batch": 100, "kernel_size": 3, "channels": 12}
FIXED_CPU: dict[str, int] = {"input_size": 32, "batch": 8, "kernel_size": 3, "channels": 12}

DIRECTIONS = ("forward", "sampling", "train")
METRICS = ("time", "instructions")


SCOPES = ("layer", "model")
MIXING_MODES = ("auto", "always", "never")  # when a model step adds a 1×1 after the layer (bench/sweep/models.py)
# Fields of a model cell that a layer cell does not have (None there).
MODEL_FIELDS = ("levels", "steps", "hidden_width", "mixing")


@dataclass(frozen=True)
class Cell:
    """One measurement: a layer, or a flow model built around a layer, at one shape, device and dtype.

    For a layer cell (``scope="layer"``) ``channels``, ``height`` and ``width`` are the layer's
    input. For a model cell (``scope="model"``, see :mod:`bench.sweep.models`) they are the *image's*
    (3 or 1 channels, before any squeeze), and ``levels``, ``steps``, ``hidden_width`` (of the
    coupling networks) and ``mixing`` describe the model. ``architecture`` (model cells only)
    names a published architecture instead of the common Glow-style model: a dict with ``name``
    (see ``bench.sweep.models.ARCHITECTURES``), its settings and an optional ``label``.
    """

    layer: str
    device: str
    dtype: str
    batch: int
    channels: int
    height: int
    width: int
    kernel_size: int | None  # None: the layer has no kernel size
    options: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    scope: str = "layer"
    levels: int | None = None
    steps: int | None = None
    hidden_width: int | None = None
    mixing: str | None = None
    architecture: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    def key(self) -> str:
        """Stable identity used to match records (resume, compare).

        A layer cell's key has only the original fields, so records written before model cells
        existed still match.
        """
        d = asdict(self)
        if self.architecture is None:  # keys of cells written before architectures existed still match
            d.pop("architecture")
        if self.scope == "layer":
            for name in ("scope", *MODEL_FIELDS):
                d.pop(name)
        return json.dumps(d, sort_keys=True, separators=(",", ":"))

    def label(self) -> str:
        k = "k=n/a" if self.kernel_size is None else f"k={self.kernel_size}"
        if self.scope == "model" and self.architecture:
            return (f"{self.layer} {architecture_label(self.architecture)} B={self.batch} "
                    f"{self.channels}x{self.height}x{self.width} {k} {self.device}/{self.dtype}")
        if self.scope == "model":
            return (f"{self.layer} model L={self.levels} K={self.steps} w={self.hidden_width} B={self.batch} "
                    f"{self.channels}x{self.height}x{self.width} {k} {self.device}/{self.dtype}")
        return f"{self.layer} B={self.batch} C={self.channels} {self.height}x{self.width} {k} {self.device}/{self.dtype}"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> "Cell":
        return Cell(**{**d, "options": dict(d.get("options") or {})})


@dataclass
class SweepConfig:
    """A fully resolved sweep: everything needed to re-run it, stored as ``config.json``."""

    layers: list[str]
    sweep: list[str]
    values: dict[str, list[Any]]  # every axis in AXES -> its values (one if not swept); sizes: n or [H, W]
    device: str
    dtype: str
    repeat: int
    min_time: float
    warmup: int
    warmup_time: float
    max_time: float
    timeout: float
    isolate: bool
    threads: int | None
    seed: int = 0
    cold_cache: bool = False
    directions: list[str] = field(default_factory=lambda: list(DIRECTIONS))
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-layer create() options
    scope: str = "layer"  # "layer" or "model"; configs written before model cells exist are layer sweeps
    model: dict[str, Any] = field(default_factory=dict)  # model scope: levels, steps, hidden_width, mixing
    preset: dict[str, Any] | None = None  # the preset this run came from: name, paper table, quick, notes
    processes: int = 1  # worker processes per cell (runs written before --processes had one)
    metric: str = "time"  # "time", or "instructions" (counted under callgrind: bench/execution/instructions.py)
    # Model scope: published architectures measured besides the Glow-style model, each
    # {"layer": name, "architecture": {"name": ..., settings, "label": ...}, "options": {...}}.
    architectures: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_json(d: dict[str, Any]) -> "SweepConfig":
        return SweepConfig(**d)


# Model settings when none are given: the comparison tables' model (2 levels of 16 steps,
# docs/math.md §6). The coupling width 128 is the power of two that puts our Inverse-Flow CIFAR model
# nearest the published parameter count (1.63 M against 1.76 M); the papers do not state theirs.
MODEL_DEFAULTS: dict[str, Any] = {"levels": 2, "steps": 16, "hidden_width": 128, "mixing": "auto"}


def default_values(device: str, sweep: list[str], full: bool) -> dict[str, list[int]]:
    grid = PAPER_GRID if (full or device == "cuda") else CPU_GRID
    fixed = FIXED_GPU if device == "cuda" else FIXED_CPU
    return {axis: (list(grid[axis]) if axis in sweep else [fixed[axis]]) for axis in AXES}


def expand(config: SweepConfig) -> list[Cell]:
    """Every (layer × axis values) cell, in a stable order; model cells for ``scope="model"``.

    Layers whose kernel size does not apply get one cell per combination of the other axes with
    ``kernel_size=None`` instead of one per k, so a kernel-size sweep does not repeat them.
    """
    import layers

    cells: list[Cell] = []
    seen: set[str] = set()
    v = config.values
    model: dict[str, Any] = {}
    if config.scope == "model":
        model = {"scope": "model", **{f: config.model.get(f, MODEL_DEFAULTS[f]) for f in MODEL_FIELDS}}
    elif config.scope != "layer":
        raise ValueError(f"unknown scope {config.scope!r}; accepted: {', '.join(SCOPES)}")
    for name in config.layers:
        kernel_applies = layers.info(name).kernel_size_applies
        for size, batch, k, channels in itertools.product(v["input_size"], v["batch"], v["kernel_size"], v["channels"]):
            height, width = (size, size) if isinstance(size, int) else size
            cell = Cell(
                layer=name, device=config.device, dtype=config.dtype, batch=batch, channels=channels,
                height=height, width=width, kernel_size=k if kernel_applies else None,
                options=dict(config.options.get(name, {})), **model,
            )
            if cell.key() not in seen:
                seen.add(cell.key())
                cells.append(cell)
    if config.scope == "model":
        for entry in config.architectures:
            name = entry["layer"]
            kernel_applies = layers.info(name).kernel_size_applies
            for size, batch, k, channels in itertools.product(v["input_size"], v["batch"], v["kernel_size"],
                                                              v["channels"]):
                height, width = (size, size) if isinstance(size, int) else size
                cell = Cell(
                    layer=name, device=config.device, dtype=config.dtype, batch=batch, channels=channels,
                    height=height, width=width, kernel_size=k if kernel_applies else None,
                    options={**config.options.get(name, {}), **entry.get("options", {})}, **model,
                    architecture=dict(entry["architecture"]),
                )
                if cell.key() not in seen:
                    seen.add(cell.key())
                    cells.append(cell)
    return cells


def architecture_label(architecture: dict[str, Any]) -> str:
    """How a published architecture is named in tables: its ``label``, else its ``name``."""
    return str(architecture.get("label") or architecture.get("name"))
