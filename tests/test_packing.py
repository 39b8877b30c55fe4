"""Packing changes no loss: rows packed together score exactly as they do alone (block-diagonal
attention from position ids), and the trained-positions-only loss equals the full-logits loss."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REAL_DATA_FILES, real_rows, save_tiny_model
from transformers import AutoModelForCausalLM

import sftcore.loop
from sftcore.loop import TrainedTokenLoss, collate
from sftcore.masking import IGNORE_INDEX, EncodeOptions, encode_row
from sftcore.packing import best_fit_decreasing, pack_rows


def test_best_fit_decreasing_places_every_row_once_within_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 1000) for _ in range(2000)]
    bins = best_fit_decreasing(lengths, 1000)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 1000 for b in bins)
    assert bins == best_fit_decreasing(lengths, 1000)  # deterministic
    assert sum(lengths) / (len(bins) * 1000) > 0.99
    with pytest.raises(ValueError, match="exceeds the pack budget"):
        best_fit_decreasing([5, 11], 10)


@pytest.fixture(scope="module")
def encoded_rows(smollm2_tokenizer):
    rows = [row for name, _, row in real_rows() if name == REAL_DATA_FILES[1].name][:12]
    encoded = [encode_row(row, smollm2_tokenizer, EncodeOptions(max_seq_length=1024)).samples[0] for row in rows]
    return {
        "input_ids": [np.asarray(e.input_ids, dtype=np.int32) for e in encoded],
        "labels": [np.asarray(e.labels, dtype=np.int64) for e in encoded],
        "num_trained": [sum(label != IGNORE_INDEX for label in e.labels) for e in encoded],
    }


def test_packs_hold_every_row_once_with_restarting_positions_and_masked_row_starts(encoded_rows):
    packs = pack_rows(encoded_rows, budget=2048)
    assert sum(packs["num_rows"]) == 12 and all(n <= 2048 for n in packs["num_tokens"])
    assert sum(packs["num_tokens"]) == sum(len(ids) for ids in encoded_rows["input_ids"])
    for ids, labels, positions in zip(packs["input_ids"], packs["labels"], packs["position_ids"], strict=True):
        starts = np.flatnonzero(positions == 0)
        assert (labels[starts] == IGNORE_INDEX).all()
        assert len(ids) == len(labels) == len(positions)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(request, tmp_path_factory, smollm2_tokenizer):
    path = save_tiny_model(tmp_path_factory.mktemp("m"), smollm2_tokenizer)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=request.param, dtype=torch.float32).eval()


def per_position_losses(model, batch) -> torch.Tensor:
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    return F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")


@torch.no_grad()
def test_each_row_scores_the_same_packed_as_alone(model, encoded_rows):
    cpu = torch.device("cpu")
    alone = []
    for ids, labels in zip(encoded_rows["input_ids"], encoded_rows["labels"], strict=True):
        batch = collate({"input_ids": [ids], "labels": [labels]}, 0, cpu)
        alone.append(per_position_losses(model, batch)[0][batch["labels"][0, 1:] != IGNORE_INDEX])

    packs = pack_rows(encoded_rows, budget=2048)
    order = [i for b in best_fit_decreasing([len(x) for x in encoded_rows["input_ids"]], 2048) for i in sorted(b)]
    batch = collate(packs, 0, cpu)  # all packs in one micro-batch: [packs, longest pack], padded
    assert "attention_mask" not in batch
    losses = per_position_losses(model, batch)
    packed = []
    for p in range(len(packs["input_ids"])):
        positions = batch["position_ids"][p, : packs["num_tokens"][p]]
        starts = [*torch.nonzero(positions == 0).flatten().tolist(), int(packs["num_tokens"][p])]
        for start, end in zip(starts, starts[1:], strict=False):
            targets = batch["labels"][p, start + 1 : end]
            packed.append(losses[p, start : end - 1][targets != IGNORE_INDEX])
    assert len(packed) == 12
    for row, got in zip(order, packed, strict=True):
        torch.testing.assert_close(got, alone[row], rtol=1e-5, atol=1e-5)


def test_trained_positions_loss_and_gradients_equal_the_full_logits_ones(model, encoded_rows, monkeypatch):
    monkeypatch.setattr(sftcore.loop, "LOSS_CHUNK_TOKENS", 37)  # many chunks, one ragged
    batch = collate(pack_rows(encoded_rows, budget=2048), 0, torch.device("cpu"))
    trained = batch["labels"][:, 1:] != IGNORE_INDEX

    model.zero_grad()
    expected = per_position_losses(model, batch)[trained].sum()
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    loss_sum, correct = TrainedTokenLoss(model)(**{k: v for k, v in batch.items() if k != "num_tokens"})
    loss_sum.backward()
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-4)
    for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert 0 <= int(correct) <= int(trained.sum())


def test_gradient_checkpointing_changes_no_loss_or_gradient(tmp_path, smollm2_tokenizer, encoded_rows):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, smollm2_tokenizer)).train()
    batch = collate(pack_rows(encoded_rows, budget=2048), 0, torch.device("cpu"))
    inputs = {k: v for k, v in batch.items() if k != "num_tokens"}
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.zero_grad()
        loss_sum, _ = TrainedTokenLoss(model)(**inputs)
        loss_sum.backward()
        results.append((loss_sum.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for plain, recomputed in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(plain, recomputed)
