"""Command line of the harness: ``python -m bench <command>``."""

from __future__ import annotations

import argparse
import sys


def _cmd_list(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    import layers

    rows = []
    for name in layers.available():
        info = layers.info(name)
        rows.append([name, str(info.paper), info.sequential, "exact" if info.exact_inverse else "approximate",
                     info.describe_kernel_sizes(), info.describe_channels(), ", ".join(info.devices), "yes"])
    for name, reason in layers.unavailable().items():
        rows.append([name, "", "", "", "", "", "", f"no: {reason}"])
    headers = ["layer", "paper", "sequential", "inverse", "kernel sizes", "channels", "devices", "available"]
    print(tabulate(rows, headers=headers, tablefmt="github"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("list", help="registered layers, their capabilities and availability",
                       description="List the registered layers with their capabilities and availability.")
    p.set_defaults(func=_cmd_list)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
