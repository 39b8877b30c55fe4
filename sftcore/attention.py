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

Prefix trees (sftcore.trees): a token attends to its ancestors only. The collate cuts each tree into
segments, runs of tokens each the child of the one before, and passes, besides the segments' bounds,
``tree_key_index``: for each segment in turn, the flat positions of its ancestors' tokens then its own
(``cu_seq_lens_k``: where each segment's keys start in that list). A segment's queries attend to all
of its ancestors and causally among themselves: causal attention aligned to the bottom right of the
[segment, keys] block. ``packed_sdpa`` runs it per segment (a mask of segment x keys at most, never
pack x pack); ``packed_varlen`` in one varlen call over the gathered keys and values (flash aligns a
causal block to the bottom right when it has more keys than queries). Keys are gathered per segment,
so attention costs what the per-turn samples would; everything else runs once per tree token.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from transformers import AttentionInterface

from sftcore.models import native_bf16
from sftcore.sequence_parallel import ulysses

PACKED_SDPA = "packed_sdpa"
PACKED_VARLEN = "packed_varlen"
PACKED_EAGER = "packed_eager"
ATTENTION_CHOICES = ("auto", PACKED_SDPA, PACKED_VARLEN, PACKED_EAGER, "sdpa", "eager", "flash_attention_2")
# The implementations that read the boundaries; others get none (a remote-code model may refuse them).
READS_BOUNDARIES = (PACKED_SDPA, PACKED_VARLEN, PACKED_EAGER, "flash_attention_2")


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


def tree_segments(parents: list[np.ndarray], width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """For rows of prefix trees (each token's parent in its row, -1 for a tree's first token; each row
    right-padded to width by a causal segment of its own): (segment bounds over the flattened batch,
    where each segment's keys start in the key index, the key index: each segment's ancestors' flat
    positions then its own, the longest segment, the most keys of one segment)."""
    bounds, key_bounds, keys = [0], [0], []
    for row, row_parents in enumerate(parents):
        offset, n = row * width, len(row_parents)
        starts = [0, *(np.flatnonzero(row_parents[1:] != np.arange(n - 1)) + 1).tolist()]
        ends = [*starts[1:], n]
        segment_of = np.repeat(np.arange(len(starts)), np.diff([*starts, n]))
        ancestors: list[list[tuple[int, int]]] = []  # per segment: its ancestors' (first, last) ranges
        for start, end in zip(starts, ends, strict=True):
            parent = int(row_parents[start])
            above = [] if parent < 0 else [*ancestors[segment_of[parent]], (starts[segment_of[parent]], parent + 1)]
            ancestors.append(above)
            ranges = [*above, (start, end)]
            keys += [np.arange(first + offset, last + offset) for first, last in ranges]
            bounds.append(offset + end)
            key_bounds.append(key_bounds[-1] + sum(last - first for first, last in ranges))
        if width > n:
            keys.append(np.arange(offset + n, offset + width))
            bounds.append(offset + width)
            key_bounds.append(key_bounds[-1] + width - n)
    index = torch.as_tensor(np.concatenate(keys), dtype=torch.long)
    lengths, key_lengths = np.diff(bounds), np.diff(key_bounds)
    cu = [torch.as_tensor(b, dtype=torch.int32) for b in (bounds, key_bounds)]
    return cu[0], cu[1], index, int(lengths.max()), int(key_lengths.max())


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


def _segment_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float, scaling: float | None
) -> torch.Tensor:
    """Causal sdpa of a segment's queries over its keys, the last keys being the queries' own: aligned to
    the bottom right where ancestors' keys come first (a [queries, keys] mask, built by torch)."""
    queries, keys = query.shape[2], key.shape[2]
    causal = {"is_causal": True} if queries == keys else {"attn_mask": causal_lower_right(queries, keys)}
    gqa = key.shape[1] != query.shape[1]
    return F.scaled_dot_product_attention(query, key, value, dropout_p=dropout, scale=scaling, enable_gqa=gqa, **causal)


def _flattened(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """[batch, heads, length, dim] as [1, heads, batch * length, dim]: a batch's segments one after the
    other. 4-D, as sdpa's CPU flash kernel takes (3-D inputs fall back to the math kernel, which keeps
    a segment x segment matrix per head for backward)."""
    return [t.transpose(0, 1).reshape(1, t.shape[1], t.shape[0] * t.shape[2], t.shape[3]) for t in tensors]


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    cu_seq_lens_k: torch.Tensor | None = None,
    tree_key_index: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Causal attention within each segment (each tree segment over its ancestors too). query [batch,
    heads, length, dim], key [batch, kv heads, length, dim], value [batch, kv heads, length, value dim]
    (multi-head latent attention has its own); returns [batch, length, heads, value dim] as transformers
    expects."""
    _refuse_uncomputed(PACKED_SDPA, query, kwargs)
    batch, heads, length, _ = query.shape
    bounds = _boundaries(query, key, cu_seq_lens_q, None)[0].tolist()
    query, key, value = _flattened(query, key, value)
    key_bounds = bounds
    if tree_key_index is not None:
        key, value = (t.index_select(2, tree_key_index) for t in (key, value))
        key_bounds = cu_seq_lens_k.tolist()
    outputs = [
        _segment_attention(query[:, :, start:end], key[:, :, k0:k1], value[:, :, k0:k1], dropout, scaling)
        for start, end, k0, k1 in zip(bounds, bounds[1:], key_bounds, key_bounds[1:], strict=False)
        if end > start
    ]
    output = torch.cat(outputs, dim=2).reshape(heads, batch, length, value.shape[3])
    return output.permute(1, 2, 0, 3).contiguous(), None


# Keyword arguments with which transformers asks an attention function for more than causal softmax
# attention: the packed kernels do not compute them, so they refuse them rather than ignore them.
_UNCOMPUTED = {"s_aux": "attention sinks", "softcap": "attention-logit soft-capping"}


def _refuse_uncomputed(kernel: str, query: torch.Tensor, kwargs: dict[str, Any]) -> None:
    asked = [what for name, what in _UNCOMPUTED.items() if kwargs.get(name) is not None]
    window = kwargs.get("sliding_window")
    if window is not None and window < query.shape[2]:  # a window as long as the batch changes nothing
        asked.append(f"a {window}-token sliding window")
    if asked:
        raise _uncomputed_error(kernel, asked)


def _uncomputed_error(kernel: str, uncomputed: list[str]) -> ValueError:
    return ValueError(
        f"--attn_implementation {kernel} does not compute this model's {' and '.join(uncomputed)}: use "
        "--attn_implementation auto, which picks transformers' attention for it"
    )


def _model_eager_attention(module: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, Any]]:
    """The eager attention function of the module's own modeling file (transformers names it
    ``eager_attention_forward`` in every model)."""
    owner = type(getattr(module, "whole", module))  # under sequence parallelism, a HeadShare of the module
    eager = getattr(sys.modules.get(owner.__module__), "eager_attention_forward", None)
    if eager is None:
        raise ValueError(
            f"--attn_implementation {PACKED_EAGER}: {owner.__name__} has no eager_attention_forward in its "
            "modeling file: use --attn_implementation eager"
        )
    return eager


def packed_eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The model's own eager attention, per segment, with a causal mask of the segment's size (sliding
    where the layer slides): what the model computes beyond causal softmax (gpt-oss's sinks, Gemma-2's
    soft-capping) is computed by the model's code, and memory grows with the segment squared, not the
    pack's. Some models (gpt-oss) build no per-sample masks from packed position ids at all."""
    eager = _model_eager_attention(module)
    window = sliding_window or getattr(module, "sliding_window", None)
    batch, heads, length, _ = query.shape
    bounds = _boundaries(query, key, cu_seq_lens_q, None)[0].tolist()
    query, key, value = _flattened(query, key, value)
    outputs = []
    for start, end in zip(bounds, bounds[1:], strict=False):
        if end == start:
            continue
        index = torch.arange(end - start, device=query.device)
        seen = index[None, :] <= index[:, None]
        if window:  # as transformers' sliding-window masks: a query sees the last `window` positions
            seen &= index[:, None] - index[None, :] < window
        mask = torch.zeros(seen.shape, dtype=query.dtype, device=query.device)
        mask = mask.masked_fill(~seen, torch.finfo(query.dtype).min)[None, None]
        part = (t[:, :, start:end] for t in (query, key, value))
        outputs.append(eager(module, *part, mask, dropout=dropout, scaling=scaling, **kwargs)[0])
    return torch.cat(outputs, dim=1).reshape(batch, length, heads, value.shape[3]), None


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
    cu_seq_lens_k: torch.Tensor | None = None,
    max_length_k: int | None = None,
    tree_key_index: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """packed_sdpa's attention in one call of torch's varlen flash kernel (CUDA, bf16 or fp16)."""
    _refuse_uncomputed(PACKED_VARLEN, query, kwargs)
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
    query, key, value = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    if tree_key_index is None:
        cu_seq_lens_k, max_length_k = cu_seq_lens_q, max_length_q
    else:  # each segment's ancestors' keys and values, then its own: causal aligned to the bottom right
        key, value = (t.index_select(0, tree_key_index) for t in (key, value))
    output = kernel(
        query, key, value, cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k, scale=scaling, **causal
    )
    return output.reshape(batch, length, heads, dim), None


# Under sequence parallelism (collate passes sequence_group) each runs on the whole sequence for this
# worker's share of the heads (sftcore.sequence_parallel).
AttentionInterface.register(PACKED_SDPA, ulysses(packed_sdpa))
AttentionInterface.register(PACKED_VARLEN, ulysses(packed_varlen))
AttentionInterface.register(PACKED_EAGER, ulysses(packed_eager))


@contextlib.contextmanager
def unpacked_attention(model: torch.nn.Module) -> Iterator[None]:
    """Transformers' sdpa, with the masks it builds, while generating with a model trained with packed
    attention: generation pads batches and decodes one token against a KV cache, which the packed
    kernels do not compute."""
    config = model.config
    trained_with = config._attn_implementation
    if trained_with in (PACKED_SDPA, PACKED_VARLEN):
        config._attn_implementation = "sdpa"
    elif trained_with == PACKED_EAGER:  # sdpa would not compute what it does
        config._attn_implementation = "eager"
    try:
        yield
    finally:
        config._attn_implementation = trained_with


TREE_KERNELS = (PACKED_SDPA, PACKED_VARLEN)  # the implementations that compute prefix trees


def uncomputed_attention(config: Any, max_seq_length: int) -> list[str]:
    """What a model's attention computes beyond causal softmax attention, which the packed kernels do
    not: attention-logit soft-capping (Gemma-2), sliding windows shorter than the sequences (Gemma-2/3,
    Cohere2, gpt-oss, Mistral's older configs), attention sinks (gpt-oss)."""
    window = getattr(config, "sliding_window", None)
    uses_window = bool(window) and window < max_seq_length and getattr(config, "use_sliding_window", True) is not False
    found = ["attention-logit soft-capping"] if getattr(config, "attn_logit_softcapping", None) else []
    found += [f"a {window}-token sliding window"] if uses_window else []
    # gpt-oss's sinks are a learned parameter of every attention layer, not a config field
    return found + (["attention sinks"] if getattr(config, "model_type", None) == "gpt_oss" else [])


def check_attention(choice: str, config: Any, max_seq_length: int) -> None:
    """Raises ValueError, before any model loads, for a packed kernel asked for a model whose attention
    it does not compute (the kernels would refuse it in the first step anyway)."""
    uncomputed = uncomputed_attention(config, max_seq_length)
    if choice in TREE_KERNELS and uncomputed:
        raise _uncomputed_error(choice, uncomputed)


def trains_trees(choice: str, tree_packing: str, config: Any, max_seq_length: int) -> bool:
    """Whether a row's samples train as prefix trees (sftcore.trees): --tree_packing auto, with an
    attention implementation that computes them (packed_sdpa, packed_varlen, or auto for a model they
    compute)."""
    if tree_packing == "off":
        return False
    return choice in TREE_KERNELS or (choice == "auto" and not uncomputed_attention(config, max_seq_length))


def resolve_attention(
    choice: str, config: Any, max_seq_length: int, trees: bool = False, sequence_parallel: int = 1
) -> str | None:
    """The attention implementation to load the model with. auto on a GPU with bf16 in hardware:
    flash_attention_2 with flash-attn installed (not for trees, whose keys it cannot gather, nor with
    sequence parallelism, whose all-to-alls are around our kernels), else
    packed_varlen (torch >= 2.10); elsewhere packed_sdpa. Models whose attention packed_sdpa and packed_varlen do not
    compute get packed_eager (their own eager attention per sample), or, for remote code (whose
    modeling file we cannot see), transformers' default for the class (None)."""
    if choice != "auto":
        return choice
    if uncomputed_attention(config, max_seq_length):
        return None if getattr(config, "auto_map", None) else PACKED_EAGER
    if native_bf16():  # both flash kernels need bf16 in hardware (sm80 on)
        if not trees and sequence_parallel == 1:
            try:
                import flash_attn  # noqa: F401

                return "flash_attention_2"
            except ImportError:
                pass
        if _varlen_kernel() is not None:
            return PACKED_VARLEN
    return PACKED_SDPA
