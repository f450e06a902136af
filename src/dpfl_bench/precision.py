"""Precision of the forward pass: autocast dtypes, fp16's constant loss scale, and moving batches to the device."""

import contextlib

import torch

# fp16 only: the summed loss is multiplied by this before the backward pass so that small activation
# gradients stay representable in half precision; per-example gradients are divided by it in fp32. A
# constant, not a dynamic scaler: a scale that adapts to overflows would make the step depend on the data.
FP16_LOSS_SCALE = 2.0**12
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for the forward pass; fp32 runs as is."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def use_tensor_cores(device: torch.device) -> None:
    """fp32 on a CUDA GPU: matmuls and convolutions on TF32 tensor cores (inputs rounded to 10 mantissa
    bits, sums in fp32), several times faster than full fp32 GEMMs. The privacy arithmetic is unaffected:
    each example's computed gradient is clipped by its own computed norm, in fp32, whatever rounding
    produced it."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch to the device (see `tensor_to_device`)."""
    return {k: tensor_to_device(v, device) for k, v in tensors.items()}


def tensor_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """On CUDA through pinned memory, so the copy overlaps with compute instead of blocking the host."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
