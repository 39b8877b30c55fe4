"""What the driver decides, under Ray or torchrun alike: the checks that take seconds before anything
starts, the plan (steps per epoch, total steps), the account of every line of the data and the
reports, and the run's last summary. Plain functions, unit-tested in seconds (tests/test_driver.py);
workflows/train.py wires them to Ray Train or to the torchrun processes.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, replace
from typing import Any

from sftcore.attention import check_attention
from sftcore.checkpoint import newest_checkpoint, read_run_config, read_trainer_state
from sftcore.config import TrainConfig, plan_changes
from sftcore.console import summarize_run
from sftcore.data import NOT_BAD_INPUT
from sftcore.dataset import DatasetSummary
from sftcore.models import load_model_config, load_tokenizer
from sftcore.runtime import accelerate_strategy, placeable_workers
from sftcore.sequence_parallel import check_sequence_parallel
from sftcore.sources import read_jsonl, resolve_data_files
from sftcore.storage import StoragePath, first_line
from sftcore.templates import load_chat_template, template_support
from sftcore.tracking import plot_loss_curve

logger = logging.getLogger("sftcore.train")
REJECTED_FILE = "rejected_rows.jsonl"


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


def check_placement(
    cfg: TrainConfig, worker_resources: dict[str, float], nodes: list[dict[str, float]], joined: bool
) -> None:
    """The workers fit the cluster's nodes (their resources): on a local instance a UsageError saying how
    many do, on a joined cluster (``joined``: an autoscaler may add nodes) a warning that the run waits."""
    fits = placeable_workers(worker_resources, nodes)
    if fits >= cfg.num_workers:
        return
    each = ", ".join(f"{amount:g} {kind}" for kind, amount in worker_resources.items())
    message = (
        f"--num-workers {cfg.num_workers} needs {each} per worker, and this Ray cluster's nodes hold {fits} such "
        "worker(s): lower --num-workers (or --cpus_per_worker / --gpus_per_worker)"
    )
    if not joined:
        raise UsageError(message)
    logger.warning("%s; waiting for the cluster to add nodes", message)


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


def check_worker_count(cfg: TrainConfig, workers: int, what: str = "--num-workers") -> None:
    """--sequence_parallel divides the workers (under torchrun: the processes it started)."""
    if workers % cfg.sequence_parallel:
        raise UsageError(
            f"--sequence_parallel {cfg.sequence_parallel} must divide {what} {workers}: each group of that many "
            "workers shares its packs"
        )


def under_accelerate(cfg: TrainConfig, environ: Mapping[str, str]) -> TrainConfig:
    """cfg with accelerate launch's own switches applied (sftcore.runtime.accelerate_strategy), checked
    again as if given on the command line."""
    try:
        strategy = accelerate_strategy(cfg.strategy, cfg.use_lora, environ)
        if strategy == cfg.strategy:
            return cfg
        cfg = replace(cfg, strategy=strategy)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if environ.get("RANK") == "0":
        logger.info(
            "accelerate launch --use_fsdp: training with --strategy fsdp (FSDP2, one unit per transformer block; "
            "accelerate's other FSDP settings are not read)"
        )
    return cfg


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
                + _read_as({key[3:]: n for key, n in c.items() if key.startswith("as ")}, " ")
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
            "%d steps (%d per epoch)%s",
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
            _read_as(summary.shapes, "; rows "),
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


def _read_as(shapes: dict[str, int], before: str) -> str:
    """'{before}read as messages' (mixed: 'read as messages 3, rows 2'): the shapes the rows were read in."""
    if not shapes:
        return ""
    if len(shapes) == 1:
        return f"{before}read as {next(iter(shapes))}"
    return before + "read as " + ", ".join(f"{shape} {n}" for shape, n in sorted(shapes.items()))


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
