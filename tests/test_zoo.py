"""The model side across the architectures users fine-tune for agents: tiny random models built from
transformers' own configs (real architectures: a few layers, small widths), with default flags.

For each: the attention `--attn_implementation auto` picks loads and computes what the model computes
(attention sinks, soft-capping, sliding windows and latent attention included); our loss on trained
positions equals transformers' own ``model(input_ids, labels=...).loss`` (an eager twin with the same
weights) on each sample alone; packed equals alone; prefix trees equal their samples where the
attention computes trees; full fine-tuning and LoRA take a few steps with a finite, falling loss."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from sftcore.attention import PACKED_EAGER, PACKED_SDPA, check_attention, resolve_attention, trains_trees
from sftcore.heads import CHECKED_MODEL_TYPES
from sftcore.loop import TrainedTokenLoss, collate, model_inputs
from sftcore.masking import IGNORE_INDEX, Sample
from sftcore.packing import pack_rows
from sftcore.trees import build_trees

VOCAB, LENGTH = 256, 4096
TINY = {
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": LENGTH,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
EXPERTS = {"num_local_experts": 4, "num_experts_per_tok": 2}
QWEN_EXPERTS = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16}
LATENT = {  # multi-head latent attention: the value head dim differs from the query/key one
    "num_key_value_heads": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "moe_intermediate_size": 16,
    "q_lora_rank": 16,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 8,
    "v_head_dim": 4,
    "first_k_dense_replace": 1,
    "n_group": 1,
    "topk_group": 1,
}
SOFTCAPS = {"head_dim": 8, "sliding_window": 16, "final_logit_softcapping": 0.5}
# model type: (config fields beside TINY, the attention auto picks on CPU: packed_eager where the model
# computes more than causal softmax attention)
ZOO = {
    "llama": ({}, PACKED_SDPA),
    "mistral": ({"sliding_window": None}, PACKED_SDPA),
    "mixtral": ({**EXPERTS, "sliding_window": None}, PACKED_SDPA),
    "qwen2": ({}, PACKED_SDPA),
    "qwen2_moe": ({**QWEN_EXPERTS, "shared_expert_intermediate_size": 16}, PACKED_SDPA),
    "qwen3": ({"head_dim": 8}, PACKED_SDPA),
    "qwen3_moe": ({"head_dim": 8, **QWEN_EXPERTS}, PACKED_SDPA),
    "gemma": ({"head_dim": 8}, PACKED_SDPA),
    # caps small enough to change a tiny model's logits
    "gemma2": ({**SOFTCAPS, "attn_logit_softcapping": 1.0}, PACKED_EAGER),  # soft-capped attention, sliding windows
    "gemma3_text": (SOFTCAPS, PACKED_EAGER),
    "phi": ({}, PACKED_SDPA),
    "phi3": ({}, PACKED_SDPA),
    "gpt_oss": ({"head_dim": 8, **EXPERTS, "sliding_window": 16}, PACKED_EAGER),  # attention sinks, sliding windows
    "granite": ({"logits_scaling": 8.0}, PACKED_SDPA),
    "granitemoe": ({"logits_scaling": 8.0, **EXPERTS}, PACKED_SDPA),
    "granitemoeshared": ({"logits_scaling": 8.0, **EXPERTS, "shared_intermediate_size": 16}, PACKED_SDPA),
    "deepseek_v2": (LATENT, PACKED_SDPA),
    "deepseek_v3": (LATENT, PACKED_SDPA),
    "glm4": ({"head_dim": 8}, PACKED_SDPA),
    "glm4_moe": ({**LATENT, "head_dim": 8}, PACKED_SDPA),
    "smollm3": ({}, PACKED_SDPA),
    "cohere": ({"logit_scale": 0.25}, PACKED_SDPA),
    "cohere2": ({"head_dim": 8, "sliding_window": 16, "logit_scale": 0.25}, PACKED_EAGER),
    "olmo2": ({}, PACKED_SDPA),
    "olmoe": ({"num_experts": 4, "num_experts_per_tok": 2}, PACKED_SDPA),
    "starcoder2": ({"sliding_window": None}, PACKED_SDPA),
    "ernie4_5": ({"head_dim": 8}, PACKED_SDPA),
    "seed_oss": ({"head_dim": 8}, PACKED_SDPA),
    "apertus": ({}, PACKED_SDPA),
    "hunyuan_v1_dense": ({"head_dim": 8}, PACKED_SDPA),
    "exaone4": ({"head_dim": 8, "sliding_window": 16}, PACKED_EAGER),
}


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, **{**TINY, **ZOO[model_type][0]})


def samples() -> list[Sample]:
    """Three samples: two sharing a 24-token prompt (one prefix tree), one alone; a few tokens trained."""
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in (24, 9, 13, 30)]
    prompt, first, second, other = ids

    def sample(context: list[int], trained: list[int], turn: int) -> Sample:
        return Sample(context + trained, [IGNORE_INDEX] * len(context) + trained, turns=[turn], history="full")

    return [sample(prompt, first, 0), sample(prompt, second, 1), sample(other[:20], other[20:], 0)]


def loss_sum(model: torch.nn.Module, columns: dict) -> torch.Tensor:
    return TrainedTokenLoss(model)(**model_inputs(collate(columns, 0, torch.device("cpu"))))[0]


def as_columns(sequences) -> dict:
    columns = {k: [list(getattr(s, k)) for s in sequences] for k in ("input_ids", "labels")}
    if hasattr(sequences[0], "parents"):
        columns |= {k: [list(getattr(s, k)) for s in sequences] for k in ("position_ids", "parents")}
    columns["num_trained"] = [sum(label != IGNORE_INDEX for label in s.labels) for s in sequences]
    return columns


def test_every_model_type_with_a_known_logit_transform_is_in_the_zoo():
    assert set(ZOO) >= CHECKED_MODEL_TYPES


@pytest.mark.parametrize("model_type", list(ZOO))
def test_each_architecture_loads_with_auto_and_trains_what_transformers_computes(model_type):
    config = tiny_config(model_type)
    trees = trains_trees("auto", "auto", config, LENGTH)
    attention = resolve_attention("auto", config, LENGTH, trees)
    assert attention == ZOO[model_type][1]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).float().eval()
    # a config of its own: loading sets the config's attention implementation
    twin = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").float().eval()
    twin.load_state_dict(model.state_dict())
    if attention == PACKED_EAGER:  # a packed kernel asked for explicitly is refused, not run wrong
        with pytest.raises(ValueError, match="does not compute this model's"):
            check_attention(PACKED_SDPA, config, LENGTH)
        # by the kernel in the first step, or by transformers for a class that refuses anything sdpa
        with pytest.raises(ValueError, match="does not compute this model's|does not support an attention"):
            kernel = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=PACKED_SDPA)
            kernel(torch.tensor([samples()[0].input_ids]))
    rows = samples()
    # our loss on each sample alone is transformers' own (a mean over the trained tokens)
    alone = [loss_sum(model, as_columns([s])) for s in rows]
    for sample, ours in zip(rows, alone, strict=True):
        labels = torch.tensor([sample.labels])
        expected = twin(torch.tensor([sample.input_ids]), labels=labels).loss * (labels[0, 1:] != IGNORE_INDEX).sum()
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    # several samples in one pack score what they score alone; so do their prefix trees
    packs = pack_rows(as_columns(rows), budget=128)
    assert len(packs["input_ids"]) == 1
    torch.testing.assert_close(loss_sum(model, packs), sum(alone), rtol=1e-5, atol=1e-4)
    if trees:
        row_trees = build_trees(rows[:2], 128) + build_trees(rows[2:], 128)
        assert len(row_trees) == 2
        tree_pack = pack_rows(as_columns(row_trees), budget=128)
        torch.testing.assert_close(loss_sum(model, tree_pack), sum(alone), rtol=1e-5, atol=1e-4)


def falls(model: torch.nn.Module, columns: dict, steps: int = 4) -> list[float]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_sum(model, columns)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("model_type", list(ZOO))
def test_full_fine_tuning_and_lora_take_steps_with_a_falling_loss(model_type):
    from peft import LoraConfig, get_peft_model

    config = tiny_config(model_type)
    attention = resolve_attention("auto", config, LENGTH, trains_trees("auto", "auto", config, LENGTH))
    packs = pack_rows(as_columns(samples()), budget=128)
    for lora in (False, True):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).float().train()
        if lora:
            model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        losses = falls(model, packs)
        assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0], (lora, losses)
