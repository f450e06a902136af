"""LA-LoRA: A and B alternate step by step inside each client's local loop; both are sent and averaged.

Two more parts from the paper and its authors' code: B trains at a higher learning rate than A, and the
(already privatized) gradient of the factor being trained is smoothed by a Gaussian low-pass filter along
its feature axis before the optimizer step.

`filter = "laplacian"` reproduces the authors' stored code instead: FFT Laplacian smoothing over every axis
of a LoRA factor (rank included, periodic ends) and over the flattened head, taken as an *extra* plain
step of the round's learning rate before the optimizer's own step on the raw gradient.
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
    # Strength of the filter: the Gaussian's width in features, or the Laplacian smoothing's σ; 0: no filter.
    smooth_sigma: float = 1.0
    # gaussian: the filtered gradient replaces the raw one (the paper's newer README); laplacian: the
    # authors' code, an extra smoothed step before the optimizer's step, the head included.
    filter: str = "gaussian"

    def __post_init__(self) -> None:
        if self.first_factor not in ("A", "B"):
            raise ValueError(f"first_factor must be 'A' or 'B', got {self.first_factor!r}")
        if self.filter not in ("gaussian", "laplacian"):
            raise ValueError(f"filter must be 'gaussian' or 'laplacian', got {self.filter!r}")
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


def laplacian_smooth(grad: torch.Tensor, sigma: float) -> torch.Tensor:
    """Solve (I − sigma·Δ) d = grad, Δ the discrete Laplacian over every axis of `grad` with periodic ends,
    in the frequency domain: d = ifft(fft(grad) / (1 − sigma·λ)), λ = Σ_axes (2cos(2πk/n) − 2) ≤ 0.

    The authors' `LaplacianSmoothing2D` (and, on a flattened tensor, `LaplacianSmoothing`). It damps high
    frequencies and keeps the mean (λ = 0 at k = 0). Computed in float64, returned in `grad`'s dtype."""
    if sigma == 0:
        return grad
    x = grad.double()
    eigenvalues = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for axis, n in enumerate(x.shape):
        shape = [1] * x.dim()
        shape[axis] = n
        frequencies = torch.fft.fftfreq(n, dtype=torch.float64, device=x.device)
        eigenvalues = eigenvalues + (2 * torch.cos(2 * math.pi * frequencies) - 2).view(shape)
    return torch.fft.ifftn(torch.fft.fftn(x) / (1 - sigma * eigenvalues)).real.to(grad.dtype)


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
        if self.options.filter == "laplacian":
            return grad  # the raw gradient: the smoothed one took its own step (`extra_step`)
        # A is [rank, in(, 1, 1)]: smooth over inputs. B is [out, rank(, 1, 1)]: smooth over outputs.
        if factor is Factor.A:
            return gaussian_smooth(grad, 1, self.options.smooth_sigma)
        if factor is Factor.B:
            return gaussian_smooth(grad, 0, self.options.smooth_sigma)
        return grad  # the head is never filtered

    def extra_step(self, factor: Factor, grad: torch.Tensor) -> torch.Tensor | None:
        if self.options.filter != "laplacian" or self.options.smooth_sigma == 0:
            return None
        # LoRA factors over all their axes (a conv's trailing 1x1 adds nothing); the head flattened, as theirs.
        smoothed = laplacian_smooth(grad if factor is not Factor.HEAD else grad.flatten(), self.options.smooth_sigma)
        return smoothed.reshape(grad.shape)
