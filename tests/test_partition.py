"""Splitting data across clients (iid, Dirichlet label skew) and the mechanisms' participation schedules."""

import math

import numpy as np
import pytest

from dpfl_bench.config import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.partition import dirichlet_partition, iid_partition
from dpfl_bench.privacy.mechanism import create_mechanism
from dpfl_bench.privacy.randomness import Purpose, Randomness


def split(seed: int):
    return Randomness(seed).stream(Purpose.SPLIT)


def participation_schedule(clients: int, participation: float, rounds: int, *, seed: int, level: str = "sample") -> list[list[int]]:
    """The schedule a run of that level draws."""
    options = {"task": "synthetic", "clients": clients, "participation": participation, "rounds": rounds, "seed": seed, "dp-level": level}
    mechanism = create_mechanism(build_config(options), [1000] * clients)
    return mechanism.participation(Randomness(seed).stream(Purpose.PARTICIPATION))


def assert_disjoint_cover(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n, "every example is assigned exactly once (no duplicates, nothing lost)"
    assert np.array_equal(np.sort(joined), np.arange(n))


def balanced_labels(per_class: int = 200, classes: int = 10) -> np.ndarray:
    return np.repeat(np.arange(classes), per_class)


# ---------------------------------------------------------------------------------------------- iid


@pytest.mark.parametrize("n, clients", [(600, 3), (601, 3), (10, 10), (103, 7), (1000, 1)])
def test_iid_is_disjoint_covering_and_balanced(n, clients):
    parts = iid_partition(n, clients, rng=split(3))
    assert len(parts) == clients
    assert_disjoint_cover(parts, n)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_iid_is_random_but_reproducible():
    a = iid_partition(100, 4, rng=split(0))
    b = iid_partition(100, 4, rng=split(0))
    c = iid_partition(100, 4, rng=split(1))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))
    # a random split, not contiguous blocks
    assert not np.array_equal(a[0], np.arange(25))


def test_iid_more_clients_than_examples_is_a_user_error():
    with pytest.raises(UserError, match="fewer --clients"):
        iid_partition(3, 4, rng=split(0))


# ---------------------------------------------------------------------------------------- dirichlet


@pytest.mark.parametrize("alpha", [100.0, 1.0, 0.5, 0.1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_is_disjoint_covering_and_respects_min_size(alpha, seed):
    labels = balanced_labels()
    min_size = 20
    parts = dirichlet_partition(labels, 10, alpha=alpha, min_size=min_size, rng=split(seed))
    assert len(parts) == 10
    assert_disjoint_cover(parts, len(labels))
    assert min(len(p) for p in parts) >= min_size


def test_dirichlet_is_reproducible_by_seed():
    labels = balanced_labels()
    a = dirichlet_partition(labels, 5, alpha=0.5, min_size=10, rng=split(4))
    b = dirichlet_partition(labels, 5, alpha=0.5, min_size=10, rng=split(4))
    c = dirichlet_partition(labels, 5, alpha=0.5, min_size=10, rng=split(5))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(len(x) == len(y) and np.array_equal(x, y) for x, y in zip(a, c))


def _skew(labels: np.ndarray, parts: list[np.ndarray], classes: int) -> tuple[float, float]:
    """Mean over clients of the largest class share, and of the label entropy (nats)."""
    max_shares, entropies = [], []
    for part in parts:
        counts = np.bincount(labels[part], minlength=classes)
        share = counts / counts.sum()
        max_shares.append(share.max())
        nz = share[share > 0]
        entropies.append(float(-(nz * np.log(nz)).sum()))
    return float(np.mean(max_shares)), float(np.mean(entropies))


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
    classes = 10
    labels = balanced_labels(per_class=200, classes=classes)
    results = {}
    for alpha in (100.0, 1.0, 0.1):
        stats = [
            _skew(labels, dirichlet_partition(labels, 10, alpha=alpha, min_size=1, rng=split(seed)), classes)
            for seed in range(5)
        ]
        results[alpha] = tuple(np.mean(stats, axis=0))
    (share_100, ent_100), (share_1, ent_1), (share_01, ent_01) = results[100.0], results[1.0], results[0.1]
    # the largest class share grows and the entropy falls, with clear margins
    assert share_100 < share_1 - 0.1 < share_01 - 0.2, results
    assert ent_100 > ent_1 + 0.2 > ent_01 + 0.4, results
    # alpha = 100 is close to iid: every client holds nearly the uniform share of every class
    assert share_100 < 0.2 and ent_100 > 0.95 * math.log(classes), results
    # alpha = 0.1 is strongly skewed: on average one class holds most of a client's data
    assert share_01 > 0.5, results


def test_dirichlet_impossible_min_size_raises_user_error_naming_the_fix():
    labels = balanced_labels(per_class=10, classes=10)  # 100 examples
    with pytest.raises(UserError) as info:
        dirichlet_partition(labels, 10, alpha=0.5, min_size=50, rng=split(0))  # 10 x 50 > 100: impossible
    message = str(info.value)
    assert "--dirichlet-alpha" in message
    assert "--min-partition-size" in message
    assert "--clients" in message


# ------------------------------------------------------------------------------------ participation


@pytest.mark.parametrize(
    "clients, participation", [(1, 1.0), (4, 0.5), (10, 0.1), (10, 0.25), (7, 0.3), (10, 1.0), (20, 0.33)]
)
def test_schedule_picks_ceil_p_n_distinct_clients_each_round(clients, participation):
    rounds = 12
    schedule = participation_schedule(clients, participation, rounds, seed=0)
    assert len(schedule) == rounds
    expected = math.ceil(participation * clients)
    for chosen in schedule:
        assert len(chosen) == expected
        assert len(set(chosen)) == expected, "no client is sampled twice in a round"
        assert all(isinstance(k, int) and 0 <= k < clients for k in chosen)


def test_full_participation_takes_every_client_every_round():
    assert participation_schedule(5, 1.0, 3, seed=9) == [[0, 1, 2, 3, 4]] * 3


def test_schedule_is_reproducible_by_seed_and_differs_across_seeds():
    a = participation_schedule(20, 0.25, 10, seed=0)
    assert a == participation_schedule(20, 0.25, 10, seed=0)
    assert a != participation_schedule(20, 0.25, 10, seed=1)
    # and it is not the same set of clients every round
    assert len({tuple(r) for r in a}) > 1


@pytest.mark.parametrize("clients, participation, expected", [(100, 0.07, 7), (25, 0.28, 7), (100, 0.55, 55)])
def test_schedule_size_is_not_inflated_by_float_rounding(clients, participation, expected):
    schedule = participation_schedule(clients, participation, 1, seed=0)
    assert len(schedule[0]) == expected


def test_client_level_samples_each_client_independently_with_probability_p():
    schedule = participation_schedule(20, 0.3, 400, seed=0, level="client")
    joined = np.zeros(20)
    for chosen in schedule:
        assert chosen == sorted(set(chosen))
        joined[chosen] += 1
    sizes = {len(chosen) for chosen in schedule}
    assert len(sizes) > 3  # Poisson: the round size varies (Binomial(20, 0.3))
    assert np.abs(joined / 400 - 0.3).max() < 4 * math.sqrt(0.3 * 0.7 / 400)
