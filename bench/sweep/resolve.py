"""A sweep's settings resolved: the parsed options of ``bench run`` (and ``bench ab``), on top of a
preset's settings and the per-device defaults, turned into one :class:`SweepConfig`, with a one-line
error naming the problem for every bad request."""

from __future__ import annotations

import argparse
import math

from ..errors import UsageError
from .cells import DIRECTIONS, MODEL_DEFAULTS, SWEEPABLE, SweepConfig, default_values

# Per-device defaults, per worker process: the process is the unit of evidence, so each of
# PROCESSES_DEFAULT processes takes a few samples after its own warm-up (as pyperf does) rather
# than one process taking many. A 2-core CPU finishes the default input-size sweep (every layer
# at 16, 32, 64) in under 3 minutes.
TIMING_DEFAULTS = {
    "cpu": {"repeat": 5, "min_time": 0.1, "max_time": 2.0, "warmup": 3, "warmup_time": 0.1},
    "cuda": {"repeat": 20, "min_time": 0.3, "max_time": 5.0, "warmup": 3, "warmup_time": 0.2},
}
PROCESSES_DEFAULT = 3
"""Worker processes per cell. Three give a median over processes that one unlucky process cannot
move, and a spread to judge it by; ``compare`` and ``ab`` compare process medians."""
# Model cells without a preset: the comparison tables' model on a GPU; fewer steps on a CPU,
# where the pure-PyTorch solves make a 16-step model take seconds per call.
MODEL_STEPS_DEFAULT = {"cpu": 4, "cuda": 16}


def _flatten(lists):
    return [x for sub in lists for x in sub] if lists else None


def resolve_config(args: argparse.Namespace, preset_name: str | None = None) -> SweepConfig:
    """A :class:`SweepConfig` from the parsed options of ``bench run`` or ``bench ab`` (on top of
    ``preset_name``'s settings, if given), with clear errors for bad requests."""
    import torch

    import layers

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    preset, base = None, {}
    if preset_name:
        preset = load_preset(preset_name)
        base = preset.settings(quick=args.quick)
        from ..locations import paper_table_ids

        # Rendered after the sweep: found out now, not after hours of measuring.
        if preset.paper_table not in paper_table_ids():
            raise UsageError(f"preset {preset.name}: paper table {preset.paper_table!r} is not in results/paper/ "
                             f"(known: {', '.join(paper_table_ids())})")

    names = _flatten(args.layers)
    if names == []:
        raise UsageError("--layers names no layer; give comma-separated names (see `python -m bench list`) "
                         "or leave it out for every layer")
    if names is None:
        names = base.get("layers", "all")
        names = layers.available() if names == "all" else names
    for name in names:
        try:
            layers.info(name)
        except layers.LayerError as exc:
            raise UsageError(f"{exc}" + (f" (named by preset {preset.name})" if preset else "")) from None
    if len(set(names)) != len(names):
        names = list(dict.fromkeys(names))
    scope = args.scope or (preset.scope if preset else "layer")
    sweep = list(dict.fromkeys(_flatten(args.sweep) or base.get("sweep", [])))
    if preset and not args.sweep:
        values = {axis: list(v) for axis, v in base["values"].items()}
    else:
        values = default_values(device, sweep, args.full)
        if scope == "model":
            values["channels"] = [3]  # the image's channels (a model squeezes them to 12 itself)
        for axis in sweep:  # a preset's grid for an axis it sweeps, when --sweep names it again
            if axis in base.get("values", {}) and len(base["values"][axis]) > 1:
                values[axis] = list(base["values"][axis])
    for axis, given in (("channels", args.channels), ("batch", args.batch), ("input_size", args.input_size),
                        ("kernel_size", args.kernel_size)):
        if given:
            values[axis] = given
    # An axis given several values is swept, whether or not --sweep names it (else the tables
    # would mix its values in one column and say "Swept: nothing").
    sweep += [axis for axis in SWEEPABLE if axis not in sweep and len(values[axis]) > 1]
    directions = args.directions or base.get("directions") or list(DIRECTIONS)
    for d in directions:
        if d not in DIRECTIONS:
            raise UsageError(f"unknown direction {d!r}; accepted: {', '.join(DIRECTIONS)}")
    options: dict[str, dict] = {}
    for layer, key, value in args.option or []:
        if layer not in names:
            raise UsageError(f"--option {layer}:{key}: layer {layer!r} is not in this run ({', '.join(names)})")
        options.setdefault(layer, {})[key] = value
    for layer, opts in options.items():
        try:
            layers.check_options(layer, opts)
        except layers.LayerError as exc:
            raise UsageError(f"--option: {exc}") from None
    check_solver()
    model: dict = {}
    if scope == "model":
        model = {**MODEL_DEFAULTS, "steps": MODEL_STEPS_DEFAULT[device], **base.get("model", {})}
        for key in ("levels", "steps", "hidden_width", "mixing"):
            if getattr(args, key) is not None:
                model[key] = getattr(args, key)
    timing = {**TIMING_DEFAULTS[device], "timeout": 300.0, "processes": PROCESSES_DEFAULT,
              **base.get("timing", {})}
    threads = args.threads or timing.pop("threads", None)
    for key in ("repeat", "min_time", "max_time", "warmup", "warmup_time", "timeout", "processes"):
        value = getattr(args, key)
        if value is not None:
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"--{key.replace('_', '-')} must be a finite number >= 0, got {value}")
            timing[key] = value
    return SweepConfig(
        layers=names, sweep=sweep, values=values, device=device, dtype=args.dtype or "float32",
        repeat=timing["repeat"], min_time=timing["min_time"], warmup=timing["warmup"],
        warmup_time=timing["warmup_time"], max_time=timing["max_time"], timeout=float(timing["timeout"]),
        # One CPU thread by default: with two on a shared 2-core machine, a call waits whenever
        # the other core is taken, and a 0.16 ms call took 24 ms (whole scheduler ticks).
        isolate=not args.no_isolate, threads=threads or (1 if device == "cpu" else None),
        processes=int(timing["processes"]), metric=args.metric or "time",
        seed=args.seed or 0, cold_cache=args.cold_cache, directions=directions, options=options,
        scope=scope, model=model, preset=preset.record(args.quick) if preset else None,
        # Published architectures of the preset, for the layers this run measures.
        architectures=[a for a in base.get("architectures", []) if a["layer"] in names] if scope == "model" else [],
    )


def check_solver() -> None:
    """``INVCONV_SOLVER`` (and the native CPU kernel's ISA choice) is read inside every worker;
    a bad value there would make every cell an error, so it is checked before the first one."""
    from layers import native

    try:
        native.requested_mode()
        native.cpu_isa_code()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def load_preset(name: str):
    from . import presets

    try:
        return presets.load(name)
    except presets.PresetError as exc:
        raise UsageError(str(exc)) from None
