"""What the per-worker loop gets from its launcher (sftcore.runtime)."""

from __future__ import annotations

import pytest

from sftcore.runtime import accelerate_strategy


def test_accelerate_launch_switches_are_read_never_silently_ignored():
    assert accelerate_strategy("ddp", False, {}) == "ddp"
    assert accelerate_strategy("ddp", False, {"ACCELERATE_USE_FSDP": "true"}) == "fsdp"  # --use_fsdp
    assert accelerate_strategy("fsdp", False, {"ACCELERATE_USE_FSDP": "1"}) == "fsdp"
    with pytest.raises(ValueError, match="a LoRA adapter trains with DDP"):
        accelerate_strategy("ddp", True, {"ACCELERATE_USE_FSDP": "true"})
    with pytest.raises(ValueError, match="sftcore shards with FSDP2; launch without DeepSpeed"):
        accelerate_strategy("ddp", False, {"ACCELERATE_USE_DEEPSPEED": "true"})
