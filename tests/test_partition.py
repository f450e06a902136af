"""Splitting data across clients (iid, Dirichlet label skew, Dirichlet class mixes) and the mechanisms'
participation schedules."""

import math

import numpy as np
import pytest

from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.partition import class_counts, dirichlet_mix_partition, dirichlet_partition, iid_partition
from dpfl_bench.privacy.mechanism import create_mechanism
from dpfl_bench.privacy.randomness import Purpose, Randomness


def split(seed: int):
    return Randomness(seed).stream(Purpose.SPLIT)


def participation_schedule(clients: int, participation: float, rounds: int, *, seed: int, level: str = "sample") -> list[list[int]]:
    """The schedule a run of that level draws."""
    options = {"task": "synthetic", "clients": clients, "participation": participation, "rounds": rounds, "seed": seed, "dp-level": level}
    mechanism = create_mechanism(build_config(options), [1000] * clients)
    return mechanism.participation(Randomness(seed).stream(Purpose.PARTICIPATION))


def assert_disjoint_of_size(parts: list[np.ndarray], n: int, size: int) -> None:
    """Every client exactly `size` examples of range(n), no example in two clients."""
    assert [len(p) for p in parts] == [size] * len(parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined), "no example is given to two clients"
    assert joined.min() >= 0 and joined.max() < n


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


@pytest.mark.parametrize("n, clients, size", [(600, 3, 200), (600, 3, 150), (1000, 7, 1), (103, 4, 25)])
def test_iid_with_a_client_size_gives_every_client_exactly_that_many(n, clients, size):
    parts = iid_partition(n, clients, size=size, rng=split(2))
    assert_disjoint_of_size(parts, n, size)
    assert not np.array_equal(np.concatenate(parts)[:size], np.arange(size)), "random examples, not the first ones"


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet-mix"])
def test_clients_needing_more_examples_than_the_training_set_are_refused_naming_the_numbers(partitioner):
    labels = balanced_labels(per_class=10, classes=10)  # 100 examples
    with pytest.raises(UserError) as info:
        if partitioner == "iid":
            iid_partition(100, 4, size=26, rng=split(0))
        else:
            dirichlet_mix_partition(labels, 4, alpha=1.0, size=26, rng=split(0))
    message = str(info.value)
    assert "\n" not in message
    for text in ("4 clients of 26 examples", "need 104", "has 100", "--client-size", "--clients"):
        assert text in message, message


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


@pytest.mark.parametrize(
    "split_with",
    [
        lambda labels, rng: dirichlet_partition(labels, 5, alpha=0.5, min_size=10, rng=rng),
        lambda labels, rng: dirichlet_mix_partition(labels, 5, alpha=0.5, size=100, rng=rng),
    ],
    ids=["dirichlet", "dirichlet-mix"],
)
def test_dirichlet_splits_are_reproducible_by_seed(split_with):
    labels = balanced_labels()
    a, b, c = split_with(labels, split(4)), split_with(labels, split(4)), split_with(labels, split(5))
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


def skew_by_alpha(split_with, labels: np.ndarray, alphas: tuple[float, ...], classes: int) -> list[tuple[float, float]]:
    """(mean largest class share, mean entropy) of `split_with(labels, alpha, rng)` per alpha, over 5 seeds."""
    return [
        tuple(np.mean([_skew(labels, split_with(labels, alpha, split(seed)), classes) for seed in range(5)], axis=0))
        for alpha in alphas
    ]


def test_dirichlet_label_skew_grows_as_alpha_shrinks():
    classes = 10
    labels = balanced_labels(per_class=200, classes=classes)
    results = skew_by_alpha(
        lambda labels, alpha, rng: dirichlet_partition(labels, 10, alpha=alpha, min_size=1, rng=rng), labels, (100.0, 1.0, 0.1), classes
    )
    (share_100, ent_100), (share_1, ent_1), (share_01, ent_01) = results
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


# ------------------------------------------------------------------------------------ dirichlet-mix


@pytest.mark.parametrize("alpha", [100.0, 1.0, 0.1, 0.01])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("size", [50, 180])
def test_dirichlet_mix_gives_every_client_exactly_its_size_disjoint(alpha, seed, size):
    labels = balanced_labels()  # 2,000 examples; 10 x 180 uses 90% of them, so pools run out
    parts = dirichlet_mix_partition(labels, 10, alpha=alpha, size=size, rng=split(seed))
    assert_disjoint_of_size(parts, len(labels), size)


@pytest.mark.parametrize("alpha", [1.0, 0.05])
def test_dirichlet_mix_without_a_client_size_splits_the_whole_set_into_equal_clients(alpha):
    labels = balanced_labels(per_class=101, classes=10)  # 1,010 examples over 4 clients: 252 each, 2 unused
    parts = dirichlet_mix_partition(labels, 4, alpha=alpha, size=0, rng=split(0))
    assert_disjoint_of_size(parts, len(labels), 252)


def test_dirichlet_mix_label_skew_grows_as_alpha_shrinks():
    classes = 10
    labels = balanced_labels(per_class=500, classes=classes)  # pools far larger than the 10 x 100 drawn
    results = skew_by_alpha(
        lambda labels, alpha, rng: dirichlet_mix_partition(labels, 10, alpha=alpha, size=100, rng=rng), labels, (100.0, 1.0, 0.05), classes
    )
    (share_100, ent_100), (share_1, ent_1), (share_005, ent_005) = results
    assert share_100 < share_1 - 0.1 < share_005 - 0.3, results
    assert ent_100 > ent_1 + 0.2 > ent_005 + 0.6, results
    assert share_100 < 0.2 and ent_100 > 0.95 * math.log(classes), results  # near iid
    assert share_005 > 0.7, results  # mostly one class per client


def test_dirichlet_mix_follows_the_drawn_proportions_while_the_pools_last():
    """One client: its counts are its Dir(α) draw times its size, rounded (the same stream, replayed)."""
    labels = balanced_labels(per_class=1000, classes=5)
    (part,) = dirichlet_mix_partition(labels, 1, alpha=1.0, size=333, rng=split(7))
    replay = split(7)
    for _ in range(5):
        replay.permutation(1000)  # the class pools are shuffled first
    proportions = replay.dirichlet(np.ones(5))
    counts = np.bincount(labels[part], minlength=5)
    assert counts.sum() == 333
    assert np.abs(counts - 333 * proportions).max() < 1


def test_class_counts_round_by_largest_remainder():
    counts = class_counts(7, np.array([0.34, 0.33, 0.33]), np.array([100, 100, 100]))
    assert counts.tolist() == [3, 2, 2]  # shares 2.38, 2.31, 2.31: the one extra goes to the largest remainder
    counts = class_counts(10, np.array([0.25, 0.25, 0.5]), np.array([10, 10, 10]))
    assert counts.tolist() == [2, 3, 5] or counts.tolist() == [3, 2, 5]
    assert counts.sum() == 10


def test_an_exhausted_class_is_spread_over_the_clients_other_classes_in_proportion():
    # wants 5 of class 0, which has 2 left: classes 1 and 2 share the other 8 as 1 : 3
    assert class_counts(10, np.array([0.5, 0.125, 0.375]), np.array([2, 100, 100])).tolist() == [2, 2, 6]
    # a draw that gives nothing to the classes that still have examples: those fill by what their pools hold
    assert class_counts(10, np.array([1.0, 0.0, 0.0]), np.array([2, 2, 6])).tolist() == [2, 2, 6]
    assert class_counts(5, np.array([1.0, 0.0, 0.0]), np.array([0, 10, 30])).tolist() == [0, 1, 4]


@pytest.mark.parametrize("seed", range(20))
def test_class_counts_never_exceed_the_pools_and_always_sum_to_the_total(seed):
    rng = np.random.default_rng(seed)
    available = rng.integers(0, 30, size=8)
    total = int(rng.integers(0, available.sum() + 1))
    counts = class_counts(total, rng.dirichlet(np.full(8, 0.1)), available)
    assert counts.sum() == total
    assert (counts >= 0).all() and (counts <= available).all()


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
