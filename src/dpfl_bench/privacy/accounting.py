"""Privacy accounting and noise calibration: our RDP accountant (`rdp.py`, no torch) or Opacus's PRV one.

The only mechanism here is the subsampled Gaussian: `steps` applications at `sample_rate` with
`noise_multiplier` σ. Under sample-level DP each client's dataset is protected separately (rate
batch/n_k, one application per local step it runs); under client-level DP the set of clients is (rate
m/N, one application per round). Calibration picks the smallest σ that keeps *every* client within ε.
"""

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from dpfl_bench.errors import UserError
from dpfl_bench.privacy.rdp import epsilon_from_rdp, subsampled_gaussian_rdp

MAX_NOISE_MULTIPLIER = 1e4


# Opacus's RDP orders first (its DEFAULT_ALPHAS); at large σ (a small client under DP-SGD, σ ≈ 7) the best
# order lies beyond its last one (63), where stopping would give a looser bound and more noise than needed,
# so the grid is continued geometrically until the best order is an inner one.
RDP_ORDERS = tuple([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)))
MAX_RDP_ORDER = 10**6


@lru_cache(maxsize=65536)
def epsilon(*, noise_multiplier: float, sample_rate: float, steps: int, delta: float, accountant: str) -> float:
    """ε after `steps` subsampled Gaussian mechanisms; 0 before the first, inf without noise."""
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if accountant == "rdp":
        return _rdp_epsilon(noise_multiplier, sample_rate, steps, delta)
    with warnings.catch_warnings():  # Opacus's own advice on PRV's grid does not reach the user
        warnings.simplefilter("ignore")
        from opacus.accountants import create_accountant

        acc = create_accountant(accountant)
        acc.history = [(noise_multiplier, sample_rate, steps)]
        return float(acc.get_epsilon(delta=delta))


def _rdp_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """RDP over RDP_ORDERS, continued until the best order is not the largest (or is past MAX_RDP_ORDER:
    every order's ε is a valid bound, and by then the best one is a sliver tighter)."""
    orders = list(RDP_ORDERS)
    while True:
        grid = np.array(orders, dtype=float)
        eps, best_order = epsilon_from_rdp(steps * subsampled_gaussian_rdp(sample_rate, noise_multiplier, grid), grid, delta)
        if best_order < orders[-1] or not math.isfinite(eps) or orders[-1] >= MAX_RDP_ORDER:
            return eps
        orders += [round(orders[-1] * 1.25**k) for k in range(1, 5)]


@dataclass(frozen=True)
class Exposure:
    """How often one protected dataset is touched: `steps` mechanisms at `sample_rate`."""

    sample_rate: float
    steps: int


def worst_epsilon(noise_multiplier: float, exposures: list[Exposure], *, delta: float, accountant: str) -> float:
    return max(
        epsilon(noise_multiplier=noise_multiplier, sample_rate=e.sample_rate, steps=e.steps, delta=delta, accountant=accountant)
        for e in set(exposures)
    )


def calibrate_noise(*, target_epsilon: float, delta: float, exposures: list[Exposure], accountant: str) -> float:
    """The smallest noise multiplier (to 0.1%) whose worst ε over `exposures` is at most `target_epsilon`.
    Remembered in this process: a sweep's worker calibrates each schedule once (seconds each, per client)."""
    return _calibrated(target_epsilon, delta, tuple(exposures), accountant)


@lru_cache(maxsize=1024)
def _calibrated(target_epsilon: float, delta: float, exposures: tuple[Exposure, ...], accountant: str) -> float:
    def fits(sigma: float) -> bool:
        return worst_epsilon(sigma, exposures, delta=delta, accountant=accountant) <= target_epsilon

    high = 1.0
    while not fits(high):
        high *= 2
        if high > MAX_NOISE_MULTIPLIER:
            raise UserError(
                f"ε = {target_epsilon} cannot be met even with noise multiplier {MAX_NOISE_MULTIPLIER:g}; "
                "raise --eps or use fewer --rounds or --local-steps"
            )
    low = 0.0
    while high - low > 1e-3 * high:
        middle = (low + high) / 2
        low, high = (low, middle) if fits(middle) else (middle, high)
    return high


def check_delta(delta: float, smallest_dataset: int, what: str) -> None:
    if delta >= 1 / smallest_dataset:
        raise UserError(
            f"--delta {delta:g} must be below 1/n = {1 / smallest_dataset:.3g} for the smallest {what} "
            f"({smallest_dataset}); lower --delta"
        )
