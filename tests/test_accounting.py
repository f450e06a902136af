"""Privacy accounting: our ε against Google's dp-accounting, noise calibration, and the run's privacy plan.

`dp_accounting` is an independent implementation (test-only dependency); our `epsilon` wraps Opacus.
Both use the add/remove-one neighbouring relation for the Poisson-subsampled Gaussian.
"""

import logging
import math

import dp_accounting
import pytest
from dp_accounting import pld, rdp
from opacus.accountants import RDPAccountant

from dpfl_bench.config import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.privacy.accounting import Exposure, calibrate_noise, check_delta, epsilon, worst_epsilon
from dpfl_bench.privacy.plan import plan_privacy

DELTA = 1e-5
# Opacus warns when the best RDP order is at the end of its grid (during calibration's bisection at tiny σ).
pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the:UserWarning")
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
    # Opacus's RDP accountant evaluates a fixed grid of orders; give dp_accounting the same grid so the two
    # optimise over the same set.
    accountant = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS, neighboring_relation=ADD_OR_REMOVE)
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
    # float precision; at fractional orders Opacus sums the binomial series with its alternating signs
    # while dp_accounting adds |terms| (a slightly larger, upper-bound RDP). Keep that direction honest:
    assert ours >= reference * 0.99


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


# ---------------------------------------------------------------------------------------------- plan


def _config(**options):
    base = {"task": "synthetic", "method": "dp-lora", "device": "cpu", "eps": 2.0, "local-steps": 5, "batch-size": 10}
    return build_config({**base, **options})


def test_sample_level_plan_calibrates_for_most_participating_client():
    config = _config(clients=3, participation=2 / 3, rounds=4)
    sizes = [200, 200, 200]
    schedule = [[0, 1], [0, 2], [0, 1], [0, 2]]  # client 0 takes part 4 times, the others twice
    plan = plan_privacy(config, sizes, schedule)

    assert plan.level == "sample"
    assert plan.sample_rates == (0.05, 0.05, 0.05)
    steps = [4 * 5, 2 * 5, 2 * 5]
    spent = plan.spent(steps)
    assert spent[0] <= 2.0
    assert spent[0] == pytest.approx(2.0, rel=0.01)  # σ is the smallest that fits: ε lands on the target
    assert spent[1] <= spent[0] and spent[2] <= spent[0]
    assert spent[1] < 0.9 * 2.0  # calibrating for client 0 leaves the others well inside the budget
    # Cross-check the most-exposed client's ε with dp_accounting at the plan's σ.
    assert reference_rdp(0.05, plan.noise_multiplier, 20) == pytest.approx(spent[0], rel=0.02)


def test_sample_level_plan_worst_client_can_be_the_smallest():
    """A small client has a higher Poisson rate, so it may be the binding one despite fewer rounds."""
    config = _config(clients=2, participation=0.5, rounds=3)
    sizes = [1000, 100]  # rates 0.01 and 0.1
    schedule = [[0], [0], [1]]
    plan = plan_privacy(config, sizes, schedule)
    assert plan.sample_rates == (0.01, 0.1)
    spent = plan.spent([2 * 5, 1 * 5])
    assert max(spent) == pytest.approx(2.0, rel=0.01) and max(spent) <= 2.0
    assert spent[1] > spent[0]


def test_sample_level_plan_checks_delta_against_smallest_client():
    config = _config(clients=2, participation=1.0, rounds=1, delta=1e-2)
    with pytest.raises(UserError, match="--delta"):
        plan_privacy(config, [1000, 100], [[0, 1]])


def test_client_level_plan_uses_m_over_n_and_rounds():
    config = _config(clients=10, participation=0.2, rounds=30, **{"dp-level": "client", "clip": 0.5})
    schedule = [[0, 1]] * 30  # client level ignores who; only the rate and the number of rounds matter
    plan = plan_privacy(config, [60] * 10, schedule)
    assert plan.level == "client"
    assert plan.sample_rates == (0.2,)
    assert plan.clip == 0.5
    expected = calibrate_noise(target_epsilon=2.0, delta=DELTA, exposures=[Exposure(0.2, 30)], accountant="rdp")
    assert plan.noise_multiplier == expected
    (spent,) = plan.spent([30])
    assert spent <= 2.0 and spent == pytest.approx(2.0, rel=0.01)
    assert reference_rdp(0.2, plan.noise_multiplier, 30) == pytest.approx(spent, rel=0.02)
    # δ must be below 1/N for the set of clients.
    with pytest.raises(UserError, match="--delta"):
        plan_privacy(_config(clients=10, participation=0.2, rounds=3, delta=0.1, **{"dp-level": "client"}), [60] * 10, [[0, 1]] * 3)


def test_plan_without_privacy():
    plan = plan_privacy(_config(eps=math.inf), [200, 200], [[0, 1]])
    assert plan.level == "none" and plan.noise_multiplier == 0.0 and not plan.private
    assert plan.spent([3, 3]) == [math.inf, math.inf]


def test_client_level_epsilon_covers_the_sampler_actually_used():
    from dpfl_bench.partition import participation_schedule

    clients, participation, rounds = 10, 0.2, 30
    config = _config(clients=clients, participation=participation, rounds=rounds, **{"dp-level": "client"})
    schedule = participation_schedule(clients, participation, rounds, seed=config.seed, poisson=True)  # as run_federated
    plan = plan_privacy(config, [60] * clients, schedule)
    (reported,) = plan.spent([rounds])

    sizes = {len(chosen) for chosen in schedule}
    if len(sizes) > 1:  # Poisson client sampling: the add/remove Poisson analysis applies
        reference = reference_rdp(plan.sample_rates[0], plan.noise_multiplier, rounds)
    else:  # fixed-size sampling without replacement: dp_accounting's analysis (replace-one, sensitivity 2C)
        (m,) = sizes
        accountant = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
        gaussian = dp_accounting.GaussianDpEvent(plan.noise_multiplier / 2)
        accountant.compose(
            dp_accounting.SelfComposedDpEvent(dp_accounting.SampledWithoutReplacementDpEvent(clients, m, gaussian), rounds)
        )
        reference = accountant.get_epsilon(DELTA)
    assert reported >= reference * 0.98, (reported, reference)
