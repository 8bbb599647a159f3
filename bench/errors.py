"""The error every layer of the harness may raise for a bad request, without importing the CLI."""


class UsageError(Exception):
    """A bad command-line request: printed as one line, exit status 2 (by ``bench/cli.py``)."""
