"""Where every random draw of a run comes from: one stream per purpose, seeded or cryptographically secure.

`--rng seeded` (default): every stream is a PCG64 generator keyed by (seed, purpose, round, client)
through NumPy's SeedSequence, with the seed as its entropy and a fixed-length spawn key, so two purposes
(or two rounds, or two clients) never share a stream. Reproducible, which is what a benchmark on public
data wants, and **not private** against anyone who can guess or brute-force the seed.

`--rng secure`: the privacy-relevant streams (client participation, Poisson masks, Gaussian noise,
canary inclusion and sampling) each come from ChaCha20 keyed with 256 fresh bits from the operating
system, kept in memory only and never written anywhere; their Gaussian noise is hardened against
floating-point attacks as Opacus's `secure_mode` does. The other streams (data split, initialization,
dropout, canary directions) stay seeded: nothing in the guarantee depends on their secrecy.

Every draw is made on the CPU and copied to the device, so one seed gives the same noise on a CPU and on
a GPU, whatever the physical batch size. Code that draws from torch's own generator and cannot be handed
one (peft's and timm's initializers) gets torch's generator seeded from its stream; dropout inside the model
draws per example from `example_seeds` (see `example_draws`).
"""

from __future__ import annotations

import enum
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

SERVER = 2**32 - 1  # the `client` key of the server's own streams (client ids are below it)
MODES = ("seeded", "secure")


class Purpose(enum.IntEnum):
    SPLIT = 1  # the data partition across clients
    PARTICIPATION = 2  # which clients take part in each round
    INIT = 3  # the initial LoRA A and head
    BATCHES = 4  # a client's Poisson masks or shuffles
    NOISE = 5  # Gaussian noise: a client's (sample level) or the server's (client level)
    DROPOUT = 6  # dropout masks inside the model (per example), and torch's generator for other draws there
    CANARY_DIRECTIONS = 7  # the audit's canary directions (public: the auditor knows them)
    CANARY_INCLUSION = 8  # which canaries are inserted
    CANARY_SAMPLING = 9  # which inserted canaries a step or round samples


SECRET = frozenset({Purpose.PARTICIPATION, Purpose.BATCHES, Purpose.NOISE, Purpose.CANARY_INCLUSION, Purpose.CANARY_SAMPLING})


class Stream:
    """One stream of draws, on the CPU. `hardened` streams sample Gaussians the secure way."""

    def __init__(self, generator: np.random.Generator, hardened: bool = False) -> None:
        self._generator = generator
        self._hardened = hardened

    def bernoulli(self, n: int, p: float) -> np.ndarray:
        """n independent coins of probability p, compared in float64 against p itself (the accounted rate)."""
        return self._generator.random(n) < p

    def permutation(self, n: int) -> np.ndarray:
        return self._generator.permutation(n)

    def choice(self, n: int, size: int) -> np.ndarray:
        return self._generator.choice(n, size=size, replace=False)

    def dirichlet(self, alpha: np.ndarray) -> np.ndarray:
        return self._generator.dirichlet(alpha)

    def bytes(self, n: int) -> bytes:
        return self._generator.bytes(n)

    def normal(self, shape: tuple[int, ...] | torch.Size, std: float) -> torch.Tensor:
        """N(0, std²) per coordinate, float32 on the CPU.

        Hardened: (z1 + z2 + z3 + z4) / 2 of four float64 draws, the fix of Holohan & Braghin (arXiv
        2107.10138, §5.1) that Opacus's secure_mode uses: an attacker who sees a noisy value can no longer
        tell from its floating-point pattern which values a single draw can produce."""
        import torch

        size = tuple(shape)
        if self._hardened:
            z = self._generator.standard_normal((4, *size)).sum(axis=0) / 2
            return torch.from_numpy(z.astype(np.float32) * np.float32(std))
        return torch.from_numpy(self._generator.standard_normal(size, dtype=np.float32) * np.float32(std))


@dataclass(frozen=True)
class Randomness:
    """The run's source of randomness: `stream(purpose, round, client)` opens one stream."""

    seed: int
    mode: str = "seeded"  # seeded | secure

    @property
    def secure(self) -> bool:
        return self.mode == "secure"

    def stream(self, purpose: Purpose, round: int = 0, client: int = 0) -> Stream:
        if self.secure and purpose in SECRET:
            return Stream(np.random.Generator(_secure_bit_generator()), hardened=True)
        return Stream(np.random.Generator(np.random.PCG64(self._key(purpose, round, client))))

    def torch_seed(self, purpose: Purpose, round: int = 0, client: int = 0) -> int:
        """A 64-bit seed for torch's generator, for library code that draws from it (never a SECRET purpose)."""
        assert purpose not in SECRET, f"{purpose.name} draws must come from stream(), not torch's generator"
        return int(self._key(purpose, round, client).generate_state(1, dtype=np.uint64)[0])

    def example_seeds(self, round: int, client: int, step: int, count: int) -> list[int]:
        """One 64-bit seed per example of a client's step (by its position in the batch), for the draws
        inside the model (dropout): an example's masks then do not depend on what shares its pass."""
        key = np.random.SeedSequence(self.seed, spawn_key=(int(Purpose.DROPOUT), round, client, step))
        return key.generate_state(count, dtype=np.uint64).tolist()

    def _key(self, purpose: Purpose, round: int, client: int) -> np.random.SeedSequence:
        # The spawn key always has three words and the seed is padded to a whole pool (it is < 2**63), so
        # no two (seed, purpose, round, client) give the same key: unlike SeedSequence([s, 3]) and
        # SeedSequence([s, 3, 0]), which are one and the same.
        return np.random.SeedSequence(self.seed, spawn_key=(int(purpose), round, client))


def _secure_bit_generator() -> np.random.BitGenerator:
    """ChaCha20 (20 rounds) keyed with 256 bits from the operating system. Why ChaCha20: a standard stream
    cipher (RFC 8439, the generator behind Linux's getrandom) that is constant-time in software, where
    AES counter mode is only fast and side-channel-safe with AES-NI; measured here at 1.5 ms per 100k
    float32 normals (PCG64: 0.9 ms), so a hardened draw for a LoRA-sized step costs milliseconds."""
    from randomgen import ChaCha

    return ChaCha(key=fresh_key(), rounds=20)


def fresh_key() -> np.ndarray:
    """256 bits from the operating system, as ChaCha's four uint64 key words. Never stored or logged."""
    return np.frombuffer(os.urandom(32), dtype=np.uint64).copy()
