"""Options shared by the commands that can fail a CI job: ``compare``, ``ab`` and ``baseline check``."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UsageError


def fraction(text: str) -> float:
    """``25%`` or ``0.25`` → 0.25. A bare number ≥ 1 is refused: ``10`` is ambiguous."""
    t = text.strip()
    try:
        value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a fraction (e.g. 0.25) or a percentage (e.g. 25%)") from None
    if not t.endswith("%") and value >= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is ambiguous: write {value:g}% for a percentage or a fraction "
                                         "below 1 (100% means twice as slow)")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the threshold must be positive")
    return value


def add_accept_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("accepting an intended slowdown")
    g.add_argument("--accept", action="append", metavar="'PATTERN — REASON'", default=[],
                   help="accept regressions of the layers or rows matching PATTERN (a glob), for REASON (repeatable)")
    g.add_argument("--accept-from", metavar="REV",
                   help="also accept what commit REV's 'Perf-Regression-Accepted: PATTERN — REASON' trailers name "
                        "(CI passes HEAD)")


def markers(args: argparse.Namespace, repo: str | Path = "."):
    from ..regression import accept

    try:
        out = [accept.parse(v) for v in args.accept]
        if args.accept_from:
            out += accept.from_commit(args.accept_from, repo)
    except accept.MarkerError as exc:
        raise UsageError(str(exc)) from None
    return out


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reports")
    g.add_argument("--markdown", metavar="FILE", help="also write the Markdown summary (a PR comment) to FILE")
    g.add_argument("--json", metavar="FILE", help="also write every row as JSON to FILE")
