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


@dataclass(frozen=True)
class Gain:
    mean: float  # mean paired difference (NaN without a pair)
    low: float  # the 95% interval; NaN with fewer than 2 pairs
    high: float
    pairs: int  # seeds with a finite value in both cells

    @property
    def significant(self) -> bool:
        """Whether the interval excludes zero (never without one)."""
        return self.low > 0 or self.high < 0


def paired_gain(better: pd.Series, worse: pd.Series) -> Gain:
    """`better` − `worse`, seed by seed (both indexed by seed): the mean and its Student-t interval with
    n − 1 degrees of freedom. A seed missing or NaN in either is left out."""
    differences = (better - worse).dropna()  # index alignment pairs the seeds
    n = len(differences)
    mean = differences.mean() if n else math.nan
    if n < 2:
        return Gain(mean, math.nan, math.nan, n)
    half = stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * differences.std(ddof=1) / math.sqrt(n)
    return Gain(mean, mean - half, mean + half, n)


def mean_interval(values: pd.Series) -> tuple[float, float, int]:
    """The mean of `values` (NaNs left out), the half-width of its 95% Student-t interval (NaN with fewer
    than 2 values) and how many there are."""
    values = values.dropna()
    n = len(values)
    if n < 2:
        return (values.mean() if n else math.nan), math.nan, n
    return values.mean(), stats.t.ppf((1 + CONFIDENCE) / 2, n - 1) * values.std(ddof=1) / math.sqrt(n), n
