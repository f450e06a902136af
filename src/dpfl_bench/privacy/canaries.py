"""Canaries for the empirical privacy audit (`--audit-canaries M`): inserted into training, scored after.

Every canary is inserted with probability 1/2 (a secret draw, its own stream) and then enters training
exactly as an example (sample level) or a client (client level) does, with norm at most the clipping bound.

- Sample level (`ExampleCanaries`; white-box gradient canaries, Nasr et al. 2023 and Steinke et al. 2023):
  the canaries belong to one client's dataset (--audit-client). An inserted canary is Poisson-sampled at
  the client's rate like any example, and its gradient enters the clipped sum before the noise. Each is a
  Dirac canary: the clipping norm on one coordinate, at each step the i-th quietest of what the step
  trains by the released steps so far (that choice is our design: docs/privacy-audit.md measures it).
  Scores: its coordinate's value in each privatized step, summed over the client's steps, and the largest
  of them; the bounds take the better at half the significance.
- Client level (`ClientCanaries`; canary clients, Andrew et al. 2024): each canary i is a fixed random
  sign vector s_i over all the trainable parameters (seeded: the auditor knows them). An inserted canary
  client joins each round with probability p like any client, and its update, clip · s_i restricted to
  what the round aggregates and scaled to norm C, enters the server's sum before the noise. Scores: the
  cosine of s_i with the global model's total change, and the largest cosine with one round's change.

The canaries train with the model like real data: that is what they cost in accuracy.
"""

import math

import numpy as np
import torch

from dpfl_bench.adapters import TrainableParams
from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.method import Factor
from dpfl_bench.privacy.audit import fdp_lower_bound, gaussian_estimate, one_run_lower_bound
from dpfl_bench.privacy.mechanism import Mechanism, protected_unit
from dpfl_bench.privacy.randomness import SERVER, Purpose, Randomness
from dpfl_bench.server import State

CONFIDENCE = 0.95
SCORE_CHUNK = 256  # canaries unpacked at a time when scoring
SEEN_BEFORE_QUIET = 2  # released steps a coordinate must have been in before it can be called quiet


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
        return {"audit_canaries": 0, "audit_eps_lower": math.nan, "audit_eps_lower_fdp": math.nan, "audit_eps_estimate": math.nan}

    def state(self) -> dict[str, torch.Tensor]:
        """What the audit has accumulated so far, for a checkpoint."""
        return {}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        pass


def lower_bounds(statistics: list[np.ndarray], inserted: np.ndarray, delta: float) -> dict[str, float]:
    """Both lower bounds, each the better over the canaries' `statistics` (scores), which share the
    significance equally so that each bound holds at CONFIDENCE as a whole."""
    confidence = 1 - (1 - CONFIDENCE) / len(statistics)
    return {name: max(bound(s, inserted, delta=delta, confidence=confidence) for s in statistics)
            for name, bound in (("audit_eps_lower", one_run_lower_bound), ("audit_eps_lower_fdp", fdp_lower_bound))}


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
    """Gradient canaries in one client's dataset (sample level), each a single coordinate (a Dirac canary):
    at every step, canary i's gradient is `clip` on the i-th quietest coordinate of what the step trains,
    quietest meaning the smallest summed magnitude over the client's released steps so far (ties broken by
    a fixed random order), among coordinates seen in at least SEEN_BEFORE_QUIET of them (one step says
    little: LoRA's A has no gradient at all while B is still zero). Until enough are, the canaries' gradient
    is zero. Where the real gradients are exactly zero (dead channels, untouched rows), a canary's score
    holds its own signal and the noise, nothing of the data; distinct coordinates keep canaries out of
    each other's scores. Choosing from released steps is an adaptive choice of each example's gradient,
    which the accountant's composition already covers."""

    def __init__(self, count: int, client: int, rate: float, clip: float, shapes: dict[str, torch.Size], randomness: Randomness) -> None:
        self.count, self.client, self.rate, self.clip, self.randomness = count, client, rate, clip, randomness
        self.offsets, start = {}, 0
        for name, shape in shapes.items():
            self.offsets[name] = (start, start + math.prod(shape))
            start += math.prod(shape)
        self.inserted = randomness.stream(Purpose.CANARY_INCLUSION, 0, client).bernoulli(count, 0.5)
        self.order = randomness.stream(Purpose.CANARY_DIRECTIONS).permutation(start)  # the fixed tie-break
        self.loudness = np.zeros(start)  # Σ over released steps of |step| per coordinate
        self.seen = np.zeros(start, dtype=np.int64)  # released steps each coordinate was in
        self.sums, self.maxima = np.zeros(count), np.zeros(count)  # per canary, over the client's steps
        self.steps = 0
        self._round, self._sampling, self._where = -1, None, {}

    def state(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(np.array(value)) for name, value in
                [("loudness", self.loudness), ("seen", self.seen), ("sums", self.sums), ("maxima", self.maxima),
                 ("steps", self.steps)]}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        if "loudness" not in state:
            raise UserError("this checkpoint's audit was written by an earlier canary design; run again with --restart")
        self.loudness, self.seen, self.sums, self.maxima = (state[k].numpy().copy() for k in ("loudness", "seen", "sums", "maxima"))
        self.steps = int(state["steps"])

    def _quietest(self, names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Each canary's coordinate for this step, as {name: (the canaries in that tensor, their positions in
        it)}; empty while fewer than `count` coordinates have been seen often enough."""
        coordinates = np.concatenate([np.arange(*self.offsets[n]) for n in names])
        coordinates = coordinates[self.seen[coordinates] >= SEEN_BEFORE_QUIET]
        if len(coordinates) < self.count:
            return {}
        key = self.loudness[coordinates]
        cut = np.partition(key, self.count - 1)[self.count - 1]
        candidates = coordinates[key <= cut]
        chosen = candidates[np.lexsort((self.order[candidates], self.loudness[candidates]))][: self.count]
        where = {}
        for name in names:
            start, end = self.offsets[name]
            canaries = np.flatnonzero((chosen >= start) & (chosen < end))
            where[name] = (canaries, chosen[canaries] - start)
        return where

    def insert(self, client: int, round: int, summed: State) -> tuple[State, int]:
        if client != self.client:
            return summed, 0
        if round != self._round:  # each client-round draws its canaries' Poisson masks from its own stream
            self._round, self._sampling = round, self.randomness.stream(Purpose.CANARY_SAMPLING, round, client)
        self._where = self._quietest(list(summed))
        sampled = self.inserted & self._sampling.bernoulli(self.count, self.rate)  # drawn every step all the same
        if not sampled.any():
            return summed, 0
        if not self._where:  # sampled, with a zero gradient
            return summed, int(sampled.sum())
        out = dict(summed)
        for name, (canaries, positions) in self._where.items():
            hit = positions[sampled[canaries]]
            if len(hit):
                flat = summed[name].flatten().clone()
                flat[torch.from_numpy(hit).to(flat.device)] += self.clip
                out[name] = flat.view_as(summed[name])
        return out, int(sampled.sum())

    def observe(self, client: int, privatized: State) -> None:
        if client != self.client:
            return
        values = np.zeros(self.count)
        for name, g in privatized.items():
            start, end = self.offsets[name]
            flat = g.detach().flatten().double().cpu().numpy()
            if self._where:
                canaries, positions = self._where[name]
                values[canaries] = flat[positions]
            self.loudness[start:end] += np.abs(flat)
            self.seen[start:end] += 1
        self.sums += values
        self.maxima = values if self.steps == 0 else np.maximum(self.maxima, values)
        self.steps += 1

    def estimates(self, delta: float) -> dict[str, float]:
        statistics = [self.sums, self.maxima]  # the sum suits steady signals, the largest step rare sampling
        return {"audit_canaries": self.count, **lower_bounds(statistics, self.inserted, delta),
                "audit_eps_estimate": gaussian_estimate(self.sums, self.inserted, delta=delta)}


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
        return {"audit_canaries": self.count, **lower_bounds(statistics, self.inserted, delta),
                "audit_eps_estimate": max(gaussian_estimate(s, self.inserted, delta=delta) for s in statistics)}


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
    if unit == "example":
        client = config.audit.audit_client
        return ExampleCanaries(count, client, mechanism.sample_rates[client], config.privacy.clip, shapes, randomness)
    if fed.weighting != "uniform":
        raise UserError("canary clients join FedAvg with uniform weights; drop --weighting size to audit this run")
    bits = randomness.stream(Purpose.CANARY_DIRECTIONS).bytes(count * math.ceil(sum(math.prod(s) for s in shapes.values()) / 8))
    return ClientCanaries(count, fed.participation, config.privacy.clip, Directions(count, shapes, bits), randomness)
