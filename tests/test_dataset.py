"""The two data paths (Ray Data for Ray Train, in-process for torchrun) give the same sequences and counts."""

from __future__ import annotations

import threading

import pytest
from conftest import DATA, TEMPLATES

from sftcore.dataset import build_datasets, build_sequences
from sftcore.masking import EncodeOptions

pytestmark = pytest.mark.slow  # starts a real local Ray


def in_threads_as_ranks(world: int, **kwargs) -> list[tuple]:
    """build_sequences run by `world` threads standing in for torchrun processes, with an all-gather."""
    from transformers import AutoTokenizer  # noqa: F401  resolve transformers' lazy import before threads race on it

    parts: list = [None] * world
    results: list = [None] * world
    barrier = threading.Barrier(world)

    def run(rank: int) -> None:
        def gather(value):
            parts[rank] = value
            barrier.wait(timeout=300)
            return list(parts)

        try:
            results[rank] = build_sequences(rank=rank, world=world, gather=gather, **kwargs)
        except Exception as e:  # re-raised in the test's thread
            results[rank] = e
            barrier.abort()

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    errors = sorted(
        (e for e in results if isinstance(e, Exception)), key=lambda e: isinstance(e, threading.BrokenBarrierError)
    )
    if errors:
        raise errors[0]
    return results


def as_keys(sequences) -> list[tuple]:
    return sorted((tuple(s["input_ids"]), tuple(s["labels"]), tuple(s.get("position_ids", ()))) for s in sequences)


def on_both_paths(world: int, **options) -> tuple[list, list, object]:
    """build_datasets on a real local Ray (train rows, validation rows, summary), checked equal to
    build_sequences run by `world` simulated torchrun ranks."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        train, validation, summary = build_datasets(**options)
        ray_train, ray_validation = list(train.iter_rows()), list(validation.iter_rows())
    finally:
        ray.shutdown()
    for local_train, local_validation, local_summary in in_threads_as_ranks(world, **options):
        assert local_summary == summary
        assert as_keys(local_train) == as_keys(ray_train)
        assert as_keys(local_validation) == as_keys(ray_validation)
    return ray_train, ray_validation, summary


@pytest.mark.parametrize("packing", [True, False])
def test_torchrun_data_path_matches_the_ray_data_path(tmp_path, packing):
    lines = (DATA / "fireact_hotpotqa.jsonl").read_text().splitlines()[:80]
    lines[10] = '{"input": "no output field"}'
    lines[20] = ""
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    options = {
        "data_path": str(data),
        "model_name_or_path": "smollm2-135m-instruct",
        "options": EncodeOptions(max_seq_length=1024),
        "validation_split": 0.1,
        "seed": 7,
        "packing": packing,
    }
    _, _, summary = on_both_paths(2, **options)
    assert summary.lines == 80 and summary.blank_lines == 1 and [r["line"] for r in summary.rejected] == [11]
    assert summary.train_rows + summary.validation_rows == summary.rows == 78


@pytest.mark.parametrize("packing", [True, False])
def test_a_row_split_into_samples_goes_to_one_split_and_both_paths_agree(tmp_path, packing):
    """Under Qwen3's template tau-bench rows become several samples each; a row's samples all go to the
    same split, the counts add up, and the Ray Data and torchrun paths give the same sequences."""
    lines = (DATA / "taubench_airline_dev.jsonl").read_text().splitlines()[:12]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    options = {
        "data_path": str(data),
        "model_name_or_path": "smollm2-135m-instruct",
        "options": EncodeOptions(max_seq_length=4096),
        "validation_split": 0.25,
        "seed": 3,
        "packing": packing,
        "chat_template": str(TEMPLATES / "Qwen-Qwen3-0.6B.jinja"),
    }
    ray_train, ray_validation, summary = on_both_paths(1, **options)
    assert (summary.train_rows, summary.validation_rows) == (9, 3) and summary.samples > 12
    assert summary.split_overhead > 1.5 and summary.trained_turns == summary.samples  # one turn per sample
    if not packing:
        train_lines = {row["line"] for row in ray_train}
        assert not train_lines & {row["line"] for row in ray_validation}
        assert len(ray_train) + len(ray_validation) == summary.samples
