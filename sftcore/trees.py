"""Prefix trees: a row's samples merged by their shared prefixes, trained as one sequence.

The samples of a row share long prefixes: each turn's prompt holds the conversation before it, and a
row splits into several samples only where a later prompt stops repeating an earlier sample's tokens
(sftcore.masking). A trie of the samples' token ids stores every shared prefix once. Serialized
depth-first it is one sequence in which each token keeps the position it has in its samples (its depth
in the trie) and attends to its ancestors only (sftcore.attention): every token then sees exactly the
tokens before it in each sample through it, so the tree's per-token losses and gradients are its
samples'.

A token is a target where a sample through it trains it. Each trained turn is trained in exactly one
sample (sftcore.masking), and two samples through the same token share everything before it, so no
token is trained twice; that invariant is checked and counted (``Tree.repeated_targets``). A token's
target is predicted from its parent (the token before it on its path), not from the token before it
in the sequence: ``parents`` says which.

Built from the tokens alone, with no knowledge of templates, so it holds for every template and for
samples with a shortened history (``--overflow window``), which join the tree where they share a
prefix (the system prompt, the first user message).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sftcore.masking import IGNORE_INDEX, Sample

ROOT = -1  # the parent of a tree's first token


@dataclass
class Tree:
    """One sequence holding several samples: ``input_ids``, ``labels`` (the token where a sample trains
    it, else -100), ``position_ids`` (each token's position in its samples) and ``parents`` (the index of
    the token before it on its path, ROOT for the first)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    parents: list[int]
    samples: int  # the samples it holds
    sample_tokens: int  # their tokens, counted sample by sample
    repeated_targets: int = 0  # tokens two samples both train (0 by sftcore.masking's invariant)

    @property
    def branches(self) -> int:
        """Tokens that start a branch: their parent is not the token before them."""
        return sum(parent != i - 1 for i, parent in enumerate(self.parents) if i)


class _Trie:
    def __init__(self) -> None:
        self.token: list[int] = []
        self.label: list[int] = []
        self.depth: list[int] = []
        self.children: list[dict[int, int]] = []
        self.roots: dict[int, int] = {}
        self.samples = self.sample_tokens = self.repeated_targets = 0

    def shared(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ``ids`` the trie holds already."""
        level, n = self.roots, 0
        for token in ids:
            node = level.get(token)
            if node is None:
                break
            level, n = self.children[node], n + 1
        return n

    def add(self, sample: Sample) -> None:
        level = self.roots
        for position, (token, label) in enumerate(zip(sample.input_ids, sample.labels, strict=True)):
            node = level.get(token)
            if node is None:
                node = len(self.token)
                self.token.append(token)
                self.label.append(IGNORE_INDEX)
                self.depth.append(position)
                self.children.append({})
                level[token] = node
            if label != IGNORE_INDEX:
                self.repeated_targets += self.label[node] != IGNORE_INDEX
                self.label[node] = label
            level = self.children[node]
        self.samples += 1
        self.sample_tokens += len(sample.input_ids)

    def tree(self) -> Tree:
        """Depth-first, children in the order their samples came (the first sample's path first)."""
        order, parents = [], []
        stack = [(node, ROOT) for node in reversed(self.roots.values())]
        while stack:
            node, parent = stack.pop()
            index = len(order)
            order.append(node)
            parents.append(parent)
            stack += [(child, index) for child in reversed(self.children[node].values())]
        return Tree(
            input_ids=[self.token[n] for n in order],
            labels=[self.label[n] for n in order],
            position_ids=[self.depth[n] for n in order],
            parents=parents,
            samples=self.samples,
            sample_tokens=self.sample_tokens,
            repeated_targets=self.repeated_targets,
        )


def build_trees(samples: list[Sample], budget: int | None = None) -> list[Tree]:
    """The row's samples as prefix trees of at most ``budget`` tokens (None: one tree). A tree that would
    be larger is cut at branch points: consecutive samples share a tree while it fits, and each tree
    carries the ancestors its samples need. A sample is never cut (it fits the budget already)."""
    tries, current = [], _Trie()
    for sample in samples:
        grown = len(current.token) + len(sample.input_ids) - current.shared(sample.input_ids)
        if current.samples and budget is not None and grown > budget:
            tries.append(current)
            current = _Trie()
        current.add(sample)
    return [trie.tree() for trie in [*tries, current]]


def tree_paths(tree: Tree) -> list[list[int]]:
    """Each leaf's root-to-leaf token indices: the samples the tree holds, as sequences of its tokens."""
    has_child = set(tree.parents)
    paths = []
    for leaf in (i for i in range(len(tree.input_ids)) if i not in has_child):
        path, node = [], leaf
        while node != ROOT:
            path.append(node)
            node = tree.parents[node]
        paths.append(path[::-1])
    return paths


def tree_stats(trees: list[Tree]) -> dict[str, int]:
    """The counts a row's trees add to its line's (sftcore.data.LineCounts)."""
    return {
        "trees": len(trees),
        "tree_tokens": sum(len(tree.input_ids) for tree in trees),
        "repeated_targets": sum(tree.repeated_targets for tree in trees),
    }
