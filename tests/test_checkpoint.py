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
    local_newest_checkpoint,
    newest_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_manifest,
)
from sftcore.storage import StoragePath


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


def publish(output_dir: StoragePath, name: str, parts, step: int, tmp_path) -> StoragePath:
    """A checkpoint written locally, then copied into output_dir as the runtimes copy it."""
    write(tmp_path / "staging" / name, parts, step)
    (output_dir / name).upload(tmp_path / "staging" / name)
    return output_dir / name


def test_newest_checkpoint_skips_torn_ones_and_prune_keeps_the_newest_intact(output_dir, tmp_path, parts, caplog):
    for step in (2, 4, 6):
        publish(output_dir, f"checkpoint-{step}", parts, step, tmp_path)
    (output_dir / "checkpoint-6" / MANIFEST).remove()
    (output_dir / "checkpoint-8" / "config.json").write_text("{}")  # an upload cut off after its first file
    assert newest_checkpoint(output_dir) == output_dir / "checkpoint-4"
    assert f"skipping checkpoint {output_dir / 'checkpoint-6'}" in caplog.text

    publish(output_dir, "final", parts, 10, tmp_path)
    assert newest_checkpoint(output_dir) == output_dir / "final"

    prune_checkpoints(output_dir, keep=1)  # the newest intact checkpoint-N is 4: everything older goes
    assert sorted(output_dir.children()) == ["checkpoint-4", "checkpoint-6", "checkpoint-8", "final"]


def test_a_checkpoint_in_a_bucket_is_checked_by_size_there_and_by_hash_once_downloaded(
    s3_bucket, tmp_path, parts, caplog
):
    _, bucket = s3_bucket
    output_dir = StoragePath.of(f"s3://{bucket}/runs/run")
    publish(output_dir, "checkpoint-2", parts, 2, tmp_path)
    newest = publish(output_dir, "checkpoint-4", parts, 4, tmp_path)
    state = bytearray((newest / TRAINING_STATE).read_bytes())
    state[100] ^= 1  # bit rot in the bucket: same size, wrong bytes
    (newest / TRAINING_STATE).write_bytes(bytes(state))

    assert newest_checkpoint(output_dir) == newest  # sizes only: no download on the driver
    assert checkpoint_problem(newest) == f"{TRAINING_STATE} is corrupted (sha256 mismatch)"
    with local_newest_checkpoint(output_dir) as local:
        assert local is not None and local.name == "checkpoint-2" and local.is_dir()
        assert checkpoint_problem(local) is None
    assert not local.exists()  # the downloaded copy is gone with the block
    assert f"skipping checkpoint {newest} (step 4): {TRAINING_STATE} is corrupted" in caplog.text


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
