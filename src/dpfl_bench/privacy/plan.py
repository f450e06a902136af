"""A run's privacy plan: its noise multiplier, calibrated before training, and the ε each client spends.

Sample level (DP-SGD in every client): client k's dataset of n_k examples is touched once per local step
at Poisson rate q_k = batch/n_k, for K steps in each of the R_k rounds it takes part in. Client level
(DP-FedAvg): the set of N clients is touched once per round at rate m/N. The participation schedule
depends only on the seed, so the plan is exact for the run that follows.
"""

import math
from dataclasses import dataclass

from dpfl_bench.config import RunConfig
from dpfl_bench.privacy.accounting import Exposure, calibrate_noise, check_delta, epsilon


@dataclass(frozen=True)
class PrivacyPlan:
    level: str  # none | sample | client
    noise_multiplier: float  # σ; noise std is σ·clip (0 without privacy)
    clip: float
    delta: float
    accountant: str
    sample_rates: tuple[float, ...]  # per client (sample level) or one rate (client level)

    @property
    def private(self) -> bool:
        return self.level != "none"

    def spent(self, mechanisms_run: list[int]) -> list[float]:
        """ε spent by each protected unit, given how many mechanisms each has gone through so far."""
        if not self.private:
            return [math.inf] * len(mechanisms_run)
        return [
            epsilon(noise_multiplier=self.noise_multiplier, sample_rate=q, steps=t, delta=self.delta, accountant=self.accountant)
            for q, t in zip(self.sample_rates, mechanisms_run)
        ]


def plan_privacy(config: RunConfig, client_sizes: list[int], schedule: list[list[int]]) -> PrivacyPlan:
    """Check the privacy settings against the data and calibrate σ for the whole schedule."""
    privacy = config.privacy
    if not privacy.private:
        return PrivacyPlan("none", 0.0, math.inf, privacy.delta, privacy.accountant, ())
    rates, exposures = exposures_of(config, client_sizes, schedule)
    sigma = calibrate_noise(
        target_epsilon=privacy.eps, delta=privacy.delta, exposures=exposures, accountant=privacy.accountant
    )
    return PrivacyPlan(privacy.dp_level, sigma, privacy.clip, privacy.delta, privacy.accountant, rates)


def exposures_of(
    config: RunConfig, client_sizes: list[int], schedule: list[list[int]]
) -> tuple[tuple[float, ...], list[Exposure]]:
    """Sampling rate of each protected unit and how often the whole run touches it (checks δ too)."""
    privacy, federated = config.privacy, config.federated
    if privacy.dp_level == "sample":
        check_delta(privacy.delta, min(client_sizes), "client dataset")
        rates = tuple(min(1.0, config.training.batch_size / n) for n in client_sizes)
        rounds_taken = [sum(k in chosen for chosen in schedule) for k in range(len(client_sizes))]
        exposures = [Exposure(q, r * federated.local_steps) for q, r in zip(rates, rounds_taken)]
    else:
        check_delta(privacy.delta, federated.clients, "set of clients")
        rates = (federated.participation,)  # clients are Poisson-sampled at this rate
        exposures = [Exposure(rates[0], federated.rounds)]
    return rates, exposures
