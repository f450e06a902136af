"""A round's clients trained together give what they give one after another: the same uploads (to float
rounding) and the same evaluated accuracy, for every method with and without privacy; each example's
gradient and each client's noise stay that client's own."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dpfl_bench.client import Workspace, train_client, zero_if_overflowed
from dpfl_bench.client_batch import _routed, _Routing, train_clients, uncovered
from dpfl_bench.configure import build_config
from dpfl_bench.errors import UserError
from dpfl_bench.example_draws import ExampleDraws
from dpfl_bench.federated import client_batching, prepare, run_federated
from dpfl_bench.method import BOTH, Factor, Method
from dpfl_bench.privacy.per_example import PerExampleGradients
from dpfl_bench.results import read_run
from dpfl_bench.tasks import TASKS

LEVELS = {"sample": {}, "client": {"dp-level": "client"}, "none": {"eps": math.inf}}


def configure(**options):
    """Plain SGD: its step carries float rounding through as it is. AdamW divides by √v, which turns the
    rounding of a near-zero gradient entry into a visible step (see the AdamW test)."""
    base = {"task": "synthetic", "clients": 4, "participation": 1.0, "local-steps": 3, "device": "cpu", "optimizer": "sgd", "lr": 0.5}
    return build_config({**base, **options}, TASKS.get("synthetic").defaults)


def both_ways(config, method=None, **batched_setup):
    """Round 0's client results, one after another and together, from the same global state."""
    exp = prepare(config)
    method = method or exp.run.method
    ws, state, chosen = exp.workspace, exp.workspace.params.state(), exp.schedule[0]
    run = dataclasses.replace(exp.run, method=method)
    one_by_one = [train_client(ws, state, exp.clients[k], run, client=k, round=0) for k in chosen]
    for key, value in batched_setup.items():
        setattr(ws, key, value)
    together = train_clients(ws, [state] * len(chosen), [exp.clients[k] for k in chosen], run, clients=chosen, round=0)
    return state, one_by_one, together


def assert_same_uploads(one_by_one, together, tolerance=1e-5):
    for a, b in zip(one_by_one, together):
        assert a.upload.keys() == b.upload.keys()
        for name in a.upload:
            assert float((a.upload[name] - b.upload[name]).norm()) <= tolerance * float(a.upload[name].norm()) + 1e-7, name
        assert a.train_loss == pytest.approx(b.train_loss, rel=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("method", ["dp-lora", "ffa-lora", "rolora", "la-lora"])
def test_batched_and_sequential_clients_upload_the_same(method, level):
    _, one_by_one, together = both_ways(configure(method=method, **LEVELS[level]))
    assert_same_uploads(one_by_one, together)


@pytest.mark.parametrize("level", LEVELS)
def test_with_adamw_the_uploads_agree_to_its_amplified_rounding(level):
    """AdamW (the default) on stacked tensors is element-wise, so each client steps as alone; what differs
    is float rounding of the gradients, which AdamW's normalisation magnifies for near-zero entries."""
    _, one_by_one, together = both_ways(configure(optimizer="adamw", lr=0.01, **LEVELS[level]))
    assert_same_uploads(one_by_one, together, tolerance=1e-4)


def test_clients_with_different_poisson_batches_and_an_empty_one(monkeypatch):
    """Batches of expected size 1 from 150 examples: realised sizes differ, and some are empty."""
    import dpfl_bench.privacy.mechanisms.sample as sample

    sizes = []
    draw = sample.SampleDP.draw_batches

    def recorded(self, client, steps, stream):
        batches = draw(self, client, steps, stream)
        sizes.extend(len(index) for index in batches)
        return batches

    monkeypatch.setattr(sample.SampleDP, "draw_batches", recorded)
    _, one_by_one, together = both_ways(configure(**{"batch-size": 1}))
    assert 0 in sizes and len(set(sizes)) > 1
    assert_same_uploads(one_by_one, together)


class TrainsBOnly(Method):
    name = "trains-b-only"
    summary = citation = ""

    def trains(self, round, step):
        return frozenset({Factor.B})

    def uploads(self, round):
        return BOTH


@pytest.mark.parametrize("level", ["sample", "client"])
def test_a_frozen_factor_stays_exactly_the_global_one_for_every_client(level):
    """No gradient, no noise and no optimizer step reaches A, for any client, while B trains."""
    state, one_by_one, together = both_ways(configure(**LEVELS[level]), method=TrainsBOnly())
    assert_same_uploads(one_by_one, together)
    for result in together:
        for name, value in result.upload.items():
            if ".lora_A." in name:
                assert torch.equal(value, state[name]), name
            elif ".lora_B." in name:
                assert not torch.equal(value, state[name]), name
    b_name = next(n for n in state if ".lora_B." in n)
    assert not torch.equal(together[0].upload[b_name], together[1].upload[b_name]), "each client its own noise"


def test_halving_on_out_of_memory_keeps_the_uploads(monkeypatch):
    config = configure(**{"physical-batch-size": 64})
    exp = prepare(config)
    _, reference, _ = both_ways(config)
    compute = exp.workspace.per_example.compute

    def small_memory(losses, loss_scale=1.0):
        if len(losses) > 8:
            raise torch.cuda.OutOfMemoryError("simulated")
        return compute(losses, loss_scale)

    ws, state, chosen = exp.workspace, exp.workspace.params.state(), exp.schedule[0]
    monkeypatch.setattr(ws.per_example, "compute", small_memory)
    with pytest.warns(UserWarning, match="physical batch size lowered to 8"):
        halved = train_clients(ws, [state] * len(chosen), [exp.clients[k] for k in chosen], exp.run, clients=chosen, round=0)
    assert ws.physical_batch_size == 8
    assert_same_uploads(reference, halved)


@pytest.mark.parametrize("layers", ["linear", "1x1-conv"])
def test_per_example_gradients_of_a_batched_pass_equal_one_example_at_a_time(layers):
    """Three clients with different weights in one pass: each example's gradient is its own client's."""
    torch.manual_seed(0)
    if layers == "linear":
        model, x = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)), torch.randn(7, 5)
    else:  # channels-last input, as the backbone's convolutions run
        model = nn.Sequential(nn.Conv2d(2, 4, 1), nn.Tanh(), nn.Conv2d(4, 2, 1), nn.Flatten(), nn.Linear(18, 3))
        x = torch.randn(7, 2, 3, 3).to(memory_format=torch.channels_last)
    params = dict(model.named_parameters())
    stacks = {n: nn.Parameter(torch.randn(3, *p.shape)) for n, p in params.items()}
    engine, routing = PerExampleGradients(model, params), _Routing()
    y = torch.randint(0, 3, (7,))
    owners = torch.tensor([0, 2, 1, 1, 0, 2, 2])
    with _routed(model, params, stacks, routing):
        routing.clients = owners
        batched = engine.compute(F.cross_entropy(model(x), y, reduction="none"))
    engine.remove()
    for i, c in enumerate(owners.tolist()):
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(stacks[name][c])
        single = torch.autograd.grad(F.cross_entropy(model(x[i : i + 1]), y[i : i + 1]), list(params.values()))
        for name, g in zip(params, single):
            torch.testing.assert_close(batched[name][i], g, rtol=1e-5, atol=1e-6)


def test_batched_and_sequential_runs_record_the_same_rows(tmp_path):
    rows = {}
    for mode in ("on", "off"):
        config = configure(**{"client-batching": mode, "rounds": 2, "out": str(tmp_path / mode)})
        rows[mode] = run_federated(config).rows
    for on, off in zip(rows["on"], rows["off"]):
        assert on["test_accuracy"] == off["test_accuracy"] and on["val_accuracy"] == off["val_accuracy"]
        assert on["eps_spent"] == off["eps_spent"] and on["test_loss"] == pytest.approx(off["test_loss"], rel=1e-4)
    assert rows["on"][0]["run_id"] == rows["off"][0]["run_id"], "batching is not part of a run's identity"
    assert [r["clients_together"] for r in rows["on"] + rows["off"]] == [True, True, False, False]


def test_a_run_records_its_physical_batch_after_an_out_of_memory_halving(tmp_path, monkeypatch):
    compute = PerExampleGradients.compute

    def small_memory(self, losses, loss_scale=1.0):
        if len(losses) > 8:
            raise torch.cuda.OutOfMemoryError("simulated")
        return compute(self, losses, loss_scale)

    monkeypatch.setattr(PerExampleGradients, "compute", small_memory)
    config = configure(**{"rounds": 2, "out": str(tmp_path), "physical-batch-size": 64})
    with pytest.warns(UserWarning, match="physical batch size lowered to 8"):
        rows = run_federated(config).rows
    assert [r["physical_batch_size"] for r in rows] == [8, 8]
    assert read_run(next(tmp_path.glob("*.parquet")))["physical_batch_size"].tolist() == [8, 8]


@pytest.mark.parametrize("task", ["sentiment", "mnist"])
def test_real_models_with_dropout_train_together_as_one_after_another(task):
    """MiniLM (dropout in every layer, attention dropout inside SDPA) and EfficientNet-Lite0 (LoRA on 1x1
    convolutions, dropout and drop-connect): every example's masks are its own in a shared pass."""
    options = {"task": task, "clients": 2, "participation": 1.0, "local-steps": 2, "batch-size": 6, "device": "cpu",
               "optimizer": "sgd", "lr": 0.5, "client-batching": "on"}
    config = build_config(options, TASKS.get(task).defaults)
    draws = []
    record = ExampleDraws.__torch_function__

    def recorded(self, func, types, args=(), kwargs=None):
        draws.append(getattr(func, "__name__", str(func)))
        return record(self, func, types, args, kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ExampleDraws, "__torch_function__", recorded)
        state, one_by_one, together = both_ways(config)
    expected = {"sentiment": {"dropout", "scaled_dot_product_attention"}, "mnist": {"dropout", "rand"}}[task]
    assert expected <= set(draws), "the model's draws went through ExampleDraws"
    assert_same_uploads(one_by_one, together)
    assert any(not torch.equal(r.upload[n], state[n]) for r in together for n in r.upload), "training moved something"


class _MixesExamples(nn.Module):
    def forward(self, x):
        return x - x.mean(dim=0, keepdim=True)


def test_what_is_covered_and_what_is_not_is_named():
    def workspace(model, trained):
        return Workspace(model, _params(model, trained), torch.device("cpu"), None, 8)

    covered = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Dropout(0.5), nn.Flatten(), nn.Linear(32, 2))
    assert uncovered(workspace(covered, ["0.weight", "3.weight"]), _images()) is None
    wide = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Flatten(), nn.Linear(32, 2))
    assert "a trainable Conv2d layer" in uncovered(workspace(wide, ["0.weight"]), _images())
    padded = nn.Sequential(nn.Conv2d(1, 8, 1, padding=1), nn.Flatten(), nn.Linear(128, 2))  # 1x1, but not pointwise
    assert "a trainable Conv2d layer" in uncovered(workspace(padded, ["0.weight"]), _images())
    with pytest.raises(TypeError, match="per-example gradients are not implemented"):
        PerExampleGradients(padded, {"0.weight": padded[0].weight})
    for rate in (0.5, 1e-9):  # found from torch's generator moving, however rarely the draw drops anything
        shared_draws = nn.Sequential(nn.Conv2d(1, 8, 1), nn.Dropout2d(rate), nn.Flatten(), nn.Linear(32, 2))
        assert "not per example" in uncovered(workspace(shared_draws, ["3.weight"]), _images())
    mixing = nn.Sequential(nn.Flatten(), _MixesExamples(), nn.Linear(4, 2))
    assert "not per example" in uncovered(workspace(mixing, ["2.weight"]), _images())


def test_on_is_refused_in_one_line_for_a_model_it_does_not_cover():
    model = nn.Sequential(nn.Flatten(), _MixesExamples(), nn.Linear(4, 2))
    ws = Workspace(model, _params(model, ["2.weight"]), torch.device("cpu"), None, 8)
    with pytest.raises(UserError, match=r"^--client-batching on: .* not per example .*; use --client-batching auto or off$"):
        client_batching("on", ws, _images())
    with pytest.warns(UserWarning, match="clients train one after another"):
        assert client_batching("auto", ws, _images()) is False


def _params(model, head):
    from dpfl_bench.adapters import TrainableParams

    named = dict(model.named_parameters())
    return TrainableParams({Factor.A: {}, Factor.B: {}, Factor.HEAD: {n: named[n] for n in head}})


def _images():
    from dpfl_bench.tasks import Examples

    return Examples({"input": torch.randn(2, 1, 2, 2)}, torch.tensor([0, 1]))


def test_an_fp16_overflow_in_a_batched_pass_zeroes_only_the_clients_it_overflowed_for():
    a, b = torch.ones(3, 2, 4), torch.ones(3, 5)
    b[1, 2] = math.inf
    kept_a, kept_b = zero_if_overflowed([a, b], per_client=True)
    assert torch.equal(kept_a[[0, 2]], a[[0, 2]]) and torch.equal(kept_b[[0, 2]], b[[0, 2]])
    assert not kept_a[1].any() and not kept_b[1].any()
    assert not any(g.any() for g in zero_if_overflowed([a, b])), "a client's chunk: all of it"
