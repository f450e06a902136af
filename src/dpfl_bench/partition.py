"""Splitting a training set across clients. (Which clients take part in each round is the privacy
mechanism's `participation`.)"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from dpfl_bench.config import RunConfig
from dpfl_bench.errors import UserError
from dpfl_bench.privacy.randomness import Purpose, Randomness, Stream

if TYPE_CHECKING:
    from dpfl_bench.tasks import Examples, Task


def partition(train: Examples, config: RunConfig, randomness: Randomness) -> list[np.ndarray]:
    """Each client's indices into `train` (a task's `Task.load(...).train`, never its validation split)."""
    fed, rng = config.federated, randomness.stream(Purpose.SPLIT)
    if fed.partition == "iid":
        return iid_partition(len(train), fed.clients, size=fed.client_size, rng=rng)
    if fed.partition == "dirichlet-mix":
        return dirichlet_mix_partition(train.labels.numpy(), fed.clients, alpha=fed.dirichlet_alpha, size=fed.client_size, rng=rng)
    return dirichlet_partition(
        train.labels.numpy(), fed.clients, alpha=fed.dirichlet_alpha, min_size=fed.min_partition_size, rng=rng
    )


def counted_client_sizes(task: Task, config: RunConfig) -> list[int] | None:
    """Each client's number of examples as `partition` would give them, where counts alone decide it: every
    client --client-size examples, or an iid split of a task that counts its training examples without
    loading them (`Task.count_train`). None where only the data can tell (a label-skewed split)."""
    fed = config.federated
    total = None if task.count_train is None else task.train_size(config.sources)
    if total is not None:
        check_client_size(total, fed.clients, fed.client_size)  # as `partition` would, without the data
    if fed.client_size:
        return [fed.client_size] * fed.clients
    if fed.partition != "iid" or total is None:
        return None
    return [total // fed.clients + (k < total % fed.clients) for k in range(fed.clients)]  # as np.array_split


def iid_partition(num_examples: int, num_clients: int, *, size: int = 0, rng: Stream) -> list[np.ndarray]:
    """An equal random split: `size` examples per client, or (size 0) the whole set, client sizes then
    differing by at most one."""
    check_client_size(num_examples, num_clients, size)
    used = size * num_clients or num_examples
    return [np.sort(part) for part in np.array_split(rng.permutation(num_examples)[:used], num_clients)]


def check_client_size(num_examples: int, num_clients: int, size: int) -> None:
    """Refuse a split that would leave a client empty, or whose clients of `size` examples each (0: the
    whole set split) need more examples than the training set holds: clients never share an example."""
    if num_examples < num_clients:
        raise UserError(f"{num_examples} training examples cannot be split across {num_clients} clients; use fewer --clients")
    if size * num_clients > num_examples:
        raise UserError(
            f"{num_clients} clients of {size} examples (--client-size) need {size * num_clients} training examples, "
            f"but the training set has {num_examples} (after its validation split); lower --client-size or --clients"
        )


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


def dirichlet_mix_partition(
    labels: np.ndarray, num_clients: int, *, alpha: float, size: int, rng: Stream
) -> list[np.ndarray]:
    """Label skew with equal clients: each client draws its class proportions from Dir(alpha·1) and takes
    `size` examples (0: len(labels) // num_clients), disjoint from every other client's.

    A client's proportions become counts by largest-remainder rounding; when a class has fewer examples
    left than the client's share of it, the client takes all that is left and spreads the rest over its
    other classes in proportion to its draw (see `class_counts`). Clients draw in order, from class pools
    shuffled once.
    """
    check_client_size(len(labels), num_clients, size)
    size = size or len(labels) // num_clients
    classes = np.unique(labels)
    pools = [members[rng.permutation(len(members))] for members in (np.flatnonzero(labels == c) for c in classes)]
    taken = np.zeros(len(classes), dtype=int)  # how much of each pool earlier clients took
    partition = []
    for _ in range(num_clients):
        counts = class_counts(size, rng.dirichlet(np.full(len(classes), alpha)), np.array([len(p) for p in pools]) - taken)
        partition.append(np.sort(np.concatenate([pool[t : t + n] for pool, t, n in zip(pools, taken, counts)])))
        taken += counts
    return partition


def class_counts(total: int, proportions: np.ndarray, available: np.ndarray) -> np.ndarray:
    """Integer counts summing to `total`, none above what is `available`, proportional to `proportions`
    where the pools allow: a class whose share exceeds its pool gets the whole pool and the remainder is
    shared among the other classes in proportion to theirs (by what is left in their pools if all of
    theirs are 0), then shares are rounded by largest remainder. Needs total <= available.sum()."""
    counts = np.zeros(len(proportions), dtype=int)
    open_ = available > 0
    while total > 0:
        weights = np.where(open_, proportions, 0.0)
        if weights.sum() <= 0:
            weights = np.where(open_, available - counts, 0).astype(float)
        share = total * weights / weights.sum()
        full = open_ & (share >= available - counts)
        if full.any():
            total -= int((available - counts)[full].sum())
            counts[full] = available[full]
            open_ &= ~full
            continue
        rounded = np.floor(share).astype(int)
        remainders = np.argsort(-(share - rounded), kind="stable")[: total - rounded.sum()]
        rounded[remainders] += 1
        counts += rounded
        total = 0
    return counts


def clients_per_round(num_clients: int, participation: float) -> int:
    """⌈p·N⌉, computed so that float error cannot add a client (0.07 · 100 is 7.000000000000001)."""
    return max(1, math.ceil(round(participation * num_clients, 9)))

