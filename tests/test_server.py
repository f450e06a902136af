"""Server-side aggregation: FedAvg, update clipping, and client-level DP-FedAvg."""

import math

import pytest
import torch

from dpfl_bench import server
from dpfl_bench.server import aggregate, aggregate_private, clip_update, fedavg


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def total_norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))


# ------------------------------------------------------------------------------------------- fedavg


def test_fedavg_uniform_is_exact():
    states = [{"a": t(1, 2), "b": t(10)}, {"a": t(3, 4), "b": t(20)}, {"a": t(5, 9), "b": t(-6)}]
    avg = fedavg(states, [1.0, 1.0, 1.0])
    assert set(avg) == {"a", "b"}
    torch.testing.assert_close(avg["a"], t(3, 5), rtol=0, atol=1e-6)
    torch.testing.assert_close(avg["b"], t(8), rtol=0, atol=1e-6)


def test_fedavg_weighted_is_exact():
    states = [{"w": t(0, 4, -8)}, {"w": t(4, 8, 8)}]
    # weights 1 and 3: 0.25 * first + 0.75 * second, dyadic, so exact in float32
    assert torch.equal(fedavg(states, [1.0, 3.0])["w"], t(3, 7, 4))
    # weights need not sum to 1: example counts 50 and 150 give the same average
    assert torch.equal(fedavg(states, [50, 150])["w"], t(3, 7, 4))
    # a zero weight drops a client
    assert torch.equal(fedavg(states, [0.0, 2.0])["w"], t(4, 8, 8))


def test_fedavg_of_one_client_is_that_client():
    state = {"w": torch.randn(3, 4)}
    torch.testing.assert_close(fedavg([state], [7.0])["w"], state["w"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------- aggregate


def test_aggregate_without_clip_is_fedavg_and_only_changes_uploaded_names():
    global_state = {"lora_A": t(0, 0), "lora_B": t(1, 1), "frozen": t(7, 7)}
    uploads = [{"lora_A": t(2, 4)}, {"lora_A": t(4, 8)}]
    new = aggregate(global_state, uploads, [1.0, 1.0])
    assert set(new) == set(global_state)
    assert torch.equal(new["lora_A"], t(3, 6))
    assert new["lora_B"] is global_state["lora_B"] and torch.equal(new["lora_B"], t(1, 1))
    assert new["frozen"] is global_state["frozen"]
    # the caller's global state is not modified in place
    assert torch.equal(global_state["lora_A"], t(0, 0))


def private(global_state, uploads, *, clip, noise_multiplier=0.0, expected_clients=None, generator=None):
    return aggregate_private(
        global_state,
        uploads,
        names=list(uploads[0]),
        clip=clip,
        noise_multiplier=noise_multiplier,
        expected_clients=expected_clients or len(uploads),
        generator=generator or torch.Generator().manual_seed(0),
    )


def test_private_aggregate_only_changes_uploaded_names():
    global_state = {"lora_A": t(0, 0), "lora_B": t(1, 1), "head": t(5)}
    uploads = [{"lora_B": t(100, 100), "head": t(5)}, {"lora_B": t(1, 1), "head": t(5)}]
    new = private(global_state, uploads, clip=1.0)
    assert set(new) == set(global_state)
    assert new["lora_A"] is global_state["lora_A"]
    assert not torch.equal(new["lora_B"], global_state["lora_B"])
    assert torch.equal(global_state["lora_B"], t(1, 1))


# -------------------------------------------------------------------------------------- clip_update


def test_clip_update_bounds_the_joint_norm_and_keeps_the_direction():
    update = {"a": t(300, 400), "b": t(0, 0, 1200)}  # joint norm 1300
    clipped = clip_update(update, 2.0)
    assert total_norm(clipped) == pytest.approx(2.0, rel=1e-6)
    # one common scale for all tensors (the whole update is clipped, not each tensor separately)
    scale = 2.0 / 1300.0
    for name in update:
        torch.testing.assert_close(clipped[name], update[name] * scale, rtol=1e-6, atol=0)


def test_clip_update_leaves_small_updates_untouched():
    update = {"a": t(0.3, -0.4), "b": t(0.1)}  # norm < 1
    clipped = clip_update(update, 1.0)
    for name in update:
        assert torch.equal(clipped[name], update[name])


def test_clip_update_of_zero_is_zero_not_nan():
    clipped = clip_update({"a": torch.zeros(3)}, 1.0)
    assert torch.equal(clipped["a"], torch.zeros(3))


# ------------------------------------------------------------------------------ client-level DP


def test_client_level_aggregate_averages_clipped_deltas(monkeypatch):
    clip = 1.0
    g = {"A": t(1, -1, 2), "B": t(0.5, 0.5), "head": t(3)}
    deltas = [
        {"A": t(300, 0, 400), "B": t(0, 0), "head": t(0)},  # norm 500
        {"A": t(0, 0, 0), "B": t(-6000, 8000), "head": t(0)},  # norm 10000
        {"A": t(0.1, 0.2, 0), "B": t(0, 0.2), "head": t(-0.2)},  # norm < clip: kept as is
        {"A": t(1e6, 1e6, 1e6), "B": t(1e6, -1e6), "head": t(1e6)},  # huge
    ]
    uploads = [{n: g[n] + d[n] for n in g} for d in deltas]

    entering = []
    original = server.clip_update

    def recording_clip(update, c):
        out = original(update, c)
        entering.append(out)
        return out

    monkeypatch.setattr(server, "clip_update", recording_clip)
    new = private(g, uploads, clip=clip)

    assert len(entering) == len(uploads)
    for d in entering:
        assert total_norm(d) <= clip * (1 + 1e-6)

    # expected: g + mean over clients of delta * min(1, clip / |delta|)
    expected_clipped = []
    for d in deltas:
        norm = total_norm({n: d[n] for n in d})
        s = min(1.0, clip / norm)
        expected_clipped.append({n: d[n].double() * s for n in d})
    for name in g:
        mean = sum(c[name] for c in expected_clipped) / len(deltas)
        torch.testing.assert_close(new[name].double(), g[name].double() + mean, rtol=0, atol=1e-5)
    # the huge update moved the state by at most clip / m in norm
    assert total_norm({n: new[n] - g[n] for n in g}) <= clip + 1e-5


def test_client_level_aggregate_noise_has_std_sigma_clip_over_m():
    n, m, sigma, clip = 200_000, 4, 2.0, 0.5
    g = {"w": torch.zeros(n)}
    uploads = [{"w": torch.zeros(n)} for _ in range(m)]  # no update at all: only the noise moves the state
    new = private(g, uploads, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(0))
    std = float(new["w"].std())
    assert std == pytest.approx(sigma * clip / m, rel=0.02)
    assert abs(float(new["w"].mean())) < 5 * sigma * clip / m / math.sqrt(n)
    # seeded: the same generator seed gives the same noise, another seed different noise
    again = private(g, uploads, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(0))
    other = private(g, uploads, clip=clip, noise_multiplier=sigma, generator=torch.Generator().manual_seed(1))
    assert torch.equal(new["w"], again["w"])
    assert not torch.equal(new["w"], other["w"])


def test_private_aggregate_divides_by_the_expected_number_of_clients():
    """Clients are Poisson-sampled under client-level DP: the divisor is fixed, whoever came (even nobody)."""
    g = {"w": t(0, 0)}
    one = private(g, [{"w": t(0.3, 0.4)}], clip=1.0, expected_clients=2.5)
    torch.testing.assert_close(one["w"], t(0.3, 0.4) / 2.5)
    nobody = aggregate_private(
        g, [], names=["w"], clip=1.0, noise_multiplier=1.0, expected_clients=2.5, generator=torch.Generator().manual_seed(0)
    )
    assert not torch.equal(nobody["w"], g["w"])  # noise alone still moves the state
