"""What the driver decides before and after training (sftcore.driver), in seconds, without Ray."""

from __future__ import annotations

import logging
from collections import Counter

import pytest

from sftcore.config import TrainConfig
from sftcore.dataset import DatasetSummary
from sftcore.driver import (
    UsageError,
    account_for_data,
    check_output_dir,
    check_placement,
    check_worker_count,
    plan_steps,
    training_failure_message,
    under_accelerate,
)
from sftcore.storage import StoragePath


def config(**options) -> TrainConfig:
    return TrainConfig(data_path="rows.jsonl", **options)


def test_the_plan_counts_batches_of_workers_or_of_sequence_parallel_groups():
    assert plan_steps(config(num_workers=2, per_device_batch_size=2, num_epochs=3), 17) == (4, 12)
    assert plan_steps(config(num_workers=4, sequence_parallel=2, per_device_batch_size=2), 17) == (4, 12)
    assert plan_steps(config(max_steps=7), 5) == (2, 7)  # batches of 2; --max_steps over epochs
    with pytest.raises(
        UsageError, match="^3 training packs are too few for 2 group\\(s\\) of 2 workers x --per_device"
    ):
        plan_steps(config(num_workers=4, sequence_parallel=2, per_device_batch_size=2), 3)
    with pytest.raises(UsageError, match="must divide --num-workers 3: each group of that many workers"):
        check_worker_count(config(sequence_parallel=2), 3)


def test_workers_that_fit_no_node_stop_a_local_run_and_wait_on_a_joined_cluster(caplog):
    nodes = [{"CPU": 2.0}, {"CPU": 1.0}]
    check_placement(config(num_workers=3), {"CPU": 1}, nodes, joined=False)
    with pytest.raises(UsageError, match="needs 2 CPU per worker, and this Ray cluster's nodes hold 1 such worker"):
        check_placement(config(num_workers=2), {"CPU": 2}, nodes, joined=False)
    with caplog.at_level(logging.WARNING, logger="sftcore.train"):
        check_placement(config(num_workers=2), {"CPU": 2}, nodes, joined=True)
    assert "waiting for the cluster to add nodes" in caplog.text


def test_output_dir_is_probed_and_resume_never_refuses_a_used_one(tmp_path):
    out = tmp_path / "run"
    assert check_output_dir(config(output_dir=str(out), resume="never")).uri == str(out)
    (out / "metrics.jsonl").write_text("")
    with pytest.raises(UsageError, match="is not empty and --resume never was given"):
        check_output_dir(config(output_dir=str(out), resume="never"))
    (tmp_path / "file").write_text("")
    with pytest.raises(UsageError, match="is not writable"):
        check_output_dir(config(output_dir=str(tmp_path / "file" / "run")))


def test_a_failure_names_each_worker_and_where_to_continue(tmp_path):
    message = training_failure_message({1: ValueError("boom"), 0: RuntimeError("bang")}, StoragePath.of(tmp_path))
    assert message == (
        "training failed\n  worker 0: RuntimeError: bang\n  worker 1: ValueError: boom\nno checkpoint was saved yet"
    )


def test_accelerate_launch_use_fsdp_becomes_the_strategy_checked_like_a_flag():
    assert under_accelerate(config(), {"ACCELERATE_USE_FSDP": "true"}).strategy == "fsdp"
    assert under_accelerate(config(), {}).strategy == "ddp"
    with pytest.raises(UsageError, match="--eval_generate_rows generates on each worker's own copy"):
        under_accelerate(config(eval_generate_rows=2), {"ACCELERATE_USE_FSDP": "true"})


def test_the_data_account_plans_the_run_or_says_there_is_nothing_to_train(tmp_path):
    out = StoragePath.of(tmp_path)
    summary = DatasetSummary(path="rows.jsonl", lines=12, rows=10, train_rows=9, validation_rows=1, train_sequences=9)
    loop = account_for_data(config(per_device_batch_size=2, num_epochs=2), summary, out, speak=True)
    assert (loop["steps_per_epoch"], loop["total_steps"], loop["has_validation"]) == (4, 8, True)
    assert loop["train_config"]["per_device_batch_size"] == 2
    empty = DatasetSummary(path="rows.jsonl", lines=2, rejected_counts=Counter({"too_long": 2}))
    with pytest.raises(UsageError, match="^rows.jsonl: no rows to train on"):
        account_for_data(config(), empty, out, speak=True)
    bad = DatasetSummary(path="rows.jsonl", lines=3, rows=2, train_rows=2, train_sequences=2)
    bad.rejected_counts["invalid_json"] = 1
    bad.rejected.append({"file": "rows.jsonl", "line": 3, "reason": "invalid_json", "message": "not valid JSON"})
    with pytest.raises(UsageError, match="rows.jsonl:3: not valid JSON \\[invalid_json\\](.|\\n)*--on_bad_rows skip"):
        account_for_data(config(), bad, out, speak=True)
    assert account_for_data(config(on_bad_rows="skip", num_epochs=1), bad, out, speak=True)["total_steps"] == 1
