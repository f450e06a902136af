"""The privacy mechanism interface: the questions on which `none`, `sample` and `client` differ.

The federated core asks a mechanism these things and branches on nothing else:

- `participation(stream)`: which clients take part in each round (drawn before training);
- `calibrate(schedule)`: the noise multipliers σ_k (one per protected unit) for the whole schedule,
  before training: each unit's own smallest σ (`--calibration per-client`) or the worst unit's for all;
- `draw_batches(client, steps, stream)`: which of a client's examples each local step of a round uses;
- `clip_examples`: the per-example clipping norm a client's gradient sum uses, or None for a plain sum;
- `privatize(summed, count, client, stream)`: the gradient a local step applies, from the sum over its
  `count` examples;
- `aggregate(global_state, names, deltas, weights, stream)`: the server's next global state from the
  clients' updates of the parameters `names`;
- `state()` / `load_state(state)`: what a checkpoint keeps of the mechanism;
- `exposures(schedule)`: what the accountant is told: how often each protected unit was touched, at
  which rate, over the rounds of `schedule` (a prefix of the run's schedule gives the ε spent so far).

Defaults below are the non-private ones (the clients --client-selection names, fixed-size shuffled batches
in --batch-order, plain gradient means, FedAvg), so a mechanism overrides only what it changes. A
mechanism is one module in `privacy/mechanisms/`, registered with `@register_mechanism`; its name is a
`--dp-level`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from dpfl_bench.config import RunConfig
from dpfl_bench.partition import clients_per_round
from dpfl_bench.privacy.accounting import Exposure, calibrate_noise, epsilon
from dpfl_bench.privacy.randomness import Stream
from dpfl_bench.registry import Registry
from dpfl_bench.server import State, fedavg_step

if TYPE_CHECKING:
    import torch

Schedule = list[list[int]]  # the clients that take part in each round


class Mechanism:
    name: ClassVar[str]
    unit: ClassVar[str | None]  # what one guarantee protects and an audit inserts: "example" | "client" | None
    accounted: ClassVar[bool] = True  # an accountant backs the run with an (ε, δ) guarantee

    def __init__(self, config: RunConfig, client_sizes: list[int]) -> None:
        self.config = config
        self.client_sizes = client_sizes
        batch = config.training.batch_size
        self.sample_rates = [min(1.0, batch / n) for n in client_sizes]  # a step's rate on each client's data
        self.noise_multipliers: list[float] = []  # σ_k per protected unit (noise std σ_k·clip); set by `calibrate`
        self.check_config(config)  # `build_config` asked already; a RunConfig made by hand is asked here
        self.check()

    @property
    def clip(self) -> float:
        return self.config.privacy.clip

    @property
    def noise_multiplier(self) -> float:
        """The largest σ_k of the units that take part: what the results record as `noise_multiplier`."""
        return max(self.noise_multipliers, default=0.0)

    @property
    def noise_multiplier_min(self) -> float:
        """The smallest σ_k of the units that take part (σ_k = 0 marks a unit that never takes part)."""
        return min((s for s in self.noise_multipliers if s > 0), default=0.0)

    @property
    def expected_clients(self) -> float:
        """Clients per round on average (what the upload size per round is reported for)."""
        fed = self.config.federated
        return float(clients_per_round(fed.clients, fed.participation))

    @classmethod
    def check_config(cls, config: RunConfig) -> None:
        """Refuse, in one line, options this mechanism cannot protect (before any data is loaded)."""

    def check(self) -> None:
        """Refuse, in one line, a configuration this mechanism cannot protect, given its clients' sizes."""

    def participation(self, stream: Stream) -> Schedule:
        """⌈p·N⌉ clients each round: drawn without replacement, or the first ones every round (`first`)."""
        fed = self.config.federated
        per_round = clients_per_round(fed.clients, fed.participation)
        if fed.client_selection == "first":
            return [list(range(per_round)) for _ in range(fed.rounds)]
        return [sorted(stream.choice(fed.clients, per_round).tolist()) for _ in range(fed.rounds)]

    def exposures(self, schedule: Schedule) -> list[Exposure]:
        """One per protected unit; none for a mechanism without an accountant."""
        return []

    def calibrate(self, schedule: Schedule) -> None:
        """σ_k for each unit: its own smallest σ within (ε, δ) for its rate and steps, or with
        `--calibration shared` the worst unit's σ for every unit (a unit that never takes part gets 0)."""
        privacy = self.config.privacy
        exposures = self.exposures(schedule)

        def smallest(group: list[Exposure]) -> float:
            return calibrate_noise(target_epsilon=privacy.eps, delta=privacy.delta, exposures=group, accountant=privacy.accountant)

        if privacy.calibration == "shared":
            sigma = smallest([e for e in exposures if e.steps]) if any(e.steps for e in exposures) else 0.0
            self.noise_multipliers = [sigma if e.steps else 0.0 for e in exposures]
        else:
            own = {e: smallest([e]) for e in set(exposures) if e.steps}  # equal exposures calibrate once
            self.noise_multipliers = [own.get(e, 0.0) for e in exposures]

    def spent(self, schedule: Schedule) -> list[float]:
        """ε spent by each protected unit over the rounds of `schedule` (a prefix of the calibrated one);
        [inf] for a mechanism that the accountant is told nothing of."""
        privacy = self.config.privacy
        exposures = self.exposures(schedule)
        if not exposures:
            return [math.inf]
        return [
            epsilon(noise_multiplier=sigma, sample_rate=e.sample_rate, steps=e.steps, delta=privacy.delta, accountant=privacy.accountant)
            for e, sigma in zip(exposures, self.noise_multipliers)
        ]

    def state(self) -> dict[str, list[float]]:
        """What a checkpoint keeps: σ_k (calibrated before training, or learnt while training)."""
        return {"noise_multipliers": list(self.noise_multipliers)}

    def load_state(self, state: dict[str, list[float]]) -> None:
        self.noise_multipliers = list(state["noise_multipliers"])

    clip_examples: float | None = None

    def draw_batches(self, client: int, steps: int, stream: Stream) -> list[torch.Tensor]:
        """Batches of --batch-size examples for a round's `steps` local steps: each the head of a fresh
        shuffle (`fresh`), or consecutive slices of one shuffle, a short last batch and then a new shuffle
        (`epoch`, as a shuffling data loader walked from the start of each round)."""
        import torch

        size, batch = self.client_sizes[client], self.config.training.batch_size
        if self.config.training.batch_order == "fresh":
            return [torch.from_numpy(stream.permutation(size)[:batch]) for _ in range(steps)]
        batches: list[torch.Tensor] = []
        while len(batches) < steps:
            batches += torch.from_numpy(stream.permutation(size)).split(batch)
        return batches[:steps]

    def privatize(self, summed: State, count: int, client: int, stream: Stream) -> State:
        """The mean gradient over the step's `count` examples."""
        return {name: g / max(count, 1) for name, g in summed.items()}

    def aggregate(self, global_state: State, names: list[str], deltas: list[State], weights: list[float], stream: Stream) -> State:
        """FedAvg: the global state moves by the weighted mean of the clients' updates."""
        return fedavg_step(global_state, names, deltas, weights)

    def client_records(self, clients_labels: list[torch.Tensor], num_classes: int, secret: bool) -> list[dict]:
        """What the results record about each client. With secret randomness only what the accounting
        treats as public: nothing by default (a mechanism says what it publishes)."""
        import torch

        if secret:
            return []
        return [
            {"examples": len(labels), "labels": torch.bincount(labels, minlength=num_classes).tolist()}
            for labels in clients_labels
        ]


def noise_like(summed: State, std: float, stream: Stream) -> State:
    """Gaussian noise of `std` for every tensor of `summed`, drawn in its (fixed) order on the CPU."""
    return {name: stream.normal(g.shape, std).to(g.device) for name, g in summed.items()}


MECHANISMS: Registry[type[Mechanism]] = Registry("privacy mechanism")


def register_mechanism(cls: type[Mechanism]) -> type[Mechanism]:
    return MECHANISMS.add(cls.name, cls)


def load_mechanisms() -> Registry[type[Mechanism]]:
    import dpfl_bench.privacy.mechanisms  # noqa: F401  (registers the built-in ones)

    return MECHANISMS


def mechanism_of(config: RunConfig) -> type[Mechanism]:
    """The run's mechanism: its --dp-level, or `none` for a non-private run (--eps inf)."""
    return load_mechanisms().get("none" if math.isinf(config.privacy.eps) else config.privacy.dp_level)


def create_mechanism(config: RunConfig, client_sizes: list[int]) -> Mechanism:
    return mechanism_of(config)(config, client_sizes)


def protected_unit(config: RunConfig) -> str | None:
    """What --dp-level protects (and an audit inserts), also for a non-private run of that level."""
    return load_mechanisms().get(config.privacy.dp_level).unit

