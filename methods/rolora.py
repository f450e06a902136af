"""RoLoRA: one LoRA factor trains per round, alternating; only that factor is sent and averaged.

With one factor fixed across clients, averaging the other is exact (mean of B_k A = (mean B_k) A).
"""

from dataclasses import dataclass

from dpfl_bench.method import Factor, Method, alternating, register_method


@dataclass(frozen=True)
class RoLoRAOptions:
    # Factor trained in round 0. B first: while B = 0 (its init), A's gradient is exactly zero.
    first_factor: str = "B"

    def __post_init__(self) -> None:
        if self.first_factor not in ("A", "B"):
            raise ValueError(f"first_factor must be 'A' or 'B', got {self.first_factor!r}")


@register_method
class RoLoRA(Method):
    name = "rolora"
    summary = "one factor per round, alternating (B, A, B, ...); only the trained factor is sent and averaged"
    citation = (
        "Chen et al., Robust Federated Finetuning of LLMs via Alternating Optimization of LoRA (RoLoRA), "
        "NeurIPS 2025, arXiv 2502.01755"
    )
    Options = RoLoRAOptions

    def trains(self, round: int, step: int) -> frozenset[Factor]:
        return alternating(self.options.first_factor, round)

    def uploads(self, round: int) -> frozenset[Factor]:
        return alternating(self.options.first_factor, round)
