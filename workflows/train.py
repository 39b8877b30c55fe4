"""Fine-tune a causal LM on agent trajectories with Ray Train (or under torchrun / accelerate launch).

    python workflows/train.py --num-workers 1 --data_path examples/sample_trajectories.jsonl \
        --model_name_or_path smollm2-135m-instruct --use_lora --max_steps 20 --output_dir /tmp/run

Starts Ray in-process, or joins the cluster named by --address / $RAY_ADDRESS (as `ray job submit`
does). Started by torchrun or accelerate launch, it runs the same per-worker loop in each process,
without Ray. Rerunning the same command continues from the newest checkpoint in --output_dir.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from sftcore.config import TrainConfig, parse_config, save_resolved_config
from sftcore.console import Progress, configure_console_logging, quiet_libraries
from sftcore.data import DataError
from sftcore.driver import (
    REJECTED_FILE,
    TrainingFailed,
    UsageError,
    account_for_data,
    check_output_dir_is_shared,
    check_placement,
    check_worker_count,
    finish,
    prepare,
    training_failure_message,
    under_accelerate,
)
from sftcore.runtime import TorchrunRuntime, group_data_config, relay_events
from sftcore.storage import StoragePath

logger = logging.getLogger("sftcore.train")
# Ray Train's list of the checkpoints reported in earlier launches. Ray refuses to start when one of them
# is gone (pruned by --save_total_limit, or deleted by hand); which checkpoint to continue from is decided
# from the checkpoints themselves (sftcore.checkpoint.newest_checkpoint), so each launch starts Ray's list anew.
RAY_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def init_ray(cfg: TrainConfig) -> None:
    """Start or join Ray. Unless --verbose, the workers' and actors' output stays in Ray's log files
    (the workers send what the user needs to the driver: sftcore.runtime.relay_events), and so do the
    driver's own Ray and Ray Data lines below ERROR (ray-data.log, sftcore-driver.log)."""
    import ray
    import ray.data

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    runtime_env = {"env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}}
    ray_loggers = [logging.getLogger("ray"), logging.getLogger("ray.data")]
    if not cfg.verbose:
        for handler in (h for ray_logger in ray_loggers for h in ray_logger.handlers):
            if getattr(handler, "stream", None) in (sys.stderr, sys.stdout):
                handler.setLevel(logging.ERROR)
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=cfg.verbose)
    else:
        ray.init(include_dashboard=False, runtime_env=runtime_env, log_to_driver=cfg.verbose)
    log_dir = _ray_log_dir()
    if not cfg.verbose and os.path.isdir(log_dir):
        driver_log = logging.FileHandler(os.path.join(log_dir, "sftcore-driver.log"))
        driver_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        ray_loggers[0].addHandler(driver_log)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    # Rows in file order whatever task finishes first: the same seed gives the same run, and a
    # resumed run sees the data in the order the interrupted one did.
    context.execution_options.preserve_order = True
    resources = ray.cluster_resources()
    nodes = sum(node["Alive"] for node in ray.nodes())
    where = f"joined the cluster at {address}" if address else "started a local instance"
    logger.info(
        "ray: %s (%d node(s), %d CPUs, %d GPUs); its logs: %s",
        where,
        nodes,
        resources.get("CPU", 0),
        resources.get("GPU", 0),
        log_dir,
    )


def _ray_log_dir() -> str:
    """This node's Ray log folder (each node of a cluster has its own)."""
    import ray

    try:  # no public API names the session folder
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:
        return "/tmp/ray/session_latest/logs"


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    cfg = parse_config(argv, description=__doc__)
    under_torchrun = TorchrunRuntime.launched()
    quiet = under_torchrun and os.environ["RANK"] != "0"  # one process speaks for all
    configure_console_logging(logging.WARNING if quiet else logging.INFO)
    quiet_libraries(cfg.verbose)
    try:
        return run_under_torchrun(cfg, started) if under_torchrun else run(cfg, started)
    except (UsageError, DataError) as e:
        if not quiet:
            print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def run(cfg: TrainConfig, started: float) -> int:
    """The driver under Ray: Ray Data prepares the sequences, Ray Train runs the loop on each worker."""
    import ray

    from sftcore.dataset import build_datasets

    output_dir, trees = prepare(cfg)
    check_worker_count(cfg, cfg.num_workers)
    save_resolved_config(cfg, output_dir)
    init_ray(cfg)
    check_output_dir_is_shared(output_dir)
    resources = ray.cluster_resources()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else resources.get("GPU", 0) > 0
    cpus_per_worker = cfg.cpus_per_worker or (1 if use_gpu else max(1, int(resources.get("CPU", 1)) // cfg.num_workers))
    worker_resources = {"CPU": cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if use_gpu else {})
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    check_placement(cfg, worker_resources, nodes, joined=bool(cfg.address or os.environ.get("RAY_ADDRESS")))

    train, validation, summary = build_datasets(
        cfg.data_path,
        cfg.model_name_or_path,
        cfg.encode_options(trees),
        cfg.validation_split,
        cfg.seed,
        encoder_concurrency=max(1, min(4, int(resources.get("CPU", 1)))),
        trust_remote_code=cfg.trust_remote_code,
        packing=cfg.packing,
        chat_template=cfg.chat_template,
        rejected_file=output_dir / REJECTED_FILE,
    )
    loop_config = account_for_data(cfg, summary, output_dir, speak=True)
    datasets = {"train": train} | ({"validation": validation} if validation is not None else {})
    (output_dir / RAY_RUN_SNAPSHOT).remove()
    waiting_for = f"{cfg.num_workers} x {worker_resources}"
    logger.info("training: %s, %d steps", waiting_for, loop_config["total_steps"])
    with relay_events(Progress(loop_config["total_steps"]), waiting_for) as events:
        fit(cfg, output_dir, loop_config | {"events": events}, datasets, use_gpu, worker_resources)
    finish(output_dir, started)
    return 0


def fit(
    cfg: TrainConfig,
    output_dir: StoragePath,
    loop_config: dict[str, Any],
    datasets: dict[str, Any],
    use_gpu: bool,
    worker_resources: dict[str, float],
) -> None:
    """Ray Train's TorchTrainer over the workers; a failure after any restarts is TrainingFailed."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from sftcore.loop import train_loop_per_worker

    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.num_workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources,
            placement_strategy=cfg.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=output_dir.name,
            storage_path=output_dir.parent.path,
            storage_filesystem=None if output_dir.is_local else output_dir.filesystem,
            # retention is ours (prune_checkpoints): Ray's num_to_keep would count final/ as a checkpoint
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=None),
            failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        ),
        datasets=datasets,
        dataset_config=group_data_config(cfg.sequence_parallel),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        failures = getattr(e, "worker_failures", None) or {}
        raise TrainingFailed(training_failure_message(failures, output_dir, str(e).strip().splitlines()[-1])) from None


def run_under_torchrun(cfg: TrainConfig, started: float) -> int:
    """One process of a torchrun / accelerate launch: every process reads and encodes its share of
    the lines, then runs the same per-worker loop as a Ray Train worker."""
    from sftcore.dataset import build_sequences
    from sftcore.loop import CheckpointWriteError, NonFiniteLossError, run_worker
    from sftcore.parallel import gather_objects

    cfg = under_accelerate(cfg, os.environ)
    output_dir, trees = prepare(cfg)  # every process checks before any of them writes (init is a rendezvous)
    runtime = TorchrunRuntime()
    try:
        if cfg.num_workers != runtime.world and runtime.rank == 0:
            logger.info("torchrun started %d processes: training with %d workers", runtime.world, runtime.world)
        cfg.num_workers = runtime.world
        check_worker_count(cfg, runtime.world, "the processes torchrun started,")
        if runtime.rank == 0:
            save_resolved_config(cfg, output_dir)
        train, validation, summary = build_sequences(
            cfg.data_path,
            cfg.model_name_or_path,
            cfg.encode_options(trees),
            cfg.validation_split,
            cfg.seed,
            trust_remote_code=cfg.trust_remote_code,
            packing=cfg.packing,
            chat_template=cfg.chat_template,
            rejected_file=output_dir / REJECTED_FILE,
            rank=runtime.rank,
            world=runtime.world,
            gather=gather_objects,
        )
        loop_config = account_for_data(cfg, summary, output_dir, speak=runtime.rank == 0)
        runtime.set_data(train, validation, cfg.sequence_parallel)
        if runtime.rank == 0:
            runtime.progress = Progress(loop_config["total_steps"])
        try:
            run_worker(loop_config, runtime)
        except (NonFiniteLossError, CheckpointWriteError) as e:
            raise TrainingFailed(training_failure_message({runtime.rank: e}, output_dir)) from None
    finally:
        runtime.close()
    if runtime.rank == 0:
        finish(output_dir, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
