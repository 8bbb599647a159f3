"""Accepting an intended slowdown: the ``Perf-Regression-Accepted`` commit-message trailer.

A change that makes something slower on purpose (an exact algorithm replacing an approximate
one, a correctness fix) says so in the commit that makes it, as a git trailer in the last
paragraph of the message::

    Perf-Regression-Accepted: inverse-flow — the solve now checks its input for NaN
    Perf-Regression-Accepted: glow-1x1*sampling — W⁻¹ recomputed in float64

The value is ``PATTERN — REASON`` (an em dash, ``--`` or `` - `` separates them). The pattern
is a shell-style glob (:mod:`fnmatch`) matched against the layer name, against the comparison
row's name (``<layer> B=8 C=12 16x16 k=3 cpu/float32 <direction>``) and against a baseline
ratio's name (``layer/inverse-flow/forward ÷ glow-1x1``). The reason is required: an
acceptance without a reason is an error, not a silent pass. Accepted regressions are not
failures, and every report repeats them with their reason, so the reviewer sees what was
waved through.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

TRAILER = "Perf-Regression-Accepted"

_SEPARATOR = re.compile(r"\s+(?:—|–|--|-)\s+")


class MarkerError(ValueError):
    """A malformed marker (no pattern, or no reason)."""


@dataclass(frozen=True)
class Marker:
    pattern: str
    reason: str
    source: str = "command line"  # e.g. "commit abc1234"

    def matches(self, row) -> bool:
        """``row`` has ``layer`` and ``name`` (a comparison row or a baseline ratio)."""
        return any(fnmatch.fnmatchcase(text, self.pattern) for text in (row.layer, row.name))

    def __str__(self) -> str:
        return f"{self.pattern} — {self.reason} ({self.source})"


def parse(value: str, source: str = "command line") -> Marker:
    """``"PATTERN — REASON"`` → :class:`Marker`."""
    parts = _SEPARATOR.split(value.strip(), maxsplit=1)
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise MarkerError(f"{TRAILER}: {value.strip()!r} must be 'PATTERN — REASON' (a layer name or glob, "
                          "then a reason after an em dash or '--')")
    return Marker(parts[0].strip(), parts[1].strip(), source)


def from_commit(rev: str = "HEAD", repo: str | Path = ".") -> list[Marker]:
    """The markers in the trailers of commit ``rev``'s message."""
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "log", "-1", f"--format=%h%n%(trailers:key={TRAILER},valueonly,unfold)", rev,
             "--"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise MarkerError(f"cannot read the message of {rev}: {exc}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["git failed"])[-1]
        raise MarkerError(f"cannot read the message of {rev} in {repo}: {last}")
    short, *values = out.stdout.splitlines()
    return [parse(v, f"commit {short}") for v in values if v.strip()]
