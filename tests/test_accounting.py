"""Privacy accounting: our ε against Google's dp-accounting and Opacus, noise calibration, and what the
mechanisms tell it.

`dp_accounting` and Opacus are independent implementations (test-only for us: our RDP accountant is
`privacy/rdp.py`, our PRV one wraps Opacus's). All use the add/remove-one neighbouring relation for the
Poisson-subsampled Gaussian.
"""

import logging
import math
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.privacy.accounting import RDP_ORDERS, Exposure, calibrate_noise, check_delta, epsilon, worst_epsilon
from dpfl_bench.privacy.mechanism import create_mechanism
from dpfl_bench.privacy.randomness import Purpose, Randomness

DELTA = 1e-5
# A wide grid for the independent accountant, so that it never stops at its own last order either.
WIDE_ORDERS = list(RDPAccountant.DEFAULT_ALPHAS) + [round(64 * 1.25**k) for k in range(25)]
ADD_OR_REMOVE = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE

# (q, σ, steps). Sample level: one client's DP-SGD, q = batch/n_k, thousands of local steps in total.
SAMPLE_LEVEL = [(0.01, 1.0, 5000), (0.02, 0.8, 3000), (0.05, 1.2, 2000), (0.1, 2.0, 1000)]
# Client level: DP-FedAvg, q = m/N, one mechanism per round, tens of rounds.
CLIENT_LEVEL = [(0.5, 1.5, 20), (0.2, 1.0, 30), (0.5, 5.0, 50), (0.2, 3.0, 10)]
POINTS = SAMPLE_LEVEL + CLIENT_LEVEL


@pytest.fixture(autouse=True)
def _quiet_dp_accounting():
    # dp_accounting logs a warning for each fractional order whose series it gives up on (q = 0.5 or 0.2
    # at orders near 1); it then excludes that order, which is harmless here (the optimum is elsewhere).
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(level)


def _event(q: float, sigma: float, steps: int) -> dp_accounting.DpEvent:
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps
    )


def reference_rdp(q: float, sigma: float, steps: int, delta: float = DELTA) -> float:
    accountant = rdp.RdpAccountant(orders=WIDE_ORDERS, neighboring_relation=ADD_OR_REMOVE)
    accountant.compose(_event(q, sigma, steps))
    return accountant.get_epsilon(delta)


def reference_pld(q: float, sigma: float, steps: int, delta: float = DELTA) -> float:
    accountant = pld.PLDAccountant(neighboring_relation=ADD_OR_REMOVE)
    accountant.compose(_event(q, sigma, steps))
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("q, sigma, steps", POINTS)
def test_rdp_epsilon_matches_dp_accounting(q, sigma, steps):
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    reference = reference_rdp(q, sigma, steps)
    assert ours == pytest.approx(reference, rel=0.02)
    # Observed: ours is at most ~0.3% *below* dp_accounting. At integer orders the two RDP values agree to
    # float precision; at fractional orders ours (as Opacus) sums the binomial series with its alternating
    # signs while dp_accounting adds |terms| (a slightly larger, upper-bound RDP). Keep that direction honest:
    assert ours >= reference * 0.99


@pytest.mark.parametrize("q", [1e-8, 1e-4, 0.01, 0.035, 0.2, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("sigma", [0.1, 0.3, 0.8, 1.3, 5.0, 50.0])
def test_rdp_accountant_equals_opacus_on_its_orders(q, sigma):
    """Ours replaced Opacus's RDP analysis (it imports torch); on the same orders it gives the same ε to about
    1e-9 (1.3e-9 at worst, q = 0.5 and σ = 50 over 10⁶ steps, where ours is the closer to an exact sum), so
    a calibrated σ is the same as before: a sweep resumed across the change keeps its noise."""
    from dpfl_bench.privacy.rdp import epsilon_from_rdp, subsampled_gaussian_rdp

    orders = np.array(RDP_ORDERS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for steps in (1, 40, 5000, 10**6):
            theirs = get_privacy_spent(orders=orders, rdp=compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders), delta=DELTA)
            ours = epsilon_from_rdp(steps * subsampled_gaussian_rdp(q, sigma, orders), orders, DELTA)
            assert ours[0] == pytest.approx(float(theirs[0]), rel=2e-9) and ours[1] == theirs[1]


def test_rdp_accountant_never_claims_privacy_it_cannot_compute():
    """Where the arithmetic overflows (σ so small that 1/σ² does), ε is +inf, never -inf or a NaN; past the
    orders where the conversion dips below 0, ε is 0, never negative; a best order beyond the grid's end
    returns the last order's ε (a valid bound), not an error."""
    for sigma in (1e-160, 1e-153, 1e-10):
        assert epsilon(noise_multiplier=sigma, sample_rate=0.1, steps=10, delta=DELTA, accountant="rdp") > 1e20
    assert epsilon(noise_multiplier=60.0, sample_rate=1e-4, steps=1, delta=DELTA, accountant="rdp") == 0.0
    far = epsilon(noise_multiplier=5000.0, sample_rate=0.01, steps=1, delta=1e-12, accountant="rdp")
    assert 0 < far < 1e-4


@pytest.mark.parametrize("q, sigma, steps", POINTS)
def test_prv_epsilon_matches_dp_accounting_pld(q, sigma, steps):
    ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="prv")
    reference = reference_pld(q, sigma, steps)
    # Opacus's PRV accountant returns the *upper* end of its estimate, estimate + eps_error (0.01 absolute),
    # and the PLD accountant is pessimistic too; they agree to about 0.01 absolute, i.e. within 2% for the
    # ε ≥ 0.9 of these points (1.1% at the smallest).
    assert ours == pytest.approx(reference, rel=0.02)
    assert ours >= reference - 1e-3  # never less conservative than the independent estimate


def test_prv_is_tighter_than_rdp():
    q, sigma, steps = SAMPLE_LEVEL[0]
    prv = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="prv")
    rdp_eps = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    assert prv < rdp_eps


def test_epsilon_edge_cases():
    assert epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=0, delta=DELTA, accountant="rdp") == 0.0
    assert epsilon(noise_multiplier=0.0, sample_rate=0.1, steps=5, delta=DELTA, accountant="rdp") == math.inf
    more = [epsilon(noise_multiplier=1.0, sample_rate=0.1, steps=t, delta=DELTA, accountant="rdp") for t in (10, 100, 1000)]
    assert more == sorted(more) and len(set(more)) == 3


# ---------------------------------------------------------------------------------------------- calibration

EXPOSURES = [Exposure(0.05, 400), Exposure(0.08, 200)]


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 4.0])
def test_calibrated_sigma_is_smallest_meeting_target(target, accountant):
    sigma = calibrate_noise(target_epsilon=target, delta=DELTA, exposures=EXPOSURES, accountant=accountant)
    assert worst_epsilon(sigma, EXPOSURES, delta=DELTA, accountant=accountant) <= target
    assert worst_epsilon(sigma * 0.99, EXPOSURES, delta=DELTA, accountant=accountant) > target


def test_lower_epsilon_needs_more_noise():
    sigmas = [
        calibrate_noise(target_epsilon=eps, delta=DELTA, exposures=EXPOSURES, accountant="rdp")
        for eps in [0.5, 1, 2, 4, 8]
    ]
    assert all(a > b for a, b in zip(sigmas, sigmas[1:])), sigmas


def test_more_steps_need_more_noise():
    sigmas = [
        calibrate_noise(target_epsilon=2.0, delta=DELTA, exposures=[Exposure(0.05, steps)], accountant="rdp")
        for steps in [50, 200, 800, 3200]
    ]
    assert all(a < b for a, b in zip(sigmas, sigmas[1:])), sigmas


def test_worst_exposure_decides():
    alone = calibrate_noise(target_epsilon=2.0, delta=DELTA, exposures=[Exposure(0.05, 100)], accountant="rdp")
    worst = calibrate_noise(target_epsilon=2.0, delta=DELTA, exposures=[Exposure(0.05, 400)], accountant="rdp")
    both = calibrate_noise(
        target_epsilon=2.0, delta=DELTA, exposures=[Exposure(0.05, 100), Exposure(0.05, 400)], accountant="rdp"
    )
    assert both == worst > alone


def test_unreachable_target_raises():
    with pytest.raises(UserError, match="cannot be met"):
        calibrate_noise(target_epsilon=1e-4, delta=DELTA, exposures=[Exposure(1.0, 100)], accountant="rdp")


def test_check_delta_refuses_delta_at_or_above_one_over_n():
    check_delta(0.9 / 100, 100, "client dataset")  # below 1/n: fine
    for delta in (1 / 100, 0.05):
        with pytest.raises(UserError, match="--delta"):
            check_delta(delta, 100, "client dataset")


# ---------------------------------------------------------------------------------------------- RDP orders


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 6.8, 20), (0.05, 6.8, 40), (1.0, 20.0, 1)])
def test_large_sigma_finds_its_best_order_beyond_opacus_grid_without_a_warning(q, sigma, steps):
    """At large σ the best RDP order is beyond Opacus's last (63): stopping there gives a looser ε (and so
    more noise at calibration). Ours continues the grid, agrees with dp_accounting on a wide grid, and lets
    no library warning out."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA, accountant="rdp")
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opacus_eps, best = opacus.get_privacy_spent(delta=DELTA)
    assert best == RDPAccountant.DEFAULT_ALPHAS[-1] and any("largest alpha" in str(w.message) for w in caught)
    assert ours < opacus_eps
    assert ours == pytest.approx(reference_rdp(q, sigma, steps), rel=0.01)


# ---------------------------------------------------------------------------------------------- mechanisms


def _config(**options):
    base = {"task": "synthetic", "method": "dp-lora", "device": "cpu", "eps": 2.0, "local-steps": 5, "batch-size": 10}
    return build_config({**base, **options})


def calibrated(config, sizes, schedule):
    mechanism = create_mechanism(config, sizes)
    mechanism.calibrate(schedule)
    return mechanism


def test_shared_calibration_gives_every_client_the_most_participating_clients_sigma():
    config = _config(clients=3, participation=2 / 3, rounds=4, calibration="shared")
    schedule = [[0, 1], [0, 2], [0, 1], [0, 2]]  # client 0 takes part 4 times, the others twice
    mechanism = calibrated(config, [200, 200, 200], schedule)

    assert mechanism.name == "sample"
    assert mechanism.sample_rates == [0.05, 0.05, 0.05]
    assert mechanism.exposures(schedule) == [Exposure(0.05, 4 * 5), Exposure(0.05, 2 * 5), Exposure(0.05, 2 * 5)]
    spent = mechanism.spent(schedule)
    assert spent[0] <= 2.0
    assert spent[0] == pytest.approx(2.0, rel=0.01)  # σ is the smallest that fits: ε lands on the target
    assert spent[1] <= spent[0] and spent[2] <= spent[0]
    assert spent[1] < 0.9 * 2.0  # calibrating for client 0 leaves the others well inside the budget
    assert mechanism.spent(schedule[:1]) == [epsilon(noise_multiplier=mechanism.noise_multiplier, sample_rate=0.05, steps=s,
                                                      delta=DELTA, accountant="rdp") for s in (5, 5, 0)]
    # Cross-check the most-exposed client's ε with dp_accounting at the calibrated σ.
    assert reference_rdp(0.05, mechanism.noise_multiplier, 20) == pytest.approx(spent[0], rel=0.02)
    assert mechanism.noise_multipliers == [mechanism.noise_multiplier] * 3


def test_per_client_calibration_gives_each_client_its_own_smallest_sigma():
    """Each client protects its own dataset, so each gets the least noise that keeps it within ε for its
    own rate and steps: every client spends the whole budget, none more."""
    config = _config(clients=4, participation=0.5, rounds=4)
    assert config.privacy.calibration == "per-client"  # the default
    schedule = [[0, 1], [0, 2], [0, 1], [0, 2]]  # client 0: 4 rounds; 1 and 2: twice; 3: never
    sizes = [200, 200, 50, 200]  # client 2 is small: rate 0.2
    mechanism = calibrated(config, sizes, schedule)
    sigmas = mechanism.noise_multipliers
    assert sigmas[3] == 0.0  # never takes part: never adds noise
    for k, (q, steps) in enumerate([(0.05, 20), (0.05, 10), (0.2, 10)]):
        own = calibrate_noise(target_epsilon=2.0, delta=DELTA, exposures=[Exposure(q, steps)], accountant="rdp")
        assert sigmas[k] == own
        assert reference_rdp(q, sigmas[k], steps) == pytest.approx(2.0, rel=0.02)  # dp_accounting agrees
    spent = mechanism.spent(schedule)
    assert all(e <= 2.0 and e == pytest.approx(2.0, rel=0.01) for e in spent[:3]) and spent[3] == 0.0
    assert sigmas[1] < sigmas[0] < sigmas[2]  # fewer steps need less noise; a higher rate more
    assert mechanism.noise_multiplier == sigmas[2] and mechanism.noise_multiplier_min == sigmas[1]
    shared = calibrated(_config(clients=4, participation=0.5, rounds=4, calibration="shared"), sizes, schedule)
    assert shared.noise_multipliers == [sigmas[2]] * 3 + [0.0]


def test_sample_level_worst_client_can_be_the_smallest():
    """A small client has a higher Poisson rate, so it may be the binding one despite fewer rounds."""
    config = _config(clients=2, participation=0.5, rounds=3, calibration="shared")
    schedule = [[0], [0], [1]]
    mechanism = calibrated(config, [1000, 100], schedule)  # rates 0.01 and 0.1
    assert mechanism.sample_rates == [0.01, 0.1]
    spent = mechanism.spent(schedule)
    assert max(spent) == pytest.approx(2.0, rel=0.01) and max(spent) <= 2.0
    assert spent[1] > spent[0]


def test_sample_level_checks_delta_against_smallest_client():
    config = _config(clients=2, participation=1.0, rounds=1, delta=1e-2)
    with pytest.raises(UserError, match="--delta"):
        create_mechanism(config, [1000, 100])


def test_client_level_uses_m_over_n_and_rounds():
    config = _config(clients=10, participation=0.2, rounds=30, **{"dp-level": "client", "clip": 0.5})
    schedule = [[0, 1]] * 30  # client level ignores who; only the rate and the number of rounds matter
    mechanism = calibrated(config, [60] * 10, schedule)
    assert mechanism.name == "client" and mechanism.clip == 0.5
    assert mechanism.exposures(schedule) == [Exposure(0.2, 30)]
    expected = calibrate_noise(target_epsilon=2.0, delta=DELTA, exposures=[Exposure(0.2, 30)], accountant="rdp")
    assert mechanism.noise_multiplier == expected
    (spent,) = mechanism.spent(schedule)
    assert spent <= 2.0 and spent == pytest.approx(2.0, rel=0.01)
    assert reference_rdp(0.2, mechanism.noise_multiplier, 30) == pytest.approx(spent, rel=0.02)
    # δ must be below 1/N for the set of clients.
    with pytest.raises(UserError, match="--delta"):
        create_mechanism(_config(clients=10, participation=0.2, rounds=3, delta=0.1, **{"dp-level": "client"}), [60] * 10)


def test_no_privacy_has_no_noise_and_no_guarantee():
    mechanism = calibrated(_config(eps=math.inf), [200, 200], [[0, 1]])
    assert mechanism.name == "none" and mechanism.noise_multiplier == 0.0
    assert mechanism.exposures([[0, 1]]) == [] and mechanism.spent([[0, 1]]) == [math.inf]


def test_client_level_epsilon_covers_the_sampler_actually_used():
    clients, participation, rounds = 10, 0.2, 30
    config = _config(clients=clients, participation=participation, rounds=rounds, **{"dp-level": "client"})
    mechanism = create_mechanism(config, [60] * clients)
    schedule = mechanism.participation(Randomness(config.seed).stream(Purpose.PARTICIPATION))  # as run_federated
    mechanism.calibrate(schedule)
    (reported,) = mechanism.spent(schedule)

    assert len({len(chosen) for chosen in schedule}) > 1  # Poisson client sampling: the add/remove analysis applies
    reference = reference_rdp(participation, mechanism.noise_multiplier, rounds)
    assert reported >= reference * 0.98, (reported, reference)
