"""`authors`: what the LA-LoRA authors' public code does at every local step. **No privacy guarantee.**

Reproduced so that their reported numbers can be set beside real DP (see "The authors' code, read line by
line" in the reference notes): a shuffled batch of fixed size B, the gradient of the mean loss, then for
every trained tensor C = min(median of the tensors' norms, 0.4) (chosen from the data at every step, at
no privacy cost), each tensor's batch-mean gradient clipped to C on its own, and N(0, (dp_sigma·C/B)²)
added to every coordinate. No accountant is ever told anything: ε is NaN in the results.

For comparison the results record the noise multiplier the same noise would be relative to a per-example
sensitivity: one example moves a batch mean clipped per tensor by up to 2C in each of the L tensors, so
2C√L in all, and σ_equivalent = (dp_sigma·C/B) / (2C√L) = dp_sigma / (2B√L), at the step with the most
tensors (the weakest one).
"""

import math
import statistics

from dpfl_bench.privacy.mechanism import Mechanism, noise_like, register_mechanism
from dpfl_bench.privacy.randomness import Stream
from dpfl_bench.server import State

CLIP_CAP = 0.4  # their cap on the data-chosen clipping norm


def authors_privatize(summed: State, count: int, batch: int, dp_sigma: float, stream: Stream) -> State:
    """Their step: the mean gradient over `count` examples, per-tensor clipping at C = min(median tensor
    norm, 0.4), noise of std dp_sigma·C/batch on every coordinate."""
    mean = {name: g / max(count, 1) for name, g in summed.items()}
    norms = {name: float(g.norm()) for name, g in mean.items()}
    clip = min(statistics.median(norms.values()), CLIP_CAP)  # as their code: the middle two's mean for an even count
    clipped = {name: g * min(1.0, clip / norms[name]) if norms[name] > 0 else g for name, g in mean.items()}
    noise = noise_like(clipped, dp_sigma * clip / batch, stream)
    return {name: g + noise[name] for name, g in clipped.items()}


@register_mechanism
class AuthorsRegime(Mechanism):
    name = "authors"
    unit = "example"  # audited as sample level: canary gradients enter the batch before the noise
    accounted = False

    def calibrate(self, schedule: list[list[int]]) -> None:
        """Nothing to calibrate: the noise is --dp-sigma. σ_equivalent is known after the first step."""
        self.noise_multipliers = [math.inf]

    def spent(self, schedule: list[list[int]]) -> list[float]:
        return [math.nan]  # no accountant: no ε

    def privatize(self, summed: State, count: int, client: int, stream: Stream) -> State:
        batch, dp_sigma = min(self.config.training.batch_size, self.client_sizes[client]), self.config.privacy.dp_sigma
        equivalent = dp_sigma / (2 * batch * math.sqrt(len(summed)))
        self.noise_multipliers = [min(equivalent, self.noise_multipliers[0])]
        return authors_privatize(summed, count, batch, dp_sigma, stream)

    @property
    def clip(self) -> float:
        return CLIP_CAP  # the most any tensor's clipping norm can be
