"""Is the new code slower? The statistics and the verdict policy behind ``compare``, ``ab`` and CI.

Absolute times on a shared machine drift between identical runs, so a regression gate that
compares two numbers cries wolf. This module decides from the **raw samples** of two runs
(docs/regression.md), one direction of one cell at a time, and fails only
when two independent conditions hold: the difference is **significant** (p < :data:`ALPHA`),
and the whole :data:`CONFIDENCE` interval of the ratio new/base lies above ``1 + threshold``
(default :data:`THRESHOLDS`: 10 % on a GPU, 25 % on a shared CPU). The interval's *lower bound*
is used, not the point estimate: the estimate for identical code lands beyond 25 % by chance
whenever one side was unlucky, the lower bound only when the data show a slowdown of at least
the threshold with the stated confidence. The price is power: a true slowdown of exactly the
threshold is usually reported as "same"; a 2× slowdown is not.

**What counts as one observation.** Samples taken in one worker process are not independent
evidence: a process is lucky or unlucky *as a whole*. On the 2-core CI machine, identical code
measured as ``bench ab`` does (glow-1x1, B=2 C=4 8×8, two processes per revision) gave median
ratios from 0.64× to 1.77× in eight repetitions: the calls of one process fall into two modes
(≈ 0.10 ms and ≈ 0.19 ms, the machine's, not the code's) in proportions that differ from process
to process, so a process's median lands on one mode or the other. A test that pools the samples
of a few processes treats thousands of calls as independent, finds p < 1e-6 for such a
difference, and a bootstrap over two processes cannot see the spread between processes either:
that combination failed CI on unchanged code. Hence two methods, chosen by the data:

- **Several processes per side** (``bench ab``: one per round, ``round_sizes`` in the record):
  the process is the unit. Each round is summarised by its median; on the log scale, Welch's
  t-test compares the two sides' round medians (p-value) and gives the t interval of the
  difference of their means, i.e. of the ratio of the geometric means of the round medians,
  with Welch–Satterthwaite degrees of freedom. The spread between processes enters the interval
  with the small-sample penalty of the t distribution, as in the multi-level method of Kalibera &
  Jones ("Rigorous benchmarking in reasonable time", ISMM 2013) with the repetitions at the
  process level. With 2 rounds a side only a slowdown far beyond the spread between processes
  can fail; ``bench ab`` runs 5 by default.
- **One process per side** (two ``bench run`` folders): there is no spread between processes to
  estimate. Significance is a two-sided Mann–Whitney U test on the samples (a rank test: no
  normality needed, and a few enormous outliers weigh no more than any other sample on the same
  side); the interval is a percentile bootstrap of ``median(new) / median(base)`` with a fixed
  seed (:data:`BOOTSTRAP_SEED`). This says whether the two *processes* differed; whether the code
  did is a question for ``bench ab`` (the report says which method a row used).

Both are deterministic: the same samples always give the same interval and verdict.

Verdicts per (cell, direction):

- ``slower`` — significant, and the interval's lower bound ≥ 1 + threshold: **fails**;
- ``faster`` — significant, and the interval's upper bound ≤ 1 / (1 + threshold) (the same
  effect size in log space);
- ``same`` — everything else; ``significant`` says whether a shift smaller than the threshold
  was detected (shown, never failing);
- ``broken`` — ``ok`` in base but ``error``, ``timeout``, ``oom`` or ``nonfinite`` in new: a
  regression of another kind, and it **fails** too (a cell that now runs out of memory or time
  has become infinitely slow);
- ``fixed`` — failed in base, ``ok`` in new;
- ``unsupported`` — the layer declares the cell unsupported in new (base ok): a deliberate
  change of capability, reported but not failing;
- ``inconclusive`` — slower beyond the threshold, but on evidence that cannot tell code from
  process noise (one process a side, or a side marked ``unstable``) and by less than
  :data:`PROCESS_NOISE_BOUND`: reported, never failing;
- ``not compared`` — nothing to compare (failed in both, too few samples, or one run timed and
  the other counted instructions).

Instruction counts (``--metric instructions``) are deterministic: their rows compare the two
counts directly, ``slower`` beyond :data:`INSTRUCTIONS_THRESHOLD` (3 %) and ``faster`` below
its inverse, with no interval or p-value (method ``instructions``).

A failing verdict can be **accepted** by an explicit marker (see :mod:`bench.regression.accept`); it then
stays in the report, marked accepted, and does not fail.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

ALPHA = 0.01
"""Significance level of the U test, and 1 − the interval's confidence. A CI gate runs a few
dozen comparisons per commit; at 1 % the expected number of purely statistical alarms stays well
below one per commit even before the effect-size condition (which removes almost all of them)."""

CONFIDENCE = 1.0 - ALPHA
"""Two-sided confidence of the bootstrap interval of the median ratio."""

THRESHOLDS: dict[str, float] = {"cuda": 0.10, "cpu": 0.25}
"""Minimum slowdown that can fail, by device. GPU timings of the same binary drift by a few
per cent; a shared CPU (other jobs, frequency scaling, SMT siblings) by much more, so a smaller
CPU threshold would either cry wolf or need far longer runs."""

BOOTSTRAP_RESAMPLES = 2000
"""Replicates per interval (one process per side): the 0.5 % and 99.5 % quantiles rest on ~10
replicates each, enough for a gate whose decisions are not close calls (the effect threshold
sits far from 1)."""

BOOTSTRAP_SEED = 20261122
"""Fixed seed of the bootstrap: identical inputs give identical verdicts (reproducible CI)."""

MAX_POINTS = 400
"""A side with more samples than this (fast calls collect thousands) enters the bootstrap as
this many evenly spaced quantiles of its samples. That keeps the shape of the distribution and
bounds the cost; the bootstrap of fewer points has a slightly *wider* spread, i.e. the shortcut
errs on the side of not failing."""

MIN_SAMPLES = 3
"""Fewer samples than this on either side: no verdict ("not compared")."""

PROCESS_NOISE_BOUND = 3.0
"""The largest slowdown that process-to-process noise alone produced on this project's shared
2-core machines, rounded up: where the evidence cannot tell the code from the process (one
worker process on a side, or a side whose samples the machine disturbed), a slower row fails
only when the whole interval lies beyond this factor, and is ``inconclusive`` (reported, exit 0)
otherwise. How it was measured: see docs/regression.md (the largest ratio of
two process medians of the same cell, over 12 processes per cell under a load average of 10)."""

INSTRUCTIONS_THRESHOLD = 0.03
"""Default failing increase of an instruction count (``--metric instructions``): two processes
of identical code agree within 0.8 % (bench/execution/instructions.py), so a 5 % regression always fails
and identical code never does."""

FAILED_STATUSES = ("error", "timeout", "oom", "nonfinite")


# ---------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class Samples:
    """Raw timings (ms) of one direction, in the order taken, and how many each round
    (worker process) contributed; one round if the run does not say."""

    values: np.ndarray
    round_sizes: tuple[int, ...]

    @staticmethod
    def of(values: Iterable[float], round_sizes: Iterable[int] | None = None) -> "Samples":
        v = np.asarray(list(values), dtype=np.float64)
        sizes = tuple(int(s) for s in round_sizes) if round_sizes else (v.size,)
        if sum(sizes) != v.size or any(s < 1 for s in sizes):
            sizes = (v.size,)  # inconsistent bookkeeping: treat the samples as one round
        return Samples(v, sizes)

    @property
    def n(self) -> int:
        return int(self.values.size)

    @property
    def median(self) -> float:
        return float(np.median(self.values))

    def rounds(self) -> list[np.ndarray]:
        out, start = [], 0
        for s in self.round_sizes:
            out.append(self.values[start:start + s])
            start += s
        return out


def _thin(values: np.ndarray, cap: int) -> np.ndarray:
    if values.size <= cap:
        return values
    return np.quantile(values, (np.arange(cap) + 0.5) / cap)


@dataclass(frozen=True)
class Estimate:
    """The ratio new/base, its interval, the p-value of "no difference", and how they were got."""

    ratio: float
    ci: tuple[float, float]
    p_value: float
    method: str  # "rounds" (process-level t) or "samples" (one process per side)


def per_round(base: Samples, new: Samples, confidence: float = CONFIDENCE) -> Estimate:
    """Welch's t on the log of the round medians: the ratio of the geometric means of the round
    medians, its t interval and the two-sided p-value. Needs at least 2 rounds on each side."""
    from scipy.stats import t as student_t

    x = np.log([np.median(r) for r in base.rounds()])
    y = np.log([np.median(r) for r in new.rounds()])
    if x.size < 2 or y.size < 2:
        raise ValueError(f"per_round needs at least 2 rounds a side, got {x.size} and {y.size}")
    diff = float(y.mean() - x.mean())
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    se = float(np.sqrt(vx + vy))
    if se == 0.0:  # every round of each side had the same median: the difference is exact
        return Estimate(float(np.exp(diff)), (float(np.exp(diff)),) * 2, 1.0 if diff == 0.0 else 0.0, "rounds")
    dof = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))  # Welch–Satterthwaite
    half = float(student_t.ppf(0.5 + confidence / 2, dof)) * se
    p = float(2.0 * student_t.sf(abs(diff) / se, dof))
    return Estimate(float(np.exp(diff)), (float(np.exp(diff - half)), float(np.exp(diff + half))), p, "rounds")


def bootstrap_medians(values: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` percentile-bootstrap replicates of the median of ``values``."""
    values = _thin(np.asarray(values, dtype=np.float64), MAX_POINTS)
    idx = rng.integers(0, values.size, size=(resamples, values.size))
    return np.median(values[idx], axis=1)


def median_ratio_interval(base: Samples, new: Samples, confidence: float = CONFIDENCE,
                          resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap ``confidence`` interval of ``median(new) / median(base)``, every
    sample treated as independent (the one-process-per-side method)."""
    rng = np.random.default_rng(seed)
    ratios = bootstrap_medians(new.values, resamples, rng) / bootstrap_medians(base.values, resamples, rng)
    tail = (1.0 - confidence) / 2
    lo, hi = np.quantile(ratios, [tail, 1.0 - tail])
    return float(lo), float(hi)


def mann_whitney_p(base: Samples, new: Samples) -> float:
    """Two-sided Mann–Whitney U p-value of the pooled samples (1.0 when every value is equal)."""
    from scipy.stats import mannwhitneyu

    if np.ptp(np.concatenate([base.values, new.values])) == 0:
        return 1.0  # all identical: no evidence of any difference (scipy would divide by zero)
    return float(mannwhitneyu(new.values, base.values, alternative="two-sided").pvalue)


def per_sample(base: Samples, new: Samples) -> Estimate:
    """The one-process-per-side method: Mann–Whitney U and the bootstrap of the median ratio."""
    return Estimate(new.median / base.median, median_ratio_interval(base, new), mann_whitney_p(base, new), "samples")


def estimate(base: Samples, new: Samples) -> Estimate:
    """The process-level method when both sides have several rounds, else the sample-level one."""
    if len(base.round_sizes) >= 2 and len(new.round_sizes) >= 2 and min(base.values.min(), new.values.min()) > 0:
        return per_round(base, new)
    return per_sample(base, new)


# ---------------------------------------------------------------------------------------------
# Verdicts


@dataclass
class Row:
    """The comparison of one direction of one cell."""

    key: str
    cell: dict[str, Any]
    direction: str
    base_status: str
    new_status: str
    verdict: str
    threshold: float
    base_median: float | None = None
    new_median: float | None = None
    ratio: float | None = None
    ci: tuple[float, float] | None = None
    p_value: float | None = None
    significant: bool = False
    method: str = ""  # "rounds" or "samples": see estimate()
    base_n: int = 0
    new_n: int = 0
    base_rounds: int = 0
    new_rounds: int = 0
    message: str = ""  # why a cell failed or was not compared
    accepted: Any = None  # the marker (bench.regression.accept.Marker) that accepted this failing verdict

    @property
    def layer(self) -> str:
        return self.cell["layer"]

    @property
    def label(self) -> str:
        """Layer, shape, device and dtype: ``glow-1x1 B=8 C=12 16x16 k=n/a cpu/float32``."""
        from ..sweep.cells import Cell

        return Cell.from_dict(self.cell).label()

    @property
    def name(self) -> str:
        """What a marker pattern is matched against: the label and the direction."""
        return f"{self.label} {self.direction}"

    @property
    def failing(self) -> bool:
        return self.verdict in ("slower", "broken") and self.accepted is None


@dataclass
class Comparison:
    """Every row of a comparison of two runs, and the cells only one of them has."""

    rows: list[Row]
    only_base: list[dict[str, Any]] = field(default_factory=list)  # records
    only_new: list[dict[str, Any]] = field(default_factory=list)
    unused_markers: list[Any] = field(default_factory=list)

    @property
    def failures(self) -> list[Row]:
        return [r for r in self.rows if r.failing]

    @property
    def accepted(self) -> list[Row]:
        return [r for r in self.rows if r.accepted is not None]

    @property
    def compared(self) -> list[Row]:
        return [r for r in self.rows if r.ratio is not None]


def default_threshold(device: str) -> float:
    return THRESHOLDS.get(device, THRESHOLDS["cpu"])


def compare_samples(base: Samples, new: Samples, threshold: float, unstable: bool = False) -> dict[str, Any]:
    """Ratio, interval, p-value, method and verdict (``slower``, ``faster``, ``same`` or
    ``inconclusive``). ``unstable``: a side's samples were disturbed by the machine."""
    e = estimate(base, new)
    lo, hi = e.ci
    significant = e.p_value < ALPHA
    weak = e.method != "rounds" or unstable  # the evidence cannot separate code from process
    if significant and lo >= 1.0 + threshold and weak and lo < PROCESS_NOISE_BOUND:
        verdict = "inconclusive"
    elif significant and lo >= 1.0 + threshold:
        verdict = "slower"
    elif significant and hi <= 1.0 / (1.0 + threshold):
        verdict = "faster"
    else:
        verdict = "same"
    return {"ratio": e.ratio, "ci": (lo, hi), "p_value": e.p_value, "significant": significant, "method": e.method,
            "verdict": verdict, "base_median": base.median, "new_median": new.median}


def compare_counts(base: float, new: float, threshold: float) -> dict[str, Any]:
    """Two instruction counts per call: deterministic, so the ratio is the verdict."""
    ratio = new / base if base > 0 else float("inf")
    verdict = "slower" if ratio > 1.0 + threshold else "faster" if ratio < 1.0 / (1.0 + threshold) else "same"
    return {"ratio": ratio, "ci": (ratio, ratio), "p_value": None, "significant": verdict != "same",
            "method": "instructions", "verdict": verdict, "base_median": base, "new_median": new}


def _samples(direction: dict[str, Any]) -> Samples:
    return Samples.of(direction.get("samples_ms") or [], direction.get("round_sizes"))


def compare_direction(key: str, cell: dict[str, Any], direction: str, base: dict[str, Any] | None,
                      new: dict[str, Any] | None, threshold: float) -> Row:
    base, new = base or {"status": "missing"}, new or {"status": "missing"}
    bs, ns = base.get("status", "missing"), new.get("status", "missing")
    row = Row(key, cell, direction, bs, ns, "not compared", threshold)
    counted = [d.get("instructions") is not None for d in (base, new)]
    if bs == "ok" and ns == "ok" and any(counted):
        if not all(counted):
            row.message = "one run counted instructions, the other timed: not comparable"
            return row
        for k, v in compare_counts(base["instructions"], new["instructions"], threshold).items():
            setattr(row, k, v)
        return row
    if bs == "ok" and ns == "ok":
        b, n = _samples(base), _samples(new)
        row.base_n, row.new_n = b.n, n.n
        row.base_rounds, row.new_rounds = len(b.round_sizes), len(n.round_sizes)
        if min(b.n, n.n) < MIN_SAMPLES:
            row.message = f"too few samples to compare ({b.n} in base, {n.n} in new; at least {MIN_SAMPLES} needed)"
            return row
        unstable = bool(base.get("unstable") or new.get("unstable"))
        for k, v in compare_samples(b, n, threshold, unstable).items():
            setattr(row, k, v)
        if row.verdict == "inconclusive":
            why = "one worker process a side" if row.method == "samples" else "a side's samples were disturbed"
            row.message = (f"{why}: a slowdown under {PROCESS_NOISE_BOUND:g}× cannot be told from process noise; "
                           "measure both revisions with `python -m bench ab` or more --processes")
    elif bs == "ok" and ns in FAILED_STATUSES:
        row.verdict = "broken"
        row.message = new.get("message") or ns
    elif bs == "ok" and ns == "unsupported":
        row.verdict = "unsupported"
        row.message = new.get("message") or ""
    elif bs in FAILED_STATUSES and ns == "ok":
        row.verdict = "fixed"
        row.message = base.get("message") or bs
    else:
        row.message = f"base {bs}, new {ns}"
    return row


def compare_records(base: list[dict[str, Any]], new: list[dict[str, Any]], threshold: float | None = None,
                    markers: Iterable[Any] = ()) -> Comparison:
    """Compare two runs' records cell by cell (matched by ``Cell.key()``) and direction by direction.

    ``threshold`` None: the default of each cell's device (:data:`THRESHOLDS`). ``markers``:
    :class:`bench.regression.accept.Marker`-like objects with ``matches(row) -> bool``; a failing row that
    one matches is accepted.
    """
    base_by_key = {r["key"]: r for r in base}
    new_by_key = {r["key"]: r for r in new}
    rows: list[Row] = []
    for key, nr in new_by_key.items():
        br = base_by_key.get(key)
        if br is None:
            continue
        cell = nr["cell"]
        counted = br.get("metric") == "instructions" and nr.get("metric") == "instructions"
        t = threshold if threshold is not None else (
            INSTRUCTIONS_THRESHOLD if counted else default_threshold(cell.get("device", "cpu")))
        directions = list(dict.fromkeys([*br.get("directions", {}), *nr.get("directions", {})]))
        for d in directions:
            rows.append(compare_direction(key, cell, d, br["directions"].get(d), nr["directions"].get(d), t))
    markers = list(markers)
    used: set[int] = set()
    for row in rows:
        if row.verdict in ("slower", "broken"):
            for i, m in enumerate(markers):
                if m.matches(row):
                    row.accepted = m
                    used.add(i)
                    break
    return Comparison(
        rows=rows,
        only_base=[r for k, r in base_by_key.items() if k not in new_by_key],
        only_new=[r for k, r in new_by_key.items() if k not in base_by_key],
        unused_markers=[m for i, m in enumerate(markers) if i not in used],
    )
