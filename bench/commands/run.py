"""``python -m bench run``: sweep layers (or flow models) over input size, batch and/or kernel size.

A sweep expands into cells; each cell is measured in its own process (forward, sampling and
train time, peak memory, parameters, reconstruction error) and appended to the run folder's
``results.jsonl`` as soon as it finishes; tables and plots are rendered at the end.

``--scope model`` times whole Glow-style flows around each layer (bench/sweep/models.py) instead of
single layers; ``--preset NAME`` runs the spec file of one published table (bench/sweep/presets/) and
renders ours beside the published numbers (``paper.md``, ``paper.tex``).
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import signal
import sys
from pathlib import Path

from ..arguments import positive_int, positive_ints
from ..errors import UsageError
from ..sweep.cells import DIRECTIONS, MIXING_MODES, SCOPES, SWEEPABLE

HELP = "measure layers over a sweep of input size, batch and/or kernel size"
DESCRIPTION = __doc__ + """
examples:
  python -m bench run --sweep input_size
  python -m bench run --sweep kernel_size --layers inverse-flow,finc --batch 16
  python -m bench run --sweep batch --sweep input_size --full --device cuda
  python -m bench run --scope model --sweep kernel_size --layers inverse-flow --levels 2 --steps 8
  python -m bench run --preset ablation-kernel-size --quick
  python -m bench run --preset all --quick --out results/quick --name {preset} --overwrite
  python -m bench run --resume results/runs/20261122T101500Z_abc1234
"""

_DEFAULT_OUT = "results/runs"

# Settings that --resume takes from the run folder instead of the command line.
_SWEEP_SETTINGS = ("sweep", "layers", "device", "dtype", "channels", "batch", "input_size", "kernel_size",
                   "repeat", "min_time", "warmup", "warmup_time", "max_time", "timeout", "no_isolate", "full",
                   "threads", "seed", "cold_cache", "directions", "option", "scope", "levels", "steps",
                   "hidden_width", "mixing", "preset", "quick", "name", "overwrite", "processes", "metric")

# Per-device defaults, per worker process: the process is the unit of evidence, so each of
# PROCESSES_DEFAULT processes takes a few samples after its own warm-up (as pyperf does) rather
# than one process taking many. A 2-core CPU finishes the default input-size sweep (every layer
# at 16, 32, 64) in under 3 minutes.
_TIMING_DEFAULTS = {
    "cpu": {"repeat": 5, "min_time": 0.1, "max_time": 2.0, "warmup": 3, "warmup_time": 0.1},
    "cuda": {"repeat": 20, "min_time": 0.3, "max_time": 5.0, "warmup": 3, "warmup_time": 0.2},
}
PROCESSES_DEFAULT = 3
"""Worker processes per cell. Three give a median over processes that one unlucky process cannot
move, and a spread to judge it by; ``compare`` and ``ab`` compare process medians."""
# Model cells without a preset: the comparison tables' model on a GPU; fewer steps on a CPU,
# where the pure-PyTorch solves make a 16-step model take seconds per call.
_MODEL_STEPS_DEFAULT = {"cpu": 4, "cuda": 16}


def _sizes(text: str) -> list[int | list[int]]:
    out: list[int | list[int]] = []
    for part in text.split(","):
        if "x" in part:
            h, w = (positive_int(v) for v in part.split("x", 1))
            out.append(h if h == w else [h, w])
        else:
            out.extend(positive_ints(part))
    return out


def _axes(text: str) -> list[str]:
    out = []
    for part in text.split(","):
        part = part.strip().replace("-", "_")
        if part not in SWEEPABLE:
            raise argparse.ArgumentTypeError(f"unknown sweep axis {part!r}; accepted: {', '.join(SWEEPABLE)}")
        out.append(part)
    return out


def _names(text: str) -> list[str]:
    return [p.strip() for p in text.split(",") if p.strip()]


def _option(text: str) -> tuple[str, str, object]:
    layer, sep, rest = text.partition(":")
    key, eq, value = rest.partition("=")
    if not sep or not eq or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not LAYER:KEY=VALUE")
    for conv in (int, float):
        try:
            return layer, key, conv(value)
        except ValueError:
            pass
    return layer, key, {"true": True, "false": False}.get(value.lower(), value)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_measure_arguments(p)
    o = p.add_argument_group("where results go")
    o.add_argument("--out", metavar="DIR", default=_DEFAULT_OUT,
                   help="folder in which the run folder is created (default results/runs)")
    o.add_argument("--name", metavar="NAME",
                   help="name of the run folder instead of <UTC timestamp>_<git sha>; '{preset}' is replaced by the "
                        "preset's name")
    o.add_argument("--overwrite", action="store_true",
                   help="with --name: replace an existing run folder of that name")
    o.add_argument("--resume", metavar="RUN_DIR",
                   help="finish an interrupted run, skipping its finished cells (settings come from RUN_DIR)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")
    from ..execution.executors import add_arguments as add_executor_arguments

    add_executor_arguments(p)


def add_measure_arguments(p: argparse.ArgumentParser) -> None:
    """What to measure and how: the options :func:`resolve_config` reads (shared with ``bench ab``)."""
    g = p.add_argument_group("what to measure")
    g.add_argument("--sweep", type=_axes, action="append", metavar="AXIS",
                   help=f"axis to sweep: {', '.join(SWEEPABLE)}; repeat (or comma-separate) for the product")
    g.add_argument("--layers", type=_names, action="append", metavar="NAMES",
                   help="comma-separated layer names (default: every available layer; see `python -m bench list`)")
    g.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
    g.add_argument("--dtype", choices=("float32", "float64", "float16", "bfloat16"), help="default float32")
    g.add_argument("--channels", type=positive_ints, metavar="C[,C...]", help="channel count(s) (default 12)")
    g.add_argument("--batch", type=positive_ints, metavar="B[,B...]",
                   help="batch size(s): the grid if swept, else the fixed value (default 8 on CPU, 100 on GPU)")
    g.add_argument("--input-size", type=_sizes, metavar="N|HxW[,...]", help="image size(s) (default 32)")
    g.add_argument("--kernel-size", type=positive_ints, metavar="K[,K...]", help="kernel size(s) (default 3)")
    g.add_argument("--full", action="store_true",
                   help="the papers' grids (input 16…256, batch 1…128, kernel 2…11) even on a CPU")
    g.add_argument("--directions", type=_names, metavar="D[,D...]",
                   help=f"subset of {', '.join(DIRECTIONS)} (default: all)")
    g.add_argument("--option", type=_option, action="append", metavar="LAYER:KEY=VALUE",
                   help="a layer construction option, e.g. woodbury:variant=me (repeatable)")

    m = p.add_argument_group("flow models (--scope model; see bench/sweep/models.py)")
    m.add_argument("--scope", choices=SCOPES,
                   help="layer: time single layers (default); model: time a Glow-style flow built around each layer "
                        "(then --channels is the image's channel count, default 3, and --input-size the image's size)")
    m.add_argument("--levels", type=positive_int, metavar="L", help="model levels (default 2)")
    m.add_argument("--steps", type=positive_int, metavar="K",
                   help="model steps per level (default 16 on a GPU, 4 on a CPU)")
    m.add_argument("--width", "--hidden-width", dest="hidden_width", type=positive_int,
                   metavar="W", help="hidden channels of the coupling networks (default 128)")
    m.add_argument("--mixing", choices=MIXING_MODES,
                   help="1x1 mixing after the layer: auto (where the layer does not mix all channels; default), "
                        "always, never")

    r = p.add_argument_group("presets: the published tables as spec files (bench/sweep/presets/)")
    r.add_argument("--preset", metavar="NAME",
                   help="run a preset (settings given on the command line override it); 'all' runs every preset, "
                        "one run folder each")
    r.add_argument("--quick", action="store_true",
                   help="the preset's [quick] settings: a few minutes on a CPU (smaller images, batches or models; "
                        "the preset's note says which)")
    r.add_argument("--list-presets", action="store_true", help="list the presets and exit")

    t = p.add_argument_group("how to measure")
    t.add_argument("--repeat", type=positive_int, metavar="N",
                   help="minimum samples per direction (default 5 on CPU, 20 on GPU)")
    t.add_argument("--min-time", type=float, metavar="S", help="minimum sampling time per direction, seconds")
    t.add_argument("--max-time", type=float, metavar="S",
                   help="stop sampling a slow direction after S seconds (once 3 samples exist)")
    t.add_argument("--warmup", type=positive_int, metavar="N", help="minimum warm-up calls (default 3)")
    t.add_argument("--warmup-time", type=float, metavar="S",
                   help="minimum warm-up time per process, seconds (default 0.1 on a CPU, 0.2 on a GPU)")
    t.add_argument("--timeout", type=float, metavar="S",
                   help="timeout of each worker process of a cell, not counting its start, in seconds (default 300; "
                        "0: no limit)")
    t.add_argument("--processes", type=positive_int, metavar="N",
                   help=f"fresh worker processes per cell, each warmed up and sampled on its own; tables show the "
                        f"median over processes and their spread (default {PROCESSES_DEFAULT})")
    t.add_argument("--metric", choices=("time", "instructions"),
                   help="time (default), or instructions: instructions executed per call, counted under valgrind's "
                        "callgrind, every cell in one process (deterministic: the CPU regression gate's metric)")
    t.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch CPU threads, pinned in every cell (default 1 on a CPU: see docs/measurement.md on measuring "
                        "multi-threaded scaling)")
    t.add_argument("--seed", type=int, help="random seed of inputs and initial weights (default 0)")
    t.add_argument("--cold-cache", action="store_true", help="evict caches between samples (L2 on GPU, LLC on CPU)")
    t.add_argument("--no-isolate", action="store_true",
                   help="measure in this process instead of one process per cell (faster start; a crash ends the "
                        "sweep, memory readings are less precise, the timeout is best effort)")


def _flatten(lists):
    return [x for sub in lists for x in sub] if lists else None


def resolve_config(args: argparse.Namespace, preset_name: str | None = None):
    """A :class:`SweepConfig` from the command line (on top of ``preset_name``'s settings, if
    given), with clear errors for bad requests."""
    import torch

    import layers

    from ..sweep.cells import MODEL_DEFAULTS, SweepConfig, default_values

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    preset, base = None, {}
    if preset_name:
        preset = _load_preset(preset_name)
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
    _check_solver()
    model: dict = {}
    if scope == "model":
        model = {**MODEL_DEFAULTS, "steps": _MODEL_STEPS_DEFAULT[device], **base.get("model", {})}
        for key in ("levels", "steps", "hidden_width", "mixing"):
            if getattr(args, key) is not None:
                model[key] = getattr(args, key)
    timing = {**_TIMING_DEFAULTS[device], "timeout": 300.0, "processes": PROCESSES_DEFAULT,
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


def _check_solver() -> None:
    """``INVCONV_SOLVER`` (and the native CPU kernel's ISA choice) is read inside every worker;
    a bad value there would make every cell an error, so it is checked before the first one."""
    from layers import native

    try:
        native.requested_mode()
        isa = getattr(native, "_cpu_isa_code", None)
        if isa is not None:
            isa()
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _load_preset(name: str):
    from ..sweep import presets

    try:
        return presets.load(name)
    except presets.PresetError as exc:
        raise UsageError(str(exc)) from None


def _check_args(args: argparse.Namespace) -> None:
    """Contradictions in the command line, found before anything heavy is imported."""
    if args.quick and not args.preset:
        raise UsageError("--quick shrinks a preset; give --preset NAME (see --list-presets)")
    if args.preset and args.preset != "all":
        preset_scope = _load_preset(args.preset).scope
    else:
        preset_scope = "model" if args.preset == "all" else None
    if (args.scope or preset_scope or "layer") != "model":
        given = [f"--{k.replace('_', '-')}" for k in ("levels", "steps", "hidden_width", "mixing")
                 if getattr(args, k) is not None]
        if given:
            raise UsageError(f"{', '.join(given)} describe a model: add --scope model")
    if args.overwrite and not args.name:
        raise UsageError("--overwrite replaces a run folder named by --name; give --name")
    if args.preset == "all" and args.name and "{preset}" not in args.name:
        raise UsageError("--preset all runs several presets: --name needs '{preset}' in it")


def main(args: argparse.Namespace) -> int:
    if args.list_presets:
        from .presets import print_presets

        return print_presets()
    if not args.resume:
        _check_args(args)
    if args.preset == "all":
        from ..sweep import presets

        if args.resume:
            raise UsageError("--preset all cannot be resumed as one run; resume each preset's run folder")
        status = 0
        for name in presets.names():
            print(f"=== preset {name}", file=sys.stderr)
            status = max(status, run_one(args, name))
            if status in (130, 143):  # interrupted: Ctrl-C or SIGTERM
                break
        return status
    return run_one(args, args.preset)


def run_one(args: argparse.Namespace, preset_name: str | None) -> int:
    from ..execution import runs

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in _SWEEP_SETTINGS if getattr(args, k, None) not in (None, False)]
        if getattr(args, "out", _DEFAULT_OUT) != _DEFAULT_OUT:
            given.append("--out")
        if given:
            raise UsageError(f"--resume takes every setting (and the folder) from RUN_DIR/{runs.CONFIG}; "
                             f"drop {', '.join(given)}")
    # From here on SIGTERM ends the run as Ctrl-C does (and the lock is released either way).
    with _sigterm_as_interrupt() as terminated:
        try:
            return _run_one(args, preset_name, terminated)
        except KeyboardInterrupt:
            if terminated:
                print("\ninterrupted (SIGTERM)", file=sys.stderr)
                return 143
            raise


def _run_one(args: argparse.Namespace, preset_name: str | None, terminated: list[int]) -> int:
    from ..execution import runs
    from ..environment import collect
    from ..sweep.cells import SweepConfig

    from ..execution import executors

    lock = None
    try:
        if args.resume:
            run_dir = runs.check_run_dir(args.resume)
            # Held until the run ends: a second --resume (or an --overwrite) of this folder is refused.
            lock = runs.RunLock(run_dir).acquire()
            config = SweepConfig.from_json(runs.load_config(run_dir))
            executor, executor_options = executors.resolve(args, run_dir)
            if args.dry_run:
                return executors.dry_run(_expand(config), config, run_dir, _finished(run_dir), executor_options)
            executors.check(executor, config)
            env = runs.read_json(run_dir / runs.ENV) if (run_dir / runs.ENV).exists() else {}
            env.setdefault("resumed", []).append(
                {k: v for k, v in collect().items() if k in ("timestamp_utc", "command", "git")})
            runs.write_json(run_dir / runs.ENV, env)
        else:
            config = resolve_config(args, preset_name)
            if config.metric == "instructions":
                check_instructions(config)
            executor, executor_options = executors.resolve(args, None)
            if args.dry_run:
                return executors.dry_run(_expand(config), config, None, set(), executor_options)
            executors.check(executor, config)
            env = collect()
            name = args.name.replace("{preset}", preset_name or "run") if args.name else None
            run_dir, lock = runs.new_run_dir(args.out, env["git"], name=name, overwrite=args.overwrite)
            runs.write_json(run_dir / runs.ENV, env)
            runs.write_json(run_dir / runs.CONFIG, config.to_json())
        executors.save(run_dir, executor, executor_options)
        return _measure(args, config, env, run_dir, terminated, executor, executor_options)
    except runs.RunDirError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if lock is not None:
            lock.release()


def _measure(args: argparse.Namespace, config, env: dict, run_dir: Path, terminated: list[int],
             executor: str, executor_options) -> int:
    """Measure the cells of ``config`` not yet in ``run_dir`` (whose lock the caller holds), then
    render the tables."""
    from ..execution import executors
    from .. import records as records_mod
    from ..execution import runs
    from ..report.write import write_plots, write_tables
    from ..execution.shards import LOST, finished_keys, read_records

    cells = _expand(config)
    existing = runs.load_records(run_dir)
    foreign = records_mod.foreign(existing, config.to_json())
    if foreign:
        print(f"warning: {len(foreign)} record(s) in {run_dir / records_mod.RESULTS} do not belong to this run's "
              f"configuration (copied from another run?), e.g. {foreign[0]['key']}", file=sys.stderr)
    done = finished_keys(existing)  # every recorded cell but the lost ones
    todo = [c for c in cells if c.key() not in done]
    print(f"run folder: {run_dir}", file=sys.stderr)
    if config.preset:
        p = config.preset
        print(f"preset {p['name']}: {p['title']}; paper table {p['paper_table']}", file=sys.stderr)
        if p.get("quick"):
            print(f"--quick: {p['quick_note']}", file=sys.stderr)
        elif config.device == "cpu":
            print("warning: the full preset on a CPU can take hours; --quick shrinks it to minutes", file=sys.stderr)
    load, cpus = _load_average(), os.cpu_count() or 1
    env.setdefault("load_average", {})["start"] = load
    runs.write_json(run_dir / runs.ENV, env)
    if config.device == "cpu" and load is not None and load > 0.5 * cpus:
        print(f"warning: the machine is busy (1-minute load average {load:.1f} on {cpus} CPUs); "
              "CPU timings will be noisy, and the tables will say so", file=sys.stderr)
    what = "layers" if config.scope == "layer" else (
        f"models of {config.model['levels']} levels x {config.model['steps']} steps around each of")
    print(f"{len(cells)} cells ({len(cells) - len(todo)} already finished), {what} {len(config.layers)} layers, "
          f"device {config.device}, {config.dtype}, "
          f"{f'{config.processes} worker process(es) per cell' if config.isolate else 'in-process'}, "
          f"executor {executor}", file=sys.stderr)

    bar = progress_bar(len(cells), len(cells) - len(todo), args.no_progress)
    interrupted = None
    try:
        executors.run(executor, executor_options, cells, config, run_dir, done,
                      on_start=lambda cell: bar.set_postfix_str(cell.label(), refresh=True),
                      on_done=lambda cell, rec: _after_cell(bar, cell, rec))
    except KeyboardInterrupt:
        interrupted = "SIGTERM" if terminated else "Ctrl-C"
    finally:
        bar.close()

    env["load_average"]["end"] = _load_average()
    runs.write_json(run_dir / runs.ENV, env)
    conflicts: list = []
    records = read_records(run_dir, conflicts)
    for c in conflicts:
        print(f"warning: {c}", file=sys.stderr)
    lost = [r for r in records if r.get("status") == LOST]
    write_tables(run_dir)
    if not args.no_plots and records:
        write_plots(run_dir)
    if records:
        from ..report.write import markdown_report, paper_report

        print(markdown_report(runs.load_config(run_dir), env, records, metrics=["median"]))
        if config.preset:
            print(paper_report(run_dir, config.preset["paper_table"], "md"))
    if interrupted:
        saved = len({r["key"] for r in records} & {c.key() for c in cells})
        print(f"interrupted ({interrupted}): {saved} of {len(cells)} cells are saved in {run_dir}\n"
              f"resume with: python -m bench run --resume {shlex.quote(str(run_dir))}", file=sys.stderr)
        return 143 if interrupted == "SIGTERM" else 130
    files = ", ".join(p.name for p in sorted(Path(run_dir).iterdir()) if p.is_file() and not p.name.startswith("."))
    print(f"results: {run_dir}  ({files})")
    if lost:
        print(f"{len(lost)} cells were lost (their task ended first; see the table's notes); "
              f"run them with: python -m bench run --resume {shlex.quote(str(run_dir))}", file=sys.stderr)
        return 3
    return 0


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def check_instructions(config) -> None:
    from ..execution.instructions import InstructionsUnavailable, require_valgrind

    if config.device != "cpu":
        raise UsageError("--metric instructions counts CPU instructions; use it with --device cpu")
    if not config.isolate:
        raise UsageError("--metric instructions always runs the cells in a callgrind process; drop --no-isolate")
    try:
        require_valgrind()
    except InstructionsUnavailable as exc:
        raise UsageError(str(exc)) from None


class _sigterm_as_interrupt:
    """While a run holds its folder, SIGTERM (what CI cancellation, ``timeout`` and ``kill`` send)
    ends it as Ctrl-C does: the cell in flight is abandoned (its worker's process group killed),
    the finished cells are rendered, and the resume hint is printed. Yields a list that is
    non-empty once SIGTERM arrived."""

    def __enter__(self) -> list[int]:
        self.terminated: list[int] = []
        self.previous = None

        def on_term(signum, frame):  # noqa: ARG001
            self.terminated.append(signum)
            if len(self.terminated) == 1:  # a second SIGTERM must not interrupt the clean-up of the first
                raise KeyboardInterrupt

        try:
            self.previous = signal.signal(signal.SIGTERM, on_term)
        except ValueError:  # not the main thread: leave SIGTERM alone
            self.previous = None
        return self.terminated

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _expand(config):
    from ..sweep.cells import expand

    try:
        return expand(config)
    except Exception as exc:  # a layer of the stored config may no longer be installed
        raise UsageError(f"cannot expand the sweep: {exc}") from None


def _finished(run_dir) -> set[str]:
    """Cells that --resume skips: every recorded cell but the lost ones."""
    from ..execution.shards import finished_keys, read_records

    return finished_keys(read_records(run_dir, conflicts=[]))


class _NoBar:
    def set_postfix_str(self, *a, **k):
        pass

    def update(self, n=1):
        pass

    def write(self, s):
        print(s, file=sys.stderr)

    def close(self):
        pass


def progress_bar(total: int, initial: int, disabled: bool):
    if disabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="cell", dynamic_ncols=True, file=sys.stderr)


def _after_cell(bar, cell, record) -> None:
    bar.update(1)
    if record["status"] not in ("ok",):
        bar.write(f"  {cell.label()}: {record['status']}"
                  + (f": {record['message']}" if record.get("message") and record["status"] != "unsupported" else ""))
