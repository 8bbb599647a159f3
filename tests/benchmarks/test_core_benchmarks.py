"""pytest-benchmark suite of the core operations, for people who already track with it.

Not part of the default ``python -m pytest`` run (``tests/conftest.py`` leaves this folder out
unless it is named on the command line or ``--benchmark-only`` is given)::

    python -m pytest tests/benchmarks --benchmark-autosave            # store a baseline (.benchmarks/)
    python -m pytest tests/benchmarks --benchmark-compare \\
        --benchmark-compare-fail=median:25%                            # compare with the latest, fail on +25 %

Timing on a GPU: pytest-benchmark reads its timer before and after a (calibrated) loop of
calls; :func:`synchronized_timer` waits for the queued CUDA work first, so the interval covers
the kernels the calls launched and not only their launch.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

import layers
from bench.timing.kernels import Shape, solve_inputs
from bench.timing.measure import direction_calls
from layers.causal import solve

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# Small on a CPU (the pure-PyTorch solve takes milliseconds there), the papers' batch on a GPU.
SHAPES = {"cpu": {"batch": 8, "sizes": [16, 32]}, "cuda": {"batch": 100, "sizes": [32, 128]}}
CHANNELS, KERNEL = 12, 3


def synchronized_timer() -> float:
    """``time.perf_counter`` after waiting for every queued CUDA kernel (a plain host timer on a CPU)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


pytestmark = pytest.mark.benchmark(timer=synchronized_timer, warmup=True, warmup_iterations=3, min_rounds=10)


@pytest.fixture(autouse=True)
def _one_thread():
    # One thread: comparable between machines and not disturbed by other jobs on shared CPUs.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _solve_inputs(device: str, size: int):
    """``y``, the weight and the padded ``y`` of the solve-against-conv2d problem (as ``bench kernels``
    and the ratio baselines build it)."""
    shape = Shape(device, "float32", SHAPES[device]["batch"], CHANNELS, size, size, KERNEL, "TL")
    return solve_inputs(shape, scale=0.1)


def _size_params():
    return [pytest.param(d, s, id=f"{d}-{s}x{s}") for d in DEVICES for s in SHAPES[d]["sizes"]]


@pytest.mark.parametrize(("device", "size"), _size_params())
def test_solve(benchmark, device, size):
    y, weight, _ = _solve_inputs(device, size)
    benchmark.group = f"solve vs conv2d {device} {size}x{size}"
    with torch.no_grad():
        x = benchmark(solve, y, weight, "TL", unit_diagonal=True, assume_triangular=True)
    assert x.shape == y.shape


@pytest.mark.parametrize(("device", "size"), _size_params())
def test_conv2d(benchmark, device, size):
    """The yardstick of the solve: the convolution it inverts, on the already padded input."""
    y, weight, y_padded = _solve_inputs(device, size)
    benchmark.group = f"solve vs conv2d {device} {size}x{size}"
    with torch.no_grad():
        out = benchmark(F.conv2d, y_padded, weight)
    assert out.shape == y.shape


def _layer_params():
    out = []
    for device in DEVICES:
        for name in layers.available():
            for direction in ("forward", "sampling", "train"):
                out.append(pytest.param(device, name, direction, id=f"{device}-{name}-{direction}"))
    return out


@pytest.mark.parametrize(("device", "name", "direction"), _layer_params())
def test_layer(benchmark, device, name, direction):
    size = SHAPES[device]["sizes"][0]
    info = layers.info(name)
    k = KERNEL if info.kernel_size_applies else None
    try:
        info.check(CHANNELS, k, (size, size), torch.device(device))
    except layers.UnsupportedError as exc:
        pytest.skip(str(exc))
    layer = layers.create(name, CHANNELS, kernel_size=k, input_size=(size, size)).to(device)
    x = torch.randn(SHAPES[device]["batch"], CHANNELS, size, size, device=device)
    call = direction_calls(layer, x, torch.randn_like(x))[direction]
    benchmark.group = f"layers {direction} {device} {size}x{size}"
    benchmark(call)
