"""The authors' noise regime (`--dp-level authors`): their per-step arithmetic on crafted gradients, its
labels in the results (no ε, no guarantee), and the options that only it takes."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from support import assert_user_error, invoke

from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.privacy.mechanism import create_mechanism
from dpfl_bench.privacy.mechanisms.authors import CLIP_CAP, authors_privatize
from dpfl_bench.privacy.randomness import Purpose, Randomness


def crafted(norms: list[float], count: int) -> dict[str, torch.Tensor]:
    """Summed gradients whose batch means (sum / count) have the given norms, each along its own axis."""
    return {f"t{i}": torch.tensor([0.0, norm * count, 0.0]) for i, norm in enumerate(norms)}


@pytest.mark.parametrize(
    "norms, clip",
    [
        ([0.1, 0.2, 0.3], 0.2),  # median below the cap: C is the median, the largest tensor is clipped to it
        ([1.0, 2.0, 3.0], CLIP_CAP),  # median above the cap: C = 0.4, every tensor clipped
        ([0.05, 0.1, 0.3, 0.5], 0.2),  # an even count: the mean of the middle two
    ],
)
def test_per_tensor_clipping_of_the_batch_mean_at_the_capped_median(norms, clip):
    count = 16
    summed = crafted(norms, count)
    # dp_sigma tiny against the gradient: what is left after clipping is the noiseless value to 1e-6.
    step = authors_privatize(summed, count, count, 1e-9, Randomness(0).stream(Purpose.NOISE, 0, 0))
    for i, norm in enumerate(norms):
        expected = min(norm, clip)
        assert float(step[f"t{i}"].norm()) == pytest.approx(expected, rel=1e-6), (i, norm)
        assert float(step[f"t{i}"][1]) > 0  # clipping scales, never turns


def test_noise_std_is_dp_sigma_c_over_b_on_every_coordinate():
    count, batch, dp_sigma = 8, 16, 0.2
    norms = [0.1, 0.3, 5.0]  # C = 0.3
    summed = {name: torch.zeros(50_000) for name in ("a", "b", "c")}
    for name, norm in zip(("a", "b", "c"), norms):
        summed[name][0] = norm * count
    step = authors_privatize(summed, count, batch, dp_sigma, Randomness(3).stream(Purpose.NOISE, 0, 0))
    for name in summed:
        residual = step[name][1:].numpy()  # coordinates that held no gradient: noise alone
        assert residual.std() == pytest.approx(dp_sigma * 0.3 / batch, rel=0.02)
        assert abs(residual.mean()) < 4 * dp_sigma * 0.3 / batch / math.sqrt(len(residual))


def test_the_mechanism_records_the_equivalent_noise_multiplier_and_no_epsilon():
    config = build_config({"task": "synthetic", "dp-level": "authors", "dp-sigma": 0.5, "batch-size": 10})
    assert math.isnan(config.privacy.eps) and not config.privacy.accounted
    mechanism = create_mechanism(config, [100, 100])
    assert mechanism.name == "authors" and not mechanism.accounted
    schedule = [[0, 1]]
    mechanism.calibrate(schedule)
    summed = crafted([0.1, 0.2, 0.3, 0.4], 10)
    mechanism.privatize(summed, 10, 0, Randomness(0).stream(Purpose.NOISE, 0, 0))
    assert mechanism.noise_multiplier == pytest.approx(0.5 / (2 * 10 * math.sqrt(4)))
    mechanism.privatize(dict(list(summed.items())[:1]), 10, 0, Randomness(0).stream(Purpose.NOISE, 0, 0))
    assert mechanism.noise_multiplier == pytest.approx(0.5 / (2 * 10 * math.sqrt(4)))  # the weakest step stays
    assert all(math.isnan(e) for e in mechanism.spent(schedule))


def test_an_authors_run_says_it_has_no_guarantee(tmp_path):
    result = invoke("run", "--task", "synthetic", "--dp-level", "authors", "--rounds", "2", "--clients", "2",
                    "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    assert result.output.count("no privacy guarantee") >= 2  # the header and the summary
    assert "ε=" not in result.output.splitlines()[0]
    (path,) = tmp_path.glob("*.parquet")
    assert "authors-sigma0.2" in path.name
    rows = pd.read_parquet(path)
    assert (rows["dp_level"] == "authors").all() and not rows["guarantee"].any()
    assert rows["eps_target"].isna().all() and rows["eps_spent"].isna().all()
    assert np.isfinite(rows["noise_multiplier"]).all() and (rows["noise_multiplier"] < 0.1).all()


def test_an_accounted_run_records_its_guarantee(tmp_path):
    result = invoke("run", "--task", "synthetic", "--eps", "8", "--rounds", "1", "--clients", "2", "--device", "cpu", "--out", tmp_path)
    assert result.exit_code == 0, result.output
    rows = pd.read_parquet(next(tmp_path.glob("*.parquet")))
    assert rows["guarantee"].all() and (rows["eps_spent"] <= 8).all()


@pytest.mark.parametrize(
    "args, text",
    [
        (["--dp-level", "authors", "--eps", "1"], "--eps does not apply to --dp-level authors"),
        (["--dp-level", "authors", "--dp-sigma", "0"], "--dp-sigma must be a number > 0"),
        (["--dp-level", "authors", "--dp-sigma", "-1"], "--dp-sigma must be a number > 0"),
        (["--dp-sigma", "0.2"], "--dp-sigma applies only to --dp-level authors"),
        (["--calibration", "worst"], "--calibration must be per-client or shared"),
    ],
)
def test_bad_authors_options_are_one_line_errors(tmp_path, args, text):
    assert_user_error(invoke("run", "--task", "synthetic", *args, "--out", tmp_path), text)


def test_eps_and_authors_in_a_config_file_are_refused_too():
    with pytest.raises(UserError, match="drop --eps"):
        build_config({"task": "synthetic", "dp_level": "authors", "eps": math.inf})
