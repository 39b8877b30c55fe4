"""Fine-tune a causal LM on agent trajectories with Ray Train.

    python workflows/train.py --num-workers 1 --data_path examples/sample_trajectories.jsonl \
        --model_name_or_path smollm2-135m-instruct --use_lora --max_steps 20 --output_dir /tmp/run

Starts Ray in-process, or joins the cluster named by --address / $RAY_ADDRESS (as `ray job submit`
does). Rerunning the same command continues from the newest checkpoint in --output_dir.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path

from sftcore.checkpoint import newest_checkpoint, read_trainer_state
from sftcore.config import TrainConfig, parse_config
from sftcore.data import DataError, check_readable_file
from sftcore.tracking import plot_loss_curve

logger = logging.getLogger("sftcore.train")
REJECTED_FILE = "rejected_rows.jsonl"


class UsageError(Exception):
    """A problem with the command line or the environment; printed as one line, exit code 2."""


class TrainingFailed(Exception):
    """Training started and failed (after any restarts --max_failures allowed); exit code 1."""


def training_failure_message(error: Exception, output_dir: Path) -> str:
    """The root cause on each failed worker, in one line each, plus where the run can continue from."""
    failures = getattr(error, "worker_failures", None) or {}
    causes = [f"worker {rank}: {type(e).__name__}: {e}" for rank, e in sorted(failures.items())]
    if not causes:
        causes = [str(error).strip().splitlines()[-1]]
    resume = newest_checkpoint(output_dir)
    where = f"rerun the same command to continue from {resume}" if resume else "no checkpoint was saved yet"
    return "training failed\n  " + "\n  ".join(causes) + f"\n{where}"


def check_output_dir(cfg: TrainConfig) -> Path:
    output_dir = Path(cfg.output_dir).resolve()
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"--output_dir {cfg.output_dir} is not writable ({e.strerror})") from None
    if cfg.resume == "never" and any(output_dir.iterdir()):
        raise UsageError(
            f"--output_dir {cfg.output_dir} is not empty and --resume never was given; "
            "choose a new directory or drop --resume never to continue the run there"
        )
    return output_dir


def init_ray(cfg: TrainConfig) -> None:
    import ray
    import ray.data

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray Data's per-dataset progress bars drown the per-step training lines.
    runtime_env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(include_dashboard=False, runtime_env=runtime_env)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Rows in file order whatever actor finishes first: the same seed gives the same run, and a
    # resumed run sees the data in the order the interrupted one did.
    context.execution_options.preserve_order = True


def plan_steps(cfg: TrainConfig, train_sequences: int) -> tuple[int, int]:
    """(steps per epoch, total steps). Every worker gets train_sequences // num_workers sequences
    (packs, or rows without packing): Ray Data splits them equally."""
    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = (train_sequences // cfg.num_workers) // per_step
    if steps_per_epoch == 0:
        what = "packs" if cfg.packing else "rows"
        raise UsageError(
            f"{train_sequences} training {what} are too few for {cfg.num_workers} worker(s) x --per_device_batch_size "
            f"{cfg.per_device_batch_size} x --gradient_accumulation_steps {cfg.gradient_accumulation_steps}; "
            "lower one of them" + (", or pass --packing false" if cfg.packing else "")
        )
    return steps_per_epoch, cfg.max_steps or steps_per_epoch * cfg.num_epochs


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = parse_config(argv, description=__doc__)
    try:
        return run(cfg)
    except (UsageError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(cfg: TrainConfig) -> int:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from sftcore.dataset import build_datasets
    from sftcore.loop import train_loop_per_worker

    check_readable_file(cfg.data_path)  # fail in a second, not after Ray has started
    output_dir = check_output_dir(cfg)
    cfg.output_dir = str(output_dir)  # workers do not share the driver's working directory
    init_ray(cfg)
    resources = ray.cluster_resources()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else resources.get("GPU", 0) > 0
    cpus_per_worker = cfg.cpus_per_worker or (1 if use_gpu else max(1, int(resources.get("CPU", 1)) // cfg.num_workers))

    train, validation, summary = build_datasets(
        cfg.data_path,
        cfg.model_name_or_path,
        cfg.max_seq_length,
        cfg.validation_split,
        cfg.seed,
        encoder_concurrency=max(1, min(4, int(resources.get("CPU", 1)))),
        trust_remote_code=cfg.trust_remote_code,
        packing=cfg.packing,
    )
    if summary.rejected:
        rejected_path = output_dir / REJECTED_FILE
        rejected_path.write_text("".join(json.dumps(r) + "\n" for r in summary.rejected))
        if cfg.on_bad_rows == "error":
            raise UsageError(
                f"{summary.format_rejects(limit=100)}\nevery bad line, with its reason: {rejected_path}\n"
                "fix these lines, or pass --on_bad_rows skip to train on the valid rows only"
            )
        logger.warning("%s\nskipped them (--on_bad_rows skip); written to %s", summary.format_rejects(5), rejected_path)
    if summary.train_rows == 0:
        raise UsageError(f"{cfg.data_path}: no valid rows to train on")
    steps_per_epoch, total_steps = plan_steps(cfg, summary.train_sequences)
    logger.info(
        "data: %d lines (%d blank, %d rejected) -> %d train rows (%d tokens, %d trained), %d validation rows; "
        "%d truncated to %d tokens; %d steps (%d per epoch)",
        summary.lines,
        summary.blank_lines,
        len(summary.rejected),
        summary.train_rows,
        summary.train_tokens,
        summary.train_trained_tokens,
        summary.validation_rows,
        summary.truncated_rows,
        cfg.max_seq_length,
        total_steps,
        steps_per_epoch,
    )
    if summary.packing_efficiency is not None:
        logger.info(
            "packing: %d train rows -> %d packs of up to %d tokens, %.1f%% real tokens",
            summary.train_rows,
            summary.train_sequences,
            cfg.max_seq_length,
            100 * summary.packing_efficiency,
        )

    if cfg.resume == "auto" and (resume_from := newest_checkpoint(output_dir)) is not None:
        logger.info("continuing from %s (step %d)", resume_from, read_trainer_state(resume_from).step)
    datasets = {"train": train} | ({"validation": validation} if validation is not None else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "train_config": asdict(cfg),
            "total_steps": total_steps,
            "steps_per_epoch": steps_per_epoch,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=ray.train.RunConfig(
            name=output_dir.name,
            storage_path=str(output_dir.parent),
            # retention is ours (prune_checkpoints): Ray's num_to_keep would count final/ as a checkpoint
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingFailed(training_failure_message(e, output_dir)) from None
    curve = plot_loss_curve(str(output_dir))
    final = output_dir / "final"
    print(f"done: final model at {final}" + (f", loss curve at {curve}" if curve else ""))
    if result.metrics and "eval_loss" in result.metrics:
        print(f"final eval_loss {result.metrics['eval_loss']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
