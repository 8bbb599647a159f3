"""Types for the command line's numeric options, shared by the commands and the executors' options.

A bad value gives argparse one line naming it and what is accepted.
"""

from __future__ import annotations

import argparse


def _integer(text: str, minimum: int, below: str) -> int:
    try:
        value = int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text.strip()!r} is not an integer") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{value} {below}")
    return value


def nonneg_int(text: str) -> int:
    return _integer(text, 0, "is negative")


def positive_int(text: str) -> int:
    return _integer(text, 1, "is not a positive integer")


def positive_ints(text: str) -> list[int]:
    """A comma-separated list of positive integers."""
    return [positive_int(part) for part in text.split(",")]
