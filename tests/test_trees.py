"""Prefix trees: a row's samples merged by shared prefix, trained with the samples' own losses and gradients."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import DATA, OFFICIAL_FAMILIES, official_tokenizer, tiny_llama_config

from sftcore.attention import tree_segments
from sftcore.data import DataError
from sftcore.loop import TrainedTokenLoss, collate, model_inputs
from sftcore.masking import IGNORE_INDEX, EncodeOptions, Sample, encode_row
from sftcore.packing import pack_rows
from sftcore.trees import ROOT, build_trees, tree_paths

TAU = [json.loads(line) for line in (DATA / "taubench_airline_dev.jsonl").read_text().splitlines()]


def path_to(tree, sample: Sample) -> list[int] | None:
    """The tree tokens that spell the sample from a root, or None."""
    children: dict[int, dict[int, int]] = {}
    for i, parent in enumerate(tree.parents):
        children.setdefault(parent, {})[tree.input_ids[i]] = i
    path, node = [], ROOT
    for token in sample.input_ids:
        node = children.get(node, {}).get(token)
        if node is None:
            return None
        path.append(node)
    return path


def check_trees_hold_their_samples(samples: list[Sample], trees, budget: int | None) -> None:
    """Every sample is the path of one tree, with its positions; every token a sample trains is trained there,
    and nothing else; parents come before their children (depth-first order)."""
    for tree in trees:
        assert budget is None or len(tree.input_ids) <= budget
        assert all(parent < i for i, parent in enumerate(tree.parents))
        assert all(
            tree.position_ids[i] == (0 if p == ROOT else tree.position_ids[p] + 1) for i, p in enumerate(tree.parents)
        )
    trained = [set() for _ in trees]
    for sample in samples:
        found = [(t, path) for t, tree in enumerate(trees) if (path := path_to(tree, sample)) is not None]
        assert found, "every sample is a path of a tree"
        t, path = found[0]
        assert [trees[t].position_ids[n] for n in path] == list(range(len(path)))
        for node, label in zip(path, sample.labels, strict=True):
            if label != IGNORE_INDEX:
                assert trees[t].labels[node] == label
                trained[t].add(node)
    for tree, nodes in zip(trees, trained, strict=True):
        assert {i for i, label in enumerate(tree.labels) if label != IGNORE_INDEX} == nodes


@pytest.mark.parametrize("family", ["qwen3", "gpt_oss", "hermes3", "mistral_nemo"])
def test_a_rows_samples_merge_into_one_tree_at_a_fraction_of_their_tokens(family):
    tokenizer = official_tokenizer(family)
    rows = TAU[::6]
    row_tokens = sample_tokens = tree_tokens = 0
    for row in rows:
        encoded = encode_row(row, tokenizer)
        trees = build_trees(encoded.samples)
        check_trees_hold_their_samples(encoded.samples, trees, None)
        assert len(trees) == 1 and trees[0].samples == len(encoded.samples) and trees[0].repeated_targets == 0
        row_tokens += encoded.row_tokens
        sample_tokens += encoded.num_tokens
        tree_tokens += len(trees[0].input_ids)
    # the measurement on all 60 rows: Qwen3 9.82x -> 1.22x, gpt-oss 4.82x -> 1.07x, Hermes-3 5.85x
    # -> 1.11x; Mistral-Nemo moves the system prompt into the last user message: 6.76x -> 4.20x
    if family == "mistral_nemo":
        assert tree_tokens < 0.8 * sample_tokens
    else:
        assert tree_tokens / row_tokens < 1.3 < sample_tokens / row_tokens


def test_a_tree_larger_than_the_budget_is_cut_at_branch_points_and_windows_join_their_trees():
    tokenizer = official_tokenizer("qwen3")
    budget = 4096
    for row in TAU[:12]:
        encoded = encode_row(row, tokenizer, EncodeOptions(max_seq_length=budget))
        trees = build_trees(encoded.samples, budget)
        check_trees_hold_their_samples(encoded.samples, trees, budget)
        assert sum(tree.samples for tree in trees) == len(encoded.samples)
        assert sum(len(t.input_ids) for t in trees) <= encoded.num_tokens
    # a window sample shares the system prompt and first user message with the samples of full history
    assert any(
        len(build_trees(encode_row(r, tokenizer, EncodeOptions(max_seq_length=budget)).samples, budget)) > 1
        for r in TAU[:12]
    )


def test_two_samples_that_train_the_same_token_in_the_same_context_train_it_once_and_say_so():
    prompt, first, second = [1, 2, 3], [7, 8, 9], [7, 8, 5]
    samples = [
        Sample(prompt + first, [IGNORE_INDEX] * 3 + first, turns=[0], history="full"),
        Sample(prompt + second, [IGNORE_INDEX] * 3 + second, turns=[1], history="window"),
    ]
    (tree,) = build_trees(samples)
    assert tree.input_ids == [1, 2, 3, 7, 8, 9, 5] and tree.parents == [ROOT, 0, 1, 2, 3, 4, 4]
    assert tree.repeated_targets == 2  # 7 and 8: the same context and token in both samples
    assert tree.labels == [IGNORE_INDEX] * 3 + [7, 8, 9, 5] and tree.branches == 1
    assert tree_paths(tree) == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 6]]


def test_tree_segments_give_each_segment_its_ancestors_then_itself():
    # a trunk 0-3 with a branch 4-5 from token 1, then a second tree 6-7, padded to width 10
    parents = [np.asarray([ROOT, 0, 1, 2, 1, 4, ROOT, 6])]
    bounds, key_bounds, index, longest, most_keys = tree_segments(parents, 10)
    assert bounds.tolist() == [0, 4, 6, 8, 10]
    keys = [index[a:b].tolist() for a, b in zip(key_bounds.tolist(), key_bounds.tolist()[1:], strict=False)]
    assert keys == [[0, 1, 2, 3], [0, 1, 4, 5], [6, 7], [8, 9]]
    assert (longest, most_keys) == (4, 4)


def test_packed_trees_keep_their_parents_relative_to_the_pack():
    samples = [
        Sample([1, 2, 3], [IGNORE_INDEX, 2, 3], [0], "full"),
        Sample([1, 2, 4], [IGNORE_INDEX, 2, 4], [1], "full"),
    ]
    (tree,) = build_trees(samples)
    batch = {
        "input_ids": [np.asarray(tree.input_ids)] * 2,
        "labels": [np.asarray(tree.labels)] * 2,
        "position_ids": [np.asarray(tree.position_ids)] * 2,
        "parents": [np.asarray(tree.parents)] * 2,
        "num_trained": [3, 3],
    }
    pack = pack_rows(batch, budget=8)
    assert pack["parents"][0].tolist() == [ROOT, 0, 1, 1, ROOT, 4, 5, 5]
    assert pack["position_ids"][0].tolist() == [0, 1, 2, 2, 0, 1, 2, 2]


@pytest.fixture(scope="module")
def gqa_model():
    """A 2-layer random Llama with 4 query heads and 2 key/value heads, on packed_sdpa, with room for every
    family's tokens."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    vocab = max(len(official_tokenizer(family)) for family in OFFICIAL_FAMILIES)
    config = tiny_llama_config(vocab, max_position_embeddings=8192)
    return AutoModelForCausalLM.from_config(config, attn_implementation="packed_sdpa").float().train()


def losses_and_gradients(model, batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    model.zero_grad()
    loss_sum, _ = TrainedTokenLoss(model)(**model_inputs(batch))
    loss_sum.backward()
    return loss_sum.detach(), torch.cat([p.grad.flatten() for p in model.parameters()]), batch["num_trained"]


def without_repeated_targets(samples: list[Sample], trees) -> list[Sample]:
    """The samples with a target masked where an earlier sample trains the same tree token (the same
    context and token): what a tree trains once."""
    seen, out = set(), []
    for sample in samples:
        t, path = next((t, p) for t, tree in enumerate(trees) if (p := path_to(tree, sample)) is not None)
        labels = list(sample.labels)
        for i, node in enumerate(path):
            if labels[i] != IGNORE_INDEX:
                labels[i] = IGNORE_INDEX if (t, node) in seen else labels[i]
                seen.add((t, node))
        out.append(Sample(sample.input_ids, labels, sample.turns, sample.history))
    return out


@pytest.mark.parametrize("budget,rows", [(None, TAU[2:3]), (2048, TAU[2:4])])
def test_trees_train_with_the_samples_losses_and_gradients(gqa_model, budget, rows):
    """Real tau-bench rows under Qwen3's template (a sample per turn): the samples as rows, against their
    trees packed (several per pack, padded, with the attention reading ancestors only). At 2048 tokens
    shortened histories repeat a few targets of full-history samples: the tree trains each once."""
    tokenizer = official_tokenizer("qwen3")
    cpu = torch.device("cpu")
    encoded = [encode_row(row, tokenizer, EncodeOptions(max_seq_length=budget)).samples for row in rows]
    row_trees = [build_trees(samples, budget) for samples in encoded]
    samples = [
        s for samples, trees in zip(encoded, row_trees, strict=True) for s in without_repeated_targets(samples, trees)
    ]
    trees = [tree for trees in row_trees for tree in trees]
    assert sum(len(t.input_ids) for t in trees) < sum(len(s.input_ids) for s in samples)
    rows_batch = collate({"input_ids": [s.input_ids for s in samples], "labels": [s.labels for s in samples]}, 0, cpu)
    columns = {
        k: [np.asarray(getattr(t, k)) for t in trees] for k in ("input_ids", "labels", "position_ids", "parents")
    }
    columns["num_trained"] = [sum(label != IGNORE_INDEX for label in t.labels) for t in trees]
    packed = collate(pack_rows(columns, budget=budget or 2 * max(len(t.input_ids) for t in trees)), 0, cpu)
    sample_loss, sample_grads, sample_targets = losses_and_gradients(gqa_model, rows_batch)
    tree_loss, tree_grads, tree_targets = losses_and_gradients(gqa_model, packed)
    assert tree_targets == sample_targets
    torch.testing.assert_close(tree_loss, sample_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(tree_grads, sample_grads, rtol=1e-4, atol=1e-4)


FIRE = [json.loads(line) for line in (DATA / "fireact_hotpotqa.jsonl").read_text().splitlines()]
# short real rows: two tau-bench runs with tool calls (2,100-2,200 tokens) and two FireAct runs
SHORT_ROWS = [TAU[42], TAU[49], FIRE[0], FIRE[1]]


def encoded_rows_of(tokenizer, rows) -> list[list[Sample]]:
    out = []
    for row in rows:
        try:
            out.append(encode_row(row, tokenizer).samples)
        except DataError as e:  # DeepSeek-R1's template refuses a second tool-call message (test_templates)
            assert e.reason == "template_error"
    return out


def dense_tree_mask(tree, samples: list[Sample]) -> torch.Tensor:
    """A [tokens, tokens] boolean mask built from the samples alone: a tree token sees the tokens before it
    in any sample through it, and itself."""
    mask = torch.zeros((len(tree.input_ids), len(tree.input_ids)), dtype=torch.bool)
    for sample in samples:
        path = path_to(tree, sample)
        if path is not None:
            nodes = torch.as_tensor(path)
            for i, node in enumerate(path):
                mask[node, nodes[: i + 1]] = True
    return mask


DENSE_MASK: list[torch.Tensor] = []  # the reference attention's mask (transformers' mask handling stays out)


def dense_reference_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Plain sdpa over the whole sequence under DENSE_MASK."""
    output = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=DENSE_MASK[0], scale=scaling, enable_gqa=key.shape[1] != query.shape[1]
    )
    return output.transpose(1, 2).contiguous(), None


@pytest.mark.parametrize("family", list(OFFICIAL_FAMILIES))
def test_every_family_trains_its_trees_with_its_samples_losses_gradients_and_attention(gqa_model, family):
    """Each of the 14 verbatim template families on short tau-bench and FireAct rows: the trees, packed
    several to a pack, give the samples' losses and gradients (fp32, tight); every trained token is
    trained once; and the tree attention's hidden states equal those of transformers' sdpa under a dense
    mask built from the samples."""
    from transformers import AutoModelForCausalLM

    tokenizer = official_tokenizer(family)
    cpu = torch.device("cpu")
    encoded = encoded_rows_of(tokenizer, SHORT_ROWS)
    assert len(encoded) >= 2
    row_trees = [build_trees(samples) for samples in encoded]
    trees = [tree for trees in row_trees for tree in trees]
    samples = [s for samples in encoded for s in samples]
    assert sum(t.repeated_targets for t in trees) == 0  # whole rows: each turn's target once
    assert sum(sum(label != IGNORE_INDEX for label in t.labels) for t in trees) == sum(
        sum(label != IGNORE_INDEX for label in s.labels) for s in samples
    )
    rows_batch = collate({"input_ids": [s.input_ids for s in samples], "labels": [s.labels for s in samples]}, 0, cpu)
    columns = {
        k: [np.asarray(getattr(t, k)) for t in trees] for k in ("input_ids", "labels", "position_ids", "parents")
    }
    columns["num_trained"] = [0] * len(trees)
    packs = pack_rows(columns, budget=2 * max(len(t.input_ids) for t in trees))
    assert len(packs["input_ids"]) < len(trees)  # several trees to a pack
    sample_loss, sample_grads, _ = losses_and_gradients(gqa_model, rows_batch)
    tree_loss, tree_grads, _ = losses_and_gradients(gqa_model, collate(packs, 0, cpu))
    torch.testing.assert_close(tree_loss, sample_loss, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(tree_grads, sample_grads, rtol=1e-4, atol=1e-4)

    # the attention against a dense reference, on the first row's tree
    from transformers import AttentionInterface

    tree = row_trees[0][0]
    columns = ("input_ids", "labels", "position_ids", "parents")
    batch = collate({k: [np.asarray(getattr(tree, k))] for k in columns}, 0, cpu)
    AttentionInterface.register("dense_reference", dense_reference_attention)
    reference = AutoModelForCausalLM.from_config(copy.deepcopy(gqa_model.config), attn_implementation="dense_reference")
    reference.load_state_dict(gqa_model.state_dict())
    DENSE_MASK[:] = [dense_tree_mask(tree, encoded[0])]
    with torch.no_grad():
        inputs = {k: v for k, v in model_inputs(batch).items() if not k.startswith("trained_")}
        ours = gqa_model.model(**inputs, use_cache=False).last_hidden_state
        dense = reference.model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    torch.testing.assert_close(ours, dense.last_hidden_state, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen flash kernel needs CUDA")
def test_cuda_packed_varlen_trains_trees_with_packed_sdpas_losses_and_gradients(gqa_model):
    """On the GPU machine: the varlen kernel over the gathered keys (causal aligned to the bottom right)
    against packed_sdpa's per-segment attention, both under bf16 autocast."""
    from transformers import AutoModelForCausalLM

    device = torch.device("cuda")
    tokenizer = official_tokenizer("qwen3")
    trees = [t for samples in encoded_rows_of(tokenizer, SHORT_ROWS) for t in build_trees(samples)]
    columns = {
        k: [np.asarray(getattr(t, k)) for t in trees] for k in ("input_ids", "labels", "position_ids", "parents")
    }
    columns["num_trained"] = [0] * len(trees)
    batch = collate(pack_rows(columns, budget=2 * max(len(t.input_ids) for t in trees)), 0, device)
    results = []
    for implementation in ("packed_sdpa", "packed_varlen"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(gqa_model.config), attn_implementation=implementation)
        model.load_state_dict(gqa_model.state_dict())
        model.to(device).train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, _ = TrainedTokenLoss(model)(**model_inputs(batch))
        loss_sum.backward()
        results.append((loss_sum.detach().float(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=1e-1)
    assert torch.nn.functional.cosine_similarity(results[1][1], results[0][1], dim=0) > 0.99
