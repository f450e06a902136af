"""FedSVD through the server-side hook: the broadcast re-factorizes B·A without changing it, A gets
orthonormal rows, clients never change A, a zero product keeps its A, and it runs under every privacy
mechanism and with clients trained together."""

import math

import pytest
import torch

import dpfl_bench.federated as federated
from dpfl_bench.configure import build_config
from dpfl_bench.method import create_method
from dpfl_bench.methods.fedsvd import refactorize
from dpfl_bench.tasks import TASKS

SYNTHETIC = TASKS.get("synthetic").defaults


pytestmark = pytest.mark.usefixtures("one_thread")


def factors(state: dict, kind: str) -> dict:
    return {n: t for n, t in state.items() if f".lora_{kind}." in n}


@pytest.mark.parametrize("shape", [(8, 4, 12), (6, 3, 5, 1, 1)])  # linear [out, r] [r, in]; a 1x1 convolution
def test_refactorizing_keeps_the_product_and_gives_a_orthonormal_rows(shape):
    out, rank, inputs, *trailing = shape
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(rank, inputs, *trailing, generator=generator)
    b = torch.randn(out, rank, *trailing, generator=generator)
    new_a, new_b = refactorize(a, b)
    assert new_a.shape == a.shape and new_b.shape == b.shape
    torch.testing.assert_close(new_b.flatten(1) @ new_a.flatten(1), b.flatten(1) @ a.flatten(1), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(new_a.flatten(1) @ new_a.flatten(1).T, torch.eye(rank), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(new_a, a)


def test_a_zero_product_keeps_its_factors():
    a, b = torch.randn(4, 12), torch.zeros(8, 4)
    new_a, new_b = refactorize(a, b)
    assert new_a is a and new_b is b


def test_the_broadcast_follows_the_period_and_the_warmup():
    state = {"x.lora_A.default.weight": torch.randn(4, 12), "x.lora_B.default.weight": torch.randn(8, 4), "head.weight": torch.ones(2)}
    method = create_method("fedsvd", {"period": 2, "warmup_rounds": 2})
    assert method.broadcast(1, state) is state  # 2 rounds done, still warming up
    assert method.broadcast(2, state) is state  # 3 done: not a multiple of the period
    after = method.broadcast(3, state)  # 4 done
    assert not torch.equal(after["x.lora_A.default.weight"], state["x.lora_A.default.weight"])
    assert torch.equal(after["head.weight"], state["head.weight"])


LEVELS = {
    "none": {"eps": math.inf},
    "sample": {"eps": 8.0},
    "client": {"eps": 8.0, "dp-level": "client", "clients": 6, "participation": 0.5},
    "authors": {"dp-level": "authors"},
}


@pytest.mark.parametrize("batching", ["off", "on"])
@pytest.mark.parametrize("level", LEVELS)
def test_a_fedsvd_run_broadcasts_the_refactorized_aggregate_and_clients_never_change_a(recorded_rounds, tmp_path, level, batching):
    rounds = recorded_rounds
    config = build_config({"task": "synthetic", "device": "cpu", "method": "fedsvd", "rounds": 3, "local-steps": 2,
                           "client-batching": batching, "out": str(tmp_path), **LEVELS[level]}, SYNTHETIC)
    federated.run_federated(config)
    assert len(rounds) == 3
    for started, released, broadcast, results in rounds:
        for result in results:  # clients send B (and the head) only, and trained from the broadcast A
            assert not factors(result.upload, "A") and factors(result.upload, "B")
        for name, a in factors(released, "A").items():
            assert torch.equal(a, started[name])  # the mechanism released the A the clients had
            b_name = name.replace(".lora_A.", ".lora_B.")
            product = released[b_name].flatten(1).double() @ a.flatten(1).double()
            new = broadcast[b_name].flatten(1).double() @ broadcast[name].flatten(1).double()
            torch.testing.assert_close(new, product, rtol=1e-5, atol=1e-5)
            if torch.any(product):
                rank = a.shape[0]
                torch.testing.assert_close(broadcast[name].flatten(1) @ broadcast[name].flatten(1).T, torch.eye(rank), rtol=1e-5, atol=1e-5)
            else:
                assert torch.equal(broadcast[name], a)
    for previous, current in zip(rounds, rounds[1:]):  # what was broadcast is what the next round started from
        assert all(torch.equal(previous[2][n], current[0][n]) for n in previous[2])
    assert any(torch.any(factors(r[1], "B")[n]) for r in rounds for n in factors(r[1], "B"))  # B did learn


def test_a_client_round_changes_b_and_the_head_and_never_a():
    from dpfl_bench.client import train_client

    config = build_config({"task": "synthetic", "device": "cpu", "method": "fedsvd", "eps": 8.0}, SYNTHETIC)
    exp = federated.prepare(config)
    start = exp.workspace.params.state()
    train_client(exp.workspace, start, exp.clients[0], exp.run, client=0, round=0)
    after = exp.workspace.params.state()
    assert all(torch.equal(after[n], start[n]) for n in factors(start, "A"))
    assert all(not torch.equal(after[n], start[n]) for n in [*factors(start, "B"), "head.weight"])
