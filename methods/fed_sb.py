"""Fed-SB: W + B·R·A with A and B frozen at the pretrained weight's SVD and only the r×r matrix R trained.
Every client shares A and B, so the average of the clients' products B·R_k·A is B·(average R_k)·A: averaging
R is exact, and a client uploads r² numbers per adapted layer.

From the authors' public code (CERT-Lab/fed-sb, read in its copy putssander/fed-sb):
`fed_sb/utils/initialization_utils.py`, `find_and_initialize`: the SVD of the frozen weight, Wᵀ = U S Vᵀ
truncated to rank r, gives A ← (U_r S_r)ᵀ and B ← V_r, i.e. with W = P Σ Qᵀ, A = Σ_r Q_rᵀ and B = P_r;
`fed_sb/fed/fed_agg.py`, `aggregate_models_fed_sb`: the server averages R and the classifier alone.
Their R starts at N(0, 1e-5²); ours at exactly 0 (our decision: the model starts as the pretrained one, as
LoRA's zero B makes it, and no random draw is spent). Their SVD is randomized and in bfloat16; ours is exact,
in float64.

Their private SNLI script (`fed_sb/DP/SNLI/fed_trainer.py`) uses the other initialization,
`find_and_initialize_grad`, with R set to the singular values of a gradient estimated on 550 examples of the
pooled training data, outside any accounting. That is not offered here: every initialization dpfl-bench
runs reads no data.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dpfl_bench.errors import UserError
from dpfl_bench.method import Factor, Method, register_method

if TYPE_CHECKING:
    import torch

ONLY_R = frozenset({Factor.R})


@register_method
class FedSB(Method):
    name = "fed-sb"
    summary = "A and B frozen at the weight's SVD, only an r×r R between them trains and is averaged (exact, r² per layer)"
    citation = (
        "Singhal et al., Fed-SB: A Silver Bullet for Extreme Communication Efficiency and Performance in (Private) "
        "Federated LoRA Fine-Tuning, arXiv 2502.15436"
    )
    factors = frozenset({Factor.A, Factor.R, Factor.B})

    def initialize(self, weight: torch.Tensor, factors: dict[Factor, torch.Tensor]) -> dict[Factor, torch.Tensor]:
        import torch

        a = factors[Factor.A]
        rank = a.shape[0]
        if rank > min(weight.shape):
            raise UserError(f"fed-sb needs --rank at most {min(weight.shape)}, the smallest adapted layer's size; got {rank}")
        u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
        return {
            Factor.A: (s[:rank, None] * vh[:rank]).to(a.dtype),
            Factor.B: u[:, :rank].to(a.dtype),
            Factor.R: torch.zeros_like(factors[Factor.R]),
        }

    def trains(self, round: int, step: int) -> frozenset[Factor]:
        return ONLY_R

    def uploads(self, round: int) -> frozenset[Factor]:
        return ONLY_R
