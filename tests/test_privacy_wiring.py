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


class _Mixing(torch.nn.Module):
    """A middle layer that sees [tokens, batch, features] (tokens_first) or [batch, tokens, features]: with 6
    tokens and batches that divide into them, only the start-up check can tell the first from the second."""

    def __init__(self, tokens_first: bool) -> None:
        super().__init__()
        self.embed, self.mix, self.head = torch.nn.Linear(4, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)
        self.tokens_first = tokens_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.embed(x))
        if self.tokens_first:
            return self.head(torch.tanh(self.mix(h.transpose(0, 1))).mean(dim=0))
        return self.head(torch.tanh(self.mix(h)).mean(dim=1))


def register_mixing_task(monkeypatch, tokens_first: bool) -> None:
    """A task named `mixing` whose model's per-example gradients are wrong (tokens_first) or right."""
    from dpfl_bench.tasks import TASKS
    from dpfl_bench.tasks.base import BuiltModel, Examples, Task, TrainTestSplit

    def load_data(sources):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(260, 6, 4, generator=generator)
        labels = (x.sum(dim=(1, 2)) > 0).long()
        return TrainTestSplit(Examples({"x": x[:200]}, labels[:200]), Examples({"x": x[200:]}, labels[200:]), 2)

    def build_model(num_classes, sources):
        return BuiltModel(_Mixing(tokens_first), "mixing-toy", ("mix",), heads=("head",))

    task = Task("mixing", "a toy", "mixing-toy", load_data, build_model, ("mix",), validation_size=20,
                defaults={"clients": 2, "participation": 1.0, "batch-size": 6, "rounds": 3, "local-steps": 1})
    monkeypatch.setitem(TASKS._entries, "mixing", task)


def mixing_config(tmp_path, **options):
    from dpfl_bench.tasks import TASKS

    return build_config({"task": "mixing", "device": "cpu", "eps": 8.0, "out": str(tmp_path), **options}, TASKS.get("mixing").defaults)


def never_trains(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(federated, "train_client", refuse)
    monkeypatch.setattr(federated, "train_clients", refuse)


@pytest.mark.parametrize("batching", ["off", "on", "auto"])
def test_a_model_with_wrong_per_example_gradients_is_refused_before_any_training(tmp_path, monkeypatch, batching):
    from dpfl_bench.errors import UserError
    from dpfl_bench.federated import results_path

    register_mixing_task(monkeypatch, tokens_first=True)
    never_trains(monkeypatch)
    config = mixing_config(tmp_path, **{"client-batching": batching})
    with pytest.raises(UserError, match=r"mixing-toy are not per example \(layer mix\..*use --dp-level client"):
        federated.run_federated(config)
    assert not results_path(config).exists()


def test_a_resumed_run_is_checked_again_even_after_its_configuration_passed_in_this_process(tmp_path, monkeypatch):
    """The check is remembered per model builder: a run that resumes with another model behind the same
    task name (here, a per-example-wrong one) is checked, not waved through by the first one's pass."""
    from dpfl_bench.checkpoint import checkpoint_path
    from dpfl_bench.errors import UserError
    from dpfl_bench.federated import results_path

    class Stop(Exception):
        pass

    register_mixing_task(monkeypatch, tokens_first=False)
    config = mixing_config(tmp_path)
    with pytest.raises(Stop):
        federated.run_federated(config, on_round=lambda done, row: (_ for _ in ()).throw(Stop()) if done == 1 else None)
    assert checkpoint_path(results_path(config)).exists()
    register_mixing_task(monkeypatch, tokens_first=True)
    never_trains(monkeypatch)
    with pytest.raises(UserError, match="not per example"):
        federated.run_federated(config)
