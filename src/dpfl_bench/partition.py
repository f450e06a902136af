"""Splitting a training set across clients. (Which clients take part in each round is the privacy
mechanism's `participation`.)"""

import math

import numpy as np

from dpfl_bench.errors import UserError
from dpfl_bench.privacy.randomness import Stream


def iid_partition(num_examples: int, num_clients: int, *, rng: Stream) -> list[np.ndarray]:
    """An equal random split: client sizes differ by at most one."""
    if num_examples < num_clients:
        raise UserError(f"{num_examples} training examples cannot be split across {num_clients} clients; use fewer --clients")
    order = rng.permutation(num_examples)
    return [np.sort(part) for part in np.array_split(order, num_clients)]


def dirichlet_partition(
    labels: np.ndarray, num_clients: int, *, alpha: float, min_size: int, rng: Stream, max_tries: int = 100
) -> list[np.ndarray]:
    """Label skew: each class is split across clients in proportions drawn from Dir(alpha).

    Redrawn until every client holds at least `min_size` examples (the usual convention, as in Flower's
    DirichletPartitioner); smaller alpha gives each client fewer classes.
    """
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        for c in classes:
            members = np.flatnonzero(labels == c)
            members = members[rng.permutation(len(members))]
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

