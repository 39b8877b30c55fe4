"""What a checkpoint directory holds, and how it is written and read back.

checkpoint-{step}/
    manifest.json        every other file with its size and sha256, written last: a checkpoint is
                         usable only if it has a manifest and every file matches it
    trainer_state.json   step, epoch, step in epoch, total steps, skipped steps, the run config, wandb run id
    training_state.pt    scheduler and RNG states, and the optimizer's with DDP (loaded with weights_only=True)
    adapter/             LoRA runs: the adapter (peft format, safetensors)
    model.safetensors …  full fine-tuning with DDP: the model (HF format)
    sharded/             --strategy fsdp: model and optimizer shards, one file per worker, as a torch
                         distributed checkpoint (loads into any worker count)
    tokenizer files

final/ is a checkpoint too (so a finished run can be continued with a larger --max_steps), plus the
model in HF format at its root, LoRA merged, loadable with AutoModelForCausalLM.from_pretrained.

Ray Train copies a checkpoint into OUTPUT_DIR (a directory, or a bucket: sftcore.storage) file by
file, so a crash (or a full disk) mid-copy leaves a directory with some files missing or cut short.
Nothing trusts a directory's name: resume takes the newest checkpoint whose files all match its
manifest, and says which ones it skipped.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sftcore.storage import StoragePath

logger = logging.getLogger(__name__)

MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
ADAPTER_DIR = "adapter"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done within that epoch
    total_steps: int = 0
    skipped_steps: int = 0  # steps whose loss or gradient was not finite (no update applied)
    wandb_run_id: str | None = None


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module | None,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    state: TrainerState,
    config: dict[str, Any],
    use_lora: bool,
    export_merged: bool = False,
    model_state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write everything needed to resume exactly (and, with export_merged, a standalone HF model);
    the caller writes the manifest last. Under FSDP the weights and optimizer state are sharded
    (sftcore.parallel.save_sharded_state): model and optimizer are then None, or for final/ the
    model comes with its gathered model_state to export."""
    directory.mkdir(parents=True, exist_ok=True)
    if model is not None and use_lora:
        model.save_pretrained(directory / ADAPTER_DIR)
        if export_merged:  # only for final/, the model's last use: merging in place is fine
            model.merge_and_unload(safe_merge=True).save_pretrained(directory)
    elif model is not None:
        model.save_pretrained(directory, state_dict=model_state)
    tokenizer.save_pretrained(directory)
    training_state = {
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
    }
    if optimizer is not None:
        training_state["optimizer"] = optimizer.state_dict()
    torch.save(training_state, directory / TRAINING_STATE)
    payload = {**state.__dict__, "config": config}
    (directory / TRAINER_STATE).write_text(json.dumps(payload, indent=2))


def file_entries(directory: Path) -> dict[str, dict[str, Any]]:
    """Every file under directory (but a manifest) with its size and sha256, by relative path."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)
    return {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": StoragePath.of(p).sha256()} for p in files
    }


def write_manifest(directory: Path, entries: dict[str, dict[str, Any]] | None = None) -> None:
    """The manifest of directory's files, or of the given entries (every worker's files of a sharded checkpoint)."""
    manifest = file_entries(directory) if entries is None else entries
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))


def checkpoint_problem(directory: str | os.PathLike | StoragePath, check_hashes: bool = True) -> str | None:
    """Why this checkpoint cannot be trusted (None: it is complete and intact)."""
    directory = StoragePath.of(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except FileNotFoundError:
        return f"no {MANIFEST} (incomplete: written by a crashed or older run)"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    sizes = directory.files()
    for name, expected in manifest.items():
        if name not in sizes:
            return f"{name} is missing"
        if sizes[name] != expected["size"]:
            return f"{name} has {sizes[name]} bytes, expected {expected['size']}"
        if check_hashes and (directory / name).sha256() != expected["sha256"]:
            return f"{name} is corrupted (sha256 mismatch)"
    if TRAINER_STATE not in manifest or TRAINING_STATE not in manifest:
        return "not a training checkpoint"
    return None


def checkpoint_step(directory: str | os.PathLike | StoragePath) -> int | None:
    """N for checkpoint-N; final/ counts by the step it recorded (None when unreadable)."""
    directory = StoragePath.of(directory)
    if directory.name.startswith("checkpoint-") and directory.name[len("checkpoint-") :].isdigit():
        return int(directory.name[len("checkpoint-") :])
    try:
        return read_trainer_state(directory).step
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _checkpoints_newest_first(output_dir: StoragePath) -> list[tuple[int, StoragePath]]:
    """(step, directory) of checkpoint-N and final/, newest first (final/ before a checkpoint of the same step)."""
    directories = [output_dir / name for name, is_dir in output_dir.children().items() if is_dir]
    candidates = [d for d in directories if d.name.startswith("checkpoint-") or d.name == "final"]
    stepped = [(step, d.name == "final", d) for d in candidates if (step := checkpoint_step(d)) is not None]
    return [(step, d) for step, _, d in sorted(stepped, key=lambda s: s[:2], reverse=True)]


def _intact(directory: StoragePath, step: int, check_hashes: bool, shown: StoragePath | None = None) -> bool:
    problem = checkpoint_problem(directory, check_hashes)
    if problem is not None:
        logger.warning("skipping checkpoint %s (step %d): %s", shown or directory, step, problem)
    return problem is None


def newest_checkpoint(output_dir: str | os.PathLike | StoragePath) -> StoragePath | None:
    """The intact checkpoint (checkpoint-N or final/) with the highest step; torn ones are skipped, loudly.
    In a bucket only the files' presence and sizes are checked here (an object is uploaded whole or not
    at all); their hashes are checked on the copy a worker downloads to resume from."""
    output_dir = StoragePath.of(output_dir)
    candidates = _checkpoints_newest_first(output_dir)
    return next((d for step, d in candidates if _intact(d, step, check_hashes=output_dir.is_local)), None)


@contextlib.contextmanager
def local_newest_checkpoint(output_dir: StoragePath) -> Iterator[Path | None]:
    """The newest intact checkpoint as a directory on this machine: in place when output_dir is local,
    else a downloaded copy (deleted when the block ends), whose hashes are checked before it is used."""
    if output_dir.is_local:
        newest = newest_checkpoint(output_dir)
        yield None if newest is None else newest.local_path
        return
    for step, directory in _checkpoints_newest_first(output_dir):
        if not _intact(directory, step, check_hashes=False):
            continue
        with tempfile.TemporaryDirectory(prefix="sftcore-resume-") as tmp:
            local = Path(tmp) / directory.name
            directory.download(local)
            if _intact(StoragePath.of(local), step, check_hashes=True, shown=directory):
                yield local
                return
    yield None


def read_trainer_state(directory: str | os.PathLike | StoragePath) -> TrainerState:
    payload = json.loads((StoragePath.of(directory) / TRAINER_STATE).read_text())
    return TrainerState(**{k: payload[k] for k in TrainerState.__dataclass_fields__})


def read_run_config(directory: str | os.PathLike | StoragePath) -> dict[str, Any]:
    """The TrainConfig (as a dict) of the run that wrote the checkpoint."""
    return json.loads((StoragePath.of(directory) / TRAINER_STATE).read_text()).get("config", {})


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer | None, scheduler: Any) -> None:
    """Scheduler and RNG states, and the optimizer's unless it is sharded (None: loaded with the weights)."""
    saved = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])


def prune_checkpoints(output_dir: str | os.PathLike | StoragePath, keep: int) -> None:
    """Keep the newest `keep` intact checkpoint-{step} directories; delete every older one (torn or
    not). final/ is never counted or removed; torn directories newer than those kept (a checkpoint
    still being uploaded, say) stay."""
    output_dir = StoragePath.of(output_dir)
    names = [name for name, is_dir in output_dir.children().items() if is_dir and name.startswith("checkpoint-")]
    stepped = [(checkpoint_step(output_dir / name), output_dir / name) for name in names]
    steps = sorted(((step, d) for step, d in stepped if step is not None), key=lambda s: s[0])
    intact = [step for step, d in steps if checkpoint_problem(d, check_hashes=False) is None]
    if len(intact) <= keep:
        return
    oldest_kept = intact[-keep]
    for step, directory in steps:
        if step < oldest_kept:
            directory.remove()
