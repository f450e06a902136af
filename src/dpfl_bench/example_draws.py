"""Random draws inside the model made per example, each example from a generator of its own.

Why. Dropout, drop-connect and stochastic depth draw from torch's generator one mask for a whole forward
pass, so an example's mask depends on which examples share its pass. Clients trained together in one pass
(`client_batch`) could then not draw the masks each draws when trained alone. Here each example of a
client's step has its own generator, keyed by (seed, round, client, step, its position in the step's
batch): its masks are the same whichever pass, physical chunk or mix of clients it is part of. Token
batches are cut to their longest example, so a mask is drawn at the task's padded width and cut likewise:
the value at a token position does not depend on how long the other examples of the pass are.

How. While a training forward pass runs inside `ExampleDraws`, a TorchFunctionMode catches the draws whose
leading dimension is the batch (or a batch-major multiple of it, such as Swin's windows) and makes each
example's rows from its generator: `F.dropout` (and `nn.Dropout`), `torch.rand` / `torch.rand_like`
(drop-connect), `Tensor.bernoulli_` (timm's stochastic depth) and `F.scaled_dot_product_attention` with
dropout, which is computed in plain operations so that its attention dropout is per example too. Any
other draw goes to torch's generator as before; `client_batch.uncovered` then finds the model's training
pass not per example, and clients train one after another.
"""

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


class ExampleDraws(TorchFunctionMode):
    """Inside: the model's random draws for example i come from a generator seeded with `seeds[i]`."""

    def __init__(self, seeds: Sequence[int], device: torch.device, token_widths: tuple[int, int] | None = None) -> None:
        """`token_widths`: (cut, padded) width of a token batch (`Examples.token_widths`): a draw's dimension
        of the cut width is drawn at the padded one, then cut."""
        super().__init__()
        self._cut, self._padded = token_widths or (0, 0)
        self._generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]
        self._device = torch.device(device)
        self._handlers: dict[Callable, Callable] = {
            F.dropout: self._dropout,
            torch.rand: self._rand,
            torch.rand_like: self._rand_like,
            torch.Tensor.bernoulli_: self._bernoulli_,
            F.scaled_dot_product_attention: self._attention,
        }

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        handler = self._handlers.get(func)
        if handler is not None:
            result = handler(*args, **kwargs)
            if result is not NotImplemented:
                return result
        return func(*args, **kwargs)

    def _uniform(self, shape: Sequence[int], device: torch.device | str | None) -> torch.Tensor | None:
        """U[0, 1) in float32 of `shape`, each example's rows from its own generator; None when the
        leading dimension cannot be split into the examples' rows (then torch's generator draws)."""
        count = len(self._generators)
        same_device = torch.device(device or "cpu").type == self._device.type
        if not shape or count == 0 or shape[0] % count or not same_device:
            return None
        rows = (shape[0] // count, *shape[1:])
        drawn = [self._padded if size == self._cut else size for size in rows]
        cut = tuple(slice(0, size) for size in rows)
        return torch.cat([torch.rand(drawn, generator=g, device=self._device)[cut] for g in self._generators])

    def _dropout(self, input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if not training or p == 0.0:
            return NotImplemented
        uniform = self._uniform(input.shape, input.device)
        if uniform is None:
            return NotImplemented
        scale = ((uniform >= p) / (1.0 - p) if p < 1.0 else torch.zeros_like(uniform)).to(input.dtype)
        return input.mul_(scale) if inplace else input * scale

    def _rand(self, *size: Any, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, **rest: Any) -> Any:
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        if generator is not None or rest.get("out") is not None:
            return NotImplemented
        uniform = self._uniform(size, device)
        if uniform is None:
            return NotImplemented
        return uniform.to(dtype or torch.get_default_dtype()).requires_grad_(bool(rest.get("requires_grad")))

    def _rand_like(self, input: torch.Tensor, *, dtype: torch.dtype | None = None, **rest: Any) -> Any:
        if rest.get("device") is not None:
            return NotImplemented
        uniform = self._uniform(input.shape, input.device)
        return NotImplemented if uniform is None else uniform.to(dtype or input.dtype)

    def _bernoulli_(self, input: torch.Tensor, p: float = 0.5, *, generator: torch.Generator | None = None) -> Any:
        if generator is not None or not isinstance(p, float):
            return NotImplemented
        uniform = self._uniform(input.shape, input.device)
        return NotImplemented if uniform is None else input.copy_(uniform < p)

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Any:
        if dropout_p == 0.0:
            return NotImplemented
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        scores = query @ key.transpose(-2, -1) * (1.0 / math.sqrt(query.shape[-1]) if scale is None else scale)
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        weights = self._dropout(torch.softmax(scores, dim=-1), dropout_p)
        return NotImplemented if weights is NotImplemented else weights @ value
