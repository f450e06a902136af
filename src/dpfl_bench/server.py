"""Server-side aggregation: FedAvg, and its client-level DP form (DP-FedAvg, McMahan et al. 2018)."""

import torch

from dpfl_bench.adapters import State


def fedavg(states: list[State], weights: list[float]) -> State:
    """Weighted average of the clients' tensors, name by name (weights need not sum to 1)."""
    total = sum(weights)
    return {name: sum(w / total * s[name] for s, w in zip(states, weights)) for name in states[0]}


def clip_update(update: State, clip: float) -> State:
    """Scale a client's whole update (all tensors together) down to norm at most `clip`."""
    norm = torch.sqrt(sum(t.double().pow(2).sum() for t in update.values()))
    scale = min(1.0, clip / (float(norm) + 1e-12))
    return {n: t * scale for n, t in update.items()}


def aggregate(global_state: State, uploads: list[State], weights: list[float]) -> State:
    """The next global state under FedAvg; only the uploaded names change."""
    return {**global_state, **fedavg(uploads, weights)}


def aggregate_private(
    global_state: State,
    uploads: list[State],
    *,
    names: list[str],
    clip: float,
    noise_multiplier: float,
    expected_clients: float,
    generator: torch.Generator,
) -> State:
    """The next global state under client-level DP.

    Each client's update (upload − global, over `names`) is clipped to `clip`; Gaussian noise of std
    noise_multiplier·clip is added to their sum, which is divided by the *expected* number of clients.
    Clients are Poisson-sampled, so a round may have none, and a fixed divisor keeps one client's
    influence on the result at most `clip` / expected_clients: the sensitivity the accountant assumes."""
    deltas = [clip_update({n: u[n] - global_state[n] for n in names}, clip) for u in uploads]
    new_state = dict(global_state)
    for name in names:
        summed = sum((d[name] for d in deltas), torch.zeros_like(global_state[name]))
        noise = torch.randn(summed.shape, generator=generator).to(summed.device) * (noise_multiplier * clip)
        new_state[name] = global_state[name] + (summed + noise) / expected_clients
    return new_state
