"""Where the per-worker loop runs: under Ray Train (TorchTrainer) or under torchrun / accelerate launch.

The loop (sftcore.loop) asks its runtime for five things only: who it is (rank, world size, device),
its batches, the checkpoint to resume from, how to publish a checkpoint it wrote, and where rank 0
shows its progress. Everything else (the model, the step, saving, evaluation) is the same code under
both launchers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from sftcore.checkpoint import MANIFEST, checkpoint_problem, local_newest_checkpoint
from sftcore.console import ConsoleFormatter, Progress
from sftcore.dataset import columns_of
from sftcore.parallel import barrier
from sftcore.storage import StoragePath

logger = logging.getLogger(__name__)
SHUFFLE_BUFFER_ROWS = 256


def placeable_workers(per_worker: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many workers needing ``per_worker`` resources (CPU, GPU) the nodes can hold, each worker on
    one node: Ray Train V2 retries the placement of workers that fit nowhere, without end."""
    wanted = {k: v for k, v in per_worker.items() if v}
    return sum(min(int(node.get(k, 0) // v) for k, v in wanted.items()) for node in nodes)


def group_data_config(sequence_parallel: int) -> Any:
    """Ray Train's DataConfig with the training data split per sequence-parallel group: the first worker
    of each group gets its group's split (shared with the rest by sftcore.sequence_parallel); validation
    goes whole to every worker."""
    import ray.train

    class GroupDataConfig(ray.train.DataConfig):
        def configure(
            self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any, **kwargs: Any
        ) -> list[dict[str, Any]]:
            rest = {name: ds for name, ds in datasets.items() if name != "train"}
            output = super().configure(rest, world_size, worker_handles, worker_node_ids, **kwargs)
            if "train" not in datasets:  # Ray Train V2 configures one dataset at a time
                return output
            train = datasets["train"].copy(datasets["train"])
            train.set_name("train")
            train.context.execution_options = self._resolve_execution_options("train")
            leaders = list(range(0, world_size, sequence_parallel))
            hints = [worker_node_ids[i] for i in leaders] if self._enable_shard_locality and worker_node_ids else None
            splits = train.streaming_split(len(leaders), equal=True, locality_hints=hints)
            for worker in range(world_size):  # every worker has an entry; the others' is None
                output[worker]["train"] = splits[worker // sequence_parallel] if worker in leaders else None
            return output

    return GroupDataConfig(datasets_to_split=[])


class RayRuntime:
    """A Ray Train worker: data from Ray Data shards, checkpoints reported to (and restored by) Ray Train.
    Its console output stays in Ray's log files; rank 0 sends its progress and its sftcore log lines to
    the driver's display through ``events`` (relay_events)."""

    def __init__(self, events: Any = None) -> None:
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        # fetched on first use: a run without validation has none, and of a sequence-parallel group
        # only the first worker reads the training data (sftcore.sequence_parallel)
        self.train_shard = self.validation_shard = None
        self.events = events if self.rank == 0 else None
        if self.events is not None:
            sftcore_logger = logging.getLogger("sftcore")
            sftcore_logger.setLevel(logging.INFO)
            sftcore_logger.addHandler(_EventHandler(self))

    def show(self, event: dict[str, Any]) -> None:
        from ray.exceptions import RayError

        if self.events is None:
            return
        try:
            self.events.put(event)
        except RayError:  # the driver is gone: train on, its files are what matter now
            self.events = None

    def train_batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        import ray.train

        if self.train_shard is None:
            self.train_shard = ray.train.get_dataset_shard("train")
        return iter(
            self.train_shard.iter_batches(
                batch_size=batch_size,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=SHUFFLE_BUFFER_ROWS,
                local_shuffle_seed=seed + epoch,
                prefetch_batches=2,
            )
        )

    def validation_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        import ray.train

        if self.validation_shard is None:
            self.validation_shard = ray.train.get_dataset_shard("validation")
        return iter(self.validation_shard.iter_batches(batch_size=batch_size, batch_format="numpy"))

    def registered_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """Ray's newest registered checkpoint (after a worker failure, or Ray's own run restoration)."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return _as_path(checkpoint.as_directory()) if checkpoint is not None else contextlib.nullcontext()

    def publish(
        self, local_dir: Path | None, name: str, metrics: dict[str, Any], output_dir: StoragePath, final: bool
    ) -> None:
        """Hand this worker's files of checkpoint `name` to Ray Train, which copies them to output_dir/name
        (every worker's files into the one directory), registers it and then deletes local_dir. Into a
        bucket the upload runs in the background and training goes on (final/ excepted: the run waits
        for it); Ray Train keeps the reports in order and waits for the uploads before a worker exits."""
        import ray.train
        from ray.train import CheckpointUploadMode

        checkpoint = ray.train.Checkpoint.from_directory(local_dir) if local_dir is not None else None
        background = not output_dir.is_local and not final
        ray.train.report(
            metrics,
            checkpoint=checkpoint,
            checkpoint_dir_name=name,
            checkpoint_upload_mode=CheckpointUploadMode.ASYNC if background else CheckpointUploadMode.SYNC,
            delete_local_checkpoint_after_upload=True,
        )


class _EventHandler(logging.Handler):
    """sftcore's log records on a Ray Train worker, sent to the driver's console."""

    def __init__(self, runtime: RayRuntime) -> None:
        super().__init__(logging.INFO)
        self.runtime = runtime
        self.setFormatter(ConsoleFormatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.runtime.show({"message": self.format(record)})


SILENCE_NOTE_SECONDS = 120  # after this long without a first step, the driver says what may be holding it


@contextlib.contextmanager
def relay_events(progress: Progress, waiting_for: str) -> Iterator[Any]:
    """A Ray queue for rank 0's events (yielded: it goes to the workers in the loop config), shown by
    ``progress`` from a driver thread until the block ends. If no event comes for a while, one line
    says what the workers may be waiting for."""
    import ray
    from ray.exceptions import RayError
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On the driver's node: a queue on a worker node would go down with it, and the display with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    done = threading.Event()

    def follow() -> None:
        started, heard = time.monotonic(), False
        while True:
            try:
                progress.show(queue.get(timeout=0.5))
                heard = True
            except Empty:
                if done.is_set():
                    return
                if not heard and time.monotonic() - started > SILENCE_NOTE_SECONDS:
                    heard = True  # say it once
                    progress.show(
                        {
                            "message": f"no word from the workers for {SILENCE_NOTE_SECONDS}s: they are loading the "
                            f"model, or waiting for {waiting_for} (`ray status` shows what the cluster has)"
                        }
                    )
            except RayError:
                return

    thread = threading.Thread(target=follow, name="sftcore-progress", daemon=True)
    thread.start()
    try:
        yield queue
    finally:
        done.set()
        thread.join(timeout=30)
        progress.close()


@contextlib.contextmanager
def _as_path(directory_context: Any) -> Iterator[Path]:
    with directory_context as directory:
        yield Path(directory)


class TorchrunRuntime:
    """A process started by torchrun or accelerate launch (RANK, WORLD_SIZE, MASTER_ADDR in the
    environment): no Ray. Each process holds its share of the encoded sequences in memory, and
    checkpoints are copied into output_dir by the processes themselves (output_dir must be shared
    between nodes, or a bucket)."""

    def __init__(self) -> None:
        self.rank, self.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        self.train: list[dict[str, Any]] = []
        self.validation: list[dict[str, Any]] | None = None
        self.progress: Progress | None = None  # rank 0's display, set once the run's length is known

    @staticmethod
    def launched() -> bool:
        return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ

    def set_data(
        self, train: list[dict[str, Any]], validation: list[dict[str, Any]] | None, sequence_parallel: int = 1
    ) -> None:
        """Take this rank's equal share of the training sequences (like Ray Data's equal split, the
        remainder is dropped so every rank runs the same number of steps) and all of validation. With
        sequence parallelism the shares are per group, held by the group's first worker."""
        groups, group = self.world // sequence_parallel, self.rank // sequence_parallel
        leader = self.rank % sequence_parallel == 0
        self.train = train[group::groups][: len(train) // groups] if leader else []
        self.validation = validation

    def train_batches(self, epoch: int, batch_size: int, seed: int) -> Iterator[dict[str, Any]]:
        order = list(range(len(self.train)))
        random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield columns_of([self.train[i] for i in order[start : start + batch_size]])

    def validation_batches(self, batch_size: int) -> Iterator[dict[str, Any]]:
        validation = self.validation or []
        return (columns_of(validation[i : i + batch_size]) for i in range(0, len(validation), batch_size))

    def registered_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        return contextlib.nullcontext()  # no run controller: resume reads output_dir

    def publish(
        self, local_dir: Path | None, name: str, metrics: dict[str, Any], output_dir: StoragePath, final: bool
    ) -> None:
        """Copy every worker's files into output_dir/name, the manifest (rank 0's) last, then delete
        local_dir: a crash mid-copy leaves a directory that fails verification, as under Ray."""
        destination = output_dir / name
        if self.rank == 0:
            destination.remove()  # a torn copy from an earlier, crashed attempt
        barrier()
        if local_dir is not None:
            destination.upload(local_dir, skip=(MANIFEST,))
        barrier()
        if local_dir is not None and (local_dir / MANIFEST).exists():
            (destination / MANIFEST).write_bytes((local_dir / MANIFEST).read_bytes())
        barrier()
        if local_dir is not None:
            shutil.rmtree(local_dir, ignore_errors=True)

    def show(self, event: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.show(event)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if dist.is_initialized():
            dist.destroy_process_group()


WorkerRuntime = RayRuntime | TorchrunRuntime


def _switched_on(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").lower() in ("1", "true", "yes")


def accelerate_strategy(strategy: str, use_lora: bool, environ: Mapping[str, str]) -> str:
    """The --strategy to train with under ``accelerate launch``, whose own switches arrive as
    environment variables: --use_fsdp (or an `accelerate config` with FSDP) trains with FSDP2, never
    silently with DDP; DeepSpeed is refused. Raises ValueError with the line to show."""
    if _switched_on(environ, "ACCELERATE_USE_DEEPSPEED"):
        raise ValueError(
            "accelerate launch with DeepSpeed: sftcore shards with FSDP2; launch without DeepSpeed, and pass "
            "--strategy fsdp to shard the model"
        )
    if not _switched_on(environ, "ACCELERATE_USE_FSDP"):
        return strategy
    if use_lora:
        raise ValueError(
            "accelerate launch --use_fsdp with --use_lora: a LoRA adapter trains with DDP (it is small); launch "
            "without --use_fsdp, or drop --use_lora to shard full fine-tuning"
        )
    return "fsdp"


@contextlib.contextmanager
def checkpoint_to_resume(runtime: WorkerRuntime, output_dir: StoragePath, resume: str) -> Iterator[Path | None]:
    """The directory to resume from (or None): the runtime's registered checkpoint if intact, else the
    newest intact one in output_dir (resume auto, or a restart after a failure), downloaded if need be."""
    with runtime.registered_checkpoint() as registered:
        if registered is not None:
            problem = checkpoint_problem(registered)
            if problem is None:
                yield registered
                return
            logger.warning(
                "the registered checkpoint %s is unusable (%s); looking for an older one", registered, problem
            )
        if resume == "never" and registered is None:
            yield None
            return
        with local_newest_checkpoint(output_dir) as newest:
            yield newest
