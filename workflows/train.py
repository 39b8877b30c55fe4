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
import uuid
from dataclasses import asdict, replace
from typing import Any

from sftcore.attention import check_attention
from sftcore.checkpoint import newest_checkpoint, read_run_config, read_trainer_state
from sftcore.config import TrainConfig, parse_config, plan_changes, save_resolved_config
from sftcore.console import Progress, configure_console_logging, quiet_libraries, summarize_run
from sftcore.data import NOT_BAD_INPUT, DataError
from sftcore.dataset import DatasetSummary
from sftcore.models import load_model_config, load_tokenizer
from sftcore.runtime import (
    TorchrunRuntime,
    accelerate_strategy,
    group_data_config,
    placeable_workers,
    relay_events,
)
from sftcore.sequence_parallel import check_sequence_parallel
from sftcore.sources import read_jsonl, resolve_data_files
from sftcore.storage import StoragePath, first_line
from sftcore.templates import load_chat_template, template_support
from sftcore.tracking import plot_loss_curve

logger = logging.getLogger("sftcore.train")
REJECTED_FILE = "rejected_rows.jsonl"
# Ray Train's list of the checkpoints reported in earlier launches. Ray refuses to start when one of them
# is gone (pruned by --save_total_limit, or deleted by hand); which checkpoint to continue from is decided
# from the checkpoints themselves (sftcore.checkpoint.newest_checkpoint), so each launch starts Ray's list anew.
RAY_RUN_SNAPSHOT = "checkpoint_manager_snapshot.json"


class UsageError(Exception):
    """A problem with the command line or the environment; printed as one line, exit code 2."""


class TrainingFailed(Exception):
    """Training started and failed (after any restarts --max_failures allowed); exit code 1."""


def training_failure_message(failures: dict[int, BaseException], output_dir: StoragePath, fallback: str = "") -> str:
    """The root cause on each failed worker, in one line each, plus where the run can continue from."""
    causes = [f"worker {rank}: {type(e).__name__}: {e}" for rank, e in sorted(failures.items())] or [fallback]
    resume = newest_checkpoint(output_dir)
    where = f"rerun the same command to continue from {resume}" if resume else "no checkpoint was saved yet"
    return "training failed\n  " + "\n  ".join(causes) + f"\n{where}"


PROBE_PREFIX = ".sftcore-probe-"  # short-lived files the driver (or each torchrun process) writes to test output_dir


def check_output_dir(cfg: TrainConfig) -> StoragePath:
    """--output_dir, a directory or a bucket URI, made and probed with a short-lived file."""
    try:
        output_dir = StoragePath.of(cfg.output_dir)
    except ValueError as e:
        raise UsageError(f"--output_dir {cfg.output_dir}: cannot open this URI ({e})") from None
    try:
        output_dir.mkdir()
        probe = output_dir / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        probe.write_text("")
        probe.remove()
        entries = output_dir.children()
    except OSError as e:
        raise UsageError(f"--output_dir {cfg.output_dir} is not writable ({e.strerror or first_line(e)})") from None
    if cfg.resume == "never" and any(not name.startswith(PROBE_PREFIX) for name in entries):
        raise UsageError(
            f"--output_dir {cfg.output_dir} is not empty and --resume never was given; "
            "choose a new directory or drop --resume never to continue the run there"
        )
    return output_dir


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


def check_placement(cfg: TrainConfig, worker_resources: dict[str, float]) -> None:
    """The workers fit the cluster's nodes: on a local instance a UsageError saying how many do, on a
    joined cluster (an autoscaler may add nodes) a warning that the run waits for them."""
    import ray

    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    fits = placeable_workers(worker_resources, nodes)
    if fits >= cfg.num_workers:
        return
    each = ", ".join(f"{amount:g} {kind}" for kind, amount in worker_resources.items())
    message = (
        f"--num-workers {cfg.num_workers} needs {each} per worker, and this Ray cluster's nodes hold {fits} such "
        "worker(s): lower --num-workers (or --cpus_per_worker / --gpus_per_worker)"
    )
    if not (cfg.address or os.environ.get("RAY_ADDRESS")):
        raise UsageError(message)
    logger.warning("%s; waiting for the cluster to add nodes", message)


def _ray_log_dir() -> str:
    """This node's Ray log folder (each node of a cluster has its own)."""
    import ray

    try:  # no public API names the session folder
        return os.path.join(ray._private.worker._global_node.get_session_dir_path(), "logs")
    except AttributeError:
        return "/tmp/ray/session_latest/logs"


def check_output_dir_is_shared(output_dir: StoragePath) -> None:
    """On a cluster of several nodes, every node must see output_dir: Ray Train writes checkpoints from
    the workers' nodes, and a restarted worker reads them from wherever it lands. A file the driver
    writes there must be visible from each node (a bucket is, by its URI)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [node for node in ray.nodes() if node["Alive"]]
    if len(nodes) < 2 or not output_dir.is_local:
        return

    @ray.remote(num_cpus=0)
    def visible(path: str) -> bool:
        return os.path.exists(path)

    marker = output_dir.local_path / f"{PROBE_PREFIX}{uuid.uuid4().hex}"
    marker.write_text("")
    try:
        seen = {
            f"{node['NodeManagerAddress']} (id {node['NodeID'][:8]})": visible.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
            ).remote(str(marker))
            for node in nodes
        }
        blind = sorted(node for node, ref in seen.items() if not ray.get(ref, timeout=120))
    finally:
        marker.unlink()
    if blind:
        raise UsageError(
            f"--output_dir {output_dir} is on this node's disk only: node(s) {', '.join(blind)} of this "
            f"{len(nodes)}-node cluster cannot see it. Checkpoints must go to storage every node mounts at the same "
            "path (NFS, EFS, Filestore, a ReadWriteMany volume; see cluster/README.md)"
        )


def plan_steps(cfg: TrainConfig, train_sequences: int) -> tuple[int, int]:
    """(steps per epoch, total steps). Every worker (every sequence-parallel group) gets
    train_sequences // workers (groups) sequences (packs, or rows without packing): the data is split equally."""
    per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps
    steps_per_epoch = (train_sequences // cfg.data_parallel) // per_step
    if steps_per_epoch == 0:
        what = "packs" if cfg.packing else "rows"
        who = f"{cfg.num_workers} worker(s)"
        if cfg.sequence_parallel > 1:
            who = f"{cfg.data_parallel} group(s) of {cfg.sequence_parallel} workers"
        raise UsageError(
            f"{train_sequences} training {what} are too few for {who} x --per_device_batch_size "
            f"{cfg.per_device_batch_size} x --gradient_accumulation_steps {cfg.gradient_accumulation_steps}; "
            "lower one of them" + (", or pass --packing false" if cfg.packing else "")
        )
    return steps_per_epoch, cfg.max_steps or steps_per_epoch * cfg.num_epochs


def report_untrained(cfg: TrainConfig, summary: DatasetSummary, output_dir: StoragePath, speak: bool) -> None:
    """Say what is not trained (build_datasets / build_sequences wrote each line, turn or piece of text to
    rejected_rows.jsonl); stop on malformed rows unless --on_bad_rows skip. Rows that are valid but yield
    nothing to train (too long, nothing marked for training) and text lost from trained rows are
    reported, not fatal."""
    rejected_path = output_dir / REJECTED_FILE
    if summary.bad_row_count():
        if cfg.on_bad_rows == "error":
            raise UsageError(
                f"{summary.format_rejects(limit=100, bad_only=True)}\n"
                f"every bad line, with its reason: {rejected_path}\n"
                "fix these lines, or pass --on_bad_rows skip to train on the valid rows only"
            )
        if speak:
            logger.warning(
                "%s\nskipped them (--on_bad_rows skip); written to %s",
                summary.format_rejects(5, bad_only=True),
                rejected_path,
            )
    if not speak:
        return
    unfit = {reason: n for reason, n in summary.rejected_counts.items() if reason in NOT_BAD_INPUT}
    if unfit:
        logger.warning(
            "%d valid row(s) yield nothing to train (%s); listed in %s",
            sum(unfit.values()),
            ", ".join(f"{reason}: {n}" for reason, n in sorted(unfit.items())),
            rejected_path,
        )
    if summary.omission_counts:
        logger.warning(
            "left out of rows that are trained, by reason:\n%s\nlisted in %s",
            summary.format_omissions(3),
            rejected_path,
        )
    if summary.weights:
        logger.info(
            "mixing weights (the training samples of an epoch, by file):\n%s%s",
            "\n".join(
                f"  {file}: weight {summary.weights[file]:g}: {c['train_samples']} samples "
                f"({c['train_samples'] / max(1, summary.train_samples):.1%}) from {c['rows']} rows"
                for file, c in summary.files.items()
            ),
            f"\n{summary.unsampled_rows} training row(s) drawn out by a weight below 1 (the same draw every epoch)"
            if summary.unsampled_rows
            else "",
        )
    if len(summary.files) > 1:
        logger.info(
            "data files: %d\n%s",
            len(summary.files),
            "\n".join(
                f"  {file}: {c['lines']} lines ({c['blank_lines']} blank, {c['rejected']} rejected, {c['rows']} rows)"
                for file, c in summary.files.items()
            ),
        )


def account_for_data(cfg: TrainConfig, summary: DatasetSummary, output_dir: StoragePath, speak: bool) -> dict[str, Any]:
    """Report (speak: this process is the one that logs and writes) what became of every line, stop on
    bad rows unless skipping them, and plan the run: the per-worker loop's config."""
    report_untrained(cfg, summary, output_dir, speak)
    if summary.train_rows == 0:
        listed = f"\n{summary.format_rejects(limit=3)}" if summary.rejected_counts else ""
        raise UsageError(f"{cfg.data_path}: no rows to train on{listed}")
    steps_per_epoch, total_steps = plan_steps(cfg, summary.train_sequences)
    if speak:
        logger.info(
            "data: %d lines (%d blank, %d rejected) -> %d train rows, %d validation rows; tokens %s (%d turns "
            "trained, %d of them with a shortened history, %d did not fit %d tokens); train: %d tokens, %d trained; "
            "%d steps (%d per epoch)",
            summary.lines,
            summary.blank_lines,
            summary.rejected_total,
            summary.train_rows,
            summary.validation_rows,
            summary.token_costs(),
            summary.trained_turns,
            summary.windowed_turns,
            summary.dropped_turns,
            cfg.max_seq_length,
            summary.train_tokens,
            summary.train_trained_tokens,
            total_steps,
            steps_per_epoch,
        )
        if summary.packing_efficiency is not None:
            logger.info(
                "packing: %d train rows (%d %s) -> %d packs of up to %d tokens, %.1f%% real tokens",
                summary.train_rows,
                summary.train_samples,
                "trees" if summary.trees else "samples",
                summary.train_sequences,
                cfg.max_seq_length,
                100 * summary.packing_efficiency,
            )
    if cfg.resume == "auto" and (resume_from := newest_checkpoint(output_dir)) is not None:
        changed = plan_changes({"strategy": "ddp"} | read_run_config(resume_from), cfg)
        if changed:
            raise UsageError(
                f"{resume_from} was written with {', '.join(changed)}: its place in the data counts batches of "
                "that plan; continue it with the same values, or pass a new --output_dir"
            )
        if speak:
            logger.info("continuing from %s (step %d)", resume_from, read_trainer_state(resume_from).step)
    return {
        "train_config": asdict(cfg),
        "total_steps": total_steps,
        "steps_per_epoch": steps_per_epoch,
        "has_validation": summary.validation_rows > 0,
        "generation_rows": generation_rows(cfg, summary),
    }


def generation_rows(cfg: TrainConfig, summary: DatasetSummary) -> list[tuple[int, dict]]:
    """The first --eval_generate_rows validation rows, as (line, row), for next-action evaluation."""
    wanted = set(summary.validation_lines[: cfg.eval_generate_rows])
    if cfg.eval_generate_rows and len(wanted) < cfg.eval_generate_rows:
        logger.warning(
            "--eval_generate_rows %d: the validation split has %d rows; generating on those",
            cfg.eval_generate_rows,
            len(wanted),
        )
    found = []
    for result in read_jsonl(cfg.data_path) if wanted else ():
        if (result.file, result.line) in wanted:
            found.append((result.line, result.row))
            if len(found) == len(wanted):
                break
    return found


def finish(output_dir: StoragePath, started: float) -> None:
    curve = plot_loss_curve(output_dir)
    print(summarize_run(output_dir, time.monotonic() - started, curve), flush=True)


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


def check_chat_template(cfg: TrainConfig) -> None:
    """The tokenizer loads and has a chat template (its own or --chat_template), probed as the encoders will."""
    try:
        tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
    except (OSError, ValueError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"--model_name_or_path {cfg.model_name_or_path}: cannot load its tokenizer ({first_line})"
        ) from None
    try:
        template_support(tokenizer)
    except ValueError as e:
        raise UsageError(f"--model_name_or_path {cfg.model_name_or_path}: {e}") from None


def prepare(cfg: TrainConfig) -> tuple[StoragePath, bool]:
    """(the output directory, whether rows train as prefix trees), after the checks that take seconds."""
    resolve_data_files(cfg.data_path)  # fail in a second, not after Ray or the process group has started
    if cfg.chat_template:  # workers get the template's text: they may not see the file (other nodes, other cwd)
        cfg.chat_template = load_chat_template(cfg.chat_template)
    output_dir = check_output_dir(cfg)
    cfg.output_dir = output_dir.uri  # absolute: workers do not share the driver's working directory
    check_chat_template(cfg)
    model_config = load_model_config(cfg.model_name_or_path, cfg.trust_remote_code)
    try:
        check_attention(cfg.attn_implementation, model_config, cfg.max_seq_length)
        check_sequence_parallel(cfg.attn_implementation, model_config, cfg.max_seq_length, cfg.sequence_parallel)
    except ValueError as e:
        raise UsageError(f"--model_name_or_path {cfg.model_name_or_path}: {e}") from None
    return output_dir, cfg.trains_trees(model_config)


def run(cfg: TrainConfig, started: float) -> int:
    """The driver under Ray: Ray Data prepares the sequences, Ray Train runs the loop on each worker."""
    import ray

    from sftcore.dataset import build_datasets

    output_dir, trees = prepare(cfg)
    if cfg.num_workers % cfg.sequence_parallel:  # under torchrun the process count is checked instead
        raise UsageError(
            f"--sequence_parallel {cfg.sequence_parallel} must divide --num-workers {cfg.num_workers}: each group of "
            "that many workers shares its packs"
        )
    save_resolved_config(cfg, output_dir)
    init_ray(cfg)
    check_output_dir_is_shared(output_dir)
    resources = ray.cluster_resources()
    use_gpu = cfg.use_gpu if cfg.use_gpu is not None else resources.get("GPU", 0) > 0
    cpus_per_worker = cfg.cpus_per_worker or (1 if use_gpu else max(1, int(resources.get("CPU", 1)) // cfg.num_workers))
    worker_resources = {"CPU": cpus_per_worker} | ({"GPU": cfg.gpus_per_worker} if use_gpu else {})
    check_placement(cfg, worker_resources)

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

    try:
        strategy = accelerate_strategy(cfg.strategy, cfg.use_lora, os.environ)
        if strategy != cfg.strategy:
            cfg = replace(cfg, strategy=strategy)  # checked again as if given
            if os.environ.get("RANK") == "0":
                logger.info(
                    "accelerate launch --use_fsdp: training with --strategy fsdp (FSDP2, one unit per transformer "
                    "block; accelerate's other FSDP settings are not read)"
                )
    except ValueError as e:
        raise UsageError(str(e)) from None
    output_dir, trees = prepare(cfg)  # every process checks before any of them writes (init is a rendezvous)
    runtime = TorchrunRuntime()
    try:
        if cfg.num_workers != runtime.world and runtime.rank == 0:
            logger.info("torchrun started %d processes: training with %d workers", runtime.world, runtime.world)
        cfg.num_workers = runtime.world
        if runtime.world % cfg.sequence_parallel:
            raise UsageError(f"--sequence_parallel {cfg.sequence_parallel} must divide the {runtime.world} processes")
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
