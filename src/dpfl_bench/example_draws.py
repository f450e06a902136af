"""Random draws inside the model made per example, from the example's own seed.

Why. Dropout, drop-connect and stochastic depth draw from torch's generator one mask for a whole forward
pass, so an example's mask depends on which examples share its pass. Clients trained together in one pass
(`client_batch`) could then not draw the masks each draws when trained alone. Here each example of a
client's step has its own seed, keyed by (seed, round, client, step, its position in the step's batch), and
its masks are the same whichever pass, physical chunk or mix of clients it is part of.

How. While a training forward pass runs inside `ExampleDraws`, a TorchFunctionMode catches the draws whose
leading dimension is the batch (or a batch-major multiple of it, such as Swin's windows): `F.dropout` (and
`nn.Dropout`), `torch.rand` / `torch.rand_like` (drop-connect), `Tensor.bernoulli_` (timm's stochastic
depth) and `F.scaled_dot_product_attention` with dropout, which is computed in plain operations so that its
attention dropout is per example too. Any other draw goes to torch's generator as before (so does one
inside a function the mode lets through whole, such as `nn.MultiheadAttention`'s dropout); then
`client_batch.uncovered` sees torch's generator move, and clients train one after another.

The draws are counter-based: element e of an example's k-th draw is splitmix64 of (the example's seed,
k, e), in vectorized integer arithmetic: no generator per example, one set of kernels per draw, and the
same bits on a CPU and a GPU. The counter e is the element's index in a canonical shape of the example's
draw in which every dimension but the outermost that is at most the task's padded token width counts as
that width: token batches are cut to their longest example, and an element keeps its counter (so its
value) however long the other examples of its pass are.
"""

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from dpfl_bench.precision import tensor_to_device

_GOLDEN, _MIX1, _MIX2 = (c - 2**64 for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))  # splitmix64
_DRAW_STRIDE = 2**40  # counters of one draw: at most 2**40 elements per example and draw
_MANTISSA_BITS = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}


class ExampleDraws(TorchFunctionMode):
    """Inside: the model's random draws for example i come from `seeds[i]` (64-bit)."""

    def __init__(self, seeds: Sequence[int], token_widths: tuple[int, int] | None = None) -> None:
        """`token_widths`: (cut, padded) width of a token batch (`Examples.token_widths`)."""
        super().__init__()
        self._seeds = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], dtype=torch.int64)
        self._seeds_on: dict[torch.device, torch.Tensor] = {}
        self._padded = token_widths[1] if token_widths else 0
        self._draws = 0  # draws made so far: the k of the next one
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

    def _uniform(self, shape: Sequence[int], device: torch.device | str | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
        """U[0, 1) of `shape` and `dtype`, each example's rows from its own seed; None when the leading
        dimension cannot be split into the examples' rows (then torch's generator draws)."""
        draw = self._draws  # counted whether or not this one falls back, so later draws keep their k
        self._draws += 1
        count = len(self._seeds)
        if not shape or count == 0 or shape[0] % count or dtype not in _MANTISSA_BITS:
            return None
        device = torch.device(device) if device is not None else torch.get_default_device()
        example = (shape[0] // count, *shape[1:])
        canonical = [example[0]] + [self._padded if 0 < size <= self._padded else size for size in example[1:]]
        if math.prod(canonical) >= _DRAW_STRIDE:  # its counters would run into the next draw's
            return None
        counter = torch.zeros((), dtype=torch.int64, device=device)
        stride = 1
        for dim in reversed(range(len(example))):
            position = torch.arange(example[dim], dtype=torch.int64, device=device) * stride
            counter = counter + position.view(-1, *[1] * (len(example) - 1 - dim))
            stride *= canonical[dim]
        counter += draw * _DRAW_STRIDE + 1
        if device not in self._seeds_on:  # copied once per pass, without waiting for the device
            self._seeds_on[device] = tensor_to_device(self._seeds, device)
        seeds = self._seeds_on[device].view(count, *[1] * len(example))
        bits = _MANTISSA_BITS[dtype]
        z = _splitmix(counter.mul_(_GOLDEN) + seeds)  # [count, *example]
        uniform = _shift_right(z, 64 - bits).to(torch.float64 if bits > 24 else torch.float32).mul_(2.0**-bits)
        return uniform.to(dtype).reshape(shape)

    def _dropout(self, input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Any:
        if not training or not 0.0 < p <= 1.0:  # off, or a p torch itself refuses
            return NotImplemented
        uniform = self._uniform(input.shape, input.device)
        if uniform is None:
            return NotImplemented
        dropped = uniform < p  # autograd keeps this boolean mask, as for torch's own dropout
        if inplace:
            return input.masked_fill_(dropped, 0.0).mul_(1.0 / (1.0 - p)) if p < 1.0 else input.zero_()
        return input.masked_fill(dropped, 0.0) * (1.0 / (1.0 - p)) if p < 1.0 else input * 0.0

    def _rand(self, *size: Any, generator: torch.Generator | None = None, dtype: torch.dtype | None = None,
              device: torch.device | str | None = None, requires_grad: bool = False, **rest: Any) -> Any:
        size = rest.pop("size", size)
        if len(size) == 1 and isinstance(size[0], (tuple, list, torch.Size)):
            size = tuple(size[0])
        if generator is not None or rest.get("out") is not None:
            return NotImplemented
        uniform = self._uniform(size, device, dtype or torch.get_default_dtype())
        return NotImplemented if uniform is None else uniform.requires_grad_(requires_grad)

    def _rand_like(self, input: torch.Tensor, *, dtype: torch.dtype | None = None, device: Any = None,
                   requires_grad: bool = False, **rest: Any) -> Any:
        uniform = self._uniform(input.shape, input.device if device is None else device, dtype or input.dtype)
        return NotImplemented if uniform is None else uniform.requires_grad_(requires_grad)

    def _bernoulli_(self, input: torch.Tensor, p: float = 0.5, *, generator: torch.Generator | None = None) -> Any:
        if generator is not None or not isinstance(p, float):
            return NotImplemented
        uniform = self._uniform(input.shape, input.device)
        return NotImplemented if uniform is None else input.copy_(uniform < p)

    def _attention(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Any:
        if dropout_p == 0.0 or (is_causal and attn_mask is not None):  # no draw, or what torch refuses
            return NotImplemented
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            key = key.repeat_interleave(query.shape[-3] // key.shape[-3], dim=-3)
            value = value.repeat_interleave(query.shape[-3] // value.shape[-3], dim=-3)
        root = math.sqrt(1.0 / math.sqrt(query.shape[-1]) if scale is None else scale)
        scores = (query * root) @ (key * root).transpose(-2, -1)  # scaled before the product, as torch: no fp16 overflow
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
        sees_a_key = (scores != float("-inf")).any(dim=-1, keepdim=True)
        weights = torch.softmax(scores, dim=-1).masked_fill(~sees_a_key, 0.0)  # a query that sees no key: 0, as torch
        weights = self._dropout(weights, dropout_p)
        return NotImplemented if weights is NotImplemented else weights @ value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> bits).bitwise_and_((1 << (64 - bits)) - 1)


def _splitmix(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's output function on int64, in place (multiplication wraps as on uint64)."""
    z.bitwise_xor_(_shift_right(z, 30)).mul_(_MIX1)
    z.bitwise_xor_(_shift_right(z, 27)).mul_(_MIX2)
    return z.bitwise_xor_(_shift_right(z, 31))
