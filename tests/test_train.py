"""workflows/train.py end to end on a real local Ray with a tiny random model (slow: real processes)."""

from __future__ import annotations

import gzip
import json
import math
import re
from pathlib import Path

import pytest
from conftest import COMMON, DATA, REPO, losses, train, write_rows
from transformers import AutoTokenizer

from sftcore.dataset import validation_threshold
from sftcore.sources import line_key
from sftcore.tracking import read_metrics

pytestmark = pytest.mark.slow


def test_two_workers_train_like_one_with_the_same_global_batch_and_the_saved_config_reruns_it(tmp_path, tiny_model):
    data = write_rows(tmp_path / "rows.jsonl", 4)  # one global batch of 4 rows: every step sees all of them
    base = ["--data_path", data, "--model_name_or_path", tiny_model, "--max_steps", "3", "--save_steps", "100", *COMMON]
    base += ["--packing", "false"]  # rows, not packs: the batch is the 4 rows
    home = tmp_path / "home"  # no wandb credentials here: the run must go offline, not prompt
    home.mkdir()
    one = train(
        tmp_path / "one",
        *base,
        "--num-workers",
        "1",
        "--per_device_batch_size",
        "4",
        "--report_to",
        "wandb",
        env={"HOME": str(home), "WANDB_API_KEY": None, "WANDB_MODE": None},
    )
    assert one.returncode == 0, one.stderr[-3000:]
    two = train(tmp_path / "two", *base, "--num_workers", "2", "--per_device_batch_size", "2", "--report_to", "none")
    assert two.returncode == 0, two.stderr[-3000:]
    # two workers sharing each batch of 4 rows (sequence parallelism): one worker's losses
    shared = train(
        tmp_path / "shared", *base, "--num-workers", "2", "--sequence_parallel", "2", "--per_device_batch_size", "4"
    )
    assert shared.returncode == 0, shared.stderr[-3000:]
    accum = train(
        tmp_path / "accum",
        *base,
        "--num-workers",
        "1",
        "--per_device_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "4",
        "--report_to",
        "none",
    )
    assert accum.returncode == 0, accum.stderr[-3000:]

    # The resolved config a run saves reproduces it (a new output_dir given as a flag overrides the file's).
    again = train(tmp_path / "again", "--config", str(tmp_path / "accum" / "train_config.yaml"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert losses(tmp_path / "again") == losses(tmp_path / "accum")

    reference = losses(tmp_path / "one")
    assert sorted(reference) == [1, 2, 3]
    assert reference[3] < reference[1]  # it learns
    for other in (losses(tmp_path / "two"), losses(tmp_path / "shared"), losses(tmp_path / "accum")):
        assert other.keys() == reference.keys()
        for step in reference:
            assert other[step] == pytest.approx(reference[step], rel=1e-4)
    assert list((tmp_path / "one" / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    # Each step says how long it took, how much of that it waited for data and its peak memory; a CPU
    # has no known peak FLOP/s, so no MFU is made up.
    for row in (r for r in read_metrics(tmp_path / "one") if "loss" in r):
        assert 0 <= row["data_wait_seconds"] < row["step_seconds"]
        assert 0.1 < row["peak_memory_gb"] < 24 and "mfu" not in row
    assert (tmp_path / "one" / "loss_curve.png").stat().st_size > 0


def test_stop_and_resume_matches_an_uninterrupted_run_and_final_loads(tmp_path, tiny_model):
    data = write_rows(tmp_path / "rows.jsonl", 12)
    base = [
        "--data_path",
        data,
        "--model_name_or_path",
        tiny_model,
        "--use_lora",
        "--lora_r",
        "4",
        "--per_device_batch_size",
        "2",
        "--save_steps",
        "2",
        "--save_total_limit",
        "2",
        "--report_to",
        "none",
        *COMMON,
    ]
    whole = train(tmp_path / "whole", *base, "--max_steps", "8")
    assert whole.returncode == 0, whole.stderr[-3000:]
    # the stopped run shares each pack between 2 workers (sequence parallelism): the same packs and losses
    shared = ["--num-workers", "2", "--sequence_parallel", "2"]
    first = train(tmp_path / "resumed", *base, *shared, "--max_steps", "5")
    assert first.returncode == 0, first.stderr[-3000:]
    second = train(tmp_path / "resumed", *base, *shared, "--max_steps", "8")  # same output dir: continues from 5
    assert second.returncode == 0, second.stderr[-3000:]
    assert "continuing from" in second.stderr

    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
    assert sorted(got) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step

    out = tmp_path / "resumed"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # newest 2 kept
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = out / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, return_dict=True, return_tensors="pt"
    )
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 4
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), final / "adapter")
    assert sum("lora_" in name for name, _ in adapted.named_parameters()) > 0

    # another data plan would replay other rows from the saved position: refused, naming what changed
    base[base.index("--per_device_batch_size") + 1] = "1"
    changed = train(tmp_path / "resumed", *base, *shared, "--max_steps", "10", "--gradient_accumulation_steps", "2")
    assert changed.returncode == 2 and "Traceback" not in changed.stderr
    assert changed.stderr.strip().splitlines()[-1] == (
        f"error: {final} was written with --per_device_batch_size 2 (now 1), --gradient_accumulation_steps 1 "
        "(now 2): its place in the data counts batches of that plan; continue it with the same values, or pass a "
        "new --output_dir"
    )


def test_bad_rows_stop_before_training_or_are_skipped_and_written(tmp_path, tiny_model):
    data = tmp_path / "rows.jsonl"
    write_rows(data, 6)
    with data.open("a") as f:
        f.write('{"input": "x"}\nnot json\n')
    base = [
        "--data_path",
        str(data),
        "--model_name_or_path",
        tiny_model,
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--per_device_batch_size",
        "2",
        *COMMON,
    ]
    stopped = train(tmp_path / "stopped", *base)
    assert stopped.returncode == 2
    assert f"{data}:7: missing field(s): output" in stopped.stderr and f"{data}:8: not valid JSON" in stopped.stderr
    assert "Traceback" not in stopped.stderr and not (tmp_path / "stopped" / "final").exists()

    skipped = train(tmp_path / "skipped", *base, "--on_bad_rows", "skip", "--chat_template", "chatml")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    rejected = [json.loads(line) for line in (tmp_path / "skipped" / "rejected_rows.jsonl").read_text().splitlines()]
    assert [(r["line"], r["reason"]) for r in rejected] == [(7, "missing_field"), (8, "invalid_json")]
    assert "6 train rows" in skipped.stderr
    # --chat_template is what the run trained with, and what final/'s tokenizer renders with
    shipped = (REPO / "sftcore" / "chat_templates" / "chatml.jinja").read_text()
    assert AutoTokenizer.from_pretrained(tmp_path / "skipped" / "final").chat_template == shipped


def test_shards_in_a_bucket_train_with_each_bad_line_named_by_its_uri_and_line(tmp_path, tiny_model, s3_bucket):
    """--data_path s3://.../*.jsonl* on a real S3 server: Ray Data's read tasks read the shards (one gzipped)
    and the run names a bad line in each by its URI and line number, with per-file counts."""
    client, bucket = s3_bucket
    rows = Path(write_rows(tmp_path / "rows.jsonl", 12)).read_text().splitlines()
    client.put_object(Bucket=bucket, Key="run1/a.jsonl", Body="\n".join([*rows[:6], "not json"]).encode())
    gzipped = gzip.compress("\n".join([*rows[6:9], "", *rows[9:], '{"input": "x"}']).encode())
    client.put_object(Bucket=bucket, Key="run1/b.jsonl.gz", Body=gzipped)
    args = ["--data_path", f"s3://{bucket}/run1/*.jsonl*", "--model_name_or_path", tiny_model, *COMMON]
    result = train(tmp_path / "out", *args, "--max_steps", "1", "--report_to", "none", "--on_bad_rows", "skip")
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = f"s3://{bucket}/run1/a.jsonl", f"s3://{bucket}/run1/b.jsonl.gz"
    assert f"{a}:7: not valid JSON" in result.stderr and f"{b}:8: missing field(s): output" in result.stderr
    assert f"{a}: 7 lines (0 blank, 1 rejected, 6 rows)" in result.stderr
    assert f"{b}: 8 lines (1 blank, 1 rejected, 6 rows)" in result.stderr
    assert "12 train rows" in result.stderr
    rejected = [json.loads(line) for line in (tmp_path / "out" / "rejected_rows.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["reason"]) for r in rejected] == [(a, 7, "invalid_json"), (b, 8, "missing_field")]


def test_long_agent_runs_train_at_1024_tokens_with_default_flags_and_report_what_did_not_fit(tmp_path, tiny_model):
    """tau-bench rows run to several thousand tokens and their system prompt alone is ~1,340: with the
    default --overflow window every turn still trains (without the system prompt), and the run says so."""
    out = tmp_path / "run"
    data = DATA / "taubench_airline_dev.jsonl"
    args = ["--data_path", str(data), "--model_name_or_path", tiny_model, "--max_seq_length", "1024"]
    generate = ["--eval_generate_rows", "2", "--eval_max_new_tokens", "4"]  # next-action scores at the end
    result = train(out, *args, "--max_steps", "2", "--report_to", "none", *generate)
    assert result.returncode == 0, result.stderr[-3000:]
    held_out = [n for n in range(1, 61) if line_key(42, str(data), n) < validation_threshold(0.1)]
    assert f"0 rejected) -> {60 - len(held_out)} train rows, {len(held_out)} validation rows" in result.stderr
    # every assistant turn of the first 2 validation rows was generated and scored
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    held_out = held_out[:2]
    assistant = [m for line in held_out for m in rows[line - 1]["output"] if m["role"] == "assistant"]
    (scored,) = [r for r in read_metrics(out) if "eval_turns" in r]
    assert scored["eval_turns"] == len(assistant)
    assert scored["eval_tool_call_turns"] == sum(bool(m.get("tool_calls")) for m in assistant)
    assert 0 <= scored["eval_tool_name_accuracy"] <= 1 and 0 <= scored["eval_stop_rate"] <= 1
    assert f"next action on {len(assistant)} turns" in result.stdout + result.stderr
    assert "790 turns trained, 790 of them with a shortened history, 0 did not fit 1024 tokens" in result.stderr
    assert "system_prompt_left_out: 790 in 60 row(s)" in result.stderr
    listed = [json.loads(line) for line in (out / "rejected_rows.jsonl").read_text().splitlines()]
    assert all(entry["row_trained"] for entry in listed)
    left_out = [entry for entry in listed if entry["reason"] == "system_prompt_left_out"]
    assert len(left_out) == 790 and {entry["line"] for entry in left_out} == set(range(1, 61))
    # the tiny model's template (SmolLM2's) renders no tool calls: each row with calls says so, once
    fallback = [entry["line"] for entry in listed if entry["reason"] == "template_no_native_tool_calls"]
    with_calls = [n for n, row in enumerate(rows, 1) if any(m.get("tool_calls") for m in row["output"])]
    assert sorted(fallback) == with_calls and len(listed) == len(left_out) + len(fallback)
    assert (out / "final" / "manifest.json").exists()


def test_gpt_oss_trains_with_default_flags_through_the_product_path(tmp_path, smollm2_tokenizer):
    """gpt-oss (attention sinks, sliding windows, experts), which transformers' sdpa refuses and whose
    own masks ignore packed position ids: auto trains it packed with its own eager attention per
    sample (tests/test_zoo.py checks the losses, and LoRA's steps); here the run itself."""
    import torch
    from transformers import AutoModelForCausalLM, GptOssConfig

    model = tmp_path / "gpt-oss"
    torch.manual_seed(0)
    config = GptOssConfig(
        vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=64, pad_token_id=smollm2_tokenizer.pad_token_id, eos_token_id=smollm2_tokenizer.eos_token_id,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(model)
    smollm2_tokenizer.save_pretrained(model)
    data = write_rows(tmp_path / "rows.jsonl", 8)
    args = ["--data_path", data, "--model_name_or_path", str(model), "--max_steps", "3", "--report_to", "none"]
    result = train(tmp_path / "out", *args, *COMMON)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = losses(tmp_path / "out")
    assert sorted(steps) == [1, 2, 3] and all(math.isfinite(loss) for loss in steps.values())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "final").config.model_type == "gpt_oss"


def test_missing_data_file_is_one_line(tmp_path):
    result = train(tmp_path / "out", "--data_path", str(tmp_path / "nope.jsonl"), "--report_to", "none")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nope.jsonl'}: no such file"


def test_more_workers_than_a_local_ray_can_place_is_one_line_not_a_hang(tmp_path, tiny_model):
    data = write_rows(tmp_path / "rows.jsonl", 4)
    args = ["--data_path", data, "--model_name_or_path", tiny_model, "--report_to", "none", "--num-workers", "64"]
    result = train(tmp_path / "out", *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert re.fullmatch(
        r"error: --num-workers 64 needs 1 CPU per worker, and this Ray cluster's nodes hold \d+ such worker\(s\): "
        r"lower --num-workers \(or --cpus_per_worker / --gpus_per_worker\)",
        result.stderr.strip().splitlines()[-1],
    )


def test_a_packed_kernel_asked_for_a_model_it_does_not_compute_is_one_line_before_ray(tmp_path, tiny_model):
    import shutil

    from transformers import Gemma2Config

    gemma = tmp_path / "gemma2"
    shutil.copytree(tiny_model, gemma)
    Gemma2Config(vocab_size=64, hidden_size=32, num_hidden_layers=2, sliding_window=16).save_pretrained(gemma)
    data = write_rows(tmp_path / "rows.jsonl", 4)
    args = ["--data_path", data, "--model_name_or_path", str(gemma), "--report_to", "none"]
    result = train(tmp_path / "out", *args, "--attn_implementation", "packed_sdpa")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --model_name_or_path {gemma}: --attn_implementation packed_sdpa does not compute this model's "
        "attention-logit soft-capping and a 16-token sliding window: use --attn_implementation auto, which picks "
        "transformers' attention for it"
    )
    result = train(tmp_path / "out", *args, "--num-workers", "3", "--sequence_parallel", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: --sequence_parallel 2 must divide --num-workers 3: each group of that many workers shares its packs"
    )
    # transformers' own attention builds its masks for a worker's slice: refused with sequence parallelism
    shared = ["--num-workers", "2", "--sequence_parallel", "2", "--attn_implementation", "eager"]
    result = train(tmp_path / "out", *args, *shared)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --model_name_or_path {gemma}: --sequence_parallel runs with --attn_implementation packed_sdpa, "
        "packed_varlen or packed_eager (or auto), not eager"
    )


def test_a_model_without_chat_template_or_tokenizer_is_one_line_before_ray(tmp_path, tiny_model):
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(tiny_model, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    (bare / "chat_template.jinja").unlink(missing_ok=True)
    data = write_rows(tmp_path / "rows.jsonl", 4)
    result = train(tmp_path / "out", "--data_path", data, "--model_name_or_path", str(bare), "--report_to", "none")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --model_name_or_path {bare}: the tokenizer has no chat template; use an instruct/chat model or "
        "pass --chat_template (a Jinja file, or 'chatml')"
    )
    missing = tmp_path / "no-model"
    result = train(tmp_path / "out", "--data_path", data, "--model_name_or_path", str(missing), "--report_to", "none")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"error: --model_name_or_path {missing}: cannot load its tokenizer")
    )


RAY_NOISE = [
    "PlacementGroupCleaner",
    "Failed to query Ray Train Controller",
    "core_worker.cc",
    "gcs_actor_scheduler",
    "Failed to kill actor",
    "has constructor arguments in the object store",
    "Execution plan",
    "Starting execution of Dataset",
    "execution finished",
    "Progress bars disabled",
    "RayTrainWorker pid=",
    "TrainController pid=",
    "deprecated",
    "Warning:",
    "Loading weights",
    "Writing model shards",
    "wandb: Run history",
    "Token authentication",
    "Traceback",
]


def test_default_console_is_quiet_one_line_per_step_and_evaluation_then_a_summary(tmp_path, tiny_model):
    """The README demo's shape (sample rows, LoRA, evaluation, wandb offline) at the default verbosity:
    none of Ray's or the libraries' own lines, one line per step and per evaluation, and a summary."""
    home = tmp_path / "home"
    home.mkdir()
    data = REPO / "examples" / "sample_trajectories.jsonl"
    args = ["--data_path", str(data), "--model_name_or_path", tiny_model, "--use_lora", "--max_steps", "6"]
    args += ["--save_steps", "3", "--max_seq_length", "512", "--per_device_batch_size", "1"]
    result = train(tmp_path / "run", *args, env={"HOME": str(home), "WANDB_API_KEY": None, "WANDB_MODE": None})
    assert result.returncode == 0, result.stderr[-3000:]
    console = (result.stdout + result.stderr).splitlines()
    for noise in RAY_NOISE:
        assert not [line for line in console if noise in line], noise
    assert len(console) <= 30, "\n".join(console)
    steps = [line for line in console if line.startswith("step ") and " loss " in line]
    assert [line.split()[1] for line in steps] == [f"{n}/6" for n in range(1, 7)]
    assert sum(" eval_loss " in line for line in console) == 2
    assert any(line.startswith("warning: wandb: no API key") for line in console)  # a worker's warning reached us
    assert "done: 6 steps" in result.stdout and f'from_pretrained("{tmp_path / "run" / "final"}")' in result.stdout
