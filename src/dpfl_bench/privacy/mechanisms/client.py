"""`client`: DP-FedAvg (McMahan et al. 2018). A whole client's data is protected.

Each client joins each round independently with probability p (Poisson sampling, the sampler the
accountant analyses); its update is clipped to norm C; the server adds N(0, σ²C²) to the sum and divides
by the expected number of clients pN. The accountant sees one subsampled Gaussian mechanism at rate p
per round, on the set of N clients.
"""

import numpy as np

from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.privacy.accounting import Exposure, check_delta
from dpfl_bench.privacy.mechanism import Mechanism, Schedule, noise_like, register_mechanism
from dpfl_bench.privacy.randomness import Stream
from dpfl_bench.server import State, noisy_sum_step


@register_mechanism
class ClientDP(Mechanism):
    name = "client"
    unit = "client"

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        if config.federated.client_selection != "random":
            raise UserError(
                "--client-selection first cannot be accounted at client level: the accountant's amplification assumes "
                "clients sampled at random each round; use --client-selection random"
            )

    def check(self) -> None:
        if self.config.federated.weighting != "uniform":
            raise UserError("client-level DP needs uniform FedAvg weights; drop --weighting size")
        check_delta(self.config.privacy.delta, self.config.federated.clients, "set of clients")

    @property
    def expected_clients(self) -> float:
        fed = self.config.federated
        return fed.participation * fed.clients  # the realised number is secret: it is not reported

    def participation(self, stream: Stream) -> Schedule:
        fed = self.config.federated
        return [np.flatnonzero(stream.bernoulli(fed.clients, fed.participation)).tolist() for _ in range(fed.rounds)]

    def exposures(self, schedule: Schedule) -> list[Exposure]:
        return [Exposure(self.config.federated.participation, len(schedule))]

    def aggregate(self, global_state: State, names: list[str], deltas: list[State], weights: list[float], stream: Stream) -> State:
        noise = noise_like({n: global_state[n] for n in names}, self.noise_multiplier * self.clip, stream)
        return noisy_sum_step(global_state, names, deltas, noise, clip=self.clip, divisor=self.expected_clients)
