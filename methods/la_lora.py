"""LA-LoRA: A and B alternate step by step inside each client's local loop; both are sent and averaged.

Where each part comes from (docs/concepts.md, "LA-LoRA: what comes from where"):
- the paper's text: the local alternation, and "a Gaussian low-pass filter" on the privatized gradient,
  with no kernel given;
- the authors' public code (junkangLiu0/LA-LORA, `DP_lora.py`, `update_FedAvg_AL`): B at twice A's learning
  rate; A first (`batch_idx % 2 == 0` trains A); no Gaussian anywhere, but FFT Laplacian smoothing
  (`LaplacianSmoothing2D`, σ = `ls_sigma` = 1) taken as an *extra* plain step of the round's learning rate
  before the optimizer's own step on the raw gradient, the head smoothed too (flattened, 1-D);
- dpfl-bench's decisions: B first (while B = 0, A's gradient is exactly zero, so an A step first moves A by
  noise alone under DP); the Gaussian's kernel (normalized, radius 3σ, replicated ends, along the feature
  axis only) and its width σ = 1; and that the filtered gradient *replaces* the raw one in the step.

`filter = "laplacian"` with `first_factor = "A"` is the authors' code, and its results say so
(`la-lora (authors' code)`); `smooth_sigma = 0` keeps alternation and B's learning rate only (`no filter`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dpfl_bench.method import Factor, Method, alternating, register_method

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class LALoRAOptions:
    # Factor trained on even local steps; the other trains on odd ones. B first (our decision; the authors'
    # code trains A first): while B = 0 (its init), A's gradient is exactly zero, so an A step first would be
    # wasted (or pure noise under DP).
    first_factor: str = "B"
    # B's learning rate is this times --lr; A's is 1x (the authors' code uses 2, LoRA+-style).
    lr_b_multiplier: float = 2.0
    # Strength of the filter: the Gaussian's width in features, or the Laplacian smoothing's σ (the authors'
    # ls_sigma, 1); 0: no filter.
    smooth_sigma: float = 1.0
    # gaussian: the paper's text, with our kernel, the filtered gradient replacing the raw one; laplacian: the
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
    import torch
    import torch.nn.functional as F

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
    """Solve (I − sigma·L) d = grad in the frequency domain, d = ifft(fft(grad) / (1 − sigma·fft(stencil))), L the
    discrete Laplacian over every axis of `grad` with periodic ends: the authors' `LaplacianSmoothing2D` (and,
    on a flattened tensor, `LaplacianSmoothing`). It damps high frequencies and keeps the mean.

    Their stencil is written element by element (centre −2 per axis, 1 at ±1), so on an axis of 2 elements
    its two 1s fall on one element, [−2, 1]: that axis then also damps its mean (eigenvalues −1, −3 where a
    periodic Laplacian has 0, −4). Kept, since this is their filter; an axis of 1 element is left as it is
    (theirs fails there). Computed in float64, returned in `grad`'s dtype."""
    import torch

    if sigma == 0:
        return grad
    x = grad.double()
    eigenvalues = torch.zeros(x.shape, dtype=torch.float64, device=x.device)
    for axis, n in enumerate(x.shape):
        stencil = torch.zeros(n, dtype=torch.float64, device=x.device)
        if n > 1:
            stencil[0], stencil[1], stencil[-1] = -2.0, 1.0, 1.0  # set, not added, as theirs
        shape = [1] * x.dim()
        shape[axis] = n
        eigenvalues = eigenvalues + torch.fft.fft(stencil).real.view(shape)
    return torch.fft.ifftn(torch.fft.fftn(x) / (1 - sigma * eigenvalues)).real.to(grad.dtype)


@register_method
class LALoRA(Method):
    name = "la-lora"
    summary = (
        "A and B alternate every local step (B, A, ...), B at 2x the lr; noisy gradients low-pass filtered "
        "(alternation and filter: the paper's text; B's lr, A first and the Laplacian extra step: the authors' code; "
        "B first and the Gaussian kernel: dpfl-bench's choice)"
    )
    citation = (
        "Liu et al., Rethinking LoRA for Privacy-Preserving Federated Learning in Large Models, "
        "ICLR 2026, arXiv 2602.19926"
    )
    Options = LALoRAOptions

    @property
    def label(self) -> str:
        options = self.options
        authors = (options.first_factor, options.filter, options.lr_b_multiplier) == ("A", "laplacian", 2.0)
        if authors and options.smooth_sigma > 0:
            return f"{self.name} (authors' code)"
        variant = [
            *(["A first"] if options.first_factor == "A" else []),
            *(["no filter"] if options.smooth_sigma == 0 else ["laplacian"] if options.filter == "laplacian" else []),
        ]
        return f"{self.name} ({', '.join(variant)})" if variant else self.name

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
