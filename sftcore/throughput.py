"""How close a step runs to the hardware: model FLOPs utilisation and peak memory.

MFU counts the matrix FLOPs a step runs, over the device's dense bf16 peak (sftcore.throughput.StepFlops):

    FLOPs = tokens x sum(c(w) x active(w) x |w|, w in the decoder) + positions x c(head) x |head|

with c(w) = 6 for a trained weight (forward 2, backward to inputs 2, to the weight 2) and 4 for a frozen
one (LoRA's base: no weight gradient); active(w) = experts per token / experts for a mixture-of-experts
layer's experts, else 1; the input embedding costs nothing (a lookup); the LM head runs on the trained
positions only (``positions``; every token where the model's full logits are taken). Attention's own
FLOPs (scores and values) and recomputation under gradient checkpointing are not counted, as in the
PaLM paper's 6N and nanoGPT. Devices whose peak is not in PEAK_BF16_FLOPS (CPUs among them) get no MFU
rather than a guessed one.
"""

from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from typing import Any

import torch

# Dense bf16 peak FLOP/s by the start of torch.cuda.get_device_name(), most specific first (NVL parts
# run at lower clocks than SXM ones).
PEAK_BF16_FLOPS = (
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
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


@dataclass(frozen=True)
class StepFlops:
    """A step's matrix FLOPs: ``per_token`` for every token through the decoder, ``per_position`` for
    each position the LM head runs on (see the module docstring)."""

    per_token: float
    per_position: float

    def __call__(self, tokens: float, positions: float) -> float:
        return self.per_token * tokens + self.per_position * positions


def _active_share(config: Any) -> float:
    """Experts per token over experts, for a mixture-of-experts config (else 1)."""
    experts = next(
        (n for n in (getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")) if n),
        None,
    )
    per_token = getattr(config, "num_experts_per_tok", None)
    return per_token / experts if experts and per_token else 1.0


def step_flops(model: torch.nn.Module) -> StepFlops:
    """The model's StepFlops (DTensor shards count whole; a PEFT model's frozen base at 4, its adapters at 6)."""
    head = model.get_output_embeddings().weight
    embedding = model.get_input_embeddings().weight
    active = _active_share(model.config)
    per_token = per_position = 0.0
    for name, weight in model.named_parameters():  # a tied head and embedding come once: the head
        cost = (6.0 if weight.requires_grad else 4.0) * weight.numel()
        if weight is head:
            per_position += cost
        elif weight is not embedding:
            per_token += cost * (active if ".experts." in f"{name}." else 1.0)
    return StepFlops(per_token, per_position)


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
