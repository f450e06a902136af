"""Server-side aggregation: FedAvg, update clipping, and client-level DP-FedAvg."""

import math

import pytest
import torch

from dpfl_bench import server
from dpfl_bench.configure import build_config
from dpfl_bench.privacy.mechanism import create_mechanism
from dpfl_bench.privacy.randomness import Purpose, Randomness
from dpfl_bench.server import clip_update, fedavg_step, noisy_sum_step


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def total_norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values()))


# ------------------------------------------------------------------------------------------- fedavg


def fedavg(states, weights):
    """FedAvg of whole states: fedavg_step from a zero global state."""
    zero = {n: torch.zeros_like(v) for n, v in states[0].items()}
    return fedavg_step(zero, list(zero), states, weights)


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


def test_fedavg_step_moves_only_the_named_parameters():
    global_state = {"lora_A": t(0, 0), "lora_B": t(1, 1), "frozen": t(7, 7)}
    deltas = [{"lora_A": t(2, 4)}, {"lora_A": t(4, 8)}]
    new = fedavg_step(global_state, ["lora_A"], deltas, [1.0, 1.0])
    assert set(new) == set(global_state)
    assert torch.equal(new["lora_A"], t(3, 6))
    assert new["lora_B"] is global_state["lora_B"] and torch.equal(new["lora_B"], t(1, 1))
    assert new["frozen"] is global_state["frozen"]
    # the caller's global state is not modified in place, and a round without clients changes nothing
    assert torch.equal(global_state["lora_A"], t(0, 0))
    assert fedavg_step(global_state, ["lora_A"], [], []) == global_state


def private(global_state, deltas, *, clip, noise=None, divisor=None):
    names = list(deltas[0]) if deltas else list(global_state)
    noise = noise or {n: torch.zeros_like(global_state[n]) for n in names}
    return noisy_sum_step(global_state, names, deltas, noise, clip=clip, divisor=divisor or len(deltas))


def test_private_step_only_changes_uploaded_names():
    global_state = {"lora_A": t(0, 0), "lora_B": t(1, 1), "head": t(5)}
    deltas = [{"lora_B": t(99, 99), "head": t(0)}, {"lora_B": t(0, 0), "head": t(0)}]
    new = private(global_state, deltas, clip=1.0)
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


def test_a_non_finite_update_contributes_zero():
    """min(1, C / nan) is 1: without the check, a NaN or inf update passed client-level clipping unclipped."""
    for bad in (float("nan"), float("inf")):
        clipped = clip_update({"a": t(bad, 1.0), "b": t(3.0)}, 1.0)
        assert torch.equal(clipped["a"], t(0, 0)) and torch.equal(clipped["b"], t(0))


# ------------------------------------------------------------------------------ client-level DP


def test_client_level_step_averages_clipped_deltas(monkeypatch):
    clip = 1.0
    g = {"A": t(1, -1, 2), "B": t(0.5, 0.5), "head": t(3)}
    deltas = [
        {"A": t(300, 0, 400), "B": t(0, 0), "head": t(0)},  # norm 500
        {"A": t(0, 0, 0), "B": t(-6000, 8000), "head": t(0)},  # norm 10000
        {"A": t(0.1, 0.2, 0), "B": t(0, 0.2), "head": t(-0.2)},  # norm < clip: kept as is
        {"A": t(1e6, 1e6, 1e6), "B": t(1e6, -1e6), "head": t(1e6)},  # huge
    ]

    entering = []
    original = server.clip_update

    def recording_clip(update, c):
        out = original(update, c)
        entering.append(out)
        return out

    monkeypatch.setattr(server, "clip_update", recording_clip)
    new = private(g, deltas, clip=clip)

    assert len(entering) == len(deltas)
    for d in entering:
        assert total_norm(d) <= clip * (1 + 1e-6)

    # expected: g + mean over clients of delta * min(1, clip / |delta|)
    expected_clipped = []
    for d in deltas:
        s = min(1.0, clip / total_norm(d))
        expected_clipped.append({n: d[n].double() * s for n in d})
    for name in g:
        mean = sum(c[name] for c in expected_clipped) / len(deltas)
        torch.testing.assert_close(new[name].double(), g[name].double() + mean, rtol=0, atol=1e-5)
    # the huge update moved the state by at most clip / m in norm
    assert total_norm({n: new[n] - g[n] for n in g}) <= clip + 1e-5


def test_a_nan_client_leaves_the_client_level_average_finite_and_unmoved():
    g = {"w": t(0, 0)}
    good = [{"w": t(0.3, 0.4)}, {"w": t(-0.1, 0.2)}]
    with_nan = private(g, [*good, {"w": t(float("nan"), 1.0)}], clip=1.0, divisor=3.0)
    assert torch.isfinite(with_nan["w"]).all()
    torch.testing.assert_close(with_nan["w"], private(g, good, clip=1.0, divisor=3.0)["w"])


def client_level(clients: int, participation: float, sigma: float, clip: float):
    config = build_config({"task": "synthetic", "dp-level": "client", "clients": clients, "participation": participation, "clip": clip})
    mechanism = create_mechanism(config, [100] * clients)
    mechanism.noise_multipliers = [sigma]
    return mechanism


def test_client_level_noise_has_std_sigma_clip_over_pn():
    n, sigma, clip = 200_000, 2.0, 0.5
    mechanism = client_level(8, 0.5, sigma, clip)  # pN = 4
    g = {"w": torch.zeros(n)}
    deltas = [{"w": torch.zeros(n)} for _ in range(3)]  # no update at all: only the noise moves the state

    def noise(round):
        return Randomness(0).stream(Purpose.NOISE, round)

    new = mechanism.aggregate(g, ["w"], deltas, [1.0] * 3, noise(0))
    std = float(new["w"].std())
    assert std == pytest.approx(sigma * clip / 4, rel=0.02)
    assert abs(float(new["w"].mean())) < 5 * sigma * clip / 4 / math.sqrt(n)
    # seeded: the same stream gives the same noise, another stream different noise
    assert torch.equal(new["w"], mechanism.aggregate(g, ["w"], deltas, [1.0] * 3, noise(0))["w"])
    assert not torch.equal(new["w"], mechanism.aggregate(g, ["w"], deltas, [1.0] * 3, noise(1))["w"])


def test_client_level_divides_by_the_expected_number_of_clients():
    """Clients are Poisson-sampled under client-level DP: the divisor is fixed, whoever came (even nobody)."""
    mechanism = client_level(5, 0.5, 0.0, 1.0)  # pN = 2.5
    g = {"w": t(0, 0)}
    stream = Randomness(0).stream(Purpose.NOISE)
    one = mechanism.aggregate(g, ["w"], [{"w": t(0.3, 0.4)}], [1.0], stream)
    torch.testing.assert_close(one["w"], t(0.3, 0.4) / 2.5)
    mechanism.noise_multipliers = [1.0]
    nobody = mechanism.aggregate(g, ["w"], [], [], stream)
    assert not torch.equal(nobody["w"], g["w"])  # noise alone still moves the state
