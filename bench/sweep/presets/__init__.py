"""Presets: one TOML spec file per published table, run with ``python -m bench run --preset NAME``.

A preset says everything a run needs to regenerate one table of the papers: which layers, which
axis and values, the model, the timing policy, which published table to render beside it, and a
``[quick]`` section that shrinks it to a few minutes on a CPU (``--quick``). The files sit next
to this module (``bench/sweep/presets/<name>.toml``) and ship as package data.

File format (every key but ``[quick]``'s content is required)::

    name = "ablation-kernel-size"         # = the file name
    title = "..."                         # one line
    paper_table = "ablation-kernel-size"  # results/paper/<id>.toml rendered beside the run
    description = "..."
    scope = "model"                       # "model" or "layer"
    layers = ["inverse-flow"]             # or "all": every available layer at run time
    sweep = ["kernel_size"]               # the swept axes ([] for a comparison of layers)
    directions = ["forward", "sampling", "train"]

    [values]                              # every axis: input_size, batch, kernel_size, channels
    kernel_size = [2, 3, 5, 7, 9, 11]
    ...
    [model]                               # scope "model": levels, steps, hidden_width, mixing
    [timing]                              # repeat, min_time, max_time, warmup, warmup_time, timeout,
                                          # threads (torch CPU threads)
    [quick]                               # note (required) and overrides of layers, values, model,
                                          # timing, directions, architectures for a CPU run

    [[architectures]]                     # optional, scope "model": published architectures timed
    layer = "mintnet"                     # beside the Glow-style model (bench.sweep.models.ARCHITECTURES)
    architecture = { name = "mintnet", pairs = 21, latent = 85, label = "MintNet CIFAR" }
    options = { iterations = 100 }        # layer options of this entry

A ``[quick]`` ``architectures`` list replaces the full one (e.g. with a smaller model).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...locations import paper_table_ids, read_toml

PRESET_DIR = Path(__file__).resolve().parent
ALL = "all"  # `--preset all`: every preset, one run folder each

_TOP_KEYS = {"name", "title", "paper_table", "description", "scope", "layers", "sweep", "directions", "values",
             "model", "timing", "quick", "architectures"}
_VALUE_KEYS = {"input_size", "batch", "kernel_size", "channels"}
_MODEL_KEYS = {"levels", "steps", "hidden_width", "mixing"}
_TIMING_KEYS = {"repeat", "min_time", "max_time", "warmup", "warmup_time", "timeout", "threads", "processes"}
_QUICK_KEYS = {"note", "layers", "values", "model", "timing", "directions", "architectures"}
_ARCHITECTURE_KEYS = {"layer", "architecture", "options"}


class PresetError(ValueError):
    """A preset that does not exist or does not parse."""


@dataclass
class Preset:
    """A parsed preset; :meth:`settings` gives the run settings, full or quick."""

    name: str
    title: str
    paper_table: str
    description: str
    scope: str
    layers: list[str] | str
    sweep: list[str]
    directions: list[str]
    values: dict[str, list[Any]]
    model: dict[str, Any] = field(default_factory=dict)
    timing: dict[str, Any] = field(default_factory=dict)
    quick: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None
    architectures: list[dict[str, Any]] = field(default_factory=list)

    def settings(self, quick: bool = False) -> dict[str, Any]:
        """The run settings: ``layers`` (names, or "all"), ``sweep``, ``directions``, ``values``,
        ``model``, ``timing``, ``architectures``, with the ``[quick]`` overrides applied when ``quick``."""
        out = {"layers": copy.deepcopy(self.layers), "sweep": list(self.sweep), "directions": list(self.directions),
               "values": copy.deepcopy(self.values), "model": dict(self.model), "timing": dict(self.timing),
               "architectures": copy.deepcopy(self.architectures)}
        if quick:
            q = self.quick
            for key in ("layers", "directions", "architectures"):
                if key in q:
                    out[key] = copy.deepcopy(q[key])
            for key in ("values", "model", "timing"):
                out[key].update(copy.deepcopy(q.get(key, {})))
        return out

    def record(self, quick: bool) -> dict[str, Any]:
        """What a run folder's ``config.json`` keeps about the preset (rendering reads it)."""
        return {"name": self.name, "title": self.title, "paper_table": self.paper_table, "quick": quick,
                "quick_note": self.quick.get("note") if quick else None}


def names(directory: Path = PRESET_DIR) -> list[str]:
    return sorted(p.stem for p in Path(directory).glob("*.toml"))


def load(name: str, directory: Path = PRESET_DIR) -> Preset:
    """The preset ``name`` (a file name under ``directory`` without ``.toml``; paths are refused:
    a preset is part of the package, so that a run folder's preset name says what was run)."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith(".") \
            or name.endswith(".toml"):
        raise PresetError(f"--preset takes a preset's name, not a path: {name!r}; "
                          f"known: {', '.join(names(directory)) or '(none)'}, or {ALL!r}")
    path = Path(directory) / f"{name}.toml"
    if not path.exists():
        raise PresetError(f"unknown preset {name!r}; known: {', '.join(names(directory)) or '(none)'}, or {ALL!r}")

    try:
        data = read_toml(path)
    except Exception as exc:  # noqa: BLE001 - a syntax error in a spec file is reported, not raised raw
        raise PresetError(f"{path}: {exc}") from None
    return parse(data, path)


def load_all(directory: Path = PRESET_DIR) -> list[Preset]:
    return [load(n, directory) for n in names(directory)]


def parse(d: dict[str, Any], path: Path | None = None) -> Preset:
    """Validate the structure of a preset (names of layers and paper tables are checked by
    :func:`validate`, which needs the registry)."""
    from ..cells import DIRECTIONS, SCOPES, SWEEPABLE

    where = str(path) if path else "preset"

    def need(cond: bool, message: str) -> None:
        if not cond:
            raise PresetError(f"{where}: {message}")

    unknown = set(d) - _TOP_KEYS
    need(not unknown, f"unknown key(s) {', '.join(sorted(unknown))}; accepted: {', '.join(sorted(_TOP_KEYS))}")
    missing = (_TOP_KEYS - {"model", "timing", "quick", "architectures"}) - set(d)
    need(not missing, f"missing {', '.join(sorted(missing))}")
    if path is not None:
        need(d["name"] == path.stem, f"name {d['name']!r} must equal the file name {path.stem!r}")
    need(d["scope"] in SCOPES, f"scope must be one of {', '.join(SCOPES)}")
    need(d["layers"] == ALL or (isinstance(d["layers"], list) and d["layers"] and
                                all(isinstance(x, str) for x in d["layers"])),
         f"layers must be {ALL!r} or a list of layer names")
    need(all(a in SWEEPABLE for a in d["sweep"]), f"sweep axes must be among {', '.join(SWEEPABLE)}")

    def check_directions(ds: Any) -> None:
        need(isinstance(ds, list) and ds and all(x in DIRECTIONS for x in ds),
             f"directions must be a non-empty list of {', '.join(DIRECTIONS)}")

    def check_values(values: dict[str, Any], full: bool) -> None:
        need(set(values) <= _VALUE_KEYS, f"values: unknown axis among {sorted(values)}")
        if full:
            need(set(values) == _VALUE_KEYS, f"values must give every axis: {', '.join(sorted(_VALUE_KEYS))}")
        for axis, vs in values.items():
            need(isinstance(vs, list) and vs and all(isinstance(v, int) and v > 0 for v in vs),
                 f"values.{axis} must be a non-empty list of positive integers")

    def check_section(section: dict[str, Any], keys: set[str], what: str) -> None:
        need(isinstance(section, dict) and set(section) <= keys,
             f"[{what}] accepts {', '.join(sorted(keys))}, got {sorted(section) if isinstance(section, dict) else section}")

    check_directions(d["directions"])
    check_values(d["values"], full=True)
    for axis in d["sweep"]:
        need(len(d["values"][axis]) > 1, f"swept axis {axis} needs several values")
    check_section(d.get("model", {}), _MODEL_KEYS, "model")
    check_section(d.get("timing", {}), _TIMING_KEYS, "timing")
    for key in ("name", "title", "paper_table", "description"):
        need(isinstance(d[key], str) and d[key].strip(), f"{key} must be a non-empty string")
    if d["scope"] == "model":
        need(d.get("model"), "a model preset needs a [model] section (levels, steps, hidden_width)")
    quick = d.get("quick")
    need(isinstance(quick, dict) and isinstance(quick.get("note"), str) and quick["note"],
         "needs a [quick] section with a note saying how it shrinks the preset for a CPU")
    check_section(quick, _QUICK_KEYS, "quick")
    check_values(quick.get("values", {}), full=False)
    check_section(quick.get("model", {}), _MODEL_KEYS, "quick.model")
    check_section(quick.get("timing", {}), _TIMING_KEYS, "quick.timing")
    if "directions" in quick:
        check_directions(quick["directions"])
    if "layers" in quick:
        need(quick["layers"] == ALL or (isinstance(quick["layers"], list) and quick["layers"] and
                                        all(isinstance(x, str) for x in quick["layers"])),
             f"quick.layers must be {ALL!r} or a list of layer names")
    for what, section in (("model", d.get("model", {})), ("quick.model", quick.get("model", {}))):
        _check_model(section, what, need)
    for what, section in (("timing", d.get("timing", {})), ("quick.timing", quick.get("timing", {}))):
        _check_timing(section, what, need)

    def check_architectures(entries: Any, what: str) -> None:
        need(isinstance(entries, list), f"{what} must be a list of tables")
        need(d["scope"] == "model" or not entries, f"{what}: published architectures need scope 'model'")
        for e in entries:
            need(isinstance(e, dict) and set(e) <= _ARCHITECTURE_KEYS and {"layer", "architecture"} <= set(e),
                 f"{what}: an entry has layer and architecture (and may have options), got {e}")
            need(isinstance(e["architecture"], dict) and isinstance(e["architecture"].get("name"), str),
                 f"{what}: architecture must be a table with a name, got {e['architecture']!r}")
            need(isinstance(e.get("options", {}), dict), f"{what}: options must be a table")

    check_architectures(d.get("architectures", []), "architectures")
    check_architectures(quick.get("architectures", []), "quick.architectures")
    return Preset(name=d["name"], title=d["title"], paper_table=d["paper_table"], description=d["description"],
                  scope=d["scope"], layers=d["layers"], sweep=list(d["sweep"]), directions=list(d["directions"]),
                  values=dict(d["values"]), model=dict(d.get("model", {})), timing=dict(d.get("timing", {})),
                  quick=dict(quick), path=path, architectures=list(d.get("architectures", [])))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    import math

    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def _check_model(section: dict[str, Any], what: str, need) -> None:
    """Every [model] value, so that a bad one is refused before anything is measured."""
    from ..cells import MIXING_MODES

    for key in ("levels", "steps", "hidden_width"):
        if key in section:
            need(_is_int(section[key]) and section[key] >= 1,
                 f"{what}.{key} must be a positive integer, got {section[key]!r}")
    if "mixing" in section:
        need(section["mixing"] in MIXING_MODES,
             f"{what}.mixing must be one of {', '.join(MIXING_MODES)}, got {section['mixing']!r}")


def _check_timing(section: dict[str, Any], what: str, need) -> None:
    """Every [timing] value: counts are positive integers, times finite numbers >= 0 (timeout 0:
    no limit)."""
    for key in ("repeat", "warmup", "threads", "processes"):
        if key in section:
            need(_is_int(section[key]) and section[key] >= 1,
                 f"{what}.{key} must be a positive integer, got {section[key]!r}")
    for key in ("min_time", "max_time", "warmup_time", "timeout"):
        if key in section:
            need(_is_number(section[key]) and section[key] >= 0,
                 f"{what}.{key} must be a number of seconds >= 0, got {section[key]!r}")


def validate(preset: Preset) -> list[str]:
    """Problems that need the registry and the paper data: unknown paper table, a named layer
    that is not registered (it may come from a branch not merged yet, so this is a list of
    warnings for the caller to judge, not an exception)."""
    import layers


    problems = []
    if preset.paper_table not in paper_table_ids():
        problems.append(f"paper table {preset.paper_table!r} not in results/paper/")
    from ..models import ARCHITECTURES

    for settings in (preset.settings(False), preset.settings(True)):
        for entry in settings["architectures"]:
            if entry["architecture"]["name"] not in ARCHITECTURES:
                problems.append(f"unknown architecture {entry['architecture']['name']!r}; accepted: "
                                f"{', '.join(ARCHITECTURES)}")
            try:
                layers.info(entry["layer"])
            except layers.LayerError as exc:
                problems.append(str(exc))
        if settings["layers"] != ALL:
            for name in settings["layers"]:
                try:
                    layers.info(name)
                except layers.LayerError as exc:
                    problems.append(str(exc))
    return list(dict.fromkeys(problems))
