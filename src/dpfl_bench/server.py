"""Server-side aggregation: FedAvg, and its client-level DP form (DP-FedAvg)."""

import torch

from dpfl_bench.adapters import State


def fedavg(states: list[State], weights: list[float]) -> State:
    """Weighted average of the clients' tensors, name by name (weights need not sum to 1)."""
    total = sum(weights)
    return {name: sum(w / total * s[name] for s, w in zip(states, weights)) for name in states[0]}


def clip_update(update: State, clip: float) -> State:
    """Scale a client's whole update (all tensors together) down to norm at most `clip`."""
    norm = torch.sqrt(sum(t.float().pow(2).sum() for t in update.values()))
    scale = min(1.0, clip / (float(norm) + 1e-12))
    return {n: t * scale for n, t in update.items()}


def aggregate(
    global_state: State,
    uploads: list[State],
    weights: list[float],
    *,
    clip: float | None = None,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
) -> State:
    """The next global state. Only the uploaded names change.

    Without `clip` this is FedAvg. With it (client-level DP), each client's update (upload − global) is
    clipped to `clip`, Gaussian noise of std noise_multiplier·clip is added to their sum, and the sum is
    divided by the number of clients (uniform weights: the sensitivity analysis needs them)."""
    new_state = dict(global_state)
    if clip is None:
        new_state.update(fedavg(uploads, weights))
        return new_state
    deltas = [clip_update({n: u[n] - global_state[n] for n in u}, clip) for u in uploads]
    for name in uploads[0]:
        summed = sum(d[name] for d in deltas)
        noise = torch.randn(summed.shape, generator=generator).to(summed.device) * (noise_multiplier * clip)
        new_state[name] = global_state[name] + (summed + noise) / len(uploads)
    return new_state
