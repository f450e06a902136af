"""Canaries for the empirical privacy audit (`--audit-canaries M`): inserted into training, scored after.

Every canary i is a fixed random sign vector s_i over all the trainable parameters (seeded: the auditor
knows them), inserted with probability 1/2 (a secret draw). In the space a step trains (or a round
aggregates), S, its update is clip · s_i|S / √|S|: norm exactly C, and since all canaries' restrictions
have the same norm, scores over steps that train different factors add up as one inner product.

- Sample level (`ExampleCanaries`; white-box gradient canaries, Nasr et al. 2023 and Steinke et al. 2023):
  the canaries belong to one client's dataset (--audit-client). An inserted canary is Poisson-sampled at
  the client's rate like any example, and its gradient enters the clipped sum before the noise. Score:
  the inner product of s_i|S / √|S| with each privatized step, summed over the client's steps.
- Client level (`ClientCanaries`; canary clients, Andrew et al. 2024): an inserted canary client joins
  each round with probability p like any client, and its update enters the server's sum before the
  noise. Scores: the cosine of s_i with the global model's total change, and the largest cosine with one
  round's change; the lower bound takes the better of the two at half the significance each.

The canaries train with the model like real data: that is what they cost in accuracy.
"""

import math

import numpy as np
import torch

from dpfl_bench.adapters import TrainableParams
from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.method import Factor
from dpfl_bench.privacy.audit import gaussian_estimate, one_run_lower_bound
from dpfl_bench.privacy.mechanism import Mechanism, protected_unit
from dpfl_bench.privacy.randomness import SERVER, Purpose, Randomness
from dpfl_bench.server import State

CONFIDENCE = 0.95
SCORE_CHUNK = 256  # canaries unpacked at a time when scoring


class NoAudit:
    """What the core calls when nothing is audited: every hook leaves training as it is."""

    def insert(self, client: int, round: int, summed: State) -> tuple[State, int]:
        return summed, 0

    def observe(self, client: int, privatized: State) -> None:
        pass

    def canary_updates(self, round: int, names: list[str]) -> list[State]:
        return []

    def observe_round(self, old: State, new: State, names: list[str]) -> None:
        pass

    def estimates(self, delta: float) -> dict[str, float]:
        return {"audit_canaries": 0, "audit_eps_lower": math.nan, "audit_eps_estimate": math.nan}

    def state(self) -> dict[str, torch.Tensor]:
        """What the audit has accumulated so far, for a checkpoint."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass


class Directions:
    """`count` random sign vectors over the trainable parameters (in their fixed order), kept as bits."""

    def __init__(self, count: int, shapes: dict[str, torch.Size], bits: bytes) -> None:
        self.slices, start = {}, 0
        for name, shape in shapes.items():
            self.slices[name] = (start, start + math.prod(shape), shape)
            start += math.prod(shape)
        self.size = start
        self.bits = np.frombuffer(bits, dtype=np.uint8).reshape(count, -1)

    def signs(self, rows: np.ndarray) -> torch.Tensor:
        """[len(rows), size] of ±1."""
        unpacked = np.unpackbits(self.bits[rows], axis=1, count=self.size)
        return torch.from_numpy(unpacked).float().mul_(2).sub_(1)

    def restrict(self, signs: torch.Tensor, names: list[str], norm: float) -> State:
        """A [size] vector of (summed) signs restricted to `names`, scaled so that one canary's restriction
        has norm `norm`."""
        scale = norm / math.sqrt(sum(self.slices[n][1] - self.slices[n][0] for n in names))
        out = {}
        for n in names:
            start, end, shape = self.slices[n]
            out[n] = signs[start:end].reshape(shape) * scale
        return out

    def flat(self, state: State, names: list[str]) -> torch.Tensor:
        """`state` over `names` as one float64 vector of `size`, zero elsewhere."""
        out = torch.zeros(self.size, dtype=torch.float64)
        for n in names:
            start, end, _ = self.slices[n]
            out[start:end] = state[n].detach().flatten().double().cpu()
        return out

    def project(self, vector: torch.Tensor) -> np.ndarray:
        """<s_i, vector> for every canary."""
        return np.concatenate([
            (self.signs(np.arange(i, min(i + SCORE_CHUNK, len(self.bits)))).double() @ vector).numpy()
            for i in range(0, len(self.bits), SCORE_CHUNK)
        ])


class ExampleCanaries(NoAudit):
    """Gradient canaries in one client's dataset (sample level)."""

    def __init__(self, count: int, client: int, rate: float, clip: float, directions: Directions, randomness: Randomness) -> None:
        self.count, self.client, self.rate, self.clip = count, client, rate, clip
        self.directions, self.randomness = directions, randomness
        self.inserted = randomness.stream(Purpose.CANARY_INCLUSION, 0, client).bernoulli(count, 0.5)
        self.accumulated = torch.zeros(directions.size, dtype=torch.float64)  # Σ_t pad(g̃_t) / √|S_t|
        self._round, self._sampling = -1, None

    def state(self) -> dict[str, torch.Tensor]:
        return {"accumulated": self.accumulated.clone()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.accumulated = state["accumulated"].clone()

    def insert(self, client: int, round: int, summed: State) -> tuple[State, int]:
        if client != self.client:
            return summed, 0
        if round != self._round:  # each client-round draws its canaries' Poisson masks from its own stream
            self._round, self._sampling = round, self.randomness.stream(Purpose.CANARY_SAMPLING, round, client)
        chosen = np.flatnonzero(self.inserted & self._sampling.bernoulli(self.count, self.rate))
        if len(chosen) == 0:
            return summed, 0
        names = list(summed)
        canaries = self.directions.restrict(self.directions.signs(chosen).sum(dim=0), names, self.clip)
        return {n: g + canaries[n].to(g.device) for n, g in summed.items()}, len(chosen)

    def observe(self, client: int, privatized: State) -> None:
        if client == self.client:
            names = list(privatized)
            size = sum(privatized[n].numel() for n in names)
            self.accumulated += self.directions.flat(privatized, names) / math.sqrt(size)

    def estimates(self, delta: float) -> dict[str, float]:
        scores = self.directions.project(self.accumulated)
        return {
            "audit_canaries": self.count,
            "audit_eps_lower": one_run_lower_bound(scores, self.inserted, delta=delta, confidence=CONFIDENCE),
            "audit_eps_estimate": gaussian_estimate(scores, self.inserted, delta=delta),
        }


class ClientCanaries(NoAudit):
    """Canary clients (client level)."""

    def __init__(self, count: int, participation: float, clip: float, directions: Directions, randomness: Randomness) -> None:
        self.count, self.participation, self.clip = count, participation, clip
        self.directions, self.randomness = directions, randomness
        self.inserted = randomness.stream(Purpose.CANARY_INCLUSION, 0, SERVER).bernoulli(count, 0.5)
        self.total_change = torch.zeros(directions.size, dtype=torch.float64)
        self.best_round_cosine = np.full(count, -np.inf)

    def state(self) -> dict[str, torch.Tensor]:
        return {"total_change": self.total_change.clone(), "best_round_cosine": torch.from_numpy(self.best_round_cosine.copy())}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.total_change = state["total_change"].clone()
        self.best_round_cosine = state["best_round_cosine"].numpy().copy()

    def canary_updates(self, round: int, names: list[str]) -> list[State]:
        sampling = self.randomness.stream(Purpose.CANARY_SAMPLING, round, SERVER)
        chosen = np.flatnonzero(self.inserted & sampling.bernoulli(self.count, self.participation))
        return [self.directions.restrict(self.directions.signs(np.array([i]))[0], names, self.clip) for i in chosen]

    def observe_round(self, old: State, new: State, names: list[str]) -> None:
        change = self.directions.flat({n: new[n] - old[n] for n in names}, names)
        self.total_change += change
        norm = float(change.norm())
        if norm > 0:
            size = sum(new[n].numel() for n in names)
            self.best_round_cosine = np.maximum(self.best_round_cosine, self.directions.project(change) / (math.sqrt(size) * norm))

    def estimates(self, delta: float) -> dict[str, float]:
        norm = float(self.total_change.norm())
        final = self.directions.project(self.total_change) / (math.sqrt(self.directions.size) * norm) if norm else np.zeros(self.count)
        statistics = [final, np.where(np.isfinite(self.best_round_cosine), self.best_round_cosine, 0.0)]
        confidence = 1 - (1 - CONFIDENCE) / len(statistics)
        return {
            "audit_canaries": self.count,
            "audit_eps_lower": max(one_run_lower_bound(s, self.inserted, delta=delta, confidence=confidence) for s in statistics),
            "audit_eps_estimate": max(gaussian_estimate(s, self.inserted, delta=delta) for s in statistics),
        }


def create_audit(config: RunConfig, mechanism: Mechanism, params: TrainableParams, randomness: Randomness) -> NoAudit:
    """The run's audit, with its options checked against the run (one line each)."""
    count, fed = config.audit.audit_canaries, config.federated
    if count == 0:
        return NoAudit()
    unit = protected_unit(config)
    if unit is None:
        raise UserError(f"--dp-level {config.privacy.dp_level} cannot be audited; drop --audit-canaries")
    shapes = {n: p.shape for n, p in params.all().items()}
    sizes = {f: sum(p.numel() for p in params.by_factor[f].values()) for f in Factor}
    # The smallest set a step may train: the head and the smallest factor the adapter has.
    smallest = sizes[Factor.HEAD] + min(n for f, n in sizes.items() if f is not Factor.HEAD and n)
    if count > smallest:
        raise UserError(
            f"--audit-canaries {count} is more than the {smallest} parameters the smallest trained set has: canary "
            f"directions could not be told apart; use at most {smallest}"
        )
    bits = randomness.stream(Purpose.CANARY_DIRECTIONS).bytes(count * math.ceil(sum(math.prod(s) for s in shapes.values()) / 8))
    directions = Directions(count, shapes, bits)
    if unit == "example":
        client = config.audit.audit_client
        return ExampleCanaries(count, client, mechanism.sample_rates[client], config.privacy.clip, directions, randomness)
    if fed.weighting != "uniform":
        raise UserError("canary clients join FedAvg with uniform weights; drop --weighting size to audit this run")
    return ClientCanaries(count, fed.participation, config.privacy.clip, directions, randomness)
