"""Sequence parallelism (Ulysses): two gloo workers sharing each pack train with one worker's losses and
gradients, on packed tau-bench rows, as samples and as prefix trees, under DDP, FSDP2 and LoRA, and
with gpt-oss's own eager attention (sinks, sliding windows)."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from conftest import DATA, official_tokenizer, tiny_llama_config

from sftcore.config import TrainConfig
from sftcore.loop import TrainedTokenLoss, collate, model_inputs
from sftcore.masking import IGNORE_INDEX, encode_row
from sftcore.packing import pack_rows
from sftcore.sequence_parallel import check_sequence_parallel, head_shares, kv_heads_needed, shard_tokens
from sftcore.trees import build_trees

TAU = [json.loads(line) for line in (DATA / "taubench_airline_dev.jsonl").read_text().splitlines()]
WORKERS = 2
LLAMA = {"model_type": "llama", "attention": "packed_sdpa"}
# gpt-oss: attention sinks (a per-head parameter) and sliding windows, computed by its own eager attention
GPT_OSS = {"model_type": "gpt_oss", "attention": "packed_eager", "head_dim": 8, "sliding_window": 16}
GPT_OSS |= {"num_local_experts": 4, "num_experts_per_tok": 2}
# (name, model, query heads, key/value heads, prefix trees, LoRA, strategy): 1 key/value head is fewer
# than the workers (sent to both), 2 divide them; 3 query heads do not divide among 2 workers (2 and
# 1); 6 query heads over 3 key/value heads give each worker runs of query heads of unequal lengths
# per key/value head (query heads 0-2: 2 on key/value head 0, 1 on 1), one kernel call per run
CASES = [
    ("samples, 4 heads over kv 2, ddp", LLAMA, 4, 2, False, False, "ddp"),
    ("trees, 4 heads over kv 1, ddp", LLAMA, 4, 1, True, False, "ddp"),
    ("trees, 3 heads over kv 1, ddp", LLAMA, 3, 1, True, False, "ddp"),
    ("samples, 6 heads over kv 3, ddp", LLAMA, 6, 3, False, False, "ddp"),
    ("trees, 4 heads over kv 1, lora", LLAMA, 4, 1, True, True, "ddp"),
    ("trees, 4 heads over kv 2, fsdp", LLAMA, 4, 2, True, False, "fsdp"),
    ("gpt-oss samples, 6 heads over kv 3, ddp", GPT_OSS, 6, 3, False, False, "ddp"),
]


def packed_batch(trees: bool) -> dict:
    """Two packs of real rows (tau-bench, Qwen3's template and vocabulary), as samples or as prefix trees."""
    tokenizer = official_tokenizer("qwen3")
    encoded = [encode_row(row, tokenizer).samples for row in (TAU[42], TAU[49])]
    if trees:
        items = [t for samples in encoded for t in build_trees(samples)]
        keys = ("input_ids", "labels", "position_ids", "parents")
    else:
        items = [s for samples in encoded for s in samples][:6]
        keys = ("input_ids", "labels")
    columns = {k: [np.asarray(getattr(item, k)) for item in items] for k in keys}
    columns["num_trained"] = [int((np.asarray(c) != IGNORE_INDEX).sum()) for c in columns["labels"]]
    packs = pack_rows(columns, budget=max(len(ids) for ids in columns["input_ids"]) * 3 // 2)
    return {k: v[:2] for k, v in packs.items()}


def make_model(model: dict, heads: int, kv_heads: int, lora: bool, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fields = {k: v for k, v in model.items() if k not in ("model_type", "attention")}
    shape = {"hidden_size": 8 * heads, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    if model["model_type"] == "llama":
        config = tiny_llama_config(vocab, 8192, **shape)
    else:
        config = AutoConfig.for_model(
            model["model_type"], vocab_size=vocab, intermediate_size=64, num_hidden_layers=2, **shape, **fields
        )
    lm = AutoModelForCausalLM.from_config(config, attn_implementation=model["attention"]).float().train()
    if lora:
        from peft import LoraConfig, get_peft_model

        lm = get_peft_model(lm, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    return lm


def trained_gradients(model) -> torch.Tensor:
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return torch.cat([(g.full_tensor() if hasattr(g, "full_tensor") else g).flatten() for g in grads])


def _worker(rank: int, port: int, batches: dict, vocab: int, results: str) -> None:
    import os

    import torch.distributed as dist

    from sftcore.parallel import wrap_model
    from sftcore.sequence_parallel import sequence_group

    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group("gloo", rank=rank, world_size=WORKERS)
    torch.set_num_threads(1)
    group = sequence_group(rank, WORKERS, WORKERS)
    out = {}
    for name, kind, heads, kv_heads, trees, lora, strategy in CASES:
        lm = make_model(kind, heads, kv_heads, lora, vocab)
        model = wrap_model(TrainedTokenLoss(lm), lm, strategy, torch.device("cpu"))
        batch = collate(batches[trees], 0, torch.device("cpu"), group)
        loss_sum, _ = model(**model_inputs(batch))
        # as the loop does: DDP and FSDP average gradients over the workers, the loss is a sum
        (loss_sum * WORKERS).backward()
        totals = torch.tensor([loss_sum.item(), batch["num_trained"], batch["num_tokens"]], dtype=torch.float64)
        dist.all_reduce(totals)
        out[name] = (totals, trained_gradients(lm))
    if rank == 0:
        torch.save(out, results)
    dist.barrier()
    # no teardown: gloo's process group freed from DDP's reducer can deadlock on the GIL (torch 2.13)
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_sharing_each_pack_train_like_one(tmp_path):
    """Each worker holds half of every pack; its slice's last position predicts the next slice's first
    token (a target is an id, known on the host); the attention sees the whole pack for half the heads."""
    vocab = len(official_tokenizer("qwen3"))
    batches = {trees: packed_batch(trees) for trees in (False, True)}
    for batch in batches.values():
        width = max(len(ids) for ids in batch["input_ids"])
        assert len(batch["input_ids"]) == 2 and width > 1500  # two long packs each
    results = tmp_path / "results.pt"
    mp.spawn(_worker, args=(free_port(), batches, vocab, str(results)), nprocs=WORKERS)
    got = torch.load(results, weights_only=True)
    for name, kind, heads, kv_heads, trees, lora, _ in CASES:
        model = make_model(kind, heads, kv_heads, lora, vocab)
        batch = collate(batches[trees], 0, torch.device("cpu"))
        loss_sum, _ = TrainedTokenLoss(model)(**model_inputs(batch))
        loss_sum.backward()
        totals, grads = got[name]
        assert totals[1] == batch["num_trained"] and totals[2] == batch["num_tokens"], name  # each counted once
        torch.testing.assert_close(totals[0].item(), loss_sum.item(), rtol=1e-5, atol=1e-3, msg=name)
        torch.testing.assert_close(grads, trained_gradients(model), rtol=1e-4, atol=1e-5, msg=name)


def test_each_worker_gets_its_slice_of_every_row_and_the_targets_its_positions_predict():
    batch = {"input_ids": [np.arange(10, 17)], "labels": [np.arange(10, 17)], "position_ids": [np.arange(7)]}
    whole = collate(batch, 0, torch.device("cpu"))
    slices = []
    for rank in range(2):

        class Group:  # what collate reads of a SequenceGroup
            size, group = 2, None

        Group.rank = rank
        slices.append(collate(batch, 0, torch.device("cpu"), Group))
    assert [s["input_ids"].tolist() for s in slices] == [[[10, 11, 12, 13]], [[14, 15, 16, 0]]]  # padded to 8
    assert [s["position_ids"].tolist() for s in slices] == [[[0, 1, 2, 3]], [[4, 5, 6, 0]]]
    # position 3 (the first slice's last) predicts token 14, the second slice's first
    assert [s["trained_targets"].tolist() for s in slices] == [[11, 12, 13, 14], [15, 16]]
    assert [s["trained_index"].tolist() for s in slices] == [[0, 1, 2, 3], [0, 1]]
    assert [s["num_tokens"] for s in slices] == [4, 3] and whole["num_trained"] == 6
    assert slices[0]["cu_seq_lens_q"].tolist() == [0, 7, 8]  # the attention sees the whole pack
    unpacked = shard_tokens(
        {k: v for k, v in whole.items() if k != "position_ids"} | {"attention_mask": whole["position_ids"]}, [7], 1, 7
    )
    assert "attention_mask" not in unpacked and unpacked["position_ids"].tolist() == [[1]]


def test_heads_are_shared_as_evenly_as_they_can_be_and_each_worker_gets_only_the_key_value_heads_it_uses():
    assert head_shares(8, 2) == [4, 4] and head_shares(9, 2) == [5, 4] and head_shares(6, 4) == [2, 2, 1, 1]

    def needed(heads, kv_heads, size):
        return [list(kv) for kv in kv_heads_needed(heads, kv_heads, size)]

    assert needed(4, 1, 2) == [[0], [0]]  # fewer key/value heads than workers: each gets the one it uses
    assert needed(4, 2, 2) == [[0], [1]] and needed(4, 4, 2) == [[0, 1], [2, 3]]
    assert needed(32, 8, 8) == [[h] for h in range(8)] and needed(32, 2, 8) == [[0]] * 4 + [[1]] * 4
    assert needed(9, 3, 2) == [[0, 1], [1, 2]]  # SmolLM2-135M: query heads 0-4 and 5-8, the middle one to both
    assert needed(28, 4, 8) == [[0], [0, 1], [1], [1, 2], [2], [2, 3], [3], [3]]  # Qwen2.5-7B over 8


def test_models_it_cannot_shard_are_refused_before_loading():
    from transformers import Gemma2Config, LlamaConfig, Qwen3NextConfig

    check_sequence_parallel("auto", LlamaConfig(num_attention_heads=4), 4096, 2)
    check_sequence_parallel("auto", Gemma2Config(), 4096, 2)  # its own eager attention, per head share
    for config, choice, message in [
        (LlamaConfig(), "flash_attention_2", "packed_sdpa, packed_varlen or packed_eager"),
        (Gemma2Config(auto_map={"AutoConfig": "x.X"}), "auto", "runs its own code"),
        (LlamaConfig(), "sdpa", "packed_sdpa, packed_varlen or packed_eager"),
        (LlamaConfig(hidden_size=16, num_attention_heads=2, num_key_value_heads=1), "auto", "than the model's 2"),
        (Qwen3NextConfig(), "auto", "linear_attention layers"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_sequence_parallel(choice, config, 4096, 4)
    TrainConfig(data_path="x", num_workers=1, sequence_parallel=2)  # torchrun's process count replaces 1
