"""Paired comparisons over seeds: the mean difference between two cells and its 95% Student-t interval.

Runs of two methods with the same seed share their data split, client sampling and initialization, so the
difference seed by seed varies far less than either method's accuracy does: pairing is what lets a few
seeds tell a real gain from noise.
"""

import math
from dataclasses import dataclass

import pandas as pd
from scipy import stats

CONFIDENCE = 0.95
EQUAL = 1e-12  # a spread of paired differences below this is rounding, not seeds disagreeing


@dataclass(frozen=True)
class Gain:
    mean: float  # mean paired difference (NaN without a pair)
    low: float  # the 95% interval; NaN with fewer than 2 pairs or differences all equal
    high: float
    pairs: int  # seeds with a finite value in both cells

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero (never without one)."""
        return self.low > 0 or self.high < 0


def paired_gain(better: pd.Series, worse: pd.Series) -> Gain:
    """`better` − `worse`, seed by seed (both indexed by seed): the mean and its Student-t interval with
    n − 1 degrees of freedom. A seed missing or NaN in either is left out. Differences all equal (two seeds
    of a discrete accuracy can give that) have no interval: the t interval would have zero width and call
    any nonzero mean significant, from a spread the seeds did not show."""
    differences = (better - worse).dropna()  # index alignment pairs the seeds
    n = len(differences)
    mean = differences.mean() if n else math.nan
    spread = differences.std(ddof=1) if n >= 2 else 0.0
    if spread <= EQUAL:
        return Gain(mean, math.nan, math.nan, n)
    half = stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * spread / math.sqrt(n)
    return Gain(mean, mean - half, mean + half, n)


def mean_interval(values: pd.Series) -> tuple[float, float, int]:
    """The mean of `values` (NaNs left out), the half-width of its 95% Student-t interval (NaN with fewer
    than 2 values) and how many there are."""
    values = values.dropna()
    n = len(values)
    if n < 2:
        return (values.mean() if n else math.nan), math.nan, n
    return values.mean(), stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n), n


def late_gain(curve: pd.Series) -> float:
    """How much a learning curve (values indexed by round) still rises at its end: its mean over the last
    fifth of the rounds less its mean over the fifth before; NaN where either window holds no value. Our
    rule for "converged" (the paper-regime protocol's) is a late gain under one point of accuracy."""
    curve = curve.dropna()
    if curve.empty:
        return math.nan
    last = curve.index.max()
    late = curve[curve.index > 0.8 * last]
    before = curve[(curve.index > 0.6 * last) & (curve.index <= 0.8 * last)]
    return late.mean() - before.mean() if len(late) and len(before) else math.nan
