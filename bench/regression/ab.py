"""A/B measurement of two revisions, interleaved on one machine (the CI gate's data).

The base revision is checked out into a temporary ``git worktree`` (removed afterwards, also on
Ctrl-C, SIGTERM or an error). The same resolved cell list is measured for both code trees in
rounds: in each round every cell is measured once per tree, each measurement in its own worker
process that imports *that tree's* ``bench`` and ``layers``, and the order of the two trees
alternates from round to round (A B, then B A, …). Drift of the machine — another job
starting, thermal throttling — then falls on both revisions alike, and a load burst spoils one
round of each, not one revision. Each tree gets a normal run folder (``table``, ``plot`` and
``compare`` work on it) whose records hold every round's samples, concatenated, with
``round_sizes`` saying which process produced which: the comparison takes the process as its
unit (one median per round; see ``bench/regression/statistics.py``).

Compatibility assumption: the base revision's ``python -m bench.worker`` reads the request
this revision sends (``cell``, ``policy`` (the fields of ``TimingPolicy``), ``seed``,
``threads``, ``directions`` as one JSON object on stdin) and streams JSON lines of
``{"type": "direction", ...}`` and ``{"type": "cell", ...}``. That protocol has not changed
since the runner was introduced; a revision that changes it must keep old workers readable here
(or ``ab`` against older revisions will report the base cells as errors, and no comparison).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..environment import command_line
from ..execution.runs import CONFIG, ENV, append_record, make_unique_dir, write_json
from ..git import GitError, git_state, run_git
from ..sweep.cells import Cell, SweepConfig

# bench.execution.runner (and with it torch) is imported where it is used, so that git problems are
# reported before paying for torch's import.

ROUNDS_FILE = "rounds.jsonl"  # each worker's raw record, as it finishes (results.jsonl has the merged ones)


@dataclass
class Tree:
    """One side of the comparison: a code tree and the run folder its measurements go to."""

    role: str  # "base" or "new"
    root: Path
    git: dict[str, Any]
    run_dir: Path


# ---------------------------------------------------------------------------------------------
# git


@contextmanager
def base_worktree(repo: Path, commit: str) -> Iterator[Path]:
    """A detached worktree of ``commit`` in a temporary folder, removed on exit whatever happens."""
    tmp = Path(tempfile.mkdtemp(prefix="invconv-ab-"))
    path = tmp / commit[:12]
    try:
        run_git(repo, "worktree", "add", "--detach", "--quiet", str(path), commit)
        yield path
    finally:
        try:
            run_git(repo, "worktree", "remove", "--force", str(path), timeout=60)
        except GitError:
            pass  # never added, or already gone: the prune below forgets it either way
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            run_git(repo, "worktree", "prune", timeout=60)
        except GitError:
            pass


# ---------------------------------------------------------------------------------------------
# Environment and run folders


def environment_of(root: Path, fallback: dict[str, Any]) -> dict[str, Any]:
    """The environment record as ``root``'s own code collects it (solver, git), run in a
    subprocess; ``fallback`` with ``root``'s git state if that tree cannot produce one.
    ``bench.environment.collect`` is, like ``bench.worker``, a name every revision answers to."""
    code = "import json, sys; from bench.environment import collect; json.dump(collect(), sys.stdout)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, env=env,
                             timeout=120)
        if out.returncode == 0:
            return json.loads(out.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError):
        pass
    return {**fallback, "git": git_state(root), "solvers": {}}


def new_ab_dir(out_root: str | os.PathLike, base_git: dict[str, Any], new_git: dict[str, Any]) -> Path:
    """``<out_root>/<UTC>_ab_<base sha>_<new sha>[-dirty]/`` holding ``base/`` and ``new/``."""
    stamp = f"{_dt.datetime.now(_dt.timezone.utc):%Y%m%dT%H%M%SZ}"
    name = f"{stamp}_ab_{base_git.get('short') or 'nogit'}_{new_git.get('short') or 'nogit'}" \
           f"{'-dirty' if new_git.get('dirty') else ''}"
    return make_unique_dir(Path(out_root), name)


def open_pair(out_root: str | os.PathLike, base_root: Path, new_root: Path, config: SweepConfig,
              base_env: dict[str, Any], new_env: dict[str, Any], ab: dict[str, Any]) -> tuple[Path, list[Tree]]:
    """The pair folder (:func:`new_ab_dir`) and its two sides, base and new, each an ordinary run
    folder with its environment record (``ab``: what was compared, added to both) and the config."""
    for env in (base_env, new_env):
        env["command"] = command_line()
    pair = new_ab_dir(out_root, base_env["git"], new_env["git"])
    trees = [Tree("base", base_root, base_env["git"], pair / "base"),
             Tree("new", new_root, new_env["git"], pair / "new")]
    for tree, env in zip(trees, (base_env, new_env)):
        tree.run_dir.mkdir()
        env["ab"] = {"role": tree.role, **ab, "pair": str(pair)}
        write_json(tree.run_dir / ENV, env)
        write_json(tree.run_dir / CONFIG, config.to_json())
    return pair, trees


# ---------------------------------------------------------------------------------------------
# Measuring


def merge_rounds(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One results record from a cell's per-round records (one worker process each): see
    :func:`bench.execution.runner.merge_processes`."""
    from ..execution.runner import merge_processes

    merged = merge_processes(records)
    merged["rounds"] = len(records)
    for d in merged.get("directions", {}).values():
        if "processes_ok" in d:
            d["rounds_ok"] = d["processes_ok"]
    return merged


def _all_ok(record: dict[str, Any]) -> bool:
    return record.get("status") == "ok"


def measure_interleaved(cells: list[Cell], config: SweepConfig, trees: list[Tree], rounds: int,
                        got: dict[str, dict[str, list[dict[str, Any]]]],
                        on_measured: Callable[[Tree, Cell, int, dict[str, Any]], None] | None = None,
                        measure: Callable[..., dict[str, Any]] | None = None) -> None:
    """Measure every cell ``rounds`` times per tree, interleaved, into ``got``
    (``{role: {cell key: [record per round]}}``; the caller owns it, so an interrupt keeps
    everything finished).

    A cell that did not come out ``ok`` in both trees in round one is not measured again: a
    status is decided by one round, and repeating an error or a timeout only costs time. Each
    raw record is also appended to the tree's ``rounds.jsonl`` as soon as it exists.
    ``measure(cell, config, root)`` defaults to :func:`bench.execution.runner.run_isolated`.
    """
    if measure is None:
        from ..execution.runner import run_isolated as measure
    for t in trees:
        got.setdefault(t.role, {})
    active = list(cells)
    for r in range(rounds):
        order = trees if r % 2 == 0 else list(reversed(trees))
        for cell in active:
            for tree in order:
                record = measure(cell, config, tree.root)
                record["round"] = r
                _append_round(tree.run_dir, record)
                got[tree.role].setdefault(cell.key(), []).append(record)
                if on_measured:
                    on_measured(tree, cell, r, record)
        if r == 0:
            active = [c for c in active if all(_all_ok(got[t.role][c.key()][0]) for t in trees)]


def count_trees(cells: list[Cell], config: SweepConfig, trees: list[Tree],
                got: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """``--metric instructions``: count every cell's instructions per call in each tree, one
    callgrind process per tree, the two at once (the counts do not depend on the load, and the
    wall time of a pair is then that of one: mostly torch's import under valgrind)."""
    import threading

    from ..execution.instructions import count_cells

    errors: list[BaseException] = []

    def count(tree: Tree) -> None:
        try:
            count_cells(cells, config.directions,
                        lambda rec: got[tree.role].setdefault(rec["key"], []).append(rec),
                        root=tree.root, timeout=config.timeout, seed=config.seed)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the calling thread
            errors.append(exc)

    for t in trees:
        got.setdefault(t.role, {})
    threads = [threading.Thread(target=count, args=(t,), daemon=True) for t in trees]
    for th in threads:
        th.start()
    for th in threads:
        while th.is_alive():
            th.join(timeout=0.5)  # short joins, so Ctrl-C/SIGTERM reach the main thread
    if errors:
        raise errors[0]


def _append_round(run_dir: Path, record: dict[str, Any]) -> None:
    with open(Path(run_dir) / ROUNDS_FILE, "a") as fh:
        fh.write(json.dumps(record, default=str) + "\n")


def write_merged(trees: list[Tree], got: dict[str, dict[str, list[dict[str, Any]]]]) -> None:
    """Each tree's merged records into its ``results.jsonl``."""
    for tree in trees:
        for records in got[tree.role].values():
            append_record(tree.run_dir, merge_rounds(records))


def split_supported(cells: list[Cell], directions) -> tuple[list[Cell], list[tuple[Cell, str]]]:
    """Cells the layers (of this revision) support, and the others with the reason."""
    from ..execution.runner import precheck

    keep, skipped = [], []
    for cell in cells:
        rec = precheck(cell, directions)
        if rec is None:
            keep.append(cell)
        else:
            skipped.append((cell, rec.get("message", "unsupported")))
    return keep, skipped
