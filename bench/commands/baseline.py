"""``python -m bench baseline record|check``: machine-independent ratio baselines.

``record`` measures ratios of two timings taken side by side in one process — the causal solve
÷ ``F.conv2d`` of the same shape, and every layer's forward / sampling / train time ÷
``glow-1x1``'s — and writes them with the environment and a per-ratio threshold to
``results/baselines/<device>-<machine class>.json`` (commit that file). A ratio of two kernels
holds only for machines that run the same kind of code (the same vendor and family, and the same
SIMD paths in our kernel and in oneDNN), so baselines are kept per machine class
(``bench.regression.baselines.machine_class``); on a class with none recorded, ``check`` says so and passes. ``check`` measures the same ratios again
and exits 1 when one exceeds ``baseline × (1 + threshold)`` in every one of three attempts,
naming the ratio, the cell and both values, unless a ``--accept``/``--accept-from`` marker
accepts it. How and why: ``bench/regression/baselines.py``.

Re-record after a change that moves the ratios on purpose (native solve kernels, a new layer,
an accepted slowdown): ``python -m bench baseline record`` and commit the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import UsageError
from . import gate

HELP = "record or check the committed ratio baselines (solve ÷ conv2d, layer ÷ glow-1x1)"
DESCRIPTION = __doc__ + """
examples:
  python -m bench baseline record                 # (re-)write results/baselines/cpu-<this machine class>.json
  python -m bench baseline check --accept-from HEAD
  python -m bench baseline check --device cuda --file results/baselines/cuda-nvidia-h200-sm90.json
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(p))
    rec = sub.add_parser("record", help="measure the ratios and write the baseline file",
                         description="Measure the ratios and write the baseline file (commit it).")
    chk = sub.add_parser("check", help="measure the ratios again; exit 1 when one regressed beyond its threshold",
                         description="Measure the stored ratios again; exit 1 when one regressed beyond its "
                                     "threshold in every attempt.")
    for q in (rec, chk):
        q.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available, else cpu")
        q.add_argument("--file", metavar="FILE",
                       help="the baseline file (default results/baselines/<device>-<machine class>.json in this "
                            "checkout, for the class of this machine; under the working directory when bench is "
                            "installed)")
        q.add_argument("--quiet", action="store_true", help="no progress lines")
    rec.add_argument("--layers", type=lambda s: [x.strip() for x in s.split(",") if x.strip()], metavar="NAMES",
                     help="layers to divide by glow-1x1 (default: every available layer)")
    gate.add_accept_arguments(chk)
    chk.add_argument("--markdown", metavar="FILE", help="also write the report as Markdown to FILE")


def _device(args) -> str:
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: CUDA is not available here; use --device cpu")
    return device


def _progress(args):
    return None if args.quiet else (lambda line: print(f"  {line}", file=sys.stderr, flush=True))


def main(args: argparse.Namespace) -> int:
    return _record(args) if args.action == "record" else _check(args)


def _record(args: argparse.Namespace) -> int:
    import layers

    from ..regression import baselines
    from ..environment import collect

    device = _device(args)
    names = args.layers or layers.available()
    for name in names:
        try:
            layers.info(name)
        except layers.LayerError as exc:
            raise UsageError(str(exc)) from None
    path = Path(args.file) if args.file else baselines.baseline_path(device)
    print(f"machine class: {baselines.machine_class(device)}", file=sys.stderr)
    print(f"recording ratio baselines on {device} ({baselines.THREADS} thread) into {path}", file=sys.stderr)
    doc = baselines.record(device, [n for n in names if n != baselines.REFERENCE_LAYER], collect(),
                           progress=_progress(args))
    for note in doc["notes"]:
        print(f"note: {note}", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{len(doc['ratios'])} ratios written to {path}; commit it")
    return 0


def _check(args: argparse.Namespace) -> int:
    from tabulate import tabulate

    from ..regression import baselines
    from ..git import repository

    device = _device(args)
    machine = baselines.machine_class(device)
    path = Path(args.file) if args.file else baselines.baseline_path(device, machine)
    if not args.file and not path.exists():
        # Not a failure: ratios recorded on another kind of machine say nothing about this one.
        others = ", ".join(baselines.recorded_classes(device)) or "none"
        print(f"no baseline recorded for this machine class ({device}-{machine}); recorded classes: {others}. "
              f"Nothing checked. To add one: python -m bench baseline record --device {device} "
              f"(writes {path}; commit it)")
        return 0
    if not path.exists():
        raise UsageError(f"no baseline at {path}; record one with `python -m bench baseline record --device {device}`")
    try:
        doc, ratios = baselines.load(path)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: unreadable baseline ({exc})") from None
    if doc["device"] != device:
        raise UsageError(f"{path} holds {doc['device']} ratios; pass --device {doc['device']}")
    if doc.get("machine_class") and doc["machine_class"] != machine:
        print(f"note: {path} was recorded on machine class {doc['machine_class']}, this machine is {machine}: "
              "the ratios may not carry over", file=sys.stderr)
    try:
        repo = repository()
    except Exception:  # noqa: BLE001 - markers from a commit need git; explicit --accept does not
        repo = "."
    markers = gate.markers(args, repo)
    recorded = doc.get("recorded_utc", "?")
    cpu = ((doc.get("environment") or {}).get("cpu") or {}).get("model", "?")
    print(f"checking {len(ratios)} ratio baselines from {path} (recorded {recorded} on {cpu})", file=sys.stderr)
    rows, notes = baselines.check(doc, ratios, markers, progress=_progress(args))

    fmt = baselines.fmt
    table = [[r.name, fmt(r.ratio.value), fmt(r.now), f"≤ {fmt(r.ratio.limit)} (+{r.ratio.threshold:.0%})",
              ", ".join(fmt(a) for a in r.attempts) or "–",
              ("**regressed**" if r.failing else r.verdict) + (" — accepted" if r.accepted else "")]
             for r in rows]
    failing = [r for r in rows if r.failing]
    lines = [f"### ratio baselines: {'%d regressed' % len(failing) if failing else 'no regression'} "
             f"({path.name}, recorded {recorded} on {cpu})", "",
             f"Each ratio is two timings taken side by side in one process ({baselines.THREADS} thread); a ratio "
             f"regresses when it exceeds its limit in {baselines.CHECK_ATTEMPTS} measurements in a row "
             "(*now* is the smallest).", "",
             tabulate(table, headers=["ratio", "baseline", "now", "limit", "attempts", "verdict"], tablefmt="github",
                      disable_numparse=True)]
    if notes:
        lines += [""] + [f"- note: {n}" for n in notes]
    accepted = [r for r in rows if r.accepted]
    if accepted:
        lines += ["", "**Accepted regressions** (re-record the baseline: `python -m bench baseline record`):"]
        lines += [f"- {r.name}: {fmt(r.now)} vs {fmt(r.ratio.value)}, accepted by `{r.accepted.pattern}` "
                  f"({r.accepted.source}): {r.accepted.reason}" for r in accepted]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    for r in rows:
        if r.verdict == "regressed":
            what = (f"{r.name}, cell {r.ratio.label}: ratio {fmt(r.now)} vs baseline {fmt(r.ratio.value)} "
                    f"({(r.now / r.ratio.value - 1):+.0%}, limit +{r.ratio.threshold:.0%})")
            print(f"accepted baseline regression: {what} — {r.accepted}" if r.accepted
                  else f"BASELINE REGRESSION: {what}", file=sys.stderr)
    improved = [r for r in rows if r.verdict == "improved"]
    if improved:
        print(f"{len(improved)} ratio(s) improved beyond their threshold ({', '.join(r.name for r in improved)}); "
              "re-record to lock that in: python -m bench baseline record", file=sys.stderr)
    for m in markers:
        if not any(r.accepted is m for r in rows):
            print(f"note: marker {m} matched no baseline regression", file=sys.stderr)
    return 1 if failing else 0
