"""The process that runs under callgrind for ``--metric instructions`` (see ``bench/execution/instructions.py``).

Started as a script (``python bench/execution/count_worker.py REQUEST``) with the measured tree first on
``PYTHONPATH``, so that it counts *that* tree's ``layers`` and cell set-up even when the tree is
an older revision (``bench ab``). It therefore uses only what every revision since the runner
has: ``Cell`` and the cell set-up of the measuring module, found where the measured tree keeps
them (``bench.sweep.cells`` and ``bench.timing.measure``; before the package was split into
subpackages, ``bench.sweep`` and ``bench.measure``). Protocol: one JSON line per
event on the original stdout — ``started`` when a cell begins, one ``direction`` per direction
(with the dump numbers of its counted calls), one ``cell`` at the end of the cell; anything the
measured code prints goes to stderr.
"""

import gc
import importlib.util
import json
import os
import sys


def _measured_tree():
    """The measured tree's ``Cell`` class and measuring module, in its own layout."""
    if importlib.util.find_spec("bench.timing") is not None:
        from bench.sweep.cells import Cell
        from bench.timing import measure
    else:  # a revision before the subpackages
        from bench import measure
        from bench.sweep import Cell
    return Cell, measure


def _subject_builder(measure):
    if hasattr(measure, "build_subject"):
        return measure.build_subject

    def build(cell, device, dtype):  # revisions before build_subject was public
        fn = measure._model_subject if cell.scope == "model" else measure._layer_subject
        return fn(cell, device, dtype)

    return build


def main() -> int:
    if os.path.dirname(os.path.abspath(__file__)) == os.path.abspath(sys.path[0]):
        sys.path.pop(0)  # run as a script: the tree on PYTHONPATH, not this folder, provides `bench`
    protocol = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with open(sys.argv[1]) as fh:
        request = json.load(fh)

    import torch

    Cell, measure = _measured_tree()
    torch.set_num_threads(1)
    build = _subject_builder(measure)
    toggle, dump = torch._C._valgrind_toggle, torch._C._valgrind_toggle_and_dump_stats
    calls, dumps, warmup = request["calls"], request["dumps"], request["warmup"]
    dumped = 0

    def emit(key, msg):
        protocol.write(json.dumps({"key": key, **msg}) + "\n")
        protocol.flush()

    for d in request["cells"]:
        cell = Cell.from_dict(d)
        key = cell.key()
        emit(key, {"type": "started"})
        torch.manual_seed(request.get("seed", 0))
        try:
            subject = build(cell, torch.device(cell.device), getattr(torch, cell.dtype))
        except Exception as exc:  # noqa: BLE001 - recorded as the cell's status
            status, message = measure.classify_exception(exc)
            emit(key, {"type": "cell", "status": status, "message": message})
            continue
        for direction in request["directions"]:
            fn = subject.fns[direction]
            collecting = False
            try:
                for _ in range(warmup):
                    fn()
                ids = []
                for _ in range(dumps):
                    gc.collect()
                    gc.disable()
                    toggle()
                    collecting = True
                    for _ in range(calls):
                        fn()
                    dump()
                    collecting = False
                    gc.enable()
                    dumped += 1
                    ids.append(dumped)
                emit(key, {"type": "direction", "direction": direction, "status": "ok", "calls": calls,
                           "dumps": ids})
            except Exception as exc:  # noqa: BLE001 - one failing direction must not lose the others
                if collecting:  # switch collection off again; that dump's number is spent
                    dump()
                    dumped += 1
                gc.enable()
                status, message = measure.classify_exception(exc)
                emit(key, {"type": "direction", "direction": direction, "status": status, "message": message})
        params = sum(p.numel() for p in subject.module.parameters() if p.requires_grad)
        done = {"type": "cell", "params": params}
        if hasattr(measure, "exact_inverse"):  # revisions before records stored it render from the registry
            done["exact_inverse"] = measure.exact_inverse(cell)
        emit(key, done)
    return 0


if __name__ == "__main__":
    sys.exit(main())
