"""Server-side aggregation arithmetic as pure functions: FedAvg, and DP-FedAvg's clip-sum-noise step
(McMahan et al. 2018). The privacy mechanisms (`privacy/mechanisms/`) decide which one a run uses.
Torch is imported where it computes, so the privacy calculator (`dpfl-bench privacy`) never loads it."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

State = dict[str, "torch.Tensor"]  # parameter name -> value: what the server holds and clients send


def fedavg_step(global_state: State, names: list[str], deltas: list[State], weights: list[float]) -> State:
    """The global state moved by the weighted mean of the clients' updates over `names` (weights need not
    sum to 1); the other names, and a round without clients, leave it as it is."""
    if not deltas:
        return dict(global_state)
    total = sum(weights)
    return {**global_state, **{n: global_state[n] + sum(w / total * d[n] for d, w in zip(deltas, weights)) for n in names}}


def clip_update(update: State, clip: float) -> State:
    """Scale a client's whole update (all tensors together) down to norm at most `clip`. An update whose
    norm is not finite (a NaN or inf anywhere) contributes zero: min(1, clip / nan) would let it through."""
    import torch

    norm = float(torch.sqrt(sum(t.double().pow(2).sum() for t in update.values())))
    scale = min(1.0, clip / (norm + 1e-12)) if norm < float("inf") else 0.0  # nan < inf is False too
    return {n: t * scale if scale else torch.zeros_like(t) for n, t in update.items()}


def noisy_sum_step(global_state: State, names: list[str], deltas: list[State], noise: State, *, clip: float, divisor: float) -> State:
    """DP-FedAvg: global + (Σ_k clip(Δ_k) + noise) / divisor over `names`. The divisor is fixed (the
    expected number of clients), so one client moves the result by at most clip / divisor whatever the
    round's size: the sensitivity the accountant assumes."""
    import torch

    clipped = [clip_update({n: d[n] for n in names}, clip) for d in deltas]
    new_state = dict(global_state)
    for name in names:
        summed = sum((c[name] for c in clipped), torch.zeros_like(global_state[name]))
        new_state[name] = global_state[name] + (summed + noise[name]) / divisor
    return new_state
