"""Faults injected for real into workflows/train.py runs on a local Ray with a tiny model (slow).

Each test kills real processes, corrupts real files or fills a real device, then checks what the
run did and that nothing but the steps since the last checkpoint was lost.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from conftest import COMMON, DATA, REPO, losses, save_tiny_model, train, train_command, train_env

from sftcore.checkpoint import checkpoint_problem, checkpoint_step, newest_checkpoint
from sftcore.storage import StoragePath
from sftcore.tracking import ROLLED_BACK_FILE, read_metrics, stable_run_id

pytestmark = pytest.mark.slow

# 16 steps of 2 FireAct trajectories, checkpoints at 4, 8, 12: slow enough (~0.3 s a step) to be hit mid-run.
RUN = [
    "--data_path",
    str(DATA / "fireact_hotpotqa.jsonl"),
    "--num-workers",
    "1",
    "--max_steps",
    "16",
    "--save_steps",
    "4",
    "--per_device_batch_size",
    "2",
    *COMMON,
    "--max_seq_length",
    "1024",  # the last value of a flag wins: this overrides COMMON's
]


def run_args(model: str, *extra: str) -> list[str]:
    return [*RUN, "--model_name_or_path", model, "--report_to", "none", *extra]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model) -> Path:
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = train(out, *run_args(tiny_model))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def launch(output_dir: Path, args: list[str], env: dict | None = None) -> tuple[subprocess.Popen, Path]:
    log = output_dir.parent / f"{output_dir.name}.log"
    with log.open("w") as f:
        proc = subprocess.Popen(
            train_command(output_dir, *args), cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=train_env(env)
        )
    return proc, log


def logged_steps(output_dir: Path) -> list[int]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line being written right now
            steps.append(json.loads(line)["step"])
    return steps


def wait_for_step(output_dir: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while max(logged_steps(output_dir), default=0) < step:
        assert proc.poll() is None, f"run ended before step {step}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {step} after {timeout}s"
        time.sleep(0.05)


def command_of(process: psutil.Process) -> str:
    try:
        return " ".join(process.cmdline())
    except psutil.Error:
        return ""


def kill_leftovers(processes: list[psutil.Process]) -> None:
    for p in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()


def assert_same_losses(output_dir: Path, reference: Path) -> None:
    got, expected = losses(output_dir), losses(reference)  # losses() also fails on a step logged twice
    assert sorted(got) == list(range(1, 17))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step


def test_a_killed_worker_restarts_from_the_newest_checkpoint(tmp_path, tiny_model, reference):
    out = tmp_path / "run"
    proc, log = launch(out, run_args(tiny_model, "--max_failures", "1"))
    try:
        wait_for_step(out, 6, proc, log)  # checkpoint-4 is registered before step 5 starts
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "RayTrainWorker" in command_of(p)]
        assert workers, "no train worker process found"
        killed_at = max(logged_steps(out))
        for worker in workers:
            worker.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        proc.kill()

    assert_same_losses(out, reference)
    rolled_back = [json.loads(line) for line in (out / ROLLED_BACK_FILE).read_text().splitlines()]
    assert rolled_back, "the steps trained twice were not marked"
    assert all(r["step"] > r["rolled_back_to_step"] and r["rolled_back_to_step"] % 4 == 0 for r in rolled_back)
    assert max(r["step"] for r in rolled_back) >= killed_at
    assert "resumed from" in log.read_text()
    assert (out / "final" / "model.safetensors").exists()


def test_a_killed_driver_reruns_into_the_same_run(tmp_path, tiny_model, reference):
    out = tmp_path / "run"
    home = tmp_path / "home"  # no wandb credentials: offline, under out/wandb
    home.mkdir()
    env = {"HOME": str(home), "WANDB_API_KEY": None, "WANDB_MODE": None}
    args = [*RUN, "--model_name_or_path", tiny_model, "--report_to", "wandb"]
    proc, log = launch(out, args, env)
    try:
        wait_for_step(out, 6, proc, log)
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        time.sleep(3)  # let the workers notice the raylet is gone
    finally:
        proc.kill()
        kill_leftovers(ray_processes)  # Ray's dashboard and runtime-env agents outlive a SIGKILLed driver
    assert not (out / "final").exists()

    again = train(out, *args, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "continuing from" in again.stderr
    assert_same_losses(out, reference)
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2, run_dirs
    assert {d.name.rsplit("-", 1)[1] for d in run_dirs} == {stable_run_id(str(out)).rsplit("-", 1)[1]}


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_torn_and_corrupted_checkpoints_are_skipped_for_the_previous_one(tmp_path, tiny_model, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    flip_byte(out / "final" / "model.safetensors")  # bit rot: same size, wrong bytes
    model = out / "checkpoint-12" / "model.safetensors"
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # a copy cut short by a crash
    torn = out / "checkpoint-20"  # a crash early in the upload of a later checkpoint: no manifest yet
    torn.mkdir()
    shutil.copy(out / "checkpoint-8" / "config.json", torn)

    result = train(out, *run_args(tiny_model))
    assert result.returncode == 0, result.stderr[-3000:]
    for name, why in (("checkpoint-20", "no manifest.json"), ("final", "sha256 mismatch"), ("checkpoint-12", "bytes")):
        assert f"skipping checkpoint {out / name}" in result.stderr and why in result.stderr, name
    assert f"continuing from {out / 'checkpoint-8'} (step 8)" in result.stderr
    assert_same_losses(out, reference)


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_the_previous_one_survives(
    tmp_path, tiny_model, reference
):
    out = tmp_path / "run"
    (out / "checkpoint-8").mkdir(parents=True)
    (out / "checkpoint-8" / "model.safetensors").symlink_to("/dev/full")  # every write: ENOSPC

    failed = train(out, *run_args(tiny_model))
    assert failed.returncode == 1
    stderr = failed.stderr.splitlines()
    last_lines = stderr[stderr.index("error: training failed") :][:3]
    assert f"could not write checkpoint {out / 'checkpoint-8'}" in last_lines[1]
    assert "No space left on device" in last_lines[1]
    assert last_lines[2] == f"rerun the same command to continue from {out / 'checkpoint-4'}"

    (out / "checkpoint-8" / "model.safetensors").unlink()  # space freed
    again = train(out, *run_args(tiny_model))
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"continuing from {out / 'checkpoint-4'} (step 4)" in again.stderr
    assert_same_losses(out, reference)


POISON = " photosynthesis"  # one token in SmolLM2's vocabulary; its embedding is inf in the poisoned model


def nan_rows(path: Path, count: int, poisoned: set[int]) -> str:
    rows = [
        {
            "input": f"Question {i}: what is {i} + {i}?" + (f" Mention{POISON}." if i in poisoned else ""),
            "output": f"Thought: add them.\nThe answer is {2 * i}.",
        }
        for i in range(count)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def poisoned_model(tmp_path_factory, smollm2_tokenizer):
    (token_id,) = smollm2_tokenizer.encode(POISON, add_special_tokens=False)
    return save_tiny_model(tmp_path_factory.mktemp("poisoned"), smollm2_tokenizer, poisoned_token_id=token_id)


NAN_RUN = [
    "--packing",
    "false",  # one row per step, so each poisoned row is exactly one bad step
    "--use_lora",
    "--per_device_batch_size",
    "1",
    "--validation_split",
    "0",
    "--max_seq_length",
    "256",
    "--num_epochs",
    "1",
    "--save_steps",
    "5",
]

SECRETS = {
    "WANDB_API_KEY": "local-0123456789abcdef0123456789abcdef01234567",
    "HF_TOKEN": "hf_SeCrEtToKeNnotforlogs123",
    "AWS_SECRET_ACCESS_KEY": "aws/SeCrEt+KeY/not+for+logs",
}


def test_non_finite_steps_are_skipped_and_counted_and_no_secret_is_written(tmp_path, poisoned_model):
    data = nan_rows(tmp_path / "rows.jsonl", 20, poisoned={3, 9, 15})
    out = tmp_path / "run"
    env = {"WANDB_MODE": "offline", "HOME": str(tmp_path), **SECRETS}
    result = train(out, "--data_path", data, "--model_name_or_path", poisoned_model, *NAN_RUN, env=env)
    assert result.returncode == 0, result.stderr[-3000:]

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20
    assert sum(not math.isfinite(r["loss"]) for r in rows) == 3
    assert rows[-1]["skipped_steps"] == 3
    assert json.loads((out / "final" / "trainer_state.json").read_text())["skipped_steps"] == 3
    from safetensors.torch import load_file

    for adapter in out.glob("*/adapter/adapter_model.safetensors"):
        assert all(t.isfinite().all() for t in load_file(adapter).values()), adapter

    assert list((out / "wandb").glob("offline-run-*"))
    for path in (p for p in out.rglob("*") if p.is_file()):
        content = path.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in content, f"{name} leaked into {path}"


def test_too_many_consecutive_non_finite_steps_stop_the_run_before_a_checkpoint(tmp_path, poisoned_model):
    data = nan_rows(tmp_path / "rows.jsonl", 20, poisoned=set(range(20)))
    out = tmp_path / "run"
    args = ["--data_path", data, "--model_name_or_path", poisoned_model, *NAN_RUN, "--report_to", "none"]
    result = train(out, *args, "--max_bad_steps", "2")
    assert result.returncode == 1
    assert "NonFiniteLossError: 3 consecutive steps (up to step 3) had a non-finite loss" in result.stderr
    assert "no checkpoint was saved yet" in result.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "final").exists()


# --- bad input at scale ---


def hostile_lines(count: int) -> tuple[list[bytes], dict[int, str]]:
    """~1% hostile lines among good ones; returns the lines and {line number: expected reason}."""
    good = json.dumps({"input": "What is 2 + 2?", "output": "4"}).encode()
    hostile = [
        (b'{"input": "cut', "invalid_json"),
        (json.dumps({"input": 5, "output": "x"}).encode(), "bad_type"),
        (json.dumps({"input": "hi", "output": 7}).encode(), "bad_type"),
        (json.dumps({"input": "hi", "output": [{"role": "assistant", "content": 3}]}).encode(), "invalid_row"),
        (b'{"input": "caf\xe9", "output": "x"}', "invalid_utf8"),
        (b'{"input": "nul \x00 byte", "output": "x"}', "invalid_json"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid_json"),
        (json.dumps({"input": "hi", "output": [{"role": "wizard", "content": "x"}]}).encode(), "unknown_role"),
        (json.dumps({"input": "hi", "output": []}).encode(), "no_assistant"),
        (json.dumps({"input": "[]", "output": "x"}).encode(), "empty_input"),
        (json.dumps({"input": "hi", "output": [{"role": "user", "content": "only masked"}]}).encode(), "no_assistant"),
        (json.dumps({"input": "hi " * 1_500_000, "output": "x"}).encode(), "too_long"),  # a 4.5 MB line
        (b"x" * 3_000_000, "invalid_json"),
        (b'"a string, not an object"', "bad_type"),
        (json.dumps({"output": "x"}).encode(), "missing_field"),
    ]
    lines, expected = [], {}
    for number in range(1, count + 1):
        if number % 100 == 50:
            line, reason = hostile[(number // 100) % len(hostile)]
            expected[number] = reason
            lines.append(line)
        elif number % 1000 == 7:
            lines.append(b"   ")  # blank lines are counted, not rejected
        else:
            lines.append(good)
    return lines, expected


def data_summary(stderr: str) -> dict[str, int]:
    line = next(line for line in stderr.splitlines() if line.startswith("data: "))
    words = line.split("data:", 1)[1].replace("(", " ").replace(")", " ").replace(",", " ").split()
    numbers = {}
    for i, word in enumerate(words[1:], start=1):
        if words[i - 1].isdigit() and word in ("lines", "blank", "rejected", "validation", "train"):
            numbers[word] = int(words[i - 1])
    return numbers


def test_ten_thousand_rows_with_hostile_ones_are_all_accounted_for(tmp_path, tiny_model):
    lines, expected = hostile_lines(10_000)
    data = tmp_path / "rows.jsonl"
    data.write_bytes(b"\n".join(lines) + b"\n")
    blank = sum(1 for line in lines if not line.strip())
    args = ["--data_path", str(data), "--model_name_or_path", tiny_model, "--report_to", "none"]
    args += ["--max_steps", "2", "--max_seq_length", "512", "--per_device_batch_size", "2"]

    stopped = train(tmp_path / "stopped", *args)
    assert stopped.returncode == 2, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    bad = {number: reason for number, reason in expected.items() if reason != "too_long"}  # too long is not bad
    counts = Counter(bad.values())
    header = f"error: {len(bad)} bad row(s) in {data} ("
    assert header + ", ".join(f"{r}: {n}" for r, n in sorted(counts.items())) + ")" in stopped.stderr
    for number, reason in bad.items():
        assert f"{data}:{number}: " in stopped.stderr and f"[{reason}]" in stopped.stderr
    assert not list((tmp_path / "stopped").glob("checkpoint-*"))

    skipped = train(tmp_path / "skipped", *args, "--on_bad_rows", "skip")
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    rejected = [json.loads(line) for line in (tmp_path / "skipped" / "rejected_rows.jsonl").read_text().splitlines()]
    assert {r["line"]: r["reason"] for r in rejected} == expected
    assert all(r["text"] for r in rejected)  # the rejected row itself is kept, for fixing
    summary = data_summary(skipped.stderr)
    good = len(lines) - blank - len(expected)
    assert summary["lines"] == len(lines) and summary["blank"] == blank and summary["rejected"] == len(expected)
    assert summary["train"] + summary["validation"] == good


# --- bad paths: one line, no traceback, before Ray starts ---


def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    """train.py as an unprivileged user (root reads and writes anything, whatever the permissions)."""
    command = [*NOBODY, *train_command(*args)]
    env = train_env({"HOME": "/tmp"})
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)


def nobody_can_run_this_checkout() -> bool:
    """False for a checkout inside a folder private to root (e.g. one made by mktemp -d)."""
    check = [*NOBODY, sys.executable, "-c", f"open({str(REPO / 'workflows' / 'train.py')!r})"]
    return subprocess.run(check, capture_output=True).returncode == 0


def test_unusable_paths_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert one_line_error(train(tmp_path / "o1", "--data_path", str(empty))) == (
        f"error: {empty}: no rows (the file is empty)"
    )
    assert one_line_error(train(tmp_path / "o2", "--data_path", str(tmp_path))) == (
        f"error: {empty}: no rows (the file is empty)"  # the directory's only JSONL file
    )
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    data = nan_rows(tmp_path / "rows.jsonl", 4, set())
    assert one_line_error(train(blocker / "out", "--data_path", data)).startswith(
        f"error: --output_dir {blocker / 'out'} is not writable"
    )

    if os.geteuid() == 0 and shutil.which("setpriv") and nobody_can_run_this_checkout():
        shared = Path(tempfile.mkdtemp(prefix="sftcore-perm-"))  # pytest's tmp dirs are private to root
        try:
            shared.chmod(0o755)
            secret = shared / "secret.jsonl"
            secret.write_text(Path(data).read_text())
            secret.chmod(0o600)
            assert one_line_error(as_nobody(shared / "out", "--data_path", str(secret))) == (
                f"error: {secret}: cannot be read (Permission denied)"
            )
            readable = shared / "rows.jsonl"
            readable.write_text(Path(data).read_text())
            readable.chmod(0o644)
            locked = shared / "locked"
            locked.mkdir(mode=0o755)
            assert one_line_error(as_nobody(locked / "out", "--data_path", str(readable))) == (
                f"error: --output_dir {locked / 'out'} is not writable (Permission denied)"
            )
        finally:
            shutil.rmtree(shared)


def test_a_run_in_a_bucket_is_killed_then_resumes_from_the_bucket_and_writes_final_there(
    tmp_path, tiny_model, s3_bucket
):
    """--data_path s3://.../*.jsonl --output_dir s3://.../run on a real S3 server: Ray Train uploads the
    checkpoints (in the background), the driver is killed mid-run, and the same command continues from
    the newest checkpoint in the bucket and writes final/ there, with the losses of an uninterrupted run."""
    client, bucket = s3_bucket
    rows = (DATA / "fireact_hotpotqa.jsonl").read_text().splitlines()
    for part, lines in enumerate((rows[:20], rows[20:])):
        client.put_object(Bucket=bucket, Key=f"data/part-{part}.jsonl", Body="\n".join(lines).encode())
    run = StoragePath.of(f"s3://{bucket}/runs/first")
    args = [*RUN, "--data_path", f"s3://{bucket}/data/*.jsonl", "--model_name_or_path", tiny_model]
    args += ["--report_to", "none", "--output_dir", run.uri]  # the last --output_dir wins
    proc, log = launch(tmp_path / "launch", args)
    try:
        deadline = time.monotonic() + 300
        while newest_checkpoint(run) is None or checkpoint_step(newest_checkpoint(run)) < 8:
            assert proc.poll() is None, f"run ended before checkpoint-8 was stored:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint-8 in the bucket after 300s"
            time.sleep(0.2)
        ray_processes = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        time.sleep(3)
    finally:
        proc.kill()
        kill_leftovers(ray_processes)
    assert not (run / "final").exists()

    again = train(tmp_path / "launch", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    resumed_from = newest_checkpoint(run)  # final/ now; the line names the checkpoint it continued from
    assert resumed_from == run / "final"
    assert f"continuing from {run}/checkpoint-" in again.stderr
    assert checkpoint_problem(run / "final") is None  # hashes too, read back from the bucket
    assert (run / "final" / "model.safetensors").is_file()
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == list(range(1, 17))  # each step once, across both launches
    assert (run / "train_config.yaml").is_file()
    reference = train(tmp_path / "reference", *args[:-1], str(tmp_path / "reference"))  # same data, uninterrupted
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = losses(tmp_path / "reference")
    for step, loss in ((r["step"], r["loss"]) for r in read_metrics(run) if "loss" in r):
        assert loss == pytest.approx(expected[step], rel=1e-5), step
    assert not (REPO / "s3:").exists() and not (tmp_path / "launch").exists()  # nothing of the run written locally
    assert f"model: {run}/final" in again.stdout
