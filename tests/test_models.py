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
