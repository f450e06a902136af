"""`sample`: DP-SGD in every client (Abadi et al. 2016). Each client's dataset is protected on its own.

Each local step Poisson-samples the client's examples at rate q_k = batch / n_k, clips every example's
gradient to C, adds N(0, σ²C²) to the sum and divides by the *expected* batch size. The accountant sees
one subsampled Gaussian mechanism at q_k per local step a client runs: K per round it takes part in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.privacy.accounting import Exposure, check_delta
from dpfl_bench.privacy.mechanism import Mechanism, Schedule, noise_like, register_mechanism
from dpfl_bench.privacy.randomness import Stream
from dpfl_bench.server import State

if TYPE_CHECKING:
    import torch


@register_mechanism
class SampleDP(Mechanism):
    name = "sample"
    unit = "example"

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        if config.training.batch_order != "fresh":
            raise UserError(
                "--batch-order epoch cannot be accounted at sample level: the accountant's amplification assumes each "
                "step's batch is a fresh Poisson sample; use --batch-order fresh (or --dp-level authors, no guarantee)"
            )

    def check(self) -> None:
        check_delta(self.config.privacy.delta, min(self.client_sizes), "client dataset")

    def exposures(self, schedule: Schedule) -> list[Exposure]:
        steps = self.config.federated.local_steps
        return [Exposure(q, steps * sum(k in chosen for chosen in schedule)) for k, q in enumerate(self.sample_rates)]

    @property
    def clip_examples(self) -> float:
        return self.clip

    def draw_batches(self, client: int, steps: int, stream: Stream) -> list[torch.Tensor]:
        """Poisson sampling, the amplification the accountant assumes: at each step each example joins with rate q_k."""
        import torch

        size, rate = self.client_sizes[client], self.sample_rates[client]
        return [torch.from_numpy(np.flatnonzero(stream.bernoulli(size, rate))) for _ in range(steps)]

    def privatize(self, summed: State, count: int, client: int, stream: Stream) -> State:
        # Divided by the expected batch size, never the realised one (which would depend on the data).
        expected = min(self.config.training.batch_size, self.client_sizes[client])
        noise = noise_like(summed, self.noise_multipliers[client] * self.clip, stream)
        return {name: (g + noise[name]) / expected for name, g in summed.items()}

    def client_records(self, clients_labels: list[torch.Tensor], num_classes: int, secret: bool) -> list[dict]:
        """Client sizes (and so their rates and σ_k) are public to the accounting; label histograms only
        when seeded. (A secure run's σ_k also reflect its secret schedule's participation counts, which
        sample-level DP does not rely on keeping secret.)"""
        records = super().client_records(clients_labels, num_classes, secret=False)
        for record, rate, sigma in zip(records, self.sample_rates, self.noise_multipliers):
            record["sample_rate"] = rate
            record["noise_multiplier"] = sigma
            if secret:
                del record["labels"]
        return records
