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
import os
import shlex
import sys
from pathlib import Path

from ..arguments import positive_int, positive_ints
from ..errors import UsageError
from ..sweep.cells import DIRECTIONS, MIXING_MODES, SCOPES, SWEEPABLE
from ..sweep.resolve import PROCESSES_DEFAULT, load_preset, resolve_config

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
    """What to measure and how: the options :func:`bench.sweep.resolve.resolve_config` reads (shared with ``bench ab``)."""
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


def _check_args(args: argparse.Namespace) -> None:
    """Contradictions in the command line, found before anything heavy is imported."""
    if args.quick and not args.preset:
        raise UsageError("--quick shrinks a preset; give --preset NAME (see --list-presets)")
    if args.preset and args.preset != "all":
        preset_scope = load_preset(args.preset).scope
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
    from ..execution import drive, runs

    if args.resume:
        given = [f"--{k.replace('_', '-')}" for k in _SWEEP_SETTINGS if getattr(args, k, None) not in (None, False)]
        if getattr(args, "out", _DEFAULT_OUT) != _DEFAULT_OUT:
            given.append("--out")
        if given:
            raise UsageError(f"--resume takes every setting (and the folder) from RUN_DIR/{runs.CONFIG}; "
                             f"drop {', '.join(given)}")
    # From here on SIGTERM ends the run as Ctrl-C does (and the lock is released either way).
    return drive.interruptible(lambda terminated: _run_one(args, preset_name, terminated))


def _run_one(args: argparse.Namespace, preset_name: str | None, terminated: list[int]) -> int:
    from ..execution import drive, executors, instructions, runs

    lock = None
    try:
        if args.resume:
            run_dir, lock, config = drive.open_resumed(args.resume)
            executor, executor_options = executors.resolve(args, run_dir)
            if args.dry_run:
                return executors.dry_run(drive.expand(config), config, run_dir, drive.finished(run_dir),
                                         executor_options)
            executors.check(executor, config)
            env = drive.note_resume(run_dir)
        else:
            config = resolve_config(args, preset_name)
            if config.metric == "instructions":
                instructions.check_config(config)
            executor, executor_options = executors.resolve(args, None)
            if args.dry_run:
                return executors.dry_run(drive.expand(config), config, None, set(), executor_options)
            executors.check(executor, config)
            name = args.name.replace("{preset}", preset_name or "run") if args.name else None
            run_dir, lock, env = drive.open_new(args.out, config, name, args.overwrite)
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
    render the tables and say what happened."""
    from .. import records as records_mod
    from ..execution import drive, runs
    from ..report.write import markdown_report, paper_report, write_plots, write_tables

    work = drive.pending(config, run_dir)
    cells = work.cells
    if work.foreign:
        print(f"warning: {len(work.foreign)} record(s) in {run_dir / records_mod.RESULTS} do not belong to this "
              f"run's configuration (copied from another run?), e.g. {work.foreign[0]['key']}", file=sys.stderr)
    print(f"run folder: {run_dir}", file=sys.stderr)
    if config.preset:
        p = config.preset
        print(f"preset {p['name']}: {p['title']}; paper table {p['paper_table']}", file=sys.stderr)
        if p.get("quick"):
            print(f"--quick: {p['quick_note']}", file=sys.stderr)
        elif config.device == "cpu":
            print("warning: the full preset on a CPU can take hours; --quick shrinks it to minutes", file=sys.stderr)
    load, cpus = drive.note_load(env, run_dir, "start"), os.cpu_count() or 1
    if config.device == "cpu" and load is not None and load > 0.5 * cpus:
        print(f"warning: the machine is busy (1-minute load average {load:.1f} on {cpus} CPUs); "
              "CPU timings will be noisy, and the tables will say so", file=sys.stderr)
    what = "layers" if config.scope == "layer" else (
        f"models of {config.model['levels']} levels x {config.model['steps']} steps around each of")
    print(f"{len(cells)} cells ({len(cells) - len(work.todo)} already finished), {what} {len(config.layers)} layers, "
          f"device {config.device}, {config.dtype}, "
          f"{f'{config.processes} worker process(es) per cell' if config.isolate else 'in-process'}, "
          f"executor {executor}", file=sys.stderr)

    interrupted = drive.measure(executor, executor_options, config, run_dir, work, terminated,
                                progress=not args.no_progress)
    drive.note_load(env, run_dir, "end")
    records, conflicts, lost = drive.read_back(run_dir)
    for c in conflicts:
        print(f"warning: {c}", file=sys.stderr)
    write_tables(run_dir)
    if not args.no_plots and records:
        write_plots(run_dir)
    if records:
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
