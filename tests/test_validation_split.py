"""Every task's validation split: carved out of its training data by `Task.load`, fixed per task, never
trained on; and the partition options that decide how much of the rest each client gets."""

import numpy as np
import pytest
import torch
from support import assert_one_line_error, assert_user_error, invoke

from dpfl_bench import cli
from dpfl_bench.config import SourcesConfig
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.federated import prepare
from dpfl_bench.partition import counted_client_sizes, partition
from dpfl_bench.privacy.randomness import Randomness
from dpfl_bench.tasks import TASKS, Examples
from dpfl_bench.tasks.base import _LOADED, validation_split
from dpfl_bench.tasks.images import FASHION_DIR

# The built-in tasks that load in seconds, and their documented validation sizes.
CHEAP = [
    ("synthetic", 100),
    ("mnist", 500),
    pytest.param("fashion", 2000, marks=pytest.mark.skipif(not FASHION_DIR.exists(), reason="Fashion-MNIST not installed")),
]
SYNTHETIC = ["--task", "synthetic", "--rounds", "1", "--local-steps", "1"]  # options `run` and `privacy` share


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    monkeypatch.setattr(cli.console, "width", 1000)
    monkeypatch.setattr(cli.errors, "width", 1000)


def rows(examples: Examples) -> set[bytes]:
    """Each example's features as bytes, to find the same example in two splits."""
    flat = [v.reshape(len(examples), -1) for _, v in sorted(examples.features.items())]
    return {row.numpy().tobytes() for row in torch.cat(flat, dim=1)}


def same(a: Examples, b: Examples) -> bool:
    return torch.equal(a.labels, b.labels) and all(torch.equal(a.features[k], b.features[k]) for k in a.features)


def experiment(seed: int = 0, **options):
    config = build_config({"task": "synthetic", "device": "cpu", "eps": float("inf"), "seed": seed, **options},
                          TASKS.get("synthetic").defaults)
    return prepare(config)


# ------------------------------------------------------------------------------------------- the split


@pytest.mark.parametrize("n, size", [(600, 100), (60_000, 2000), (4000, 500), (101, 7)])
def test_validation_and_training_indices_partition_the_training_split(n, size):
    train, val = validation_split(n, size, "task")
    assert len(val) == size and len(train) == n - size
    assert torch.equal(torch.sort(torch.cat([train, val])).values, torch.arange(n))
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    assert not torch.equal(val, torch.arange(size)), "a random draw, not the first examples"


def test_the_validation_split_is_fixed_by_the_task_not_by_the_run():
    a, b = validation_split(1000, 100, "task"), validation_split(1000, 100, "task")
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.manual_seed(123)  # torch's global generator (seeded by each run) plays no part
    assert torch.equal(validation_split(1000, 100, "task")[1], a[1])


def test_a_small_training_split_holds_out_at_most_a_fifth():
    train, val = validation_split(40, 5000, "cifar10")  # a tiny local mirror of a hub dataset
    assert len(val) == 8 and len(train) == 32


def test_a_training_split_too_small_to_hold_out_anything_is_a_user_error():
    with pytest.raises(UserError, match="cifar10's training split has 4 examples"):
        validation_split(4, 5000, "cifar10")


@pytest.mark.parametrize("name, size", CHEAP)
def test_each_cheap_task_carves_its_documented_validation_split_out_of_its_training_data(name, size):
    task = TASKS.get(name)
    assert task.validation_size == size
    original = task.load_data(SourcesConfig())
    data = task.load(SourcesConfig())
    train_index, val_index = validation_split(len(original.train), size, name)
    assert len(data.val) == size and len(data.train) == len(original.train) - size
    assert same(data.val, original.train.subset(val_index)) and same(data.train, original.train.subset(train_index))
    assert same(data.test, original.test)
    _LOADED.clear()  # loaded afresh, not the copy a sweep's worker keeps
    again = task.load(SourcesConfig())
    assert again is not data and same(again.val, data.val) and same(again.train, data.train)
    assert task.load(SourcesConfig()) is again  # kept for the next point of a sweep


@pytest.mark.parametrize("name", ["synthetic", "mnist"])
def test_no_validation_example_is_in_the_test_split_or_left_in_training(name):
    data = TASKS.get(name).load(SourcesConfig())
    val = rows(data.val)
    assert len(val) == len(data.val), "the examples are distinct, so comparing them by content means something"
    assert not val & rows(data.train)
    assert not val & rows(data.test)


def test_every_task_says_how_large_its_validation_split_is():
    for name, task in TASKS:
        assert f"{task.validation_size:,}" in task.description, name
        assert "validation" in task.description, name


# ------------------------------------------------------------------------------------- through a run


@pytest.mark.parametrize("options", [{}, {"partition": "dirichlet-mix", "dirichlet-alpha": 0.1, "client-size": 150}])
def test_no_client_trains_on_a_validation_example(options):
    exp = experiment(**options)
    val = rows(exp.data.val)
    for client in exp.clients:
        assert not rows(client) & val
        assert rows(client) <= rows(exp.data.train)


def test_the_validation_split_is_the_same_for_every_run_seed():
    a, b = experiment(seed=0), experiment(seed=1)
    assert same(a.data.val, b.data.val)
    assert not same(a.clients[0], b.clients[0]), "while the clients' split follows the seed"


@pytest.mark.parametrize("partition_name", ["iid", "dirichlet-mix"])
def test_a_client_size_gives_every_client_that_many_examples_and_records_them(partition_name):
    exp = experiment(partition=partition_name, **{"client-size": 120})
    assert [len(c) for c in exp.clients] == [120, 120, 120]
    records = exp.run.mechanism.client_records([c.labels for c in exp.clients], exp.data.num_classes, secret=False)
    assert [r["examples"] for r in records] == [120, 120, 120]
    assert all(sum(r["labels"]) == 120 for r in records)


def test_partition_splits_what_load_returns():
    config = build_config({"task": "synthetic", "partition": "dirichlet-mix", "client-size": 200}, TASKS.get("synthetic").defaults)
    data = TASKS.get("synthetic").load(config.sources)
    parts = partition(data.train, config, Randomness(0))
    assert [len(p) for p in parts] == [200] * 3  # synthetic's 600 training examples, all of them
    assert len(np.unique(np.concatenate(parts))) == 600


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("command", ["run", "privacy"])
def test_a_negative_client_size_is_one_line(command):
    assert_user_error(invoke(command, *SYNTHETIC, "--eps", "1", "--client-size", "-1"), "--client-size must be 0")


@pytest.mark.parametrize("command", ["run", "privacy"])
def test_a_client_size_with_the_per_class_dirichlet_split_is_one_line_naming_dirichlet_mix(command):
    result = invoke(command, *SYNTHETIC, "--eps", "1", "--partition", "dirichlet", "--client-size", "100")
    assert_user_error(result, "--client-size 100 does not apply to --partition dirichlet", "--partition dirichlet-mix")


def test_an_unknown_partition_is_one_line():
    assert_user_error(invoke("run", *SYNTHETIC, "--partition", "shards"), "--partition must be iid, dirichlet or dirichlet-mix")


@pytest.mark.parametrize("partition_name", ["iid", "dirichlet-mix"])
def test_clients_larger_than_the_training_set_are_one_line_naming_numbers_and_fix(partition_name, tmp_path):
    result = invoke("run", *SYNTHETIC, "--eps", "inf", "--partition", partition_name, "--client-size", "201",
                    "--out", tmp_path)
    assert_one_line_error(result, "3 clients of 201 examples", "need 603", "has 600", "lower --client-size or --clients")


def test_privacy_with_a_client_size_reports_the_sigma_run_uses():
    options = {"task": "synthetic", "eps": 2.0, "rounds": 2, "local-steps": 1, "client-size": 150,
               "partition": "dirichlet-mix", "device": "cpu"}
    result = invoke("privacy", *[f"--{k}={v}" for k, v in options.items() if k != "device"])
    assert result.exit_code == 0, result.output
    assert "3 clients of 150–150 examples" in result.stdout
    sigma = float(result.stdout.split("σ = ")[1].split()[0])
    exp = prepare(build_config(options, TASKS.get("synthetic").defaults))
    assert [len(c) for c in exp.clients] == [150] * 3
    assert exp.run.mechanism.noise_multiplier == pytest.approx(sigma, abs=1e-4)


# ------------------------------------------------------------------------------------------- counted sizes


@pytest.mark.parametrize("name", ["synthetic", pytest.param("fashion", marks=CHEAP[2].marks)])
@pytest.mark.parametrize("clients", [2, 3, 7])
def test_counted_client_sizes_equal_the_split_of_the_loaded_data(name, clients):
    """`dpfl-bench privacy` counts a task's examples instead of loading them; the sizes must be the run's."""
    task = TASKS.get(name)
    config = build_config({"task": name, "clients": clients}, task.defaults)
    data = task.load(config.sources)
    assert task.count_train is not None and task.train_size(config.sources) == len(data.train)
    expected = [len(part) for part in partition(data.train, config, Randomness(0))]
    assert counted_client_sizes(task, config) == expected


def test_sizes_are_counted_only_where_counts_decide_them():
    synthetic, mnist = TASKS.get("synthetic"), TASKS.get("mnist")
    skewed = build_config({"task": "synthetic", "partition": "dirichlet"}, synthetic.defaults)
    assert counted_client_sizes(synthetic, skewed) is None  # the labels decide a label-skewed split
    assert counted_client_sizes(mnist, build_config({"task": "mnist"}, mnist.defaults)) is None  # mnist cannot count
    fixed = build_config({"task": "mnist", "client-size": 50, "clients": 4}, mnist.defaults)
    assert counted_client_sizes(mnist, fixed) == [50] * 4
    too_many = build_config({"task": "synthetic", "client-size": 200, "clients": 4}, synthetic.defaults)
    with pytest.raises(UserError, match="need 800 training examples"):  # refused as `run` refuses it
        counted_client_sizes(synthetic, too_many)
