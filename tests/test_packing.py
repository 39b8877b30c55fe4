"""Packing changes no loss: rows packed together score exactly as they do alone (block-diagonal
attention from position ids, or packed_sdpa over each sample without a mask), and the
trained-positions-only loss equals the full-logits loss."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REAL_DATA_FILES, real_rows, save_tiny_model
from transformers import AutoModelForCausalLM

import sftcore.loop
from sftcore.config import TrainConfig
from sftcore.loop import TrainedTokenLoss, collate, model_inputs
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


@pytest.fixture(scope="module", params=["packed_sdpa", "packed_eager", "sdpa", "eager"])
def model(request, tmp_path_factory, smollm2_tokenizer):
    path = save_tiny_model(tmp_path_factory.mktemp("m"), smollm2_tokenizer)
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=request.param, dtype=torch.float32).eval()


def padded_labels(sequences: dict) -> torch.Tensor:
    """The sequences' labels as one right-padded [batch, longest] tensor (collate's shape)."""
    width = max(len(labels) for labels in sequences["labels"])
    out = torch.full((len(sequences["labels"]), width), IGNORE_INDEX, dtype=torch.long)
    for i, labels in enumerate(sequences["labels"]):
        out[i, : len(labels)] = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    return out


def per_position_losses(model, batch, labels: torch.Tensor) -> torch.Tensor:
    inputs = {k: v for k, v in model_inputs(batch).items() if not k.startswith("trained_")}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    return F.cross_entropy(logits.transpose(1, 2), labels[:, 1:], ignore_index=IGNORE_INDEX, reduction="none")


@torch.no_grad()
def test_each_row_scores_the_same_packed_as_alone(model, encoded_rows):
    cpu = torch.device("cpu")
    alone = []
    for ids, labels in zip(encoded_rows["input_ids"], encoded_rows["labels"], strict=True):
        row = {"input_ids": [ids], "labels": [labels]}
        losses = per_position_losses(model, collate(row, 0, cpu), padded_labels(row))[0]
        alone.append(losses[labels[1:] != IGNORE_INDEX])

    packs = pack_rows(encoded_rows, budget=2048)
    order = [i for b in best_fit_decreasing([len(x) for x in encoded_rows["input_ids"]], 2048) for i in sorted(b)]
    batch = collate(packs, 0, cpu)  # all packs in one micro-batch: [packs, longest pack], padded
    assert "attention_mask" not in batch
    labels = padded_labels(packs)
    losses = per_position_losses(model, batch, labels)
    packed = []
    for p in range(len(packs["input_ids"])):
        positions = batch["position_ids"][p, : packs["num_tokens"][p]]
        starts = [*torch.nonzero(positions == 0).flatten().tolist(), int(packs["num_tokens"][p])]
        for start, end in zip(starts, starts[1:], strict=False):
            targets = labels[p, start + 1 : end]
            packed.append(losses[p, start : end - 1][targets != IGNORE_INDEX])
    assert len(packed) == 12
    for row, got in zip(order, packed, strict=True):
        torch.testing.assert_close(got, alone[row], rtol=1e-5, atol=1e-5)


def test_trained_positions_loss_and_gradients_equal_the_full_logits_ones(model, encoded_rows, monkeypatch):
    monkeypatch.setattr(sftcore.loop, "LOSS_CHUNK_TOKENS", 37)  # many chunks, one ragged
    packs = pack_rows(encoded_rows, budget=2048)
    batch = collate(packs, 0, torch.device("cpu"))
    labels = padded_labels(packs)
    trained = labels[:, 1:] != IGNORE_INDEX
    # collate's host-side counts, sources and targets are the labels' own: position j predicts label j + 1
    width = labels.shape[1]
    rows, columns = trained.nonzero(as_tuple=True)
    assert batch["num_trained"] == int(trained.sum())
    assert batch["trained_index"].tolist() == (rows * width + columns).tolist()
    assert batch["trained_targets"].tolist() == labels[rows, columns + 1].tolist()
    assert batch["num_tokens"] == sum(len(ids) for ids in encoded_rows["input_ids"])

    model.zero_grad()
    expected = per_position_losses(model, batch, labels)[trained].sum()
    expected.backward()
    expected_grads = [p.grad.clone() for p in model.parameters()]

    model.zero_grad()
    loss_sum, correct = TrainedTokenLoss(model)(**model_inputs(batch))
    loss_sum.backward()
    torch.testing.assert_close(loss_sum, expected, rtol=1e-5, atol=1e-4)
    for got, want in zip((p.grad for p in model.parameters()), expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert 0 <= int(correct) <= int(trained.sum())


def test_gradient_checkpointing_changes_no_loss_or_gradient(tmp_path, smollm2_tokenizer, encoded_rows):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, smollm2_tokenizer)).train()
    batch = collate(pack_rows(encoded_rows, budget=2048), 0, torch.device("cpu"))
    inputs = model_inputs(batch)
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


def test_packed_sdpa_builds_no_mask_and_gives_transformers_sdpa_losses_and_gradients(
    tmp_path, smollm2_tokenizer, encoded_rows, monkeypatch
):
    """The independent reference is transformers' sdpa with its block-diagonal mask from position ids,
    on the same packs (a GQA model: 4 query heads, 2 key/value heads), rows padded in one batch too."""
    import sftcore.attention

    path = save_tiny_model(tmp_path, smollm2_tokenizer)
    masks_seen = []
    original = sftcore.attention.packed_sdpa

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks_seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, **kwargs)

    sftcore.attention.AttentionInterface.register("packed_sdpa_spy", spy)
    monkeypatch.setattr(sftcore.loop, "READS_BOUNDARIES", ("packed_sdpa_spy",))
    packs = collate(pack_rows(encoded_rows, budget=2048), 0, torch.device("cpu"))
    rows = collate({k: encoded_rows[k][:4] for k in ("input_ids", "labels")}, 0, torch.device("cpu"))
    for batch in (packs, rows):
        results = []
        for implementation in ("sdpa", "packed_sdpa_spy"):
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=implementation).train()
            loss_sum, _ = TrainedTokenLoss(model)(**model_inputs(batch))
            loss_sum.backward()
            results.append((loss_sum.detach(), [p.grad for p in model.parameters()]))
        torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-4)
        for got, want in zip(results[1][1], results[0][1], strict=True):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert masks_seen and all(mask is None for mask in masks_seen)


def test_auto_attention_runs_the_models_own_attention_where_packed_sdpa_would_compute_something_else():
    from transformers import Gemma2Config, LlamaConfig, Qwen2Config

    from sftcore.attention import resolve_attention

    assert resolve_attention("auto", LlamaConfig(), 4096) == "packed_sdpa"  # no CUDA here
    assert resolve_attention("auto", Qwen2Config(use_sliding_window=False, sliding_window=1024), 4096) == "packed_sdpa"
    assert resolve_attention("auto", Qwen2Config(use_sliding_window=True, sliding_window=1024), 4096) == "packed_eager"
    assert resolve_attention("auto", Gemma2Config(), 4096) == "packed_eager"  # soft-capped attention logits
    assert resolve_attention("eager", Gemma2Config(), 4096) == "eager"
    remote = Gemma2Config(auto_map={"AutoModelForCausalLM": "modeling.Model"})  # its modeling file is not ours
    assert resolve_attention("auto", remote, 4096) is None  # transformers' default for the class


def test_gradient_checkpointing_is_on_by_default_on_cpu_only_and_a_flag_overrides_it():
    from sftcore.loop import uses_gradient_checkpointing

    cfg = TrainConfig(data_path="x.jsonl")
    assert uses_gradient_checkpointing(cfg, torch.device("cpu"))
    assert not uses_gradient_checkpointing(cfg, torch.device("cuda"))
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not uses_gradient_checkpointing(TrainConfig(data_path="x", gradient_checkpointing=False), cpu)
    assert uses_gradient_checkpointing(TrainConfig(data_path="x", gradient_checkpointing=True), cuda)


def test_mfu_counts_the_flops_a_step_runs_and_is_not_guessed_for_a_cpu(tmp_path, smollm2_tokenizer):
    """The decoder's weights on every token at 6 FLOPs per weight (4 when frozen: LoRA's base), the
    LM head on trained positions only, the input embedding at none (it is a lookup), experts at their
    share per token."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig

    from sftcore.throughput import peak_flops, peak_memory_gb, step_flops

    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path, smollm2_tokenizer))  # tied embeddings
    head = model.get_output_embeddings().weight.numel()
    decoder = sum(p.numel() for p in model.parameters()) - head
    flops = step_flops(model)
    assert flops(tokens=100, positions=7) == 6 * decoder * 100 + 6 * head * 7
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj"]))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert step_flops(lora)(1, 0) == 4 * decoder + 6 * adapters  # 4 per frozen weight, 6 per adapter weight
    config = Qwen3MoeConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
    )  # fmt: skip
    moe = AutoModelForCausalLM.from_config(config)
    experts = sum(p.numel() for n, p in moe.named_parameters() if ".experts." in n)
    embedding = moe.get_input_embeddings().weight.numel()
    rest = sum(p.numel() for p in moe.parameters()) - experts - 2 * embedding  # untied: head as large
    assert step_flops(moe)(1, 0) == 6 * (rest + experts * 2 / 8)
    assert peak_flops(torch.device("cpu")) is None
    assert 0.05 < peak_memory_gb(torch.device("cpu")) < 64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the varlen flash kernel and bf16 LoRA base need CUDA")
def test_cuda_packed_varlen_gives_sdpa_losses_and_gradients_and_lora_keeps_a_bf16_base(
    tmp_path, smollm2_tokenizer, encoded_rows
):
    """On the GPU machine: torch's varlen kernel over the packs' boundaries against transformers'
    masked sdpa, both under bf16 autocast (bf16 tolerances); and a LoRA model's frozen weights bf16,
    its adapters fp32."""
    from sftcore.attention import PACKED_VARLEN, resolve_attention
    from sftcore.loop import build_model

    device = torch.device("cuda")
    path = save_tiny_model(tmp_path, smollm2_tokenizer)
    assert resolve_attention("auto", AutoModelForCausalLM.from_pretrained(path).config, 4096) in (
        PACKED_VARLEN,
        "flash_attention_2",
    )
    batch = collate(pack_rows(encoded_rows, budget=2048), 0, device)
    results = []
    for implementation in ("sdpa", PACKED_VARLEN):
        model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=implementation).to(device).train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss_sum, _ = TrainedTokenLoss(model)(**model_inputs(batch))
        loss_sum.backward()
        results.append((loss_sum.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=2e-2, atol=1e-1)
    for got, want in zip(results[1][1], results[0][1], strict=True):
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99

    lora = build_model(TrainConfig(data_path="x", model_name_or_path=path, use_lora=True), None, device)
    dtypes = {(p.requires_grad, p.dtype) for p in lora.parameters()}
    assert dtypes == {(False, torch.bfloat16), (True, torch.float32)}
