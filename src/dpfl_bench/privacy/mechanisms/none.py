"""`none`: no privacy (--eps inf). Shuffled batches, plain mean gradients, FedAvg; no accountant."""

import math

from dpfl_bench.privacy.mechanism import Mechanism, register_mechanism


@register_mechanism
class NoPrivacy(Mechanism):
    name = "none"
    unit = None  # a non-private run is audited as the level it names (see `protected_unit`)
    accounted = False

    @property
    def clip(self) -> float:
        return math.inf  # nothing is clipped
