"""The empirical privacy audit: its statistics on crafted scores (known answers), and whole audited runs
that must find a non-private run out, stay below a real guarantee, and catch a planted bug."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, optimize, stats
from support import assert_one_line_error, assert_user_error, invoke

from dpfl_bench.configure import build_config
from dpfl_bench.federated import prepare, run_federated
from dpfl_bench.privacy.audit import (
    fdp_epsilon,
    fdp_lower_bound,
    fdp_refutes,
    gaussian_delta,
    gaussian_estimate,
    gdp_delta,
    gdp_mu,
    guess_plans,
    one_run_epsilon,
    one_run_lower_bound,
    one_run_p_value,
)
from dpfl_bench.privacy.mechanism import MECHANISMS, Mechanism, register_mechanism
from dpfl_bench.privacy.mechanisms.sample import SampleDP
from dpfl_bench.results import read_run
from dpfl_bench.tasks import TASKS

SYNTHETIC = TASKS.get("synthetic")
DELTA = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster on a busy 2-core machine
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------ one-run bound


def test_all_right_guesses_without_delta_give_the_closed_form():
    """δ = 0 and v = r: the p-value is q^r with q = e^ε / (1 + e^ε), so ε = logit(α^(1/r))."""
    for guesses, alpha in [(10, 0.05), (300, 0.05), (1000, 0.001)]:
        q = alpha ** (1 / guesses)
        expected = math.log(q / (1 - q))
        assert one_run_epsilon(canaries=1000, guesses=guesses, correct=guesses, delta=0, significance=alpha) == pytest.approx(
            expected, abs=2e-4)


def test_the_most_a_one_run_audit_can_certify_matches_the_published_figures():
    # ../shared/reference/methods-and-privacy.md: "about 3.5 with 100 canaries, 5.8 with 1,000 (all guesses
    # right)" at 95% confidence, δ = 1e-5.
    assert one_run_epsilon(canaries=100, guesses=100, correct=100, delta=DELTA, significance=0.05) == pytest.approx(3.5, abs=0.05)
    assert one_run_epsilon(canaries=1000, guesses=1000, correct=1000, delta=DELTA, significance=0.05) == pytest.approx(5.8, abs=0.05)


def test_gdp_delta_is_the_gaussian_pairs_hockey_stick_and_mu_inverts_it():
    """μ-GDP is N(μ, 1) against N(0, 1): its δ(ε) must equal the closed-form hockey-stick divergence of that pair,
    and gdp_mu must recover μ from (ε, δ(ε))."""
    for mu in (0.3, 1.0, 2.5):
        for eps in (0.0, 0.5, 2.0):
            assert gdp_delta(eps, mu) == pytest.approx(gaussian_delta(eps, mu, 1.0, 0.0, 1.0), rel=1e-9, abs=1e-15)
            assert gdp_mu(eps, gdp_delta(eps, mu)) == pytest.approx(mu, rel=1e-6)


def test_one_right_guess_refutes_no_gaussian_claim():
    """One canary, one right guess: under any μ-GDP it happens with probability at least 1/2, never at 5%."""
    for mu in (0.0, 1.0, 10.0):
        assert not fdp_refutes(mu, canaries=1, guesses=1, correct=1, significance=0.05)
    assert fdp_epsilon(canaries=1000, guesses=100, correct=0, delta=DELTA, significance=0.05) == 0.0


def gdp_game(mu: float, canaries: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The exact μ-GDP audit: a canary's score is N(μ, 1) when it is in, N(0, 1) when it is out."""
    inserted = rng.random(canaries) < 0.5
    return mu * inserted + rng.standard_normal(canaries), inserted


def test_the_fdp_test_never_refutes_a_true_gaussian_claim_more_often_than_its_significance():
    """Soundness of the f-DP test itself, on the exact μ-GDP game (μ = 1, 1,000 canaries, "in" for the 50
    highest scores): the smallest significance at which c right guesses refute μ-GDP is a p-value, so it must
    be at least the probability of c or more right guesses, which 20,000 games estimate. Today's margin is
    3x or more at every c where the tail is measurable: a step that makes the test that much bolder shows."""
    rng = np.random.default_rng(0)
    inserted = rng.random((20_000, 1000)) < 0.5
    scores = inserted + rng.standard_normal(inserted.shape)
    top = np.argpartition(-scores, 50, axis=1)[:, :50]
    right = np.take_along_axis(inserted, top, axis=1).sum(axis=1)

    def p_value(correct: int) -> float:
        low, high = 1e-9, 1.0
        for _ in range(40):  # refuted at significance s exactly when s >= the p-value
            middle = math.sqrt(low * high)
            refuted = fdp_refutes(1.0, canaries=1000, guesses=50, correct=correct, significance=middle)
            low, high = (low, middle) if refuted else (middle, high)
        return high

    for correct in (47, 48, 49, 50):
        tail = float((right >= correct).mean())
        assert tail + 3 * math.sqrt(tail * (1 - tail) / len(right)) <= p_value(correct), (correct, tail, p_value(correct))


def test_the_fdp_bound_stays_below_the_true_epsilon_and_beats_steinke_et_al_on_a_strong_signal():
    rng = np.random.default_rng(7)
    true_eps = optimize.brentq(lambda e: gdp_delta(e, 1.0) - DELTA, 0.0, 50.0)
    bounds = [fdp_lower_bound(*gdp_game(1.0, 1000, rng), delta=DELTA) for _ in range(5)]
    assert all(0.5 < b < true_eps for b in bounds), (true_eps, bounds)
    scores, inserted = gdp_game(4.0, 1000, rng)
    assert fdp_lower_bound(scores, inserted, delta=DELTA) > one_run_lower_bound(scores, inserted, delta=DELTA) + 1


def direct_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke et al.'s p-value written out term by term (an independent, slow transcription)."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, k) * q**k * (1 - q) ** (r - k) for k in range(r + 1)]
    tail = sum(pmf[v:])
    worst = max(sum(pmf[v - i : v]) / i for i in range(1, v + 1))
    return min(1.0, tail + worst * delta * 2 * m)


@pytest.mark.parametrize("r, v, eps", [(20, 18, 0.5), (50, 50, 2.0), (60, 41, 0.1), (30, 30, 4.0)])
def test_the_p_value_with_its_delta_term_matches_a_direct_computation(r, v, eps):
    ours = one_run_p_value(canaries=200, guesses=r, correct=v, eps=eps, delta=1e-3)
    assert ours == pytest.approx(direct_p_value(200, r, v, eps, 1e-3), rel=1e-6)


def test_the_lower_bound_on_crafted_scores_is_the_best_plan_at_its_bonferroni_share():
    """1,000 canaries; the 300 highest scores are all inserted ones, the next 200 inserted ones look like the
    excluded ones. The best plan is then 300 "in" guesses, all right, tested at 5% / (number of plans)."""
    rng = np.random.default_rng(0)
    inserted = np.zeros(1000, dtype=bool)
    inserted[:500] = True
    scores = rng.normal(0, 1, 1000)
    scores[:300] = 10 + rng.random(300)  # unmistakable
    plans = guess_plans(1000)
    share = 0.05 / len(plans)
    expected = one_run_epsilon(canaries=1000, guesses=300, correct=300, delta=DELTA, significance=share)
    # the same ε, found by a root finder on the directly computed p-value
    direct = optimize.brentq(lambda e: direct_p_value(1000, 300, 300, e, DELTA) - share, 0.5, 20)
    assert expected == pytest.approx(direct, abs=2e-4)
    assert one_run_lower_bound(scores, inserted, delta=DELTA) == pytest.approx(expected, abs=1e-9)
    # the order of the canaries does not matter, only which scores belong to inserted ones
    order = rng.permutation(1000)
    assert one_run_lower_bound(scores[order], inserted[order], delta=DELTA) == pytest.approx(expected, abs=1e-9)


def test_scores_that_carry_no_information_audit_at_zero():
    rng = np.random.default_rng(1)
    assert one_run_lower_bound(rng.normal(size=1000), rng.random(1000) < 0.5, delta=DELTA) == 0.0


# ------------------------------------------------------------------------------------ Gaussian fit


def analytic_gaussian_epsilon(mu: float, delta: float) -> float:
    """ε of the Gaussian mechanism at sensitivity/σ = mu (Balle & Wang 2018), by root finding."""
    def excess(eps):
        return stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2) - delta

    return optimize.brentq(excess, 0, 100)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.5])
def test_gaussian_fit_of_equal_variance_scores_is_the_gaussian_mechanisms_epsilon(mu):
    n = 20_000
    grid = stats.norm.ppf((np.arange(n) + 0.5) / n)  # exact quantiles: the fit sees mean 0 and std ≈ 1
    grid = grid / grid.std(ddof=1)
    scores = np.concatenate([mu + grid, grid])
    inserted = np.arange(2 * n) < n
    assert gaussian_estimate(scores, inserted, delta=DELTA) == pytest.approx(analytic_gaussian_epsilon(mu, DELTA), abs=2e-3)


@pytest.mark.parametrize("eps", [0.2, 1.0, 3.0])
def test_gaussian_delta_with_unequal_variances_matches_numerical_integration(eps):
    mu1, s1, mu0, s0 = 1.0, 1.4, 0.0, 1.0

    def hockey(mp, sp, mq, sq):
        f = lambda x: max(0.0, stats.norm.pdf(x, mp, sp) - math.exp(eps) * stats.norm.pdf(x, mq, sq))  # noqa: E731
        return integrate.quad(f, -40, 40, points=[-5, 0, 5], limit=400)[0]

    expected = max(hockey(mu1, s1, mu0, s0), hockey(mu0, s0, mu1, s1))
    assert gaussian_delta(eps, mu1, s1, mu0, s0) == pytest.approx(expected, rel=1e-4, abs=1e-10)


# ------------------------------------------------------------------------------------ audited runs


def audited(tmp_path, **options):
    base = {"task": "synthetic", "method": "dp-lora", "device": "cpu", "audit-canaries": 1000, "local-steps": 10,
            "out": str(tmp_path)}
    return run_federated(build_config({**base, **options}, SYNTHETIC.defaults)).rows[-1]


def test_a_non_private_run_audits_at_3_or_more(tmp_path):
    row = audited(tmp_path, eps=math.inf, rank=32)
    assert row["audit_canaries"] == 1000
    assert row["audit_eps_lower"] >= 3, row["audit_eps_lower"]


def test_the_authors_regime_is_audited_and_reveals_as_much_as_a_non_private_run(tmp_path):
    """Their noise is about a thousandth of a per-example sensitivity: the canaries find it out."""
    row = audited(tmp_path, rank=32, **{"dp-level": "authors"})
    assert math.isnan(row["eps_spent"]) and not row["guarantee"]
    assert row["audit_eps_lower"] >= 3, row["audit_eps_lower"]


def test_a_run_at_eps_1_audits_at_most_1_in_19_of_20_seeds(tmp_path):
    bounds = [audited(tmp_path, eps=1.0, seed=seed, **{"local-steps": 4}) for seed in range(20)]
    assert all(row["eps_spent"] <= 1.0 for row in bounds)
    for bound in ("audit_eps_lower", "audit_eps_lower_fdp"):  # the f-DP one too: DP-SGD's curve is near Gaussian
        below = [row[bound] <= 1.0 for row in bounds]
        assert sum(below) >= 19, (bound, [row[bound] for row in bounds])


class Unauditable(SampleDP):
    name = "test-unauditable"
    unit = None


@pytest.fixture
def test_mechanisms(monkeypatch):
    """The planted bug of benchmarks/audit_power.py (σ accounted, σ/10 added: the one its table audits) and a
    mechanism the audit cannot cover, registered for one test; yields the planted bug's name."""
    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "benchmarks"))
    from audit_power import TenthOfTheNoise

    for cls in (TenthOfTheNoise, Unauditable):
        register_mechanism(cls)
    yield TenthOfTheNoise.name
    for cls in (TenthOfTheNoise, Unauditable):
        del MECHANISMS._entries[cls.name]


def test_a_planted_bug_audits_above_its_accounted_epsilon(tmp_path, test_mechanisms):
    honest = audited(tmp_path / "honest", eps=1.0)
    buggy = audited(tmp_path / "buggy", eps=1.0, **{"dp-level": test_mechanisms})
    assert buggy["eps_spent"] == honest["eps_spent"] <= 1.0  # the accountant cannot see the bug
    assert honest["audit_eps_lower"] <= 1.0
    assert buggy["audit_eps_lower"] > buggy["eps_spent"], buggy["audit_eps_lower"]


def test_client_level_canaries_find_a_non_private_run_out_and_stay_below_eps_1(tmp_path):
    open_run = audited(tmp_path / "open", eps=math.inf, **{"dp-level": "client"})
    private = audited(tmp_path / "private", eps=1.0, **{"dp-level": "client"})
    assert open_run["audit_eps_lower"] >= 3, open_run["audit_eps_lower"]
    assert private["audit_eps_lower"] <= 1.0


def test_a_canary_is_clip_on_one_quiet_coordinate_of_the_trained_space_and_nothing_else(tmp_path):
    """Dirac canaries: after two released steps, each sampled canary adds exactly C to its own coordinate,
    one the released steps left at zero; no two share one; nothing else in the sum moves."""
    config = build_config({"task": "synthetic", "device": "cpu", "eps": 1.0, "audit-canaries": 200, "clip": 0.7,
                           "out": str(tmp_path)}, SYNTHETIC.defaults)
    exp = prepare(config)
    audit, params, client = exp.run.audit, exp.workspace.params, config.audit.audit_client
    trained = {n: torch.zeros_like(p) for n, p in params.of(frozenset({"B", "head"})).items()}
    loud = {n: (torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) < 0.5).float()
            for i, (n, p) in enumerate(trained.items())}  # half the coordinates carry real gradients
    for _ in range(2):  # too little seen yet: the canaries' gradient is zero
        summed, count = audit.insert(client, 0, trained)
        assert all(torch.equal(summed[n], trained[n]) for n in trained)
        audit.observe(client, {n: loud[n] * torch.randn(loud[n].shape) for n in trained})
    audit.rate = 1.0  # every inserted canary is sampled at this step
    summed, count = audit.insert(client, 0, trained)
    assert count == int(audit.inserted.sum()) > 0
    assert set(summed) == set(trained)
    changed = torch.cat([(summed[n] - trained[n]).flatten() for n in trained])
    quiet = torch.cat([(loud[n] == 0).flatten() for n in trained])
    assert int((changed != 0).sum()) == count  # one coordinate each, none shared
    assert torch.allclose(changed[changed != 0], torch.tensor(0.7))
    assert bool(quiet[changed != 0].all())  # only where the released steps were zero
    untouched, none = audit.insert(client + 1, 0, trained)  # another client's sum is left alone
    assert none == 0 and untouched is trained


def test_the_run_summary_and_compare_show_the_audit(tmp_path):
    result = invoke("run", "--task", "synthetic", "--method", "dp-lora", "--rounds", "1", "--audit-canaries", "100",
                    "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert "audit" in result.output and "lower bound" in result.output and "accounted ε 1.000" in result.output
    compared = invoke("compare", tmp_path, "--metric", "audit_eps_lower", "--format", "json")
    assert compared.exit_code == 0, compared.output
    (cell,) = json.loads(compared.output)
    assert cell["mean"] == pytest.approx(read_run(next(tmp_path.glob("*.parquet")))["audit_eps_lower"].iloc[-1])


@pytest.mark.parametrize("args, fragment", [
    (["--audit-canaries", "-1"], "--audit-canaries must be 0 (no audit) or more"),
    (["--audit-canaries", "100000"], "use at most"),
    (["--audit-canaries", "10", "--audit-client", "3"], "--audit-client 3 does not exist"),
    (["--audit-canaries", "10", "--eps", "inf", "--dp-level", "client", "--weighting", "size"], "drop --weighting size"),
    (["--audit-canaries", "10", "--dp-level", "test-unauditable"], "cannot be audited"),
])
def test_bad_audit_options_are_one_line_errors(tmp_path, test_mechanisms, args, fragment):
    result = invoke("run", "--task", "synthetic", "--rounds", "1", *args, "--out", tmp_path)
    if fragment.startswith("--audit-"):  # checked with the options, before anything starts
        assert_user_error(result, fragment)
    else:  # checked against the run's mechanism and model, once they are built
        assert_one_line_error(result, fragment)
    assert not list(tmp_path.glob("*.parquet"))


def test_mechanism_registry_is_clean_after_the_test_mechanisms():
    assert "planted-bug-tenth-noise" not in MECHANISMS and issubclass(MECHANISMS.get("sample"), Mechanism)
