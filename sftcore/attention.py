"""Packed attention without seq x seq masks.

The collate passes each micro-batch's sample boundaries (``cu_seq_lens_q``: cumulative lengths over
the flattened batch, the padding tail of a row or pack being a segment of its own; ``max_length_q``)
to the model, which hands them to the attention function. ``packed_sdpa`` (registered with
transformers' AttentionInterface) runs causal sdpa over each segment with no mask at all, so torch
picks its flash kernel (on CPU too) and memory grows with the segment, not with pack length
squared; transformers builds no 4D mask for an implementation it has no mask function for.
``packed_varlen`` (CUDA, torch >= 2.10) hands the whole flattened batch and its boundaries to
torch's varlen flash kernel in one call; flash_attention_2 (the flash-attn package) reads the same
boundaries.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AttentionInterface

PACKED_SDPA = "packed_sdpa"
PACKED_VARLEN = "packed_varlen"
ATTENTION_CHOICES = ("auto", PACKED_SDPA, PACKED_VARLEN, "sdpa", "eager", "flash_attention_2")
# The implementations that read the boundaries; others get none (a remote-code model may refuse them).
READS_BOUNDARIES = (PACKED_SDPA, PACKED_VARLEN, "flash_attention_2")


def segment_boundaries(lengths: list[list[int]], width: int) -> tuple[torch.Tensor, int]:
    """(cumulative lengths over the flattened [len(lengths), width] batch, longest segment) for rows
    made of segments of the given lengths each, every row right-padded to width by a segment of its own."""
    segments = []
    for row in lengths:
        segments += row
        if width > sum(row):
            segments.append(width - sum(row))
    bounds = np.concatenate([[0], np.cumsum(segments)])
    return torch.as_tensor(bounds, dtype=torch.int32), int(max(segments))


def _boundaries(
    query: torch.Tensor, key: torch.Tensor, cu_seq_lens: torch.Tensor | None, max_length: int | None
) -> tuple[Any, int]:
    """The boundaries collate passed, or (a caller without them) each row as one causal sequence."""
    batch, _, length, _ = query.shape
    if key.shape[2] != length:  # decoding against a KV cache: unpacked_attention() is for that
        raise ValueError("packed attention computes whole sequences (training); generate under unpacked_attention()")
    if cu_seq_lens is None:
        return torch.arange(0, (batch + 1) * length, length, dtype=torch.int32, device=query.device), length
    return cu_seq_lens, max_length or length


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment. query [batch, heads, length, dim], key and value
    [batch, kv heads, length, dim]; returns [batch, length, heads, dim] as transformers expects."""
    batch, heads, length, dim = query.shape
    bounds = _boundaries(query, key, cu_seq_lens_q, None)[0].tolist()
    # [1, heads, batch * length, dim]: sdpa's CPU flash kernel takes 4-D inputs only (3-D ones fall
    # back to the math kernel, which keeps a segment x segment matrix per head for backward).
    flat = [t.transpose(0, 1).reshape(1, t.shape[1], batch * length, dim) for t in (query, key, value)]
    gqa = key.shape[1] != heads
    outputs = [
        F.scaled_dot_product_attention(
            *(t[:, :, start:end] for t in flat),
            is_causal=True,
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=gqa,
        )
        for start, end in zip(bounds, bounds[1:], strict=False)
        if end > start
    ]
    output = torch.cat(outputs, dim=2).reshape(heads, batch, length, dim)
    return output.permute(1, 2, 0, 3).contiguous(), None


def _varlen_kernel() -> Any | None:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def packed_varlen(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    max_length_q: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """packed_sdpa's attention in one call of torch's varlen flash kernel (CUDA, bf16 or fp16)."""
    if dropout:
        raise ValueError(
            "--attn_implementation packed_varlen has no attention dropout; this model asks for "
            f"{dropout}: use --attn_implementation packed_sdpa"
        )
    batch, heads, length, dim = query.shape
    cu_seq_lens_q, max_length_q = _boundaries(query, key, cu_seq_lens_q, max_length_q)
    # Under autocast RoPE's fp32 cos/sin promote query and key to fp32 while value stays bf16.
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else value.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(
            f"--attn_implementation packed_varlen runs in bf16 or fp16 (flash kernel), not {dtype}: train on a "
            "GPU with bf16, or use --attn_implementation packed_sdpa"
        )
    query, key, value = (t.to(dtype) for t in (query, key, value))
    kernel = _varlen_kernel()
    parameters = inspect.signature(kernel).parameters
    # torch 2.10-2.11 spell causal `is_causal`; later releases a (left, right) window.
    causal = {"window_size": (-1, 0)} if "window_size" in parameters else {"is_causal": True}
    if "enable_gqa" in parameters:
        causal["enable_gqa"] = key.shape[1] != heads
    elif key.shape[1] != heads:
        key, value = (t.repeat_interleave(heads // t.shape[1], dim=1) for t in (key, value))
    flat = [t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value)]
    output = kernel(*flat, cu_seq_lens_q, cu_seq_lens_q, max_length_q, max_length_q, scale=scaling, **causal)
    return output.reshape(batch, length, heads, dim), None


AttentionInterface.register(PACKED_SDPA, packed_sdpa)
AttentionInterface.register(PACKED_VARLEN, packed_varlen)


@contextlib.contextmanager
def unpacked_attention(model: torch.nn.Module) -> Iterator[None]:
    """Transformers' sdpa, with the masks it builds, while generating with a model trained with packed
    attention: generation pads batches and decodes one token against a KV cache, which the packed
    kernels do not compute."""
    config = model.config
    trained_with = config._attn_implementation
    if trained_with in (PACKED_SDPA, PACKED_VARLEN):
        config._attn_implementation = "sdpa"
    try:
        yield
    finally:
        config._attn_implementation = trained_with


def resolve_attention(choice: str, config: Any, max_seq_length: int) -> str:
    """The attention implementation to load the model with. auto on CUDA: flash_attention_2 with
    flash-attn installed, else packed_varlen (torch >= 2.10, bf16); elsewhere packed_sdpa. Models
    whose attention the packed kernels do not compute (attention-logit soft-capping, sliding windows
    shorter than the sequences) keep transformers' sdpa."""
    if choice != "auto":
        return choice
    window = getattr(config, "sliding_window", None)
    uses_window = bool(window) and window < max_seq_length and getattr(config, "use_sliding_window", True) is not False
    if getattr(config, "attn_logit_softcapping", None) or uses_window:
        return "sdpa"
    if torch.cuda.is_available():
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
        if _varlen_kernel() is not None and torch.cuda.is_bf16_supported():
            return PACKED_VARLEN
    return PACKED_SDPA
