"""LA-LoRA: A and B alternate step by step inside each client's local loop; both are sent and averaged.

Two more parts from the paper and its authors' code: B trains at a higher learning rate than A, and the
(already privatized) gradient of the factor being trained is smoothed by a Gaussian low-pass filter along
its feature axis before the optimizer step.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from dpfl_bench.method import Factor, Method, alternating, register_method


@dataclass(frozen=True)
class LALoRAOptions:
    # Factor trained on even local steps; the other trains on odd ones. B first: while B = 0 (its init),
    # A's gradient is exactly zero, so an A step first would be wasted (or pure noise under DP).
    first_factor: str = "B"
    # B's learning rate is this times --lr; A's is 1x (the authors' code uses 2, LoRA+-style).
    lr_b_multiplier: float = 2.0
    # Width of the Gaussian low-pass filter on the noisy gradient, in features; 0 turns the filter off.
    smooth_sigma: float = 1.0

    def __post_init__(self) -> None:
        if self.first_factor not in ("A", "B"):
            raise ValueError(f"first_factor must be 'A' or 'B', got {self.first_factor!r}")
        if not self.lr_b_multiplier > 0:
            raise ValueError(f"lr_b_multiplier must be > 0, got {self.lr_b_multiplier}")
        if not self.smooth_sigma >= 0:
            raise ValueError(f"smooth_sigma must be >= 0 (0 turns the filter off), got {self.smooth_sigma}")


def gaussian_smooth(grad: torch.Tensor, dim: int, sigma: float) -> torch.Tensor:
    """Convolve `grad` along `dim` with a normalized Gaussian kernel of width `sigma` (0: unchanged).

    The kernel has radius ceil(3·sigma) (at least 1) and sums to 1; the ends are padded by replicating the
    edge values, so a gradient that is constant along `dim` comes back unchanged. Every other axis (the
    LoRA rank axis in particular) is left unmixed.

    Under DP this runs on the gradient after clipping and noise, so it is post-processing of a privatized
    value and costs no privacy: it only removes high-frequency (mostly noise) components.
    """
    if sigma == 0:
        return grad
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=grad.dtype, device=grad.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = (kernel / kernel.sum()).view(1, 1, -1)
    moved = grad.movedim(dim, -1)  # [..., L]
    rows = moved.reshape(-1, 1, moved.shape[-1])  # [N, 1, L]: one 1-D signal per row
    smoothed = F.conv1d(F.pad(rows, (radius, radius), mode="replicate"), kernel)
    return smoothed.reshape(moved.shape).movedim(-1, dim)


@register_method
class LALoRA(Method):
    name = "la-lora"
    summary = "A and B alternate every local step (B, A, ...), B at a higher lr; noisy gradients low-pass filtered"
    citation = (
        "Liu et al., Rethinking LoRA for Privacy-Preserving Federated Learning in Large Models, "
        "ICLR 2026, arXiv 2602.19926"
    )
    Options = LALoRAOptions

    def trains(self, round: int, step: int) -> frozenset[Factor]:
        return alternating(self.options.first_factor, step)

    def lr_multiplier(self, factor: Factor) -> float:
        return self.options.lr_b_multiplier if factor is Factor.B else 1.0

    def postprocess(self, factor: Factor, grad: torch.Tensor) -> torch.Tensor:
        # A is [rank, in(, 1, 1)]: smooth over inputs. B is [out, rank(, 1, 1)]: smooth over outputs.
        if factor is Factor.A:
            return gaussian_smooth(grad, 1, self.options.smooth_sigma)
        if factor is Factor.B:
            return gaussian_smooth(grad, 0, self.options.smooth_sigma)
        return grad  # the head is never filtered
