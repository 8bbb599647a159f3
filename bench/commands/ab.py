"""``python -m bench ab --base REV``: measure REV and the working tree interleaved, then compare.

The CI gate. REV is checked out into a temporary git worktree (removed afterwards, also on
Ctrl-C); the same cells are measured for both code trees in ``--rounds`` rounds, alternating
which tree goes first, each measurement in a fresh worker process importing that tree's code.
Both runs are written as normal run folders under ``OUT/<UTC>_ab_<base>_<new>/{base,new}``
(with ``comparison.md``/``.json`` beside them), then compared as ``python -m bench compare``
does. Exit status 1 on a regression (significantly slower beyond the threshold, or ok in the
base and failing now) that no ``--accept``/``--accept-from`` marker accepts; 2 when nothing
could be compared.

On a CPU the thread count defaults to 1: with several threads on a shared machine, OpenMP
workers wait for a busy core and one call can take 50× its usual time, which swamps any code
change (pass --threads to measure multi-threaded code deliberately).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import UsageError
from ..git import GitError, repository, resolve_revision
from . import gate
from .run import add_measure_arguments

HELP = "measure a base revision and the working tree interleaved on this machine, then compare (the CI gate)"
DESCRIPTION = __doc__ + """
examples:
  python -m bench ab --base HEAD~1 --layers glow-1x1,inverse-flow --input-size 16
  python -m bench ab --base main --sweep input_size --rounds 5 --markdown comment.md
  python -m bench ab --base HEAD~1 --accept-from HEAD          # what CI runs (see .ci/run)
"""

DEFAULT_ROUNDS = 5
"""Rounds per tree. Each round is one worker process per cell and tree (about 2 s of start-up on
a CPU), and the comparison's unit is the process: a t interval over 5 round medians a side is
narrow enough to catch a 2× slowdown of a steady cell; over 2 it has about 1 degree of freedom
and only a slowdown far beyond the spread between processes clears it (bench/regression/statistics.py)."""

FEW_ROUNDS = 3
"""Below this many rounds, ab says that its interval will be very wide."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, metavar="REV", help="the revision to compare against (e.g. HEAD~1, main)")
    add_measure_arguments(p)
    g = p.add_argument_group("the comparison")
    g.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, metavar="N",
                   help=f"interleaved rounds per revision, one process each (default {DEFAULT_ROUNDS})")
    g.add_argument("--threshold", type=gate.fraction, metavar="FRACTION|N%",
                   help="minimum slowdown that fails (default: 10%% on a GPU, 25%% on a CPU)")
    g.add_argument("--out", metavar="DIR", default="results/runs",
                   help="folder in which the pair of run folders is created (default results/runs)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    gate.add_accept_arguments(p)
    gate.add_report_arguments(p)


def main(args: argparse.Namespace) -> int:
    if args.no_isolate:
        raise UsageError("--no-isolate: bench ab measures every cell in a worker process of its own revision")
    if args.rounds < 2 and args.metric != "instructions":
        raise UsageError(f"--rounds must be >= 2, got {args.rounds}: the comparison's unit is the worker process, "
                         "and the spread between processes needs at least two a side (default "
                         f"{DEFAULT_ROUNDS})")

    from ..regression import ab
    from ..execution import runs
    from ..report.comparison import markdown, to_json
    from ..environment import collect
    from ..regression.statistics import compare_records
    from ..report.write import write_tables
    from ..sweep.cells import expand
    from .compare import describe, report
    from ..execution import drive
    from ..sweep.resolve import resolve_config

    try:
        repo = repository()
        commit = resolve_revision(repo, args.base)
    except GitError as exc:
        raise UsageError(str(exc)) from None
    markers = gate.markers(args, repo)
    config = resolve_config(args)
    if config.device == "cpu" and args.threads is None:
        config.threads = 1  # see the module docstring
    counting = config.metric == "instructions"
    if counting:
        from ..execution.instructions import check_config as check_instructions

        check_instructions(config)
    cells, skipped = ab.split_supported(expand(config), config.directions)
    if not cells:
        raise UsageError("no cell to measure: " + "; ".join(f"{c.label()}: {why}" for c, why in skipped))

    new_env = collect()
    got: dict = {}
    trees: list = []
    # SIGTERM (a CI runner cancelling the job) ends it as Ctrl-C does, with the same clean-up.
    with drive.sigterm_as_interrupt():
        try:
            with ab.base_worktree(repo, commit) as base_root:
                base_env = ab.environment_of(base_root, new_env)
                pair, opened = ab.open_pair(args.out, base_root, runs.ROOT, config, base_env, new_env,
                                            {"base": args.base, "base_commit": commit, "rounds": args.rounds})
                trees += opened
                how = ("instructions per call under callgrind, one process per revision, both at once" if counting
                       else f"{args.rounds} rounds × 2 revisions, device {config.device}, "
                            f"{config.threads or 'default'} thread(s)")
                print(f"ab: base {args.base} = {commit[:12]} (temporary worktree {base_root}) vs the working tree "
                      f"{runs.ROOT} ({new_env['git'].get('short')}{'-dirty' if new_env['git'].get('dirty') else ''}); "
                      f"{len(cells)} cells, {how}; runs in {pair}", file=sys.stderr)
                for cell, why in skipped:
                    print(f"  skipped {cell.label()}: {why}", file=sys.stderr)
                if counting:
                    ab.count_trees(cells, config, trees, got)
                else:
                    _measure_rounds(args, cells, config, trees, got)
        except KeyboardInterrupt:
            if got and trees:
                ab.write_merged(trees, got)
                print(f"interrupted: the rounds finished so far are in {trees[0].run_dir.parent}", file=sys.stderr)
            else:
                print("interrupted", file=sys.stderr)
            return 130
        except GitError as exc:
            raise UsageError(str(exc)) from None

    pair = trees[0].run_dir.parent
    ab.write_merged(trees, got)
    for tree in trees:
        write_tables(tree.run_dir)
    base_records, new_records = (runs.load_records(t.run_dir) for t in trees)
    comparison = compare_records(base_records, new_records, args.threshold, markers)
    threads = f", {config.threads} CPU thread(s)" if config.device == "cpu" else ""
    notes = [f"Both revisions measured on this machine in {args.rounds} interleaved rounds (one worker process "
             f"per cell, revision and round){threads}."] if not counting else [
        "Both revisions' instructions per call counted under callgrind on this machine (one process per revision)."]
    descs = describe(trees[0].run_dir, base_env), describe(trees[1].run_dir, new_env)
    # The pair folder always gets the reports; --markdown/--json add copies where CI wants them.
    (pair / "comparison.md").write_text(markdown(comparison, *descs, notes))
    (pair / "comparison.json").write_text(json.dumps(to_json(comparison), indent=2) + "\n")
    status = report(comparison, *descs, args, notes)
    if status == 0 and not comparison.compared:
        reasons = sorted({r.message for r in comparison.rows if r.message})
        print(f"ab: nothing could be compared ({'; '.join(reasons[:3]) or 'no cell ran in both revisions'}); "
              f"is {args.base} older than the harness's worker protocol?", file=sys.stderr)
        return 2
    print(f"ab: runs and comparison in {pair}", file=sys.stderr)
    return status


def _measure_rounds(args, cells, config, trees, got) -> None:
    from ..regression import ab
    from ..execution.drive import progress_bar

    _warn_if_busy(config.device)
    if args.rounds < FEW_ROUNDS:
        print(f"note: with {args.rounds} rounds a side the interval between processes is very wide; only "
              f"a slowdown far beyond the spread between processes can fail (use --rounds "
              f"{DEFAULT_ROUNDS} for a gate)", file=sys.stderr)
    bar = progress_bar(len(cells) * args.rounds * 2, 0, args.no_progress)
    try:
        ab.measure_interleaved(
            cells, config, trees, args.rounds, got,
            on_measured=lambda tree, cell, r, rec: (bar.set_postfix_str(
                f"round {r + 1} {tree.role} {cell.label()}", refresh=False), bar.update(1)))
    finally:
        bar.close()


def _warn_if_busy(device: str) -> None:
    from ..execution.drive import load_average

    load, cpus = load_average(), os.cpu_count() or 1
    if device == "cpu" and load is not None and load > 0.5 * cpus:
        print(f"note: the machine is busy (1-minute load average {load:.1f} on {cpus} CPUs); interleaving shares "
              "the noise between the revisions, and the confidence intervals widen with it", file=sys.stderr)
