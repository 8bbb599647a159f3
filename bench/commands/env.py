"""``python -m bench env``: the environment record that every run stores."""

from __future__ import annotations

import argparse
import json

HELP = "print the environment record (hardware, versions, solver per device, git state)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print raw JSON (default: a readable summary)")


def main(args: argparse.Namespace) -> int:
    from ..environment import collect

    env = collect()
    if args.json:
        print(json.dumps(env, indent=2))
        return 0
    t = env["torch"]
    print(f"python      {env['python']} on {env['platform']}")
    print(f"cpu         {env['cpu']['model']} ({env['cpu']['usable_cpus']} usable of {env['cpu']['logical_cpus']})")
    print(f"torch       {t['version']}  threads={t['threads']}  cuda={t['cuda']}  cudnn={t['cudnn']}  "
          f"mkldnn={t['mkldnn']}")
    for g in env["gpus"] or [{"name": "none"}]:
        extra = f"  {g['total_memory_bytes'] / 2**30:.1f} GiB  sm_{g['capability']}  driver {g['driver']}" \
            if "index" in g else ""
        print(f"gpu         {g['name']}{extra}")
    for device, s in env["solvers"].items():
        print(f"solver      {device}: {s.get('solver')} — {s.get('reason', '')}")
    git = env["git"]
    print(f"git         {git['commit'] or 'not a git checkout'}{' (dirty)' if git['dirty'] else ''}")
    for k, v in env["env_vars"].items():
        print(f"env         {k}={v}")
    return 0
