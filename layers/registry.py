"""The layer registry: built-in layers by name, third-party layers through entry points.

Nothing is imported until it is asked for: built-ins are stored as ``"module:Class"`` strings
and plugins as entry points, loaded on first use and cached. A plugin that fails to load is
reported as unavailable with the reason; it never breaks the other layers.
"""

from __future__ import annotations

import importlib
import inspect
import threading
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from .base import LayerError, LayerInfo, LayerUnavailableError, UnknownLayerError, normalize_input_size

ENTRY_POINT_GROUP = "invconv_bench.layers"

# Built-in layers: registry name -> "module:attribute" (imported lazily).
BUILTIN: dict[str, str] = {
    "butterfly": "layers.butterfly:Butterfly",
    "cinc": "layers.cinc:CInC",
    "convexp": "layers.convexp:ConvExp",
    "emerging": "layers.emerging:Emerging",
    "finc": "layers.finc:FInC",
    "glow-1x1": "layers.glow:Glow1x1",
    "inverse-flow": "layers.inverse_flow:InverseFlow",
    "macow": "layers.macow:MaCow",
    "mintnet": "layers.mintnet:MintNet",
    "snf": "layers.snf:SNF",
    "woodbury": "layers.woodbury:Woodbury",
}


@dataclass
class Entry:
    """One registered name and, once loaded, its class or why it could not be loaded."""

    name: str
    target: str  # "module:attribute"
    source: str  # "builtin", "runtime" or "plugin (<distribution>)"
    _loader: Any = None  # an importlib.metadata.EntryPoint for plugins
    cls: Any = None
    error: str | None = None
    loaded: bool = False

    def load(self) -> Any:
        if not self.loaded:
            try:
                obj = self._loader.load() if self._loader is not None else _import_target(self.target)
                _validate_layer_class(obj)
                self.cls = obj
            except KeyboardInterrupt:
                raise
            except BaseException as exc:  # noqa: BLE001 - any failure of a plugin (even sys.exit()) makes it unavailable
                self.error = f"{type(exc).__name__}: {exc}"
            self.loaded = True
        return self.cls


_lock = threading.Lock()
_entries: dict[str, Entry] | None = None
_runtime: dict[str, Entry] = {}


def _import_target(target: str) -> Any:
    module_name, _, attr = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _validate_layer_class(obj: Any) -> None:
    info = getattr(obj, "info", None)
    if not isinstance(info, LayerInfo):
        raise TypeError(f"{obj!r} has no `info` attribute of type layers.LayerInfo")
    if not callable(obj) or not callable(getattr(obj, "inverse", None)):
        raise TypeError(f"{obj!r} must be callable (a class) and define `inverse`")


def _discover() -> dict[str, Entry]:
    entries: dict[str, Entry] = {name: Entry(name, target, "builtin") for name, target in BUILTIN.items()}
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        entry = Entry(ep.name, ep.value, f"plugin ({dist})", _loader=ep)
        if ep.name in entries:
            # A plugin may not silently replace a built-in (or an earlier plugin).
            entry.loaded = True
            entry.error = f"name clash: {ep.name!r} is already registered by {entries[ep.name].source}"
            entries[f"{ep.name} [{dist}]"] = entry
            continue
        entries[ep.name] = entry
    entries.update(_runtime)
    return entries


def entries() -> dict[str, Entry]:
    """Every registered name (built-ins, plugins, runtime registrations), discovered once."""
    global _entries
    with _lock:
        if _entries is None:
            _entries = _discover()
        return _entries


def refresh() -> None:
    """Forget discovered entry points and loaded classes (after installing a plugin)."""
    global _entries
    with _lock:
        _entries = None


def register(name: str, target: Any) -> None:
    """Register a layer in this process: ``target`` is a class or a ``"module:Class"`` string.

    Useful in notebooks and tests; installed packages should use the entry-point group
    ``invconv_bench.layers`` instead.
    """
    if not isinstance(name, str) or not name:
        raise LayerError(f"layer name must be a non-empty string, got {name!r}")
    if isinstance(target, str):
        entry = Entry(name, target, "runtime")
    elif not isinstance(target, type):
        raise LayerError(f"register({name!r}, ...): target must be a layer class or a 'module:Class' string, "
                         f"got {type(target).__name__} {target!r}")
    else:
        entry = Entry(name, f"{target.__module__}:{target.__qualname__}", "runtime", cls=target, loaded=True)
        try:
            _validate_layer_class(target)
        except TypeError as exc:
            raise LayerError(str(exc)) from None
    _runtime[name] = entry
    refresh()


def unregister(name: str) -> None:
    """Remove a runtime registration (built-ins and plugins cannot be removed)."""
    _runtime.pop(name, None)
    refresh()


def available() -> list[str]:
    """Names of every registered layer that loads, sorted."""
    return sorted(name for name, e in entries().items() if e.load() is not None)


def unavailable() -> dict[str, str]:
    """Registered layers that cannot be loaded, with the reason."""
    return {name: e.error or "unknown reason" for name, e in sorted(entries().items()) if e.load() is None}


def get(name: str) -> Any:
    """The class registered under ``name``; clear errors for unknown or unavailable names."""
    all_entries = entries()
    entry = all_entries.get(name)
    if entry is None:
        import difflib

        names = available()
        close = difflib.get_close_matches(str(name), names, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise UnknownLayerError(f"unknown layer {name!r}; {hint}known layers: {', '.join(names) or '(none)'}")
    cls = entry.load()
    if cls is None:
        raise LayerUnavailableError(f"layer {name!r} from {entry.source} is unavailable: {entry.error}")
    return cls


def info(name: str) -> LayerInfo:
    """The declared capabilities of a layer, without building it."""
    return get(name).info


def create(name: str, channels: int, kernel_size: int | None = 3, input_size: Any = None, **options: Any):
    """Build the layer ``name`` for ``channels`` channels.

    Arguments:
        name: a name from :func:`available`.
        channels: number of input channels C.
        kernel_size: spatial kernel size k (ignored by layers whose kernel size does not apply).
        input_size: ``H`` or ``(H, W)``; required by layers that are built for a fixed size,
            ignored by the others.
        options: layer-specific keyword options (see ``layers.info(name).options``).

    Raises:
        UnknownLayerError, LayerUnavailableError, UnsupportedError, LayerError.
    """
    cls = get(name)
    layer_info: LayerInfo = cls.info
    layer_info.check(channels, kernel_size, input_size)
    if not layer_info.kernel_size_applies:
        kernel_size = None
    size = normalize_input_size(input_size, name)
    _check_options(cls, name, options)
    return cls(channels, kernel_size=kernel_size, input_size=size, **options)


def check_options(name: str, options: dict[str, Any]) -> None:
    """``LayerError`` if ``options`` are not keyword options that layer ``name`` accepts (or an
    ``init_scale`` is not a finite number >= 0), without building the layer."""
    _check_options(get(name), name, options)


def _check_options(cls: Any, name: str, options: dict[str, Any]) -> None:
    if "init_scale" in options:
        import math

        scale = options["init_scale"]
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale < 0:
            raise LayerError(f"{name}: init_scale must be a finite number >= 0, got {scale!r}")
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [p for p in params if p not in ("channels", "kernel_size", "input_size", "self")]
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise LayerError(
            f"{name}: unknown option(s) {', '.join(unknown)}; accepted: {', '.join(accepted) or '(none)'}"
        )
