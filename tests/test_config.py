"""Run configuration: precedence, validation messages, TOML files, JSON form."""

import dataclasses
import json
import math

import pytest

from dpfl_bench.config import (
    AdapterConfig,
    FederatedConfig,
    PrivacyConfig,
    RunConfig,
    TrainingConfig,
    load_toml,
    option_names,
)
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError

# --------------------------------------------------------------------------------------- precedence


def test_defaults_when_nothing_is_given():
    config = build_config({})
    # the method's options are resolved to its defaults, so they are saved with the run
    la_lora = {"first_factor": "B", "lr_b_multiplier": 2.0, "smooth_sigma": 1.0, "filter": "gaussian"}
    assert config == dataclasses.replace(RunConfig(), method_options=la_lora)
    assert config.federated == FederatedConfig()
    assert config.training == TrainingConfig()
    assert config.privacy == PrivacyConfig()
    assert config.adapter == AdapterConfig()


def test_method_options_are_resolved_the_same_from_the_cli_and_from_toml():
    from_cli = build_config({"method": "la-lora", "method_options": {"smooth-sigma": "0"}})
    from_toml = build_config({"method": "la-lora", "method_options": {"smooth_sigma": 0}})
    assert from_cli.method_options == from_toml.method_options
    assert from_cli.method_options == {"first_factor": "B", "lr_b_multiplier": 2.0, "smooth_sigma": 0.0, "filter": "gaussian"}
    assert from_cli.to_json() == from_toml.to_json()


def test_precedence_defaults_then_task_defaults_then_options():
    task_defaults = {"rounds": 7, "local-steps": 3, "lr": 0.05}
    options = {"rounds": 9, "batch_size": 8}
    config = build_config(options, task_defaults)
    assert config.federated.rounds == 9  # option beats task default
    assert config.federated.local_steps == 3  # task default beats default
    assert config.training.lr == 0.05
    assert config.training.batch_size == 8  # option beats default
    assert config.federated.clients == FederatedConfig().clients  # plain default
    assert config.privacy.eps == PrivacyConfig().eps


def test_dashes_and_underscores_name_the_same_option():
    a = build_config({"local-steps": 2, "dp-level": "client", "method-options": {"smooth-sigma": 0.5}})
    b = build_config({"local_steps": 2, "dp_level": "client", "method_options": {"smooth_sigma": 0.5}})
    assert a == b
    assert a.federated.local_steps == 2 and a.privacy.dp_level == "client"
    assert a.method_options["smooth_sigma"] == 0.5


def test_every_option_lands_in_the_config(tmp_path):
    options = {
        "task": "mnist", "method": "la-lora", "seed": 3, "device": "cpu", "out": "elsewhere",
        "clients": 6, "participation": 0.5, "rounds": 2, "local-steps": 4, "partition": "dirichlet-mix",
        "dirichlet-alpha": 0.3, "min-partition-size": 5, "client-size": 7, "weighting": "size", "batch-size": 4, "lr": 0.2,
        "optimizer": "sgd", "eval-every": 2, "physical-batch-size": 2, "rank": 2, "lora-alpha": 4.0,
        "weight-decay": 0.01, "lr-decay": 0.9, "calibration": "shared", "client-batching": "off",
        "eps": 2.0, "delta": 1e-4, "dp-level": "client", "clip": 0.5, "accountant": "prv",
        "precision": "bf16", "lora-targets": "query,value", "model": "hf:some/model", "model-path": str(tmp_path),
        "data-dir": str(tmp_path), "workers": 2, "rng": "secure", "audit-canaries": 100, "audit-client": 1,
        "method-options": {"first_factor": "A", "lr_b_multiplier": 3.0, "smooth_sigma": 0.5, "filter": "laplacian"},
        "head": "local", "batch-order": "epoch", "lora-dropout": 0.1, "center-crop": 0.9,
        "client-selection": "random",  # `first` is refused at client level (tests/test_authors_setting.py)
    }
    # dp-sigma: the authors' level only, below; preset: stands for other options (tests/test_authors_setting.py)
    assert set(options) | {"dp-sigma", "preset"} == set(option_names())
    config = build_config(options)
    flat = {}
    for section in (config.federated, config.training, config.adapter, config.privacy, config.sources, config.audit):
        flat.update(vars(section))
    flat.update(task=config.task, method=config.method, seed=config.seed, device=config.device, out=config.out,
                method_options=dict(config.method_options))
    for key, value in options.items():
        assert flat[key.replace("-", "_")] == value, key
    assert build_config({"dp-level": "authors", "dp-sigma": 0.7}).privacy.dp_sigma == 0.7


def test_unknown_option_lists_valid_options():
    with pytest.raises(UserError) as info:
        build_config({"local-stpes": 3})
    message = str(info.value)
    assert "local-stpes" in message
    for name in option_names():
        assert name in message


def test_unknown_task_default_is_rejected_too():
    with pytest.raises(UserError, match="unknown option"):
        build_config({}, {"warmup": 3})


# --------------------------------------------------------------------------------------- validation


BAD_VALUES = [
    ({"clients": 0}, "--clients must be at least 1"),
    ({"clients": -3}, "--clients must be at least 1"),
    ({"participation": 0}, "--participation must be in (0, 1]"),
    ({"participation": 1.5}, "--participation must be in (0, 1]"),
    ({"eps": 0}, "--eps must be > 0"),
    ({"eps": -1}, "--eps must be > 0"),
    ({"eps": math.nan}, "--eps must be > 0"),
    ({"rounds": 0}, "--rounds must be at least 1"),
    ({"local-steps": 0}, "--local-steps must be at least 1"),
    ({"batch-size": 0}, "--batch-size must be at least 1"),
    ({"lr": 0}, "--lr must be a number > 0"),
    ({"lr": math.inf}, "--lr must be a number > 0"),
    ({"optimizer": "adam"}, "--optimizer must be adamw or sgd"),
    ({"partition": "shards"}, "--partition must be iid, dirichlet or dirichlet-mix"),
    ({"delta": 0}, "--delta must be in (0, 1)"),
    ({"delta": 1}, "--delta must be in (0, 1)"),
    ({"clip": 0}, "--clip must be a number > 0"),
    ({"clip": math.inf}, "--clip must be a number > 0"),
    ({"seed": -1}, "--seed must be in [0, 2^63)"),
    ({"seed": 2**63}, "--seed must be in [0, 2^63)"),
    ({"dp-level": "user"}, "--dp-level must be one of authors, client, sample"),
    ({"dp-level": "none"}, "--dp-level must be one of authors, client, sample"),
    ({"weight-decay": -0.1}, "--weight-decay must be a number ≥ 0"),
    ({"lr-decay": 0}, "--lr-decay must be in (0, 1]"),
    ({"lr-decay": 1.5}, "--lr-decay must be in (0, 1]"),
    ({"rng": "urandom"}, "--rng must be seeded or secure"),
    ({"audit-canaries": -1}, "--audit-canaries must be 0 (no audit) or more"),
    ({"audit-client": -1}, "--audit-client must be a client number"),
    ({"accountant": "gdp"}, "--accountant must be rdp or prv"),
    ({"device": "tpu"}, "--device must be auto, cpu or cuda"),
    ({"dirichlet-alpha": 0}, "--dirichlet-alpha must be > 0"),
    ({"min-partition-size": 0}, "--min-partition-size must be at least 1"),
    ({"weighting": "loss"}, "--weighting must be uniform or size"),
    ({"eval-every": 0}, "--eval-every must be at least 1"),
    ({"physical-batch-size": -1}, "--physical-batch-size must be 0 (automatic) or more"),
    ({"rank": 0}, "--rank must be at least 1"),
    ({"lora-alpha": 0}, "--lora-alpha must be > 0"),
]


@pytest.mark.parametrize("options, message", BAD_VALUES, ids=[str(o) for o, _ in BAD_VALUES])
def test_bad_value_is_a_user_error_with_its_message(options, message):
    with pytest.raises(UserError) as info:
        build_config(options)
    text = str(info.value)
    assert message in text
    assert str(next(iter(options.values()))) in text, "the message shows the bad value"
    assert "\n" not in text


@pytest.mark.parametrize("options", [{"participation": 1.0}, {"eps": math.inf}, {"delta": 0.999}, {"clients": 1}])
def test_boundary_values_are_accepted(options):
    build_config(options)


def test_bad_task_default_is_caught_as_well():
    with pytest.raises(UserError, match="--rounds must be at least 1"):
        build_config({}, {"rounds": 0})


def test_config_is_frozen():
    config = build_config({})
    with pytest.raises(Exception):
        config.seed = 4  # type: ignore[misc]


def test_the_physical_batch_covers_the_poisson_tail_by_default():
    """Twice the expected batch (a Poisson batch of mean 16 exceeds 32 with probability ~1e-4), on a CPU at
    most 32 per client and 64 a pass; an explicit size always wins."""
    from math import exp, factorial

    assert 1 - sum(exp(-16) * 16**k / factorial(k) for k in range(33)) < 2e-4
    training = build_config({"batch-size": 16}).training
    assert (training.physical_batch("cuda"), training.physical_batch("cpu")) == (32, 32)
    training = build_config({"batch-size": 1024}).training
    assert (training.physical_batch("cuda"), training.physical_batch("cpu")) == (2048, 32)
    assert (training.physical_batch("cuda", clients=4), training.physical_batch("cpu", clients=4)) == (8192, 64)
    training = build_config({"batch-size": 4}).training
    assert (training.physical_batch("cpu", clients=3), training.physical_batch("cpu", clients=30)) == (24, 64)
    training = build_config({"batch-size": 1024, "physical-batch-size": 100}).training
    assert (training.physical_batch("cuda"), training.physical_batch("cpu", clients=4)) == (100, 100)


def test_clients_per_round_is_ceil_of_p_n():
    from dpfl_bench.partition import clients_per_round

    assert clients_per_round(10, 0.25) == 3
    assert clients_per_round(4, 1.0) == 4
    assert clients_per_round(3, 0.01) == 1
    assert clients_per_round(100, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floats


# --------------------------------------------------------------------------------------------- TOML


def test_load_toml_reads_flat_options_and_method_options(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'task = "synthetic"\nmethod = "la-lora"\nlocal-steps = 3\nlr = 0.02\neps = inf\nseed = 5\n'
        'dp_level = "client"\n\n[method-options]\nsmooth_sigma = 0.5\nfirst_factor = "A"\n'
    )
    data = load_toml(path)
    assert data["local-steps"] == 3 and data["lr"] == 0.02 and data["seed"] == 5
    assert math.isinf(data["eps"])
    assert data["method_options"] == {"smooth_sigma": 0.5, "first_factor": "A"}
    assert "method-options" not in data
    config = build_config(data, {"local-steps": 9, "rounds": 2})
    assert config.federated.local_steps == 3  # the file beats task defaults
    assert config.federated.rounds == 2
    assert config.task == "synthetic" and config.privacy.dp_level == "client"
    assert not config.privacy.accounted
    assert config.method_options == {"first_factor": "A", "lr_b_multiplier": 2.0, "smooth_sigma": 0.5, "filter": "gaussian"}


def test_load_toml_rejects_an_unknown_key(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("rounds = 2\nepochs = 3\n")
    with pytest.raises(UserError, match="unknown option 'epochs'"):
        load_toml(path)


def test_load_toml_rejects_a_section_table(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("[federated]\nrounds = 2\n")
    with pytest.raises(UserError, match="unknown option 'federated'"):
        load_toml(path)


def test_load_toml_rejects_invalid_toml(tmp_path):
    path = tmp_path / "broken.toml"
    path.write_text("rounds = = 2\n")
    with pytest.raises(UserError, match="not valid TOML") as info:
        load_toml(path)
    assert str(path) in str(info.value)


def test_load_toml_missing_file(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_toml(tmp_path / "absent.toml")


def test_wrongly_typed_toml_value_is_a_user_error(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('rounds = "5"\n')
    with pytest.raises(UserError):
        build_config(load_toml(path))


# --------------------------------------------------------------------------------------------- JSON


def test_to_json_writes_inf_as_the_string_inf():
    config = build_config({"eps": math.inf, "clip": 2.5, "seed": 4})
    text = config.to_json()
    assert "Infinity" not in text
    data = json.loads(text)  # valid JSON
    assert data["privacy"]["eps"] == "inf"
    assert data["privacy"]["clip"] == 2.5
    assert data["seed"] == 4
    assert data["federated"] == vars(config.federated)
    assert float(data["privacy"]["eps"]) == math.inf  # reversible


def test_to_json_is_stable_and_distinguishes_configs():
    assert build_config({"seed": 1}).to_json() == build_config({"seed": 1}).to_json()
    assert build_config({"seed": 1}).to_json() != build_config({"seed": 2}).to_json()


def test_to_json_leaves_strings_containing_infinity_alone():
    config = build_config({"out": "runs/Infinity", "eps": math.inf})
    assert json.loads(config.to_json())["out"] == "runs/Infinity"
