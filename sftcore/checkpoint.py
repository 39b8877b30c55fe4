"""What a checkpoint directory holds, and how it is written and read back.

checkpoint-{step}/
    trainer_state.json   step, epoch, step in epoch, total steps, the run config, wandb run id
    training_state.pt    optimizer, scheduler and RNG states (loaded with weights_only=True)
    adapter/             LoRA runs: the adapter (peft format, safetensors)
    model.safetensors …  full fine-tuning: the model (HF format)
    tokenizer files

final/ is a checkpoint too (so a finished run can be continued with a larger --max_steps), plus the
model in HF format at its root, LoRA merged, loadable with AutoModelForCausalLM.from_pretrained.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TRAINER_STATE = "trainer_state.json"
TRAINING_STATE = "training_state.pt"
ADAPTER_DIR = "adapter"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps done within that epoch
    total_steps: int = 0
    wandb_run_id: str | None = None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def save_checkpoint(
    directory: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    config: dict[str, Any],
    use_lora: bool,
    export_merged: bool = False,
) -> None:
    """Write everything needed to resume exactly (and, with export_merged, a standalone HF model)."""
    directory.mkdir(parents=True, exist_ok=True)
    model = _unwrap(model)
    if use_lora:
        model.save_pretrained(directory / ADAPTER_DIR)
        if export_merged:  # only for final/, the model's last use: merging in place is fine
            model.merge_and_unload(safe_merge=True).save_pretrained(directory)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
        },
        directory / TRAINING_STATE,
    )
    payload = {**state.__dict__, "config": config}
    (directory / TRAINER_STATE).write_text(json.dumps(payload, indent=2))


def read_trainer_state(directory: Path) -> TrainerState:
    payload = json.loads((directory / TRAINER_STATE).read_text())
    return TrainerState(**{k: payload[k] for k in TrainerState.__dataclass_fields__})


def load_training_state(directory: Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    saved = torch.load(directory / TRAINING_STATE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])


def is_complete(directory: Path) -> bool:
    return (directory / TRAINER_STATE).is_file() and (directory / TRAINING_STATE).is_file()


def prune_checkpoints(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoint-{step} directories (final/ is never counted or removed)."""
    steps = sorted(
        (int(p.name.split("-", 1)[1]), p) for p in output_dir.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit()
    )
    for _, path in steps[: max(len(steps) - keep, 0)]:
        shutil.rmtree(path, ignore_errors=True)
