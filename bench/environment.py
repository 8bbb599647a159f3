"""The environment record stored with every run (``env.json``) and shown by ``bench env``."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import socket
import sys
from pathlib import Path
from typing import Any

from .git import git_state


def utc_now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def command_line() -> str:
    """How this process was started, as ``python -m bench ...``."""
    return " ".join([Path(sys.executable).name, "-m", "bench", *sys.argv[1:]])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpus() -> list[dict[str, Any]]:
    import torch

    if not torch.cuda.is_available():
        return []
    driver = None
    try:
        import pynvml

        pynvml.nvmlInit()
        driver = pynvml.nvmlSystemGetDriverVersion()
        driver = driver.decode() if isinstance(driver, bytes) else driver
    except Exception:  # noqa: BLE001 - NVML is optional
        pass
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "total_memory_bytes": p.total_memory,
                    "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                    "driver": driver})
    return out


def _solvers() -> dict[str, Any]:
    """Which causal-solve implementation each device type uses, and why (builds the native
    kernels if this process has not yet: the record must say what the cells will run)."""
    from layers import native

    return native.solver_status(build=True)


def collect() -> dict[str, Any]:
    import numpy
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "timestamp_utc": utc_now().isoformat(timespec="seconds"),
        "command": command_line(),
        "cwd": os.getcwd(),
        "host": socket.gethostname(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu": {"model": _cpu_model(), "logical_cpus": os.cpu_count(), "usable_cpus": affinity,
                # A busy machine makes CPU timings noisy (and OpenMP spin-waits can make them far worse).
                "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
        "torch": {
            "version": torch.__version__,
            "threads": torch.get_num_threads(),
            "interop_threads": torch.get_num_interop_threads(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "mkldnn": torch.backends.mkldnn.is_available(),
        },
        "numpy": numpy.__version__,
        "gpus": _gpus(),
        "solvers": _solvers(),
        "git": git_state(),
        "env_vars": {k: os.environ[k] for k in ("INVCONV_SOLVER", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                 "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
