"""``python -m bench list``: the registered layers, their capabilities and availability."""

from __future__ import annotations

import argparse
import json

HELP = "registered layers, their capabilities and availability"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the capabilities as JSON")


def main(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    import layers

    if args.json:
        out = {name: layers.info(name).as_dict() for name in layers.available()}
        out.update({name: {"unavailable": reason} for name, reason in layers.unavailable().items()})
        print(json.dumps(out, indent=2))
        return 0
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
