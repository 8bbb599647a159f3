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
    """Raw samples (milliseconds) of one timed call, with lazily computed statistics."""

    samples_ms: list[float]
    usage: dict[str, Any] = field(default_factory=dict)  # what the process did meanwhile (measure.Usage)

    @property
    def n(self) -> int:
        return len(self.samples_ms)

    def _array(self) -> np.ndarray:
        if not self.samples_ms:
            raise ValueError("no samples")
        return np.asarray(self.samples_ms, dtype=np.float64)

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
        return {"n": self.n, "median_ms": self.median, "p20_ms": self.p20, "p80_ms": self.p80,
                "mean_ms": self.mean, "std_ms": self.std}
