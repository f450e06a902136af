"""DP-LoRA: plain LoRA under DP federated learning; A and B train together and are averaged separately."""

from dpfl_bench.method import Method, register_method


@register_method
class DPLoRA(Method):
    name = "dp-lora"
    summary = "A and B train together at every step and are averaged separately (the plain baseline)"
    citation = "Liu et al., Differentially Private Low-Rank Adaptation for LLMs, arXiv 2312.17493"
