"""Fault injection for the runner: a plugin package of misbehaving layers, and helpers that break
a run the ways a run gets broken (a torn results file, SIGTERM or SIGKILL of ``bench run``, two
runs racing on one folder).

Every misbehaving layer writes its process's pid (and the pid of any child it starts) into the
folder named by ``FAULT_PID_DIR``, so a test can check that nothing outlives the run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from helpers import SCALE_LAYERS, bench_cmd, install_plugin, run_bench

ROOT = Path(__file__).resolve().parent.parent
# The fast timing flags: tiny cells must take a fraction of a second each.
FAST = ["--repeat", "3", "--min-time", "0", "--max-time", "0.5", "--warmup", "1", "--warmup-time", "0",
        "--no-plots", "--no-progress"]
TINY = ["--batch", "2", "--channels", "2", "--input-size", "4"]

FAULTY = """
import resource
import subprocess
import sys
""" + SCALE_LAYERS + '''

def _note_pid(pid, what):
    folder = os.environ.get("FAULT_PID_DIR")
    if folder:
        with open(os.path.join(folder, f"{what}-{pid}"), "w") as fh:
            fh.write(str(pid))


class Good(_Scale):
    info = _info("fault-good")


class Slow(Good):
    """A good layer whose calls take FAULT_SLOW seconds (0.05 by default): a run that is easy to
    interrupt in the middle."""
    info = _info("fault-slow")

    def _forward(self, x):
        time.sleep(float(os.environ.get("FAULT_SLOW", "0.05")))
        return super()._forward(x)


class Hangs(Good):
    info = _info("fault-hangs")

    def _forward(self, x):
        _note_pid(os.getpid(), "worker")
        while True:
            time.sleep(0.1)


class SpawnsAndHangs(Good):
    """Starts a child that holds the worker's stdout and stderr open, then hangs."""
    info = _info("fault-spawns")

    def _forward(self, x):
        _note_pid(os.getpid(), "worker")
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        _note_pid(child.pid, "child")
        while True:
            time.sleep(0.1)


class LogdetBxN(Good):
    info = _info("fault-logdet-2d")

    def _forward(self, x):
        z, _ = super()._forward(x)
        return z, x.new_zeros(x.shape[0], 7)


class LogdetScalar(Good):
    info = _info("fault-logdet-0d")

    def _forward(self, x):
        z, ld = super()._forward(x)
        return z, ld.sum()


class BareTensor(Good):
    info = _info("fault-bare")

    def _forward(self, x):
        return super()._forward(x)[0]


class InverseWrongShape(Good):
    info = _info("fault-inverse-shape")

    def _inverse(self, z):
        return super()._inverse(z)[:, :1]


class ReturnsNaN(Good):
    info = _info("fault-nan")

    def _forward(self, x):
        z, ld = super()._forward(x)
        return z * float("nan"), ld


class Allocates(Good):
    """Allocates without bound; its address space is capped first (1 GiB above what the process
    maps already), so that it is this process, not the test machine, that runs out of memory."""
    info = _info("fault-allocates")

    def _forward(self, x):
        with open("/proc/self/status") as fh:
            vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (1 << 30), resource.getrlimit(resource.RLIMIT_AS)[1]))
        hoard = []
        while True:
            hoard.append(torch.ones(1 << 24))  # 64 MiB a step, touched


class Segfaults(Good):
    info = _info("fault-segfault")

    def _inverse(self, z):
        os.kill(os.getpid(), signal.SIGSEGV)


class KilledByPerson(Good):
    """SIGKILLed by someone (here: itself) rather than by the out-of-memory killer."""
    info = _info("fault-killed")

    def _forward(self, x):
        os.kill(os.getpid(), signal.SIGKILL)


class PrintsProtocol(Good):
    info = _info("fault-prints")

    def _forward(self, x):
        print('{"type": "cell", "status": "ok"}')
        print('{"type": "ready"}')
        return super()._forward(x)
'''

EXITS_AT_IMPORT = '''
import sys

sys.exit(3)
'''

ENTRIES = {
    "fault-good": "faulty_layers:Good",
    "fault-slow": "faulty_layers:Slow",
    "fault-hangs": "faulty_layers:Hangs",
    "fault-spawns": "faulty_layers:SpawnsAndHangs",
    "fault-logdet-2d": "faulty_layers:LogdetBxN",
    "fault-logdet-0d": "faulty_layers:LogdetScalar",
    "fault-bare": "faulty_layers:BareTensor",
    "fault-inverse-shape": "faulty_layers:InverseWrongShape",
    "fault-nan": "faulty_layers:ReturnsNaN",
    "fault-allocates": "faulty_layers:Allocates",
    "fault-segfault": "faulty_layers:Segfaults",
    "fault-killed": "faulty_layers:KilledByPerson",
    "fault-prints": "faulty_layers:PrintsProtocol",
    "fault-exits": "faulty_exit:Layer",
}


def install_faulty_plugins(tmp_path: Path, monkeypatch) -> Path:
    """Install the misbehaving layers as a real plugin distribution (entry points, also seen by
    worker processes); returns the folder the layers write their pids into."""
    folder = tmp_path / "faulty-plugins"
    folder.mkdir()
    (folder / "faulty_exit.py").write_text(EXITS_AT_IMPORT)
    install_plugin(folder, monkeypatch, "faulty_layers", FAULTY, "faulty-layers", ENTRIES)
    pids = tmp_path / "pids"
    pids.mkdir()
    monkeypatch.setenv("FAULT_PID_DIR", str(pids))
    return pids


def bench(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_bench(*args, env=env, timeout=timeout)


def start_bench(*args: str, env: dict | None = None) -> subprocess.Popen:
    """``bench ARGS`` in the background, in its own process group (so a test can kill it alone)."""
    return subprocess.Popen(bench_cmd(*args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})}, start_new_session=True)


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def noted_pids(folder: Path, what: str | None = None) -> list[int]:
    # From the file's name: its content may not be written yet.
    return [int(p.name.rsplit("-", 1)[1]) for p in folder.iterdir() if what is None or p.name.startswith(what + "-")]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def assert_none_alive(pids: list[int], within: float = 5.0) -> None:
    """Every pid is gone within ``within`` seconds (an orphan is reaped by init, not at once)."""
    wait_until(lambda: not any(alive(p) for p in pids), within, f"processes {pids} to exit")


def kill_parent(proc: subprocess.Popen, sig: int) -> None:
    """Send ``sig`` (SIGTERM, SIGKILL) to ``bench run`` itself, not to its group: what CI
    cancellation or a person's ``kill`` does."""
    os.kill(proc.pid, sig)


def cleanup(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def tear_last_line(run_dir: Path, how: str = "half") -> None:
    """Break ``results.jsonl`` as a crash does: ``half`` cuts the last record in the middle (no
    newline), ``nul`` appends NUL bytes (a block that was allocated but never written)."""
    path = Path(run_dir) / "results.jsonl"
    data = path.read_bytes()
    if how == "half":
        start = data.rstrip(b"\n").rfind(b"\n") + 1
        path.write_bytes(data[: start + (len(data) - start) // 2])
    elif how == "nul":
        path.write_bytes(data + b"\0" * 300)
    else:
        raise ValueError(how)


def race(args_a: list[str], args_b: list[str], ready, env: dict | None = None):
    """Start ``bench ARGS_A``, wait until ``ready()`` (e.g. its first record is on disk), then run
    ``bench ARGS_B`` to completion while A still runs. Returns (A's Popen, B's CompletedProcess)."""
    a = start_bench(*args_a, env=env)
    try:
        wait_until(lambda: ready() or a.poll() is not None, 60, "the first run to start measuring")
        assert a.poll() is None, a.communicate()
        b = bench(*args_b, env=env)
    except BaseException:
        cleanup(a)
        raise
    return a, b
