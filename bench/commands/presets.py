"""``python -m bench presets``: the presets (one spec file per published table) and how to run them."""

from __future__ import annotations

import argparse

HELP = "list the presets: spec files that regenerate the papers' tables (run with `run --preset NAME`)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="also print each preset's description")


def print_presets(verbose: bool = False) -> int:
    from ..sweep import presets

    for p in presets.load_all():
        layers = p.layers if p.layers == presets.ALL else ", ".join(p.layers)
        values = ", ".join(f"{a} {'/'.join(map(str, p.values[a]))}" for a in p.sweep) or "no axis swept"
        model = f"{p.model.get('levels')}x{p.model.get('steps')}-step model" if p.scope == "model" else "single layers"
        print(f"{p.name}\n  {p.title}\n  paper table: {p.paper_table}; {model}; layers: {layers}; {values}\n"
              f"  --quick: {p.quick['note']}")
        if verbose:
            print("  " + " ".join(p.description.split()))
    print("\nrun one: python -m bench run --preset NAME [--quick]; every one: python -m bench run --preset all --quick")
    return 0


def main(args: argparse.Namespace) -> int:
    return print_presets(args.verbose)
