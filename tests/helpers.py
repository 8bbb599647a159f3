"""Shared by the tests: dense reference computations, golden files, plugins, running ``bench``."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import torch

from layers.causal import causal_conv2d


#: A C++ compiler on PATH: without one the native CPU solver cannot be built and its tests skip.
HAS_CXX = shutil.which(os.environ.get("CXX", "c++")) is not None


def require_native_cpu() -> None:
    """Skip without a compiler; with one, the native CPU solver must build (a failed build is a
    failure, not a skip)."""
    import pytest

    from layers import native

    if not HAS_CXX:
        pytest.skip("no C++ compiler on PATH: the native CPU solver cannot be built here")
    status = native.load("cpu")
    assert status.available, f"the native CPU solver did not build:\n{status.reason}"


def dense_conv_matrix(weight: torch.Tensor, orientation: str, height: int, width: int) -> torch.Tensor:
    """Matrix T with vec(causal_conv2d(x, weight)) = T vec(x) for one image (differentiable in weight)."""
    c = weight.shape[1]
    d = c * height * width
    basis = torch.eye(d, dtype=weight.dtype, device=weight.device).reshape(d, c, height, width)
    return causal_conv2d(basis, weight, orientation).reshape(d, -1).t()


def dense_jacobian(fn, x: torch.Tensor) -> torch.Tensor:
    """Jacobian of fn (one image in, one image out) as a (D_out, D_in) matrix."""
    # vectorize=False: vmap has no batching rule for the custom solve Function.
    jac = torch.autograd.functional.jacobian(lambda v: fn(v.reshape(x.shape)).reshape(-1), x.reshape(-1),
                                             vectorize=False)
    return jac


def random_causal_weight(c: int, k: int, orientation: str, unit: bool, scale: float = 0.15,
                         dtype=torch.float64, generator=None) -> torch.Tensor:
    """A random (C, C, k, k) weight whose centre block is lower triangular (unit, or a safe diagonal)."""
    from layers.causal import centre_tap

    w = torch.randn(c, c, k, k, dtype=dtype, generator=generator) * scale
    a, b = centre_tap(k, orientation)
    centre = torch.tril(w[:, :, a, b], diagonal=-1)
    if unit:
        diag = torch.ones(c, dtype=dtype)
    else:
        mag = 0.5 + torch.rand(c, dtype=dtype, generator=generator)
        sign = torch.where(torch.rand(c, generator=generator) < 0.5, -1.0, 1.0).to(dtype)
        diag = mag * sign
    w[:, :, a, b] = centre + torch.diag(diag)
    return w


def install_plugin(tmp_path, monkeypatch, module_name: str, source: str, dist: str,
                   entries: dict[str, str]) -> None:
    """Install a plugin distribution for real: its module and a ``.dist-info`` with entry points
    in a folder on ``sys.path`` and on ``PYTHONPATH`` (so worker processes find it too)."""
    import os

    from layers import ENTRY_POINT_GROUP, registry

    (tmp_path / f"{module_name}.py").write_text(source)
    info = tmp_path / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entries.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    registry.refresh()


def perturb_(layer: torch.nn.Module, scale: float) -> torch.nn.Module:
    """Add N(0, scale²) noise to every parameter, in place; returns the layer."""
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * scale)
    return layer


def density_gradcheck(layer: torch.nn.Module, x: torch.Tensor) -> bool:
    """gradcheck of ``layer(x) -> (z, logdet)`` with respect to ``x`` and every parameter."""
    from torch.func import functional_call

    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    x = x.detach().clone().requires_grad_()

    def density(x, *ps):
        return functional_call(layer, dict(zip(names, ps)), (x,))

    n_inputs = x.numel() + sum(p.numel() for p in params)
    return torch.autograd.gradcheck(density, (x, *params), fast_mode=n_inputs > 600)


def assert_exact_layer(layer: torch.nn.Module, x: torch.Tensor, gradcheck: bool = True) -> None:
    """The checks of the conformance suite for an exact layer, on one float64 input ``x``:
    round trip, log det against the dense Jacobian, inverse Jacobian, and gradcheck."""
    with torch.no_grad():
        z, logdet = layer(x)
        torch.testing.assert_close(layer.inverse(z), x, rtol=1e-9, atol=1e-9)
    # Jacobians of the first sample only: batch independence is the conformance suite's business.
    jf = dense_jacobian(lambda v: layer(v)[0], x[:1])
    sign, logabsdet = torch.linalg.slogdet(jf)
    assert sign != 0
    torch.testing.assert_close(logdet[0], logabsdet, rtol=1e-8, atol=1e-8)
    ji = dense_jacobian(layer.inverse, z[:1])
    torch.testing.assert_close(ji @ jf, torch.eye(jf.shape[0], dtype=jf.dtype), rtol=1e-8, atol=1e-8)
    if gradcheck:
        assert density_gradcheck(layer, x)


def solve_gradcheck(orientation: str, unit: bool, channels: int, k: int = 3) -> bool:
    """float64 gradcheck of the solve (whichever solver is selected) with respect to the right-hand
    side and the free parameters of the weight: the off-centre taps, the strictly lower centre
    entries and, for a general diagonal, the diagonal. (Perturbing an upper centre entry would
    leave the set of triangular weights the solve is defined on.)"""
    from layers.causal import assemble_weight, solve

    c = channels
    off = (torch.randn(c, c, k * k - 1, dtype=torch.float64) * 0.2).requires_grad_()
    lower = (torch.randn(c * (c - 1) // 2, dtype=torch.float64) * 0.2).requires_grad_()
    diag = None if unit else (1.0 + 0.3 * torch.rand(c, dtype=torch.float64)).requires_grad_()
    y = torch.randn(2, c, 4, 3, dtype=torch.float64, requires_grad=True)

    def f(y, off, lower, *diag):
        wgt = assemble_weight(off, lower, diag[0] if diag else None, orientation)
        return solve(y, wgt, orientation, unit_diagonal=unit)

    return torch.autograd.gradcheck(f, (y, off, lower) + (() if unit else (diag,)))


GOLDEN = Path(__file__).parent / "golden"


def check_golden(name: str, text: str) -> None:
    """``text`` equals ``tests/golden/<name>``; ``UPDATE_GOLDEN=1`` rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path}; create it with UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{name} differs from the golden file"


def bench_in_process(*args: str) -> SimpleNamespace:
    """``python -m bench ARGS`` in this process (for commands that measure nothing, so need no
    isolation): ``returncode``, ``stdout``, ``stderr`` as from ``subprocess.run``."""
    from bench.cli import main

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:
            code = exc.code
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


ROOT = Path(__file__).resolve().parent.parent


def bench_cmd(*args: str) -> list[str]:
    """The command line of ``python -m bench ARGS`` with this interpreter."""
    return [sys.executable, "-m", "bench", *args]


def run_bench(*args: str, env: dict | None = None, timeout: float = 300, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python -m bench ARGS`` in a new process (``env`` on top of this one's), output captured."""
    return subprocess.run(bench_cmd(*args), capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


def only_run_dir(out: Path) -> Path:
    """The one run folder a ``bench run --out OUT`` made."""
    dirs = [p for p in out.iterdir() if p.is_dir()]
    assert len(dirs) == 1, dirs
    return dirs[0]


def raw_records(run_dir: Path) -> list[dict]:
    """Every line of a run's ``results.jsonl`` as JSON, as written (no reader's repairs)."""
    return [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]


#: The start of a plugin module of misbehaving test layers (``os``, ``signal``, ``time`` and ``torch``
#: imported): ``_info(name, **kw)``, a LayerInfo with an exact inverse and no kernel size unless
#: ``kernel_sizes`` is given, and ``_Scale``, an exactly invertible per-channel scale to subclass.
SCALE_LAYERS = '''
import os
import signal
import time

import torch
from layers import InvertibleLayer, LayerInfo, Paper


def _info(name, **kw):
    return LayerInfo(name=name, paper=Paper("test layer", "tests", "none", 2026), exact_inverse=True,
                     sequential="none", kernel_sizes=kw.pop("kernel_sizes", "n/a"), **kw)


class _Scale(InvertibleLayer):
    def __init__(self, channels, kernel_size=None, input_size=None):
        super().__init__(channels, kernel_size, input_size)
        self.log_scale = torch.nn.Parameter(torch.zeros(channels))

    def _forward(self, x):
        return x * self.log_scale.exp()[:, None, None], (x.shape[2] * x.shape[3] * self.log_scale.sum()).expand(x.shape[0])

    def _inverse(self, z):
        return z * (-self.log_scale).exp()[:, None, None]
'''


def scale_layer_plugin(class_name: str, name: str, forward: str, inverse: str = "return z / self.scale[:, None, None]",
                       doc: str = "") -> str:
    """Source of a plugin module with one test layer ``name``: a per-channel scale whose
    ``_forward``/``_inverse`` bodies are ``forward``/``inverse`` (``os``, ``time`` and ``torch``
    are imported)."""
    forward, inverse = (textwrap.indent(body, " " * 8).lstrip() for body in (forward, inverse))
    doc_line = f'    """{doc}"""\n\n' if doc else ""
    return f"""
import os
import time

import torch
from layers import InvertibleLayer, LayerInfo, Paper


class {class_name}(InvertibleLayer):
{doc_line}    info = LayerInfo(name="{name}", paper=Paper("test layer", "tests", "none", 2026), exact_inverse=True,
                     sequential="none", kernel_sizes="n/a")

    def __init__(self, channels, kernel_size=None, input_size=None):
        super().__init__(channels, kernel_size, input_size)
        self.scale = torch.nn.Parameter(torch.ones(channels))

    def _forward(self, x):
        {forward}

    def _inverse(self, z):
        {inverse}
"""
