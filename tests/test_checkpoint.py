"""Checkpoint layout: a manifest makes torn or corrupted checkpoints detectable; loading never unpickles code."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
from conftest import save_tiny_model
from transformers import AutoModelForCausalLM

from sftcore.checkpoint import (
    MANIFEST,
    TRAINING_STATE,
    TrainerState,
    checkpoint_problem,
    load_training_state,
    newest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_manifest,
)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, smollm2_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(save_tiny_model(tmp_path_factory.mktemp("m"), smollm2_tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return model, smollm2_tokenizer, optimizer, scheduler


def write(directory, parts, step: int) -> None:
    model, tokenizer, optimizer, scheduler = parts
    save_checkpoint(directory, model, tokenizer, optimizer, scheduler, TrainerState(step=step), {}, use_lora=False)
    write_manifest(directory)


def test_a_fresh_checkpoint_is_intact_and_its_manifest_lists_every_file(tmp_path, parts):
    write(tmp_path / "checkpoint-2", parts, 2)
    manifest = json.loads((tmp_path / "checkpoint-2" / MANIFEST).read_text())
    files = {str(p.relative_to(tmp_path / "checkpoint-2")) for p in (tmp_path / "checkpoint-2").rglob("*")}
    assert set(manifest) == files - {MANIFEST}
    assert checkpoint_problem(tmp_path / "checkpoint-2") is None


def test_missing_short_or_altered_files_are_each_detected(tmp_path, parts):
    for name in ("missing", "short", "altered", "no_manifest"):
        write(tmp_path / name, parts, 1)
    (tmp_path / "missing" / "config.json").unlink()
    weights = tmp_path / "short" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    state = tmp_path / "altered" / TRAINING_STATE
    data = bytearray(state.read_bytes())
    data[100] ^= 1
    state.write_bytes(bytes(data))
    (tmp_path / "no_manifest" / MANIFEST).unlink()

    assert checkpoint_problem(tmp_path / "missing") == "config.json is missing"
    assert "model.safetensors has" in checkpoint_problem(tmp_path / "short")
    assert checkpoint_problem(tmp_path / "altered") == f"{TRAINING_STATE} is corrupted (sha256 mismatch)"
    assert checkpoint_problem(tmp_path / "altered", check_hashes=False) is None  # the cheap check sees sizes only
    assert "no manifest.json" in checkpoint_problem(tmp_path / "no_manifest")


def test_newest_checkpoint_skips_torn_ones_and_prune_keeps_the_newest_intact(tmp_path, parts, caplog):
    for step in (2, 4, 6):
        write(tmp_path / f"checkpoint-{step}", parts, step)
    (tmp_path / "checkpoint-6" / MANIFEST).unlink()
    (tmp_path / "checkpoint-8").mkdir()  # an upload that never got a file in
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-4"
    assert "skipping checkpoint" in caplog.text and "checkpoint-6" in caplog.text

    write(tmp_path / "final", parts, 10)
    assert newest_checkpoint(tmp_path) == tmp_path / "final"

    prune_checkpoints(tmp_path, keep=1)  # the newest intact checkpoint-N is 4: everything older goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8", "final"]


class _Payload:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_training_state_is_loaded_without_unpickling_objects(tmp_path, parts):
    _, _, optimizer, scheduler = parts
    marker = tmp_path / "pwned"
    with (tmp_path / TRAINING_STATE).open("wb") as f:
        pickle.dump({"optimizer": _Payload(marker)}, f)
    with pytest.raises(pickle.UnpicklingError):
        load_training_state(tmp_path, optimizer, scheduler)
    assert not marker.exists()
