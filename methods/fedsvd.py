"""FedSVD: clients train only B, as FFA-LoRA; after each aggregation the server re-factorizes the global
product by SVD, B·A = UΣVᵀ, and broadcasts A ← Vᵣᵀ (orthonormal rows) and B ← UᵣΣᵣ: the model is unchanged,
and the next round's frozen A is the basis of what has been learned.

From the authors' public code (seanie12/fed-svd: `misc/utils.py`, `reinit_lora`, called by the server after
its round when `--recalculate-svd-period` divides the round and `--svd-warmup-steps` have passed; both
default to 1 and 0). The re-factorization reads only the privatized aggregate, so it is post-processing
and costs no privacy. Our decision: while a layer's B·A is still zero (nothing learned yet, e.g. a round
without clients) its A is kept, where an SVD of zeros would give an arbitrary basis.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpfl_bench.method import Factor, Method, register_method

if TYPE_CHECKING:
    import torch

ONLY_B = frozenset({Factor.B})


@dataclass(frozen=True)
class FedSVDOptions:
    period: int = 1  # re-factorize after every this many rounds (their --recalculate-svd-period)
    warmup_rounds: int = 0  # not before this many rounds have passed (their --svd-warmup-steps)

    def __post_init__(self) -> None:
        if self.period < 1:
            raise ValueError(f"period must be at least 1, got {self.period}")
        if self.warmup_rounds < 0:
            raise ValueError(f"warmup_rounds must be 0 or more, got {self.warmup_rounds}")


def refactorize(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B'·A' = B·A, A' the top-r right singular vectors (orthonormal rows) and B' = UᵣΣᵣ; the
    shapes (and a 1x1 convolution's trailing dimensions) kept. A zero product gives (A, B) back."""
    import torch

    rank = a.shape[0]
    product = b.flatten(1).double() @ a.flatten(1).double()  # [out, in]
    if not torch.any(product):
        return a, b
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    return vh[:rank].reshape(a.shape).to(a.dtype), (u[:, :rank] * s[:rank]).reshape(b.shape).to(b.dtype)


@register_method
class FedSVD(Method):
    name = "fedsvd"
    summary = "only B trains and is averaged (as ffa-lora); then the server re-factorizes B·A by SVD, so A follows what was learned"
    citation = (
        "Lee et al., FedSVD: Adaptive Orthogonalization for Private Federated Learning with LoRA, NeurIPS 2025, "
        "arXiv 2505.12805"
    )
    Options = FedSVDOptions

    def trains(self, round: int, step: int) -> frozenset[Factor]:
        return ONLY_B

    def uploads(self, round: int) -> frozenset[Factor]:
        return ONLY_B  # every client holds the broadcast A: averaging B is exact

    def broadcast(self, round: int, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        done = round + 1
        if done <= self.options.warmup_rounds or done % self.options.period:
            return state
        out = dict(state)
        for a_name in (n for n in state if ".lora_A." in n):
            b_name = a_name.replace(".lora_A.", ".lora_B.")
            out[a_name], out[b_name] = refactorize(state[a_name], state[b_name])
        return out
