"""How close a step runs to the hardware: model FLOPs utilisation and peak memory.

MFU counts 6 x parameters x tokens per step (forward and backward through every weight, the
convention of the PaLM paper and nanoGPT; attention's own FLOPs and recomputation are not counted,
and LoRA counts like full fine-tuning), over the device's dense bf16 peak. Devices whose peak is not
in PEAK_BF16_FLOPS (CPUs among them) get no MFU rather than a guessed one.
"""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak FLOP/s by the start of torch.cuda.get_device_name(), most specific first.
PEAK_BF16_FLOPS = (
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100", 989e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100", 312e12),
    ("NVIDIA L40S", 362e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA A10G", 125e12),
)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for prefix, flops in PEAK_BF16_FLOPS if name.startswith(prefix)), None)


def flops_per_token(model: torch.nn.Module) -> float:
    """6N: N every parameter, trained or frozen (DTensor shards count whole)."""
    return 6.0 * sum(p.numel() for p in model.parameters())


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gb(device: torch.device) -> float:
    """GPU: the most memory torch held for tensors since reset_peak_memory. CPU: the process's peak
    resident memory so far (the OS keeps no per-step peak)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux
