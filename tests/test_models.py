"""Model loading trusts no code from a model repo unless the user says so."""

from __future__ import annotations

import json

import pytest
import torch

from sftcore.config import TrainConfig
from sftcore.loop import build_model


def test_remote_code_in_a_model_directory_is_refused_by_default(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "configuration_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}}
    (tmp_path / "config.json").write_text(json.dumps(config))

    cfg = TrainConfig(data_path="unused.jsonl", model_name_or_path=str(tmp_path))
    assert cfg.trust_remote_code is False
    with pytest.raises(ValueError, match="trust_remote_code"):
        build_model(cfg, resume_dir=None, device=torch.device("cpu"))
    assert not marker.exists()


def test_a_missing_model_directory_is_named_not_read_as_a_hub_id(tmp_path):
    from sftcore.models import load_tokenizer, resolve_model_path

    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}/run/final: no such directory$"):
        load_tokenizer(str(tmp_path / "run" / "final"))
    assert resolve_model_path("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"  # hub ids pass through


def test_tiled_mlps_train_with_the_untiled_losses_and_gradients_and_keep_their_weight_names(tmp_path, tiny_model):
    """--tiled_mlp: each MLP over tiles of the sequence, recomputed in backward (here 7-token tiles of a
    20-token pack, under gradient checkpointing as on CPU): the same loss and gradients."""
    from sftcore.loop import TrainedTokenLoss, collate, model_inputs
    from sftcore.models import tile_mlps

    ids = list(range(5, 25))
    batch = collate({"input_ids": [ids], "labels": [ids], "position_ids": [list(range(12)) + list(range(8))]}, 0, "cpu")
    results = []
    for tiled in (False, True):
        cfg = TrainConfig(data_path="unused.jsonl", model_name_or_path=tiny_model, gradient_checkpointing=True)
        model = build_model(cfg, resume_dir=None, device=torch.device("cpu"))
        names = set(model.state_dict())
        if tiled:
            assert tile_mlps(model, tile_tokens=7) == model.config.num_hidden_layers
            assert set(model.state_dict()) == names
        loss_sum, _ = TrainedTokenLoss(model)(**model_inputs(batch))
        loss_sum.backward()
        results.append((loss_sum.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])))
    torch.testing.assert_close(results[1][0], results[0][0])
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)
