"""The one place the harness asks git: the measured tree's commit, and what ``bench ab`` needs.

Every git command runs as ``git -C REPO ...`` with a timeout, and a failure becomes one
:class:`GitError` naming the command and git's last line of complaint.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from .locations import TREE


class GitError(RuntimeError):
    """git could not do what was asked (no repository, unknown revision, worktree failure)."""


def run_git(repo: str | Path, *args: str, timeout: float = 120) -> str:
    """git's standard output, without the final newline (leading spaces are kept: ``status
    --porcelain`` lines start with one)."""
    try:
        out = subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GitError(f"git {' '.join(args)}: {exc}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [f"exit status {out.returncode}"])[-1]
        raise GitError(f"git {' '.join(args)}: {last}")
    return out.stdout.rstrip("\n")


def git_state(root: Path = TREE) -> dict[str, Any]:
    """Commit and dirty flag of the code being measured (``None`` outside a git checkout)."""

    def ask(*args: str) -> str:
        try:
            return run_git(root, *args, timeout=10)
        except GitError:
            return ""

    # Only a tree at the top of a checkout has a commit: an installed package in a virtual
    # environment inside some project is not that project's code.
    top = ask("rev-parse", "--show-toplevel").strip()
    commit = ask("rev-parse", "HEAD").strip() if top and Path(top).resolve() == Path(root).resolve() else ""
    if not commit:
        return {"commit": None, "short": None, "dirty": None, "branch": None}
    # Results are not code: run folders kept under results/ (e.g. by `--preset all`, which
    # writes one before starting the next) must not mark the measured code as modified. The
    # porcelain lines are "XY PATH": not stripped, or the first line's path loses a letter.
    changed = [line for line in ask("status", "--porcelain").splitlines()
               if line.strip() and not line[3:].strip('"').startswith("results/")]
    return {"commit": commit, "short": commit[:7], "dirty": bool(changed),
            "branch": ask("rev-parse", "--abbrev-ref", "HEAD").strip() or None}


def repository(root: Path = TREE) -> Path:
    """The top of the git checkout holding the code being measured (``bench ab``, ``baseline``)."""
    try:
        top = Path(run_git(root, "rev-parse", "--show-toplevel").strip())
    except GitError:
        raise GitError(f"bench ab needs a git checkout: {root} (where bench/ is imported from) is not in one") from None
    if top.resolve() != Path(root).resolve():
        raise GitError(f"bench ab needs bench/ at the top of a git checkout; it is imported from {root}, "
                       f"inside {top}")
    return top


def resolve_revision(repo: Path, rev: str) -> str:
    """The full commit id of ``rev``."""
    try:
        return run_git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").strip()
    except GitError:
        raise GitError(f"--base {rev}: no such commit in {repo}") from None
