"""Packing: whole encoded rows into sequences of at most max_seq_length tokens, with position ids
that restart at 0 for each row, so transformers masks attention block-diagonally (rows never see
each other) and no token is spent on padding. Prefix trees (sftcore.trees) pack the same way, keeping
their tokens' positions and their parents (shifted to the tree's place in the pack).

Packs are built by best-fit decreasing within windows of about PACK_WINDOW_ROWS rows that the seed
picks from the whole data set (sftcore.dataset), so packing is deterministic: the same data and
options give the same packs, which is what makes a resumed run see the batches the interrupted one
would have seen.
"""

from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from sftcore.masking import IGNORE_INDEX

PACK_WINDOW_ROWS = 4096  # rows packed together; larger windows fill packs better and cost more memory


def best_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Bins of row indices whose lengths sum to at most budget; each row goes, longest first, into the
    fullest bin it still fits in (a new bin when none). Deterministic: ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # (room left, bin index), sorted
    for i in order:
        if lengths[i] > budget:
            raise ValueError(f"row of {lengths[i]} tokens exceeds the pack budget of {budget}")
        slot = bisect.bisect_left(free, (lengths[i], -1))
        if slot == len(free):
            bins.append([i])
            bisect.insort(free, (budget - lengths[i], len(bins) - 1))
        else:
            room, b = free.pop(slot)
            bins[b].append(i)
            bisect.insort(free, (room - lengths[i], b))
    return bins


def pack_rows(batch: dict[str, np.ndarray], budget: int) -> dict[str, Any]:
    """Ray Data map_batches function: encoded rows (samples, or prefix trees with their position_ids
    and parents) in, packs out (input_ids, labels, position_ids, num_tokens, num_trained, num_rows, and
    parents for trees: each tree's, shifted to its place in the pack). The first label of every row is
    masked: in a pack it would otherwise be predicted from the end of the previous row."""
    lengths = [len(ids) for ids in batch["input_ids"]]
    trees = "parents" in batch
    columns = ("input_ids", "labels", "position_ids", "num_tokens", "num_trained", "num_rows")
    packs: dict[str, list] = {k: [] for k in (*columns, *(("parents",) if trees else ()))}
    # in the order of their first rows: inside a pack, and from pack to pack, rows keep the batch's order
    for members in sorted(sorted(members) for members in best_fit_decreasing(lengths, budget)):
        labels = [np.asarray(batch["labels"][i], dtype=np.int64).copy() for i in members]
        for row_labels in labels:
            row_labels[0] = IGNORE_INDEX
        packs["input_ids"].append(np.concatenate([np.asarray(batch["input_ids"][i]) for i in members]))
        packs["labels"].append(np.concatenate(labels))
        if trees:
            starts = np.cumsum([0] + [lengths[i] for i in members[:-1]])
            parents = [np.asarray(batch["parents"][i], dtype=np.int32) for i in members]
            shifted = [np.where(p >= 0, p + start, p) for p, start in zip(parents, starts, strict=True)]
            packs["parents"].append(np.concatenate(shifted))
            packs["position_ids"].append(np.concatenate([np.asarray(batch["position_ids"][i]) for i in members]))
        else:
            packs["position_ids"].append(np.concatenate([np.arange(lengths[i], dtype=np.int32) for i in members]))
        packs["num_tokens"].append(sum(lengths[i] for i in members))
        packs["num_trained"].append(int(sum(int(batch["num_trained"][i]) for i in members)))
        packs["num_rows"].append(len(members))
    return packs
