"""Rényi DP of the Poisson-subsampled Gaussian mechanism, and its conversion to (ε, δ), in NumPy alone.

RDP at order α is log(A_α) / (α − 1), with A_α a finite binomial sum at integer α and two series with erfc
factors at fractional α; the best order's RDP becomes (ε, δ) by a closed form. Where these come from: the
formulas as Opacus's `accountants/analysis/rdp.py` computes them, one term at a time (read here), which
cites Mironov, Talwar and Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism" (arXiv
1908.10530, §3.3) for A_α and Balle et al., "Hypothesis Testing Interpretations and Rényi Differential
Privacy" (arXiv 1905.09982, Theorem 21) for the conversion; beyond their abstracts, the papers themselves
were not readable from here. Ours is written from the formulas, vectorized (a fractional order's series as
one array), and tested against Opacus to 2e-9; it needs no torch, so `dpfl-bench privacy` answers at once.
"""

import math

import numpy as np

NEGLIGIBLE = -30.0  # a fractional order's series stops after the first term pair below e^-30 (both)
MAX_TERMS = 2**22  # a series still going after this many terms is not trusted (+inf), rather than run on
ERFC_TAIL = 8.0  # from here on log erfc(x) comes from its asymptotic series, vectorized (math.erfc is not)


def subsampled_gaussian_rdp(sample_rate: float, noise_multiplier: float, orders: np.ndarray) -> np.ndarray:
    """RDP of one subsampled Gaussian mechanism (sensitivity 1, noise σ, Poisson rate q) at each order."""
    q, sigma = sample_rate, noise_multiplier
    if q == 0:
        return np.zeros(len(orders))
    if sigma == 0:
        return np.full(len(orders), math.inf)
    if q == 1:
        return orders / (2 * sigma**2)
    whole = orders == np.round(orders)
    log_a = np.empty(len(orders))
    with np.errstate(all="ignore"):  # an overflow becomes a term of +inf or NaN, and its order's RDP +inf
        log_a[whole] = [_log_a_integer(q, sigma, int(alpha)) for alpha in orders[whole]]
        log_a[~whole] = _log_a_fractional(q, sigma, orders[~whole])
    return log_a / (orders - 1)


def epsilon_from_rdp(rdp: np.ndarray, orders: np.ndarray, delta: float) -> tuple[float, float]:
    """(ε, the order that gives it): the smallest ε over the orders (Balle et al.'s Theorem 21, as Opacus cites it)."""
    with np.errstate(invalid="ignore"):
        eps = rdp - (math.log(delta) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    if np.isnan(eps).all():
        return math.inf, math.nan
    best = int(np.nanargmin(eps))
    return max(0.0, float(eps[best])), float(orders[best])  # past α ≈ 1/δ it dips below 0; dp_accounting clamps too


def _log_a_integer(q: float, sigma: float, alpha: int) -> float:
    """log A_α = log Σ_k C(α, k) q^k (1 − q)^(α − k) exp((k² − k) / 2σ²), k = 0…α."""
    k = np.arange(alpha + 1, dtype=float)
    log_binomial, _ = _log_binomials(np.array([float(alpha)]), alpha + 1)
    log_terms = log_binomial[0] + k * math.log(q) + (alpha - k) * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
    return _log_sum(log_terms, np.ones_like(log_terms))


def _log_a_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log A_α at fractional α: the two series (Mironov et al. §3.3, as Opacus cites it), each term with its erfc factor, summed
    with the signs of C(α, k) (they alternate once k > α) until both of a term's parts are negligible. An
    order whose series does not end within MAX_TERMS, or whose terms overflow, gets +inf: no claim."""
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_a = np.full(len(alphas), math.inf)
    pending, terms = np.arange(len(alphas)), 64
    while len(pending) and terms <= MAX_TERMS:
        alpha, k = alphas[pending][:, None], np.arange(terms, dtype=float)[None, :]
        j = alpha - k
        log_binomial, sign = _log_binomials(alphas[pending], terms)
        log_s0 = (
            log_binomial + k * math.log(q) + j * math.log1p(-q) + (k * k - k) / (2 * sigma**2)
            + math.log(0.5) + _log_erfc((k - z0) / (math.sqrt(2) * sigma))
        )
        log_s1 = (
            log_binomial + j * math.log(q) + k * math.log1p(-q) + (j * j - j) / (2 * sigma**2)
            + math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        )
        ended = ~(np.maximum(log_s0, log_s1) >= NEGLIGIBLE)  # a NaN ends it too, and its sum is then +inf
        kept = np.cumsum(ended, axis=1) - ended == 0  # up to and including a row's first negligible pair
        done = ended.any(axis=1)
        for row in np.flatnonzero(done):
            terms_kept = np.concatenate([log_s0[row, kept[row]], log_s1[row, kept[row]]])
            log_a[pending[row]] = _log_sum(terms_kept, np.tile(sign[row, kept[row]], 2))
        pending, terms = pending[~done], terms * 2
    return log_a


def _log_binomials(alphas: np.ndarray, terms: int) -> tuple[np.ndarray, np.ndarray]:
    """log |C(α, k)| and its sign for each α (rows) and k = 0…terms − 1, from C(α, k + 1) = C(α, k)·(α − k)/(k + 1)."""
    k = np.arange(terms - 1, dtype=float)[None, :]
    ratio = (alphas[:, None] - k) / (k + 1)
    first = np.zeros((len(alphas), 1))
    with np.errstate(divide="ignore"):  # a zero ratio (k > α, α whole) ends the row at -inf
        log_binomial = np.concatenate([first, np.cumsum(np.log(np.abs(ratio)), axis=1)], axis=1)
    return log_binomial, np.concatenate([first + 1, np.cumprod(np.sign(ratio), axis=1)], axis=1)


def _log_sum(log_terms: np.ndarray, signs: np.ndarray) -> float:
    """log Σ signs·exp(log_terms), shifted by the largest term so nothing overflows. A sum that cannot be
    trusted (a NaN or +inf term, or a positive sum that cancellation left ≤ 0) is +inf: no claim."""
    top = log_terms.max()
    if top == -math.inf:
        return -math.inf
    total = float(np.sum(signs * np.exp(log_terms - top))) if top < math.inf else math.nan
    return top + math.log(total) if total > 0 else math.inf


def _log_erfc(x: np.ndarray) -> np.ndarray:
    """log erfc(x), elementwise: math.erfc below ERFC_TAIL; from there the asymptotic series
    erfc(x) = exp(−x²)/(x√π)·Σ_n (−1)^n (2n − 1)!!/(2x²)^n, whose 13th term is below 4e-15 at x = 8."""
    out = np.empty_like(x)
    tail = x >= ERFC_TAIL
    out[~tail] = np.log(np.frompyfunc(math.erfc, 1, 1)(x[~tail]).astype(float))
    t = x[tail]
    series, term = np.ones_like(t), np.ones_like(t)
    for n in range(1, 13):
        term = term * -(2 * n - 1) / (2 * t * t)
        series += term
    out[tail] = -t * t - np.log(t * math.sqrt(math.pi)) + np.log(series)
    return out
