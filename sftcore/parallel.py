"""How the model is spread over workers: DDP (a full replica on each) or FSDP2 (parameters, gradients
and optimizer state sharded), and the few collective operations the loop needs under either.

Works the same under Ray Train and under torchrun/accelerate: both leave a default process group
(gloo on CPU, NCCL on GPU) before the loop starts. Without one (a single process), nothing is wrapped.

FSDP2 limits, plainly: every worker first loads the whole model into host memory (then keeps only
its shard on the device), so host RAM must hold one copy per worker on a node; full fine-tuning only.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

SHARDED_DIR = "sharded"  # FSDP checkpoints: model + optimizer as a torch distributed checkpoint


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def wrap_model(module: torch.nn.Module, lm: torch.nn.Module, strategy: str, device: torch.device) -> torch.nn.Module:
    """module (the loss wrapper around lm) ready to train on this worker under the given strategy."""
    if strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        # One FSDP unit per transformer block (the classes transformers marks as not to be split),
        # so only one block's full weights exist at a time; the rest (embeddings, norm, head) is the root unit.
        block_types = set(getattr(lm, "_no_split_modules", None) or ())
        blocks = [m for m in lm.modules() if type(m).__name__ in block_types]
        if not blocks:
            raise ValueError(f"--strategy fsdp: {type(lm).__name__} names no transformer block class to shard by")
        for block in blocks:
            fully_shard(block)
        return fully_shard(module.to(device))
    module = module.to(device)
    if not distributed() or dist.get_world_size() == 1:
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    # gradients as views into DDP's all-reduce buckets: one copy of the gradients instead of two (the
    # model's size again under full fine-tuning); DDP points them back after zero_grad(set_to_none)
    return torch.nn.parallel.DistributedDataParallel(module, device_ids=device_ids, gradient_as_bucket_view=True)


def gradient_sync(model: torch.nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
    """Skip the gradient all-reduce / reduce-scatter for micro-batches before the last one of a step."""
    inner = getattr(model, "_orig_mod", model)  # under torch.compile
    if isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else inner.no_sync()
    if hasattr(inner, "set_requires_gradient_sync"):  # FSDP2
        inner.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def _full(value: Any) -> Any:
    """A plain tensor from a DTensor (FSDP); other values unchanged."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Global gradient norm before clipping (over every shard under FSDP), left on the device:
    clipping itself does not wait for the GPU, reading the norm does."""
    return _full(torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")))


def all_finite(params: list[torch.nn.Parameter]) -> bool:
    """Whether every (local shard of every) parameter is finite, on every worker."""
    bad = sum(int(not torch.isfinite(getattr(p, "_local_tensor", p)).all()) for p in params)
    if distributed():
        count = torch.tensor(bad, dtype=torch.int64, device=params[0].device if params else None)
        dist.all_reduce(count)
        bad = int(count)
    return bad == 0


def sum_over_workers(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor summed over workers, on the device (nothing is read back)."""
    if distributed():
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def all_reduce_sum(values: list[torch.Tensor | float], device: torch.device) -> list[float]:
    if not distributed() and not any(isinstance(v, torch.Tensor) for v in values):
        return [float(v) for v in values]  # host numbers on one worker: nothing to send or wait for
    tensor = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
    if distributed():
        dist.all_reduce(tensor)
    return tensor.tolist()


def gather_objects(value: Any) -> list[Any]:
    """value from every worker, in rank order (picklable values only)."""
    if not distributed():
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    if distributed():
        dist.barrier()


def save_sharded_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every worker writes its shards of the model and optimizer state into directory/sharded/ (with
    the index, .metadata, from rank 0). Collective: every worker must call it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(directory / SHARDED_DIR))


def load_sharded_state(directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Read directory/sharded/ into the (already sharded) model and optimizer; any worker count."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    dcp.load(state, checkpoint_id=str(directory / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state dict on rank 0's host memory, {} elsewhere. Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    # Tied weights (embeddings and LM head) come back as two copies; one tensor under both names lets
    # save_pretrained store it once, as it does for an unsharded model.
    first_name: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        first = first_name.setdefault(id(param), name)
        if first != name and name in state and first in state:
            state[name] = state[first]
    return state
