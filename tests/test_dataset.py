"""The two data paths (Ray Data for Ray Train, in-process for torchrun) give the same sequences and counts,
from one file or many, and shuffle rows across the whole data set before packing."""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path

import pytest
from conftest import DATA, TEMPLATES

from sftcore.data import DataError
from sftcore.dataset import build_datasets, build_sequences
from sftcore.masking import EncodeOptions
from sftcore.models import load_tokenizer


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
    """The sequences in their order: both paths give the same packs in the same order."""
    return [
        (tuple(s["input_ids"]), tuple(s["labels"]), tuple(s.get("position_ids", ())), tuple(s.get("parents", ())))
        for s in sequences
    ]


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


@pytest.mark.slow  # starts a real local Ray
@pytest.mark.parametrize("packing,weight", [(True, ""), (False, ""), (True, ":1.5")])
def test_torchrun_data_path_matches_the_ray_data_path(tmp_path, packing, weight):
    lines = (DATA / "fireact_hotpotqa.jsonl").read_text().splitlines()[:80]
    lines[10] = '{"input": "no output field"}'
    lines[20] = ""
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    options = {
        "data_path": str(data) + weight,
        "model_name_or_path": "smollm2-135m-instruct",
        "options": EncodeOptions(max_seq_length=1024),
        "validation_split": 0.1,
        "seed": 7,
        "packing": packing,
    }
    _, _, summary = on_both_paths(2, **options)
    assert summary.lines == 80 and summary.blank_lines == 1 and [r["line"] for r in summary.rejected] == [11]
    assert summary.train_rows + summary.validation_rows == summary.rows == 78
    if weight:  # every training row once, and about half of them twice
        assert summary.train_rows * 1.3 < summary.train_samples < summary.train_rows * 1.7


@pytest.mark.slow
@pytest.mark.parametrize(
    "packing,trees,parquet", [(True, False, False), (False, False, False), (True, True, False), (False, True, True)]
)
def test_a_row_split_into_samples_goes_to_one_split_and_both_paths_agree(tmp_path, packing, trees, parquet):
    """Under Qwen3's template tau-bench rows become several samples each (or prefix trees); a row's
    samples all go to the same split, the counts add up, and the Ray Data and torchrun paths give the
    same sequences (one case reads the rows as OpenAI messages from a Parquet file)."""
    lines = (DATA / "taubench_airline_dev.jsonl").read_text().splitlines()[:12]
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(lines) + "\n")
    if parquet:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = [json.loads(line) for line in lines]
        messages = [{"messages": json.loads(r["input"]) + r["output"]} for r in rows]
        data = tmp_path / "rows.parquet"
        pq.write_table(pa.Table.from_pylist(messages), data)
    options = {
        "data_path": str(data),
        "model_name_or_path": "smollm2-135m-instruct",
        "options": EncodeOptions(max_seq_length=4096, trees=trees),
        "validation_split": 0.25,
        "seed": 3,
        "packing": packing,
        "chat_template": str(TEMPLATES / "Qwen-Qwen3-0.6B.jinja"),
    }
    ray_train, ray_validation, summary = on_both_paths(1, **options)
    assert summary.train_rows + summary.validation_rows == 12 and summary.validation_rows >= 1
    assert summary.samples > 12
    assert summary.split_overhead > 1.5 and summary.trained_turns == summary.samples  # one turn per sample
    sequences = summary.trees if trees else summary.samples
    if trees:  # far fewer tokens, each tree's parents and positions along
        assert summary.samples > summary.trees >= 12 and summary.tree_overhead < summary.split_overhead / 1.5
        assert all(len(row["parents"]) == len(row["input_ids"]) for row in ray_train)
    assert (summary.train_samples + summary.validation_samples) == sequences
    if not packing:
        train_lines = {row["line"] for row in ray_train}
        assert not train_lines & {row["line"] for row in ray_validation}
        assert len(ray_train) + len(ray_validation) == sequences


@pytest.mark.slow
def test_bad_lines_in_two_files_of_a_directory_are_reported_by_file_and_line_and_add_up_per_file(tmp_path):
    fireact = (DATA / "fireact_hotpotqa.jsonl").read_text().splitlines()[:30]
    fireact[4] = '{"input": "no output field"}'
    fireact[9] = ""
    taubench = (DATA / "taubench_airline_dev.jsonl").read_text().splitlines()[:4]
    taubench.insert(2, "not json")
    shards = tmp_path / "shards"
    (shards / "deep").mkdir(parents=True)
    fire, tau = shards / "fireact.jsonl", shards / "deep" / "taubench.jsonl.gz"
    fire.write_text("\n".join(fireact) + "\n")
    tau.write_bytes(gzip.compress(("\n".join(taubench) + "\n").encode()))
    rejected_file = tmp_path / "rejected_rows.jsonl"
    options = {
        "data_path": str(shards),
        "model_name_or_path": "smollm2-135m-instruct",
        "options": EncodeOptions(max_seq_length=2048),
        "validation_split": 0.2,
        "seed": 5,
        "rejected_file": rejected_file,
    }
    _, _, summary = on_both_paths(2, **options)
    assert summary.files == {
        str(fire): {"lines": 30, "blank_lines": 1, "rejected": 1, "rows": 28, "as rows": 28},
        str(tau): {"lines": 5, "rejected": 1, "rows": 4, "as rows": 4},
    }
    assert summary.lines == 35 and summary.train_rows + summary.validation_rows == summary.rows == 32
    assert [(r["file"], r["line"], r["reason"]) for r in summary.rejected] == [
        (str(tau), 3, "invalid_json"),
        (str(fire), 5, "missing_field"),
    ]
    message = summary.format_rejects()
    assert f"{tau}:3: not valid JSON" in message and f"{fire}:5: missing field(s): output" in message
    listed = [json.loads(line) for line in rejected_file.read_text().splitlines()]
    assert [(e["file"], e["line"]) for e in listed if "row_trained" not in e] == [(str(tau), 3), (str(fire), 5)]
    assert listed == sorted(listed, key=lambda e: (e["file"], e["line"]))  # every omission too, in order
    assert sum("row_trained" in e for e in listed) == sum(summary.omission_counts.values())


@pytest.mark.parametrize("packing,steps", [(False, 8), (True, 4)])
def test_a_file_sorted_by_source_is_mixed_in_every_few_steps(tmp_path, monkeypatch, packing, steps):
    """All FireAct rows, then all tau-bench rows: after the seeded shuffle every few steps of 2 sequences
    see both sources (in file order the first 20 steps would be FireAct only)."""
    fireact = (DATA / "fireact_hotpotqa.jsonl").read_text().splitlines()[:40]
    taubench = (DATA / "taubench_airline_dev.jsonl").read_text().splitlines()[:6]
    monkeypatch.chdir(tmp_path)  # the shuffle depends on the seed and the file's name as given: make both fixed
    Path("sorted.jsonl").write_text("\n".join(fireact + taubench) + "\n")
    options = EncodeOptions(max_seq_length=2048)
    train, _, summary = build_sequences("sorted.jsonl", "smollm2-135m-instruct", options, 0.1, 42, packing=packing)
    marker = load_tokenizer("smollm2-135m-instruct")("# Airline Agent Policy", add_special_tokens=False)["input_ids"]

    def sources(sequence) -> tuple[int, int]:  # (FireAct rows, tau-bench rows): every tau-bench sample has the marker
        ids, n = list(sequence["input_ids"]), len(marker)
        taubench_rows = sum(ids[i : i + n] == marker for i in range(len(ids)))
        return sequence.get("num_rows", 1) - taubench_rows, taubench_rows

    mix = [sources(sequence) for sequence in train]
    assert sum(f for f, _ in mix) >= 30 and sum(t for _, t in mix) >= 20
    size = 2 * steps
    for start in range(len(mix) - size):
        window = mix[start : start + size]
        assert sum(f for f, _ in window) and sum(t for _, t in window), f"sequences {start}-{start + size}: {window}"
    again, _, _ = build_sequences("sorted.jsonl", "smollm2-135m-instruct", options, 0.1, 42, packing=packing)
    assert [list(s["input_ids"]) for s in again] == [list(s["input_ids"]) for s in train]  # seeded: the same order


@pytest.mark.slow
def test_a_file_that_cannot_be_read_in_a_ray_data_task_is_a_one_line_error(tmp_path):
    import ray

    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(gzip.compress((DATA / "fireact_hotpotqa.jsonl").read_bytes())[:200])
    ray.init(num_cpus=1, include_dashboard=False)
    try:
        with pytest.raises(DataError) as info:
            build_datasets(str(cut), "smollm2-135m-instruct", EncodeOptions(), 0.1, 1)
    finally:
        ray.shutdown()
    assert str(info.value).startswith(f"{cut}: cannot be read (") and "\n" not in str(info.value)
    assert info.value.reason == "unreadable_file" and type(info.value) is DataError  # not Ray's wrapper


def test_mixing_weights_repeat_or_draw_training_rows_and_leave_validation_as_it_is(tmp_path, monkeypatch):
    """fire.jsonl:2 trains each of its training rows twice, at different places; more.jsonl:0.5 about
    half of its training rows, a seeded draw; validation rows stay once each; the counts say so."""
    rows = (DATA / "fireact_hotpotqa.jsonl").read_text().splitlines()[:100]
    monkeypatch.chdir(tmp_path)
    Path("fire.jsonl").write_text("\n".join(rows[:40]) + "\n")
    Path("more.jsonl").write_text("\n".join(rows[40:]) + "\n")
    args = ("fire.jsonl:2,more.jsonl:0.5", "smollm2-135m-instruct", EncodeOptions(max_seq_length=2048), 0.1, 42)
    train, validation, summary = build_sequences(*args, packing=False)
    alone = build_sequences("fire.jsonl", "smollm2-135m-instruct", args[2], 0.0, 42, packing=False)[0]
    fire_samples = {tuple(s["input_ids"]) for s in alone}  # the same rows encode to the same samples
    positions: dict[tuple, list[int]] = {}
    for position, sample in enumerate(train):
        positions.setdefault(tuple(sample["input_ids"]), []).append(position)
    copies = {"fire": [], "more": []}
    for ids, where in positions.items():
        copies["fire" if ids in fire_samples else "more"].append(where)
    assert copies["fire"] and all(len(p) == 2 for p in copies["fire"]), copies["fire"]
    assert sum(p[1] - p[0] for p in copies["fire"]) / len(copies["fire"]) > len(train) / 5  # shuffled apart
    assert all(len(p) == 1 for p in copies["more"])
    more_train_rows = 60 - sum(file == "more.jsonl" for file, _ in summary.validation_lines)
    assert 0.3 * more_train_rows < len(copies["more"]) < 0.7 * more_train_rows
    assert summary.unsampled_rows == more_train_rows - len(copies["more"])
    assert summary.train_samples == len(train) == 2 * len(copies["fire"]) + len(copies["more"])
    assert summary.files["fire.jsonl"]["train_samples"] == 2 * len(copies["fire"])
    assert len(validation) == summary.validation_rows == summary.validation_samples
    assert len({tuple(s["input_ids"]) for s in validation}) == len(validation)  # once each
    again, _, _ = build_sequences(*args, packing=False)
    assert [list(s["input_ids"]) for s in again] == [list(s["input_ids"]) for s in train]  # seeded
