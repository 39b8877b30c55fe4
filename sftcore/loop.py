"""The per-worker training loop: one loop, run by Ray Train's TorchTrainer or by torchrun / accelerate
launch (sftcore.runtime says which; it supplies the batches and publishes checkpoints).

Features and limits, plainly:
- Full fine-tuning or LoRA (peft, all linear layers by default); DDP (gloo on CPU, NCCL on GPU), or
  FSDP2 for full fine-tuning (--strategy fsdp: sharded weights, gradients, optimizer state and
  checkpoints; final/ is consolidated into one HF model).
- fp32 weights; on GPUs that support it, bf16 autocast (LoRA: frozen base weights in bf16 there).
- Packs reach the attention as sample boundaries, never as a mask (sftcore.attention); prefix trees
  (sftcore.trees) as segments and their ancestors' keys, each target predicted from its parent token.
- AdamW, linear warmup then cosine/linear/constant (a run continued with more steps decays on from
  the rate it reached), gradient clipping, gradient accumulation.
- The loss of a step is the mean over every trained token of the global batch (all micro-batches,
  all workers), so 2 workers x batch 2 train exactly like 1 worker x batch 4.
- Packs (or rows) are padded to the longest in each micro-batch.
- Checkpoints every save_steps and at the end (final/), published by the runtime (reported to Ray
  Train, or copied into output_dir by the torchrun processes); output_dir may be a bucket, where
  Ray Train uploads each checkpoint in the background while training goes on. Resume restores
  weights, optimizer, scheduler, RNG and the position in the data (bit-exact with 1 worker; with
  several, Ray Data's streaming split may hand rows to workers in another order after a restart).
- Resume takes Ray's newest registered checkpoint (a restart after a worker failure) or else the
  newest intact one in output_dir (downloaded from a bucket); a torn or corrupted checkpoint is
  skipped with a warning.
- A step whose loss or gradient norm is not finite applies no update; it is counted (skipped_steps)
  and the run stops after --max_bad_steps such steps in a row, before anything non-finite is saved.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.optim.lr_scheduler import LambdaLR

from sftcore.attention import READS_BOUNDARIES, resolve_attention, segment_boundaries, tree_segments
from sftcore.checkpoint import (
    ADAPTER_DIR,
    TrainerState,
    file_entries,
    load_training_state,
    prune_checkpoints,
    read_trainer_state,
    save_checkpoint,
    write_manifest,
)
from sftcore.config import TrainConfig
from sftcore.evaluation import evaluate_turns, hf_generator, row_turns, summarize, tool_call_syntax
from sftcore.heads import LogitTransform, logit_transform
from sftcore.masking import IGNORE_INDEX
from sftcore.models import load_tokenizer, native_bf16, resolve_model_path, tile_mlps
from sftcore.parallel import (
    all_finite,
    all_reduce_sum,
    clip_gradients,
    full_model_state,
    gather_objects,
    gradient_sync,
    load_sharded_state,
    save_sharded_state,
    sum_over_workers,
    wrap_model,
)
from sftcore.runtime import RayRuntime, WorkerRuntime, checkpoint_to_resume
from sftcore.sequence_parallel import SequenceGroup, sequence_group, shard_tokens, shared_batches
from sftcore.storage import StoragePath
from sftcore.throughput import peak_flops, peak_memory_gb, reset_peak_memory, step_flops
from sftcore.tracking import MetricsLogger, stable_run_id

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """Too many consecutive steps with a NaN/inf loss or gradient."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written or uploaded (disk full, permissions, storage down)."""


LOSS_CHUNK_TOKENS = 1024  # trained positions per LM-head chunk: bounds the logits held at once


def collate(
    batch: dict[str, np.ndarray], pad_id: int, device: torch.device, sequence: SequenceGroup | None = None
) -> dict[str, Any]:
    """Right-pad a micro-batch of rows, packs or prefix trees into [batch, longest] tensors.

    The counts (num_tokens, num_trained), the flat positions whose hidden states predict the trained
    targets (trained_index, over [batch, longest]: the token before each target on its path) and the
    targets themselves come from the host arrays, so that neither the loop nor the loss has to read
    anything back from the GPU to know them.

    Rows get an attention mask. Packs get position ids instead (restarting at 0 for each sample
    inside, and for the padding tail), from which transformers' own attention implementations build
    a block-diagonal causal mask. Both get the sample boundaries (sftcore.attention), with which
    packed_sdpa and flash_attention_2 need no mask at all. Trees (``parents``: each token's parent)
    get their tokens' positions in their samples and their segments' keys (sftcore.attention).

    With sequence parallelism (``sequence`` of more than one worker) the width is a multiple of the
    group's size and this worker gets its slice of every row (sftcore.sequence_parallel)."""
    packed = "position_ids" in batch
    trees = "parents" in batch
    lengths = [len(ids) for ids in batch["input_ids"]]
    size = sequence.size if sequence is not None else 1
    width = -(-max(lengths) // size) * size
    input_ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask_or_positions = torch.zeros((len(lengths), width), dtype=torch.long)
    segments, sources, targets, parents = [], [], [], []
    for i, (ids, lab) in enumerate(zip(batch["input_ids"], batch["labels"], strict=True)):
        lab = np.asarray(lab)
        row_parents = np.asarray(batch["parents"][i]) if trees else np.arange(len(ids)) - 1
        trained = np.flatnonzero((lab != IGNORE_INDEX) & (row_parents >= 0))
        sources.append(i * width + row_parents[trained])
        targets.append(lab[trained])
        parents.append(row_parents)
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        if packed:
            positions = np.asarray(batch["position_ids"][i])
            mask_or_positions[i, : len(ids)] = torch.as_tensor(positions, dtype=torch.long)
            mask_or_positions[i, len(ids) :] = torch.arange(width - len(ids))
            segments.append(np.diff([*np.flatnonzero(positions == 0), len(ids)]).tolist())
        else:
            mask_or_positions[i, : len(ids)] = 1
            segments.append([len(ids)])
    if trees:
        bounds, key_bounds, key_index, longest, most_keys = tree_segments(parents, width)
        attention = {"cu_seq_lens_k": key_bounds, "max_length_k": most_keys}
        attention |= {"tree_key_index": key_index, "cu_seq_lens_q": bounds}
    else:
        bounds, longest = segment_boundaries(segments, width)
        attention = {"cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds, "max_length_k": longest}
    trained_index = torch.as_tensor(np.concatenate(sources), dtype=torch.long)
    host = {
        "input_ids": input_ids,
        ("position_ids" if packed else "attention_mask"): mask_or_positions,
        **attention,
        "max_length_q": longest,
        "trained_index": trained_index,
        "trained_targets": torch.as_tensor(np.concatenate(targets), dtype=torch.long),
        "num_tokens": sum(lengths),
        "num_trained": len(trained_index),
    }
    if size > 1:
        host = shard_tokens(host, lengths, sequence.rank, size) | {"sequence_group": sequence.group}
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in host.items()}


def _chunk_loss(
    head: torch.nn.Module, transform: LogitTransform, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = transform(head(hidden).float())
    loss_sum = F.cross_entropy(logits, targets, reduction="sum")
    return loss_sum, (logits.argmax(-1) == targets).sum()


class TrainedTokenLoss(torch.nn.Module):
    """A causal LM whose forward returns (sum of next-token cross-entropy over trained positions,
    number of correct argmax predictions there).

    The LM head runs only on trained positions, in chunks recomputed in backward, so logits memory
    scales with LOSS_CHUNK_TOKENS, not with sequence length x vocabulary, followed by the model's own
    post-processing of its logits (sftcore.heads: scaling, soft-capping). Model types whose
    post-processing is not known take the model's full logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = causal_lm.config
        self.transform = logit_transform(config)
        self.full_logits = self.transform is None
        self.decoder = None if self.full_logits else causal_lm.get_decoder()
        self.head = causal_lm.get_output_embeddings()
        self.reads_boundaries = config._attn_implementation in READS_BOUNDARIES

    def forward(
        self,
        input_ids: torch.Tensor,
        trained_index: torch.Tensor,
        trained_targets: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        **boundaries: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``trained_index``: the flat positions (over [batch, length]) whose hidden states predict
        ``trained_targets`` (collate). ``boundaries``: the samples' (or tree segments') bounds and keys,
        for the attention."""
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids}
        if self.reads_boundaries:
            inputs |= boundaries
        targets = trained_targets
        if self.full_logits:
            logits = self.model(**inputs, use_cache=False).logits.flatten(0, 1)
            logits = logits.index_select(0, trained_index).float()
            loss_sum = F.cross_entropy(logits, targets, reduction="sum")
            return loss_sum, (logits.argmax(-1) == targets).sum()
        hidden = self.decoder(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)
        hidden = hidden.index_select(0, trained_index)
        loss_sum = correct = torch.zeros((), device=input_ids.device)
        for h, t in zip(hidden.split(LOSS_CHUNK_TOKENS), targets.split(LOSS_CHUNK_TOKENS), strict=True):
            chunk_loss, chunk_correct = torch.utils.checkpoint.checkpoint(
                _chunk_loss, self.head, self.transform, h, t, use_reentrant=False
            )
            loss_sum, correct = loss_sum + chunk_loss, correct + chunk_correct
        return loss_sum, correct


BATCH_COUNTS = ("num_tokens", "num_trained")  # collate's host-side counts: not model inputs


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """What TrainedTokenLoss takes from a collated batch."""
    return {k: v for k, v in batch.items() if k not in BATCH_COUNTS}


def token_losses(model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over trained positions, number of correct argmax predictions)."""
    return model(**model_inputs(batch))


def build_model(cfg: TrainConfig, resume_dir: Path | None, device: torch.device) -> torch.nn.Module:
    """The model to train; from resume_dir's weights when they are there in HF form (DDP full
    fine-tuning; FSDP loads its shards after sharding, LoRA its adapter on top of the base model).

    Trained weights are fp32 (bf16 autocast computes on GPU). LoRA's frozen base weights are bf16 on
    a GPU with bf16: autocast would cast them to bf16 for every matmul of every step anyway, so
    holding them in bf16 halves their memory and removes those casts; peft keeps the adapters fp32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    weights_in_checkpoint = resume_dir is not None and not cfg.use_lora and cfg.strategy == "ddp"
    source = resume_dir if weights_in_checkpoint else resolve_model_path(cfg.model_name_or_path)
    bf16_base = cfg.use_lora and device.type == "cuda" and native_bf16()
    config = AutoConfig.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        source,
        dtype=torch.bfloat16 if bf16_base else torch.float32,
        attn_implementation=resolve_attention(
            cfg.attn_implementation, config, cfg.max_seq_length, cfg.trains_trees(config), cfg.sequence_parallel
        ),
        trust_remote_code=cfg.trust_remote_code,
    )
    if uses_gradient_checkpointing(cfg, device):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.tiled_mlp and not tile_mlps(model):
        raise ValueError(f"--tiled_mlp: {type(model).__name__} has no dense MLP to tile (mixture-of-experts layers)")
    if not cfg.use_lora:
        return model
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_dir is not None:
        return PeftModel.from_pretrained(model, resume_dir / ADAPTER_DIR, is_trainable=True)
    targets = cfg.lora_target_modules
    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets if targets == "all-linear" else [t.strip() for t in targets.split(",")],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


def uses_gradient_checkpointing(cfg: TrainConfig, device: torch.device) -> bool:
    """--gradient_checkpointing, by default on for CPU training: there memory, not compute, is what
    runs out (SmolLM2-135M at 2 packs of 4,096 tokens keeps ~14 GB of activations without it, ~0.6 GB
    with it), while a GPU run would rather spend the memory than a third more compute."""
    return cfg.gradient_checkpointing if cfg.gradient_checkpointing is not None else device.type == "cpu"


@dataclass
class LRSchedule:
    """The learning-rate factor at each step: linear warmup, then cosine or linear decay to 0 at `total`
    (or constant); the same curves as transformers' schedulers. A callable object, so LambdaLR saves
    its fields with the checkpoint and a resume restores the curve the run was on."""

    kind: str  # cosine / linear / constant
    warmup: int
    total: int
    decay_from_step: int = 0  # where the decay starts: after warmup, or where a longer run continued
    decay_from_factor: float = 1.0

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / max(1, self.warmup)
        if self.kind == "constant":
            return 1.0
        start = max(self.warmup, self.decay_from_step)
        progress = min(1.0, (step - start) / max(1, self.total - start))
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if self.kind == "cosine" else 1.0 - progress
        return self.decay_from_factor * shape

    def continue_to(self, total: int, step: int) -> None:
        """A resumed run with another step count: decay from the factor reached at `step` to 0 at the
        new total on the same curve, so the rate goes on falling instead of jumping to the longer run's
        curve (warmup keeps its length)."""
        if total != self.total and step >= self.warmup:
            self.decay_from_step, self.decay_from_factor = step, self(step)
        self.total = total


def build_scheduler(cfg: TrainConfig, optimizer: torch.optim.Optimizer, total_steps: int) -> LambdaLR:
    warmup = math.ceil(cfg.warmup_ratio * total_steps)
    return LambdaLR(optimizer, LRSchedule(cfg.lr_scheduler, warmup, total_steps))


class Trainer:
    """One worker's view of the run: setup(), train(), save_checkpoint(), cleanup()."""

    def __init__(self, loop_config: dict[str, Any], runtime: WorkerRuntime):
        self.cfg = TrainConfig(**loop_config["train_config"])
        self.total_steps: int = loop_config["total_steps"]
        self.steps_per_epoch: int = loop_config["steps_per_epoch"]
        self.evaluates: bool = loop_config["has_validation"]
        self.generation_rows: list[tuple[int, dict]] = loop_config.get("generation_rows", [])
        self.runtime = runtime
        self.rank, self.world, self.device = runtime.rank, runtime.world, runtime.device
        self.output_dir = StoragePath.of(self.cfg.output_dir)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16)
            if self.device.type == "cuda" and native_bf16()
            else contextlib.nullcontext()
        )

    def setup(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        self.sequence = sequence_group(self.rank, self.world, cfg.sequence_parallel)
        self.tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.state = TrainerState(total_steps=self.total_steps, wandb_run_id=stable_run_id(cfg.output_dir))
        self.sharded = cfg.strategy == "fsdp"

        self.consecutive_bad_steps = 0
        with checkpoint_to_resume(self.runtime, self.output_dir, cfg.resume) as resume_dir:
            self.lm = build_model(cfg, resume_dir, self.device)
            loss = TrainedTokenLoss(self.lm)
            self.head_on_every_token = loss.full_logits
            self.model = wrap_model(loss, self.lm, cfg.strategy, self.device)
            if cfg.torch_compile:  # packs vary in length: dynamic shapes, not one graph per length
                self.model = torch.compile(self.model, dynamic=True)
            self.params = [p for p in self.model.parameters() if p.requires_grad]
            self.step_flops, self.peak_flops = step_flops(self.lm), peak_flops(self.device)
            self.optimizer = torch.optim.AdamW(self.params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
            self.scheduler = build_scheduler(cfg, self.optimizer, self.total_steps)
            if resume_dir is not None:
                if self.sharded:
                    load_sharded_state(resume_dir, self.lm, self.optimizer)
                load_training_state(resume_dir, None if self.sharded else self.optimizer, self.scheduler)
                saved = read_trainer_state(resume_dir)
                self.scheduler.lr_lambdas[0].continue_to(self.total_steps, saved.step)  # --max_steps grew
                self.state.step, self.state.epoch, self.state.step_in_epoch, self.state.skipped_steps = (
                    saved.step,
                    saved.epoch,
                    saved.step_in_epoch,
                    saved.skipped_steps,
                )
                if self.rank == 0:
                    logger.warning("resumed from %s at step %d", resume_dir, saved.step)

        # --eval_generate_rows: the validation rows' turns as next-action prompts (sftcore.evaluation)
        self.generation_turns = [
            turn
            for line, row in self.generation_rows
            for turn in row_turns(row, line, self.tokenizer, cfg.encode_options()).turns
        ]
        self.syntax = tool_call_syntax(self.tokenizer) if self.generation_turns else None

        self.metrics = (
            MetricsLogger(cfg.output_dir, self.state.step, cfg.report_to, cfg.wandb_project, cfg.__dict__)
            if self.rank == 0
            else None
        )

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], data_wait: float = 0.0) -> dict[str, float]:
        """One optimizer step; data_wait: seconds spent getting and collating its micro-batches."""
        start = time.perf_counter()
        reset_peak_memory(self.device)
        self.model.train()
        # The step reads from the GPU once, after backward (loss and gradient norm together); the
        # token counts come from the host (collate), and on one worker need no collective at all.
        local_trained = sum(b["num_trained"] for b in micro_batches)
        local_tokens = sum(b["num_tokens"] for b in micro_batches)
        global_trained, tokens = all_reduce_sum([local_trained, local_tokens], self.device)
        # DDP averages gradients over workers; scaling by world size makes the update the gradient of
        # (sum of token losses over the global batch) / (trained tokens in the global batch).
        scale = self.world / max(global_trained, 1.0)
        loss_sum = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            with gradient_sync(self.model, enabled=i == len(micro_batches) - 1), self.autocast:
                batch_loss, _ = token_losses(self.model, batch)
                (batch_loss * scale).backward()
            loss_sum += batch_loss.detach()
        norm = clip_gradients(self.params, self.cfg.max_grad_norm)
        total_loss, grad_norm = torch.stack([sum_over_workers(loss_sum).double(), norm.double()]).tolist()
        lr = self.scheduler.get_last_lr()[0]
        # Both numbers are global (gradients are all-reduced), so every rank takes the same branch.
        finite = math.isfinite(grad_norm) and math.isfinite(total_loss)
        if finite:
            self.optimizer.step()
            self.consecutive_bad_steps = 0
        else:
            self.state.skipped_steps += 1
            self.consecutive_bad_steps += 1
            self._check_bad_steps()
        self.scheduler.step()  # the schedule follows the step count (and the data), skipped or not
        self.optimizer.zero_grad(set_to_none=True)
        elapsed = time.perf_counter() - start + data_wait
        row = {
            "loss": total_loss / max(global_trained, 1.0),
            "learning_rate": lr,
            "grad_norm": grad_norm,
            "tokens_per_second": tokens / elapsed,
            "trained_tokens_per_second": global_trained / elapsed,
            "trained_tokens": int(global_trained),
            "skipped_steps": self.state.skipped_steps,
            "step_seconds": elapsed,
            "data_wait_seconds": data_wait,
            "peak_memory_gb": peak_memory_gb(self.device),  # rank 0's
        }
        if self.peak_flops is not None:
            flops = self.step_flops(tokens, tokens if self.head_on_every_token else global_trained)
            row["mfu"] = flops / elapsed / (self.peak_flops * self.world)
        return row

    def _check_bad_steps(self) -> None:
        step = self.state.step + 1
        if self.rank == 0:
            logger.warning(
                "step %d: non-finite loss or gradient; no update applied (%d such steps so far, %d in a row)",
                step,
                self.state.skipped_steps,
                self.consecutive_bad_steps,
            )
        if self.consecutive_bad_steps > self.cfg.max_bad_steps:
            raise NonFiniteLossError(
                f"{self.consecutive_bad_steps} consecutive steps (up to step {step}) had a non-finite loss or "
                f"gradient; stopped before saving non-finite weights. Lower --learning_rate or look for broken "
                f"rows; --max_bad_steps {self.cfg.max_bad_steps} sets how many are tolerated in a row"
            )

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Loss, perplexity and token accuracy over the whole validation split; workers take turns by
        batch. Every worker runs the same number of forwards (FSDP's all-gathers need all of them): one
        left without a batch of its own runs the first batch again, uncounted."""
        self.model.eval()
        loss_sum = correct = count = torch.zeros((), device=self.device, dtype=torch.float64)
        batches = list(self.runtime.validation_batches(self.cfg.per_device_batch_size))
        groups, group = self.sequence.count, self.sequence.index  # a sequence-parallel group shares a batch
        rounds = math.ceil(len(batches) / groups)
        for index in range(rounds * groups)[group::groups]:
            counted = index < len(batches)
            batch = collate(batches[index if counted else 0], self.pad_id, self.device, self.sequence)
            with self.autocast:
                batch_loss, batch_correct = token_losses(self.model, batch)
            if counted:
                loss_sum, correct = loss_sum + batch_loss, correct + batch_correct
                count = count + batch["num_trained"]
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], self.device)
        eval_loss = loss_sum / max(count, 1.0)
        metrics = {
            "eval_loss": eval_loss,
            "eval_perplexity": math.exp(min(eval_loss, 50.0)),
            "eval_token_accuracy": correct / max(count, 1.0),
        }
        return metrics | (self.next_action_metrics() if self.generation_turns else {})

    def next_action_metrics(self) -> dict[str, float]:
        """workflows/evaluate.py's metrics on the --eval_generate_rows turns, each worker generating its
        share with its own copy of the model (greedy, KV cache), as eval_<metric>."""
        generate = hf_generator(self.lm, self.tokenizer, self.syntax, self.cfg.eval_max_new_tokens, batch_tokens=16384)
        mine = self.generation_turns[self.rank :: self.world]
        with self.autocast:
            records = evaluate_turns(mine, generate, self.syntax, self.tokenizer)
        report = summarize([r for part in gather_objects(records) for r in part])
        return {f"eval_{k}": v for k, v in report.items() if k != "per_tool" and v is not None}

    def _write_checkpoint(self, directory: Path, final: bool) -> bool:
        """This worker's files of the checkpoint (False: it has none). Under FSDP every worker writes
        its shards; final/ also gets the gathered model in HF form, from rank 0."""
        lm, optimizer = self.lm, self.optimizer
        model_state = None
        if self.sharded:
            save_sharded_state(directory, self.lm, self.optimizer)
            lm, optimizer = None, None
            if final:
                lm, model_state = self.lm, full_model_state(self.lm)
        if self.rank == 0:
            save_checkpoint(
                directory,
                lm,
                self.tokenizer,
                optimizer,
                self.scheduler,
                self.state,
                self.cfg.__dict__,
                self.cfg.use_lora,
                export_merged=final,
                model_state=model_state,
            )
        return self.rank == 0 or self.sharded

    def save_checkpoint(self, metrics: dict[str, Any], final: bool = False) -> None:
        name = "final" if final else f"checkpoint-{self.state.step}"
        if not all_finite(self.params):
            raise NonFiniteLossError(f"step {self.state.step}: trainable weights are not finite; not saving {name}")
        local = Path(tempfile.mkdtemp(prefix="sftcore-ckpt-"))
        wrote = published = False  # once its files are published, the runtime deletes local when they are stored
        try:
            wrote = self._write_checkpoint(local, final)
            # One manifest for the files of every worker, written by rank 0 and so uploaded by it.
            entries = gather_objects(file_entries(local) if wrote else {})
            if self.rank == 0:
                write_manifest(local, {name: entry for part in entries for name, entry in part.items()})
            if self.metrics is not None:
                self.metrics.sync()  # the metrics up to this checkpoint are stored with it
            metrics = {**metrics, "step": self.state.step}
            self.runtime.publish(local if wrote else None, name, metrics, self.output_dir, final)
            published = True
        except OSError as e:  # the driver adds which checkpoint a rerun would continue from
            raise CheckpointWriteError(
                f"could not write checkpoint {self.output_dir / name}: {e.strerror or e}"
                + (f" ({e.filename})" if getattr(e, "filename", None) else "")
                + "; free space or fix the storage, then rerun the same command"
            ) from e
        finally:
            if not (published and wrote):
                shutil.rmtree(local, ignore_errors=True)
        if self.rank == 0 and not final:
            prune_checkpoints(self.output_dir, self.cfg.save_total_limit)

    def _log(self, row: dict[str, Any]) -> None:
        if self.metrics is None:
            return
        self.metrics.log(row)
        self.runtime.show(row)

    def train(self) -> None:
        cfg, state = self.cfg, self.state
        accum = cfg.gradient_accumulation_steps
        while state.step < self.total_steps:
            own = None  # a sequence-parallel group trains its first worker's batches
            if self.sequence.leader:
                own = self.runtime.train_batches(state.epoch, cfg.per_device_batch_size, cfg.seed)
            batches = shared_batches(own, self.sequence)
            for _ in range(state.step_in_epoch * accum):  # resume mid-epoch: skip what was trained
                next(batches)
            while state.step < self.total_steps and state.step_in_epoch < self.steps_per_epoch:
                waited = time.perf_counter()
                try:
                    micro = [collate(next(batches), self.pad_id, self.device, self.sequence) for _ in range(accum)]
                except StopIteration:
                    break
                row = self.train_step(micro, data_wait=time.perf_counter() - waited)
                state.step += 1
                state.step_in_epoch += 1
                row = {"step": state.step, "epoch": state.epoch + state.step_in_epoch / self.steps_per_epoch, **row}
                if state.step % cfg.logging_steps == 0 or state.step == self.total_steps:
                    self._log(row)
                if self.evaluates and state.step % cfg.eval_steps == 0:
                    self._log({"step": state.step, **self.evaluate()})
                if state.step % cfg.save_steps == 0 and state.step < self.total_steps:
                    self.save_checkpoint(row)
            if state.step_in_epoch >= self.steps_per_epoch or state.step < self.total_steps:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0

        final_metrics: dict[str, Any] = {}
        if self.evaluates:
            final_metrics = self.evaluate()
            if state.step % cfg.eval_steps != 0:
                self._log({"step": state.step, **final_metrics})
        self.save_checkpoint(final_metrics, final=True)

    def cleanup(self) -> None:
        if self.metrics is not None:
            self.metrics.close()


def run_worker(loop_config: dict[str, Any], runtime: WorkerRuntime) -> None:
    """The whole run on one worker, under any runtime (sftcore.runtime)."""
    trainer = Trainer(loop_config, runtime)
    trainer.setup()
    try:
        trainer.train()
    finally:
        trainer.cleanup()


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train's entry point on each worker."""
    loop_config = dict(loop_config)
    run_worker(loop_config, RayRuntime(loop_config.pop("events", None)))
