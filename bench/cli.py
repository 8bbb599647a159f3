"""Command line of the harness: ``python -m bench <command>``.

One module per subcommand in ``bench/commands/`` (each defines ``HELP``, ``add_arguments(parser)``
and ``main(args) -> int``); they are imported only when their command runs, so ``--help`` stays
fast and nothing heavy (torch, matplotlib) loads for commands that do not need it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UsageError
from .execution.runs import RunDirError

# name -> module in bench.commands
COMMANDS = {
    "run": "run",
    "list": "list_layers",
    "env": "env",
    "table": "table",
    "plot": "plot",
    "presets": "presets",
    "compare": "compare",
    "ab": "ab",
    "baseline": "baseline",
    "export": "export",
    "kernels": "kernels",
    "gpu-check": "gpu_check",
}


class Parser(argparse.ArgumentParser):
    """argparse, but a bad argument gives one line (what is wrong and where to look), not the
    whole usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m bench", description="Benchmark invertible convolutions.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(f"bench.commands.{module_name}")
        p = sub.add_parser(name, help=module.HELP, description=getattr(module, "DESCRIPTION", module.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_main=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._main(args) or 0)
    except UsageError as exc:
        parser.exit(2, f"python -m bench {args.command}: error: {exc}\n")
    except FileNotFoundError as exc:
        parser.exit(2, f"python -m bench {args.command}: error: {exc}\n")
    except RunDirError as exc:  # a run folder that cannot be created, read or locked
        parser.exit(2, f"python -m bench {args.command}: error: {exc}\n")
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
