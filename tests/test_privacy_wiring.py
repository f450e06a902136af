"""What the guarantee rests on, checked inside real runs: FedAvg weights as configured, and the canaries'
inclusion draws independent of every other random draw of the run."""

import math

import pytest
import torch

import dpfl_bench.federated as federated
from dpfl_bench.configure import build_config
from dpfl_bench.tasks import TASKS

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("batching", ["off", "on"])
@pytest.mark.parametrize("level", [{"eps": math.inf}, {"eps": 8.0}], ids=["non-private", "sample-level"])
@pytest.mark.parametrize("weighting", ["uniform", "size"])
def test_a_run_averages_its_clients_with_the_configured_weights(recorded_rounds, tmp_path, weighting, level, batching):
    config = build_config({"task": "synthetic", "device": "cpu", "clients": 3, "participation": 1.0, "rounds": 2,
                           "local-steps": 1, "partition": "dirichlet", "dirichlet-alpha": 0.5, "weighting": weighting,
                           "client-batching": batching, "out": str(tmp_path), **level}, TASKS.get("synthetic").defaults)
    federated.run_federated(config)
    for started, released, _, results in recorded_rounds:
        sizes = [r.num_examples for r in results]
        assert len(set(sizes)) > 1, "clients of different sizes, or the weights could not differ"
        weights = [1.0] * len(results) if weighting == "uniform" else [float(n) for n in sizes]
        for name in results[0].upload:
            expected = started[name] + sum(w * (r.upload[name] - started[name]) for w, r in zip(weights, results)) / sum(weights)
            torch.testing.assert_close(released[name], expected, rtol=1e-5, atol=1e-7)


AUDITED = {"task": "synthetic", "device": "cpu", "rounds": 1, "local-steps": 2, "audit-canaries": 40, "audit-client": 1, "seed": 3}
OTHER_DRAWS = [  # each changes how much another stream is drawn from, or what it draws
    {}, {"local-steps": 5}, {"batch-size": 8}, {"participation": 0.5}, {"partition": "dirichlet"}, {"eps": 2.0},
    {"lora-dropout": 0.1}, {"clients": 5},
]


def audit_of(tmp_path, **options):
    config = build_config({**AUDITED, "out": str(tmp_path), **options}, TASKS.get("synthetic").defaults)
    return federated.prepare(config).run.audit, config


def test_canary_inclusion_comes_from_its_own_stream_and_no_other_draw_moves_it(tmp_path):
    from dpfl_bench.privacy.randomness import Purpose, Randomness

    own = Randomness(3).stream(Purpose.CANARY_INCLUSION, 0, 1).bernoulli(40, 0.5)
    for options in OTHER_DRAWS:
        audit, _ = audit_of(tmp_path, **options)
        assert (audit.inserted == own).all(), options
    assert 5 < own.sum() < 35  # a real draw, not a constant


def test_training_draws_nothing_from_the_inclusion_stream(tmp_path, monkeypatch):
    """A round of training opens the inclusion stream never again: what a run does cannot move which
    canaries are in."""
    from dpfl_bench.privacy.randomness import Purpose, Randomness

    opened = []
    stream = Randomness.stream
    monkeypatch.setattr(Randomness, "stream", lambda self, purpose, *a: opened.append(purpose) or stream(self, purpose, *a))
    config = build_config({**AUDITED, "rounds": 2, "out": str(tmp_path)}, TASKS.get("synthetic").defaults)
    federated.run_federated(config)
    assert opened.count(Purpose.CANARY_INCLUSION) == 1 and Purpose.CANARY_SAMPLING in opened


def test_with_secure_randomness_nothing_written_determines_the_inclusion(tmp_path):
    """The same configuration, seed included, twice: other canaries are in each time, so neither the
    configuration nor anything a run writes (which follows from it and from the secret draws) gives them away."""
    first, config = audit_of(tmp_path, rng="secure", eps=4.0)
    second, _ = audit_of(tmp_path, rng="secure", eps=4.0)
    assert config.privacy.rng == "secure"
    assert not (first.inserted == second.inserted).all()
