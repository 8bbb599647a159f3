"""Dense reference computations shared by the tests."""

from __future__ import annotations

import torch

from layers.causal import causal_conv2d


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
