"""Summary statistics of raw timing samples (kept raw; statistics are computed on demand)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The papers report mean ± std; we lead with the median and its p20–p80 band, which a few slow
# outliers (a context switch, a page fault) do not move. Nothing is dropped.
LOW_PERCENTILE = 20
HIGH_PERCENTILE = 80


@dataclass
class Measurement:
    """Raw samples of one timed call, with lazily computed statistics.

    ``unit``: what the samples are in, and the suffix of :meth:`summary`'s keys — milliseconds
    for a cell's directions (``median_ms``), seconds for ``bench kernels`` (``median_s``).
    ``usage``: what the process did meanwhile (:class:`bench.timing.measure.Usage`), where known.
    """

    samples: list[float]
    usage: dict[str, Any] = field(default_factory=dict)
    unit: str = "ms"

    @property
    def n(self) -> int:
        return len(self.samples)

    def _array(self) -> np.ndarray:
        if not self.samples:
            raise ValueError("no samples")
        return np.asarray(self.samples, dtype=np.float64)

    @property
    def median(self) -> float:
        return float(np.median(self._array()))

    @property
    def p20(self) -> float:
        return float(np.percentile(self._array(), LOW_PERCENTILE))

    @property
    def p80(self) -> float:
        return float(np.percentile(self._array(), HIGH_PERCENTILE))

    @property
    def mean(self) -> float:
        return float(self._array().mean())

    @property
    def std(self) -> float:
        a = self._array()
        return float(a.std(ddof=1)) if a.size > 1 else 0.0

    def summary(self) -> dict[str, float | int]:
        u = self.unit
        return {"n": self.n, f"median_{u}": self.median, f"p20_{u}": self.p20, f"p80_{u}": self.p80,
                f"mean_{u}": self.mean, f"std_{u}": self.std}
