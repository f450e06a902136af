"""Splitting a training set across clients, and choosing which clients take part in each round."""

import math

import numpy as np

from dpfl_bench.errors import UserError


def iid_partition(num_examples: int, num_clients: int, *, seed: int) -> list[np.ndarray]:
    """An equal random split: client sizes differ by at most one."""
    if num_examples < num_clients:
        raise UserError(f"{num_examples} training examples cannot be split across {num_clients} clients; use fewer --clients")
    order = np.random.default_rng([seed, 0]).permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, *, alpha: float, min_size: int, seed: int, max_tries: int = 100
) -> list[np.ndarray]:
    """Label skew: each class is split across clients in proportions drawn from Dir(alpha).

    Redrawn until every client holds at least `min_size` examples (the usual convention, as in Flower's
    DirichletPartitioner); smaller alpha gives each client fewer classes.
    """
    rng = np.random.default_rng([seed, 1])
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_clients, alpha)))[:-1] * len(members)).astype(int)
            for client, piece in enumerate(np.split(members, cuts)):
                parts[client].append(piece)
        partition = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(p) for p in partition) >= min_size:
            return partition
    raise UserError(
        f"no Dirichlet(alpha={alpha}) split gave every one of {num_clients} clients {min_size} examples in "
        f"{max_tries} tries; raise --dirichlet-alpha, lower --min-partition-size or use fewer --clients"
    )


def clients_per_round(num_clients: int, participation: float) -> int:
    """⌈p·N⌉, computed so that float error cannot add a client (0.07 · 100 is 7.000000000000001)."""
    return max(1, math.ceil(round(participation * num_clients, 9)))


def participation_schedule(
    num_clients: int, participation: float, rounds: int, *, seed: int, poisson: bool = False
) -> list[list[int]]:
    """Which clients take part in each round. It depends only on the seed, so privacy can be calibrated
    for the real schedule before training starts.

    By default each round takes ⌈p·N⌉ clients without replacement. With `poisson`, each client joins each
    round independently with probability p (client-level DP: the sampler its accountant analyses)."""
    rng = np.random.default_rng([seed, 2])
    if poisson:
        return [np.flatnonzero(rng.random(num_clients) < participation).tolist() for _ in range(rounds)]
    per_round = clients_per_round(num_clients, participation)
    return [sorted(rng.choice(num_clients, size=per_round, replace=False).tolist()) for _ in range(rounds)]
