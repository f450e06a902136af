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


def to_device(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Copy a batch to the device; on CUDA through pinned memory, so the copy overlaps with compute."""
    if device.type != "cuda":
        return {k: v.to(device) for k, v in tensors.items()}
    return {k: v.pin_memory().to(device, non_blocking=True) for k, v in tensors.items()}
