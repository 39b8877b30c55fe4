"""Sequence parallelism (DeepSpeed-Ulysses): a group of N workers trains the same packs, each holding
1/N of every pack's tokens everywhere but inside attention.

- Data: the workers of a group get the same micro-batches: the group's first worker reads them (its
  Ray Data split, or its torchrun share) and sends them to the others (``shared_batches``). The plan
  counts groups: a step's global batch is groups x batch x accumulation packs.
- Tokens: collate pads a micro-batch to a multiple of N and gives each worker one contiguous slice
  of every row (``shard_tokens``): its token ids and position ids, and the trained positions that
  fall in its slice with their targets. A target is an id known on the host, so a slice's last
  position predicts the first token of the next slice with no exchange at all.
- Attention (``ulysses``, around packed_sdpa, packed_varlen and packed_eager): an all-to-all swaps the sequence
  slices for head slices, the kernel runs over the whole pack for H/N heads with the unsharded
  boundaries (samples, prefix-tree segments and their keys), and a second all-to-all swaps back.
  Each worker gets the key/value heads its query heads use, and only those (one that several
  workers use goes to each); heads that N does not divide are shared as evenly as they can be (9
  over 2: 5 and 4), the kernel then called once per run of query heads sharing a key/value head.
- Loss: each worker sums the losses of the trained positions in its slice; the loop divides the
  sum over all workers by the trained tokens counted once each, so the step's loss and gradients are
  those of one worker training the whole batch (the all-to-alls carry gradients back to the slices
  that produced them, and DDP / FSDP2 average over every worker as they do without it).

  The model's own eager attention (packed_eager: gpt-oss's sinks, Gemma-2's soft-capping, sliding
  windows) sees the module through ``HeadShare``: its heads' slice of per-head parameters.

Limits, plainly: models that mix tokens outside attention (linear attention, convolutions) are
refused, as is a group larger than the model's heads; so are flash-attn's flash_attention_2,
transformers' sdpa / eager (their masks are built for the worker's slice), remote code under
packed_eager, and torch.compile.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

# Transformers' layer types that only attend (Gemma-3, Qwen3, gpt-oss, Cohere2 name them); other types
# (linear attention, convolutions, state-space layers) mix tokens where the slices cannot see each other.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class SequenceGroup:
    """This worker's sequence-parallel group: ``size`` workers holding one slice each of the same packs."""

    group: Any  # the process group (None with size 1)
    rank: int  # this worker's slice
    size: int
    index: int  # which group: the data-parallel rank
    count: int  # how many groups: the data-parallel world

    @property
    def leader(self) -> bool:
        """The worker that reads the group's data."""
        return self.rank == 0


def sequence_group(rank: int, world: int, size: int) -> SequenceGroup:
    """Groups of ``size`` consecutive workers (consecutive ranks share a node, where the all-to-alls run
    fastest). Every worker must call this in the same order: creating a group is collective."""
    if size == 1:
        return SequenceGroup(None, 0, 1, rank, world)
    if world % size:
        raise ValueError(f"--sequence_parallel {size} must divide the {world} workers")
    groups = [dist.new_group(list(range(first, first + size))) for first in range(0, world, size)]
    return SequenceGroup(groups[rank // size], rank % size, size, rank // size, world // size)


def shared_batches(batches: Iterator[Any] | None, sequence: SequenceGroup) -> Iterator[Any]:
    """The leader's batches, sent to every worker of its group (the others pass None). The leader's
    end of data is sent too, so no worker waits for a batch that will not come."""
    if sequence.size == 1:
        yield from batches
        return
    source = dist.get_global_rank(sequence.group, 0)
    while True:
        box = [next(batches, None) if sequence.leader else None]
        dist.broadcast_object_list(box, src=source, group=sequence.group)
        if box[0] is None:
            return
        yield box[0]


def shard_tokens(batch: dict[str, Any], lengths: list[int], rank: int, size: int) -> dict[str, Any]:
    """Slice ``rank`` of a collated host batch (its width a multiple of ``size``): token ids and position
    ids of that slice of every row, the trained positions in it (indices over the slice's own [batch,
    width / size] layout) with their targets, and its share of the counts. The attention's boundaries
    stay whole: the kernel sees the whole pack after the all-to-all."""
    input_ids = batch["input_ids"]
    rows, width = input_ids.shape
    part = width // size
    first = rank * part
    positions = batch.get("position_ids")
    if positions is None:  # unpacked rows: the positions transformers would count from 0
        positions = torch.arange(width).expand(rows, width)
    index = batch["trained_index"]
    row, column = index // width, index % width
    mine = (column >= first) & (column < first + part)
    sharded = {k: v for k, v in batch.items() if k != "attention_mask"}
    sharded["input_ids"] = input_ids[:, first : first + part]
    sharded["position_ids"] = positions[:, first : first + part].contiguous()
    sharded["trained_index"] = row[mine] * part + column[mine] - first
    sharded["trained_targets"] = batch["trained_targets"][mine]
    sharded["num_trained"] = int(mine.sum())
    sharded["num_tokens"] = int(np.clip(np.asarray(lengths) - first, 0, part).sum())
    return sharded


def head_shares(heads: int, size: int) -> list[int]:
    """How many of ``heads`` each of ``size`` workers attends for: equal shares, or as equal as can be
    (9 heads over 2 workers: 5 and 4)."""
    return [heads // size + (rank < heads % size) for rank in range(size)]


def query_heads(heads: int, size: int) -> list[range]:
    """The query heads each worker attends for, consecutive (9 over 2: 0-4 and 5-8)."""
    bounds = itertools.accumulate(head_shares(heads, size), initial=0)
    return [range(first, last) for first, last in itertools.pairwise(bounds)]


def kv_heads_needed(heads: int, kv_heads: int, size: int) -> list[range]:
    """The key/value heads each worker's share of the query heads attends with: only those, so a worker
    holds no more of them than its query heads use (9 query heads over 3 key/value heads, 2 workers:
    query heads 0-4 and 5-8 need key/value heads 0-1 and 1-2); one that several workers need goes to
    each of them (1 key/value head, 4 workers: all four get it)."""
    per_kv = heads // kv_heads
    return [range(share[0] // per_kv, share[-1] // per_kv + 1) for share in query_heads(heads, size)]


def kernel_calls(heads: int, kv_heads: int, mine: range, needed: range) -> list[tuple[range, slice]]:
    """A worker's kernel calls: (its query heads, the slice of its received key/value heads they use).
    Its query heads fall in runs by the key/value head they use: one call where the runs are equal
    (grouped-query attention as the kernel does it), one per run where they are not (query heads 0-4
    over key/value heads 0-1, 3 per key/value head: runs 0-2 and 3-4)."""
    per_kv = heads // kv_heads
    runs = [range(max(mine.start, kv * per_kv), min(mine.stop, (kv + 1) * per_kv)) for kv in needed]
    if len({len(run) for run in runs}) == 1:
        return [(mine, slice(0, len(needed)))]
    return [(run, slice(i, i + 1)) for i, run in enumerate(runs)]


def _heads_for_sequence(tensor: torch.Tensor, group: Any, rank: int, sends: list[range]) -> torch.Tensor:
    """[batch, heads, length / N, dim] on each worker -> [batch, its heads, length, dim]: the heads
    ``sends[rank]`` over the whole sequence (slices arrive in rank order, which is sequence order). A
    head sent to several workers has its gradients summed on the way back (index_select's backward)."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    batch, _, part, dim = tensor.shape
    size, mine = len(sends), len(sends[rank])
    order = [head for heads in sends for head in heads]
    by_head = tensor.transpose(0, 1)  # [heads sent, batch, part, dim]: each worker's in a run
    if order == list(range(tensor.shape[1])):  # each head to one worker (no index on the device to build)
        by_head = by_head.contiguous()
    else:
        by_head = by_head.index_select(0, torch.tensor(order, device=tensor.device))
    received = all_to_all_single_autograd(by_head, [mine] * size, [len(heads) for heads in sends], group)
    received = received.reshape(size, mine, batch, part, dim).permute(2, 1, 0, 3, 4)
    return received.reshape(batch, mine, size * part, dim)


def _sequence_for_heads(tensor: torch.Tensor, group: Any, size: int, heads: int) -> torch.Tensor:
    """The attention's output, [batch, length, this worker's heads, dim] -> [batch, length / N, heads, dim]."""
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    batch, length, mine, dim = tensor.shape
    part = length // size
    by_slice = tensor.reshape(batch, size, part, mine, dim).permute(1, 3, 0, 2, 4)  # each slice's heads in a run
    by_slice = by_slice.reshape(size * mine, batch, part, dim)
    received = all_to_all_single_autograd(by_slice, head_shares(heads, size), [mine] * size, group)
    return received.permute(1, 2, 0, 3)  # [heads, batch, part, dim] -> [batch, part, heads, dim]


class HeadShare:
    """An attention module as this worker's share of the heads sees it, for kernels that read the
    module (the model's own eager attention under packed_eager): its query heads per key/value head,
    and its slice of per-head parameters (gpt-oss's attention sinks); the rest is the module's."""

    def __init__(self, module: torch.nn.Module, first: int, heads: int, kv_heads: int) -> None:
        self.whole = module
        self.num_key_value_groups = heads // kv_heads
        sinks = getattr(module, "sinks", None)
        if sinks is not None:
            self.sinks = sinks[first : first + heads]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.whole, name)


def ulysses(kernel: Callable[..., tuple[torch.Tensor, Any]]) -> Callable[..., tuple[torch.Tensor, Any]]:
    """A packed attention kernel that, given ``sequence_group`` (collate passes it with the boundaries),
    runs on the whole sequence for this worker's share of the heads."""

    @functools.wraps(kernel)
    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        *args: Any,
        sequence_group: Any = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, Any]:
        if sequence_group is None:
            return kernel(module, query, key, value, attention_mask, *args, **kwargs)
        size, rank = dist.get_world_size(sequence_group), dist.get_rank(sequence_group)
        heads, kv_heads = query.shape[1], key.shape[1]
        query_sends, kv_sends = query_heads(heads, size), kv_heads_needed(heads, kv_heads, size)
        query = _heads_for_sequence(query, sequence_group, rank, query_sends)
        key, value = (_heads_for_sequence(t, sequence_group, rank, kv_sends) for t in (key, value))
        first = query_sends[rank].start
        outputs = []
        for queries, kv in kernel_calls(heads, kv_heads, query_sends[rank], kv_sends[rank]):
            share = HeadShare(module, queries.start, len(queries), kv.stop - kv.start)
            q = query[:, queries.start - first : queries.stop - first]
            output, _ = kernel(share, q, key[:, kv], value[:, kv], attention_mask, *args, **kwargs)
            outputs.append(output)
        output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)
        return _sequence_for_heads(output, sequence_group, size, heads), None

    return attention


def check_sequence_parallel(choice: str, config: Any, max_seq_length: int, size: int) -> None:
    """Raises ValueError, before any model loads, where this model cannot train with --sequence_parallel
    ``size`` and --attn_implementation ``choice``."""
    from sftcore.attention import PACKED_EAGER, PACKED_SDPA, TREE_KERNELS, uncomputed_attention

    if size == 1:
        return
    layer_types = set(getattr(config, "layer_types", None) or ()) - set(ATTENTION_LAYER_TYPES)
    if layer_types:
        raise ValueError(
            f"--sequence_parallel: {config.model_type} has {', '.join(sorted(layer_types))} layers, which mix tokens "
            "outside attention, where each worker holds only its slice of the sequence"
        )
    if choice == "auto":  # what resolve_attention picks with sequence parallelism (never flash-attn's)
        choice = PACKED_EAGER if uncomputed_attention(config, max_seq_length) else PACKED_SDPA
    if choice == PACKED_EAGER and getattr(config, "auto_map", None):
        raise ValueError(
            f"--sequence_parallel: {config.model_type} runs its own code, whose attention may read its module's "
            "per-head state beyond what the heads' shares are known to need; train it without --sequence_parallel"
        )
    heads = getattr(config, "num_attention_heads", None)
    if heads is not None and heads < size:
        raise ValueError(f"--sequence_parallel {size}: more workers than the model's {heads} attention heads to share")
    if choice not in (*TREE_KERNELS, PACKED_EAGER):
        raise ValueError(
            "--sequence_parallel runs with --attn_implementation packed_sdpa, packed_varlen or packed_eager (or "
            f"auto), not {choice}"
        )
