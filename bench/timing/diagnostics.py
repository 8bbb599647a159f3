"""What an iterative inverse did during a sampling call, collected from the layers that say.

Layers with an iterative inverse (``mintnet``'s Newton iteration) expose the last ``inverse``
call's diagnostics through ``inverse_diagnostics()`` (see ``layers.InvertibleLayer``). After the
sampling direction is timed, the runner asks every such layer in the module and stores one
summary in that direction's record under ``inverse_diagnostics``.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def collect_inverse_diagnostics(module: torch.nn.Module) -> dict[str, Any] | None:
    """A summary over every submodule that reports inverse diagnostics, or ``None`` if none does.

    ``{"layers": n, "iterations": the most any layer used, "iterations_min": the fewest,
    "iterations_total": their sum (the dependent steps of one sampling call),
    "residual": the largest final residual max |F(x) − z|, "converged": whether every layer that
    iterated to a tolerance reached it (None if none did)}``. The residual is each layer's own,
    against its own input; the round-trip error of the whole model shows how they compound.
    """
    found = []
    for m in module.modules():
        hook = getattr(m, "inverse_diagnostics", None)
        if callable(hook):
            d = hook()
            if d:
                found.append(d)
    if not found:
        return None
    iterations = [int(d["iterations"]) for d in found if d.get("iterations") is not None]
    residuals = [float(d["residual"]) for d in found if d.get("residual") is not None]
    converged = [bool(d["converged"]) for d in found if d.get("converged") is not None]
    out: dict[str, Any] = {"layers": len(found)}
    if iterations:
        out.update(iterations=max(iterations), iterations_min=min(iterations), iterations_total=sum(iterations))
    if residuals:
        worst = max(residuals)
        out["residual"] = worst if math.isfinite(worst) else float("nan")
    out["converged"] = all(converged) if converged else None
    return out


def describe(d: dict[str, Any] | None) -> str:
    """One short phrase for tables: ``"100 it./layer, residual 3.1e-07"``."""
    if not d:
        return ""
    parts = []
    if "iterations" in d:
        its = d["iterations"] if d.get("iterations_min", d["iterations"]) == d["iterations"] \
            else f"{d['iterations_min']}–{d['iterations']}"
        parts.append(f"{its} it./layer")
    if "residual" in d:
        parts.append(f"residual {d['residual']:.1e}")
    if d.get("converged") is False:
        parts.append("NOT converged")
    return ", ".join(parts)
