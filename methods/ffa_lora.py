"""FFA-LoRA: only B trains; A stays frozen at its shared random init, so averaging B alone is exact."""

from dpfl_bench.method import Factor, Method, register_method

ONLY_B = frozenset({Factor.B})


@register_method
class FFALoRA(Method):
    name = "ffa-lora"
    summary = "only B trains and is averaged; A stays at its shared random init (exact aggregation, half the upload)"
    citation = "Sun et al., Improving LoRA in Privacy-preserving Federated Learning, ICLR 2024, arXiv 2403.12313"

    def trains(self, round: int, step: int) -> frozenset[Factor]:
        return ONLY_B

    def uploads(self, round: int) -> frozenset[Factor]:
        # Every client holds the same A, so the average of B_k A is (average of B_k) A: nothing else to send.
        return ONLY_B
