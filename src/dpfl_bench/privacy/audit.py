"""Empirical privacy from canary scores: a one-run lower bound on ε, and a Gaussian-fit estimate.

Both take m canaries, each inserted into training independently with probability 1/2, and a score per
canary that is larger when it was inserted.

- `one_run_lower_bound` (Steinke, Nasr, Jagielski, NeurIPS 2023, Theorem 5.2 with its δ term): the auditor
  guesses "in" for the k₊ highest scores and "out" for the k₋ lowest, abstaining on the rest; under
  (ε, δ)-DP the number of right guesses is stochastically dominated by Binomial(r, e^ε/(1+e^ε)) up to a δ
  term, so many right guesses refute every ε below a bound. Several (k₊, k₋) are tried and the confidence
  is split among them (Bonferroni), so the reported bound holds at the stated confidence as a whole.
- `fdp_lower_bound` (Mahloujifar, Melis, Chaudhuri, ICML 2025, "Auditing f-Differential Privacy in One
  Run"): from the same guesses, the strongest Gaussian-DP claim (μ-GDP, Dong, Roth and Su 2022) that they
  refute, as the ε that μ-GDP gives at the run's δ. Tighter, because the null hypothesis is a whole
  trade-off curve instead of one (ε, δ) pair; but a lower bound on ε only where the mechanism's trade-off
  curve is Gaussian (DP-SGD's is close to it), which is why it is shown beside Steinke et al.'s bound, not
  instead of it. Written from the procedure `audit_rh_with_cap` as two public implementations have it
  (Meta's PrivacyGuard, `fdp_analysis_node.py`; Google's jax_privacy, `auditing.py`), both of which we
  read; the paper's own text was not readable from here beyond its abstract.
- `gaussian_estimate` (Andrew et al., ICLR 2024): fit a Gaussian to the inserted canaries' scores and one
  to the others' (the null), and report the ε at which those two distributions are (ε, δ)-close. An
  estimate, not a bound.
"""

import math
from typing import Callable

import numpy as np
from scipy import special, stats

# Numbers of guesses tried. A finer grid finds a better threshold but pays for it twice: in the Bonferroni
# share of each test, and through the δ term (δ·2m), which grows in weight as the share shrinks.
GUESS_COUNTS = (10, 20, 50, 100, 200, 300, 500, 700, 1000, 2000, 3000, 5000, 10000)


def one_run_p_value(*, canaries: int, guesses: int, correct: int, eps: float, delta: float) -> float:
    """The probability, under (ε, δ)-DP, of at least `correct` right guesses out of `guesses`."""
    q = 1 / (1 + math.exp(-eps))  # the accuracy of ε-DP randomized response
    tail = stats.binom.sf(correct - 1, guesses, q)  # P[Binomial(guesses, q) >= correct]
    if delta == 0 or correct == 0:
        return min(float(tail), 1.0)
    # The δ term: δ·2m times the largest average, over i, of P[correct - i <= Binomial < correct].
    below = np.arange(1, correct + 1)
    windows = stats.binom.sf(correct - below - 1, guesses, q) - tail
    return min(float(tail + np.max(windows / below) * delta * 2 * canaries), 1.0)


def _largest_refuted(refuted: Callable[[float], bool]) -> float:
    """The largest ε (to 1e-4) that `refuted` holds for, 0 if none; `refuted` holds for every smaller ε too."""
    if not refuted(0.0):
        return 0.0
    low, high = 0.0, 1.0
    while refuted(high):
        low, high = high, 2 * high
    while high - low > 1e-4:
        middle = (low + high) / 2
        low, high = (middle, high) if refuted(middle) else (low, middle)
    return low


def one_run_epsilon(*, canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε that `correct` right guesses out of `guesses` refute at `significance` (0 if none)."""
    if guesses == 0:
        return 0.0
    return _largest_refuted(lambda eps: one_run_p_value(canaries=canaries, guesses=guesses, correct=correct, eps=eps,
                                                        delta=delta) <= significance)


def guess_plans(canaries: int) -> list[tuple[int, int]]:
    """The (k₊, k₋) tried: k₊ "in" guesses alone (when inserted canaries that training rarely touched look
    like the others), and k₊ = k₋ (when the inserted ones stand out and the others bunch up)."""
    plans = [(k, 0) for k in GUESS_COUNTS if k <= canaries]
    return plans + [(k, k) for k in GUESS_COUNTS if 2 * k <= canaries]


def guesses_made(scores: np.ndarray, inserted: np.ndarray) -> list[tuple[int, int]]:
    """(guesses, right guesses) of each guess plan on these scores."""
    ranked = inserted[np.argsort(-scores, kind="stable")]  # highest score first
    return [(k_in + k_out, int(ranked[:k_in].sum()) + int((~ranked[len(ranked) - k_out :]).sum() if k_out else 0))
            for k_in, k_out in guess_plans(len(scores))]


def _best_over_plans(epsilon: Callable[..., float], scores: np.ndarray, inserted: np.ndarray, delta: float,
                     confidence: float) -> float:
    """The best of `epsilon` over the guess plans, each tested at its Bonferroni share of the significance."""
    made = guesses_made(scores, inserted)
    significance = (1 - confidence) / max(len(made), 1)
    return max((epsilon(canaries=len(scores), guesses=g, correct=c, delta=delta, significance=significance) for g, c in made),
               default=0.0)


def one_run_lower_bound(scores: np.ndarray, inserted: np.ndarray, *, delta: float, confidence: float = 0.95) -> float:
    """Steinke et al.'s ε lower bound at `confidence`, over the guess plans."""
    return _best_over_plans(one_run_epsilon, scores, inserted, delta, confidence)


def fdp_lower_bound(scores: np.ndarray, inserted: np.ndarray, *, delta: float, confidence: float = 0.95) -> float:
    """Mahloujifar et al.'s ε lower bound (Gaussian trade-off curve) at `confidence`, from the same guesses."""
    return _best_over_plans(fdp_epsilon, scores, inserted, delta, confidence)


def gdp_delta(eps: float, mu: float) -> float:
    """δ(ε) of μ-GDP: Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) (Dong, Roth, Su 2022, Corollary 2.13)."""
    return float(stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2))


def gdp_mu(eps: float, delta: float) -> float:
    """The μ whose μ-GDP privacy profile passes through (ε, δ): δ(ε) grows with μ, so bisect."""
    low, high = 0.0, 1.0
    while gdp_delta(eps, high) < delta:
        low, high = high, 2 * high
    while high - low > 1e-9 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if gdp_delta(eps, middle) < delta else (low, middle)
    return high


def fdp_refutes(mu: float, *, canaries: int, guesses: int, correct: int, significance: float) -> bool:
    """Whether `correct` right guesses out of `guesses` refute μ-GDP at `significance`.

    Under μ-GDP an event of probability x under one neighbour has probability at least Φ(Φ⁻¹(x) - μ)
    under the other. Seeing at least `correct` right guesses with probability `significance` forces a
    mass `right` of right guesses and `wrong` of wrong ones per canary; walking down from `correct` right
    guesses to none, each step's wrong mass must reach what the curve demands of the right mass, and
    raises the right mass in proportion. If the total exceeds the guesses' share of the canaries, the
    claim is refuted."""
    right = significance * correct / canaries
    wrong = significance * (guesses - correct) / canaries
    for i in range(correct - 1, -1, -1):
        demanded = max(wrong, float(special.ndtr(special.ndtri(right) - mu)))
        if demanded == wrong:  # neither mass changes again
            break
        right = min(right + i / (guesses - i) * (demanded - wrong), 1.0)
        wrong = demanded
    return right + wrong > guesses / canaries


def fdp_epsilon(*, canaries: int, guesses: int, correct: int, delta: float, significance: float) -> float:
    """The largest ε whose μ-GDP (at δ) `correct` right guesses out of `guesses` refute (0 if none)."""
    if correct == 0:
        return 0.0
    return _largest_refuted(lambda eps: fdp_refutes(gdp_mu(eps, delta), canaries=canaries, guesses=guesses, correct=correct,
                                                    significance=significance))


def gaussian_delta(eps: float, mean_in: float, std_in: float, mean_out: float, std_out: float) -> float:
    """The δ(ε) between N(mean_in, std_in²) and N(mean_out, std_out²), both ways (closed form)."""
    return max(
        _hockey_stick(eps, mean_in, std_in, mean_out, std_out),
        _hockey_stick(eps, mean_out, std_out, mean_in, std_in),
    )


def _hockey_stick(eps: float, mu_p: float, s_p: float, mu_q: float, s_q: float) -> float:
    """sup_S P(S) - e^ε Q(S) for P = N(mu_p, s_p²), Q = N(mu_q, s_q²): P and Q of the set where
    log p/q > ε, which is an interval, or the outside of one, of the quadratic a x² + b x + c > ε."""
    a = 1 / (2 * s_q**2) - 1 / (2 * s_p**2)
    b = mu_p / s_p**2 - mu_q / s_q**2
    c = mu_q**2 / (2 * s_q**2) - mu_p**2 / (2 * s_p**2) + math.log(s_q / s_p)

    def mass(mu: float, s: float, low: float, high: float) -> float:  # from the nearer tail: δ is tiny
        if high <= mu:
            return float(stats.norm.cdf(high, mu, s) - stats.norm.cdf(low, mu, s))
        return float(stats.norm.sf(low, mu, s) - stats.norm.sf(high, mu, s))

    if abs(a) < 1e-12 * (1 / s_p**2 + 1 / s_q**2):  # equal variances: a half-line
        if b == 0:
            return 0.0
        edge = (eps - c) / b
        low, high = (edge, math.inf) if b > 0 else (-math.inf, edge)
        return max(0.0, mass(mu_p, s_p, low, high) - math.exp(eps) * mass(mu_q, s_q, low, high))
    disc = b * b - 4 * a * (c - eps)
    if disc <= 0:  # the quadratic never crosses ε: everywhere above it (a > 0) or nowhere (a < 0)
        return max(0.0, 1 - math.exp(eps)) if a > 0 else 0.0
    r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
    if a < 0:  # above ε between the roots
        return max(0.0, mass(mu_p, s_p, r1, r2) - math.exp(eps) * mass(mu_q, s_q, r1, r2))
    outside_p = 1 - mass(mu_p, s_p, r1, r2)
    outside_q = 1 - mass(mu_q, s_q, r1, r2)
    return max(0.0, outside_p - math.exp(eps) * outside_q)


def gaussian_estimate(scores: np.ndarray, inserted: np.ndarray, *, delta: float) -> float:
    """The ε at which Gaussians fitted to the inserted and the other canaries' scores are (ε, δ)-close."""
    inside, outside = scores[inserted], scores[~inserted]
    if len(inside) < 2 or len(outside) < 2:
        return math.nan
    fitted = (float(inside.mean()), float(inside.std(ddof=1)), float(outside.mean()), float(outside.std(ddof=1)))
    if min(fitted[1], fitted[3]) <= 0:
        return math.inf if fitted[0] != fitted[2] else 0.0
    if gaussian_delta(0.0, *fitted) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while gaussian_delta(high, *fitted) > delta:
        low, high = high, 2 * high
        if high > 1e3:
            return math.inf
    while high - low > 1e-4:
        middle = (low + high) / 2
        low, high = (middle, high) if gaussian_delta(middle, *fitted) > delta else (low, middle)
    return high
