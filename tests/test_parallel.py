"""FSDP2 against DDP on 2 CPU workers (gloo), and the same loop under torchrun without Ray (slow: real processes)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import COMMON, REPO, losses, train, train_env, write_rows
from transformers import AutoModelForCausalLM

from sftcore.checkpoint import MANIFEST, checkpoint_problem, read_trainer_state
from sftcore.parallel import SHARDED_DIR
from sftcore.tracking import read_metrics

pytestmark = pytest.mark.slow


def full_run_args(data: str, model: str) -> list[str]:
    args = ["--data_path", data, "--model_name_or_path", model, "--num-workers", "2", "--per_device_batch_size", "1"]
    return [*args, "--max_steps", "6", "--save_steps", "2", "--report_to", "none", *COMMON]


def weights(directory) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


def test_fsdp_trains_like_ddp_checkpoints_shards_resumes_and_writes_one_hf_model(tmp_path, tiny_model):
    args = full_run_args(write_rows(tmp_path / "rows.jsonl", 16), tiny_model)
    ddp = train(tmp_path / "ddp", *args)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    fsdp = train(tmp_path / "fsdp", *args, "--strategy", "fsdp")
    assert fsdp.returncode == 0, fsdp.stderr[-3000:]

    reference = losses(tmp_path / "ddp")
    assert sorted(reference) == [1, 2, 3, 4, 5, 6]
    sharded = losses(tmp_path / "fsdp")
    for step in reference:
        assert sharded[step] == pytest.approx(reference[step], rel=1e-4)

    # every worker wrote its shard; one manifest covers them all
    checkpoint = tmp_path / "fsdp" / "checkpoint-4"
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    assert {f"{SHARDED_DIR}/__0_0.distcp", f"{SHARDED_DIR}/__1_0.distcp", f"{SHARDED_DIR}/.metadata"} <= set(manifest)
    assert "model.safetensors" not in manifest  # intermediate checkpoints stay sharded
    assert checkpoint_problem(checkpoint) is None

    # final/ is one consolidated HF model (tied embeddings stored once, like DDP's) equal to DDP's weights
    ddp_final, fsdp_final = tmp_path / "ddp" / "final", tmp_path / "fsdp" / "final"
    size = (ddp_final / "model.safetensors").stat().st_size
    assert (fsdp_final / "model.safetensors").stat().st_size == pytest.approx(size, rel=0.01)
    expected = weights(ddp_final)
    for name, tensor in weights(fsdp_final).items():
        torch.testing.assert_close(tensor, expected[name], rtol=1e-4, atol=1e-5, msg=name)

    # lose the end of the run: the rerun continues from the sharded checkpoint-4 and retrains 5-6 identically
    shutil.rmtree(fsdp_final)
    resumed = train(tmp_path / "fsdp", *args, "--strategy", "fsdp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "continuing from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    again = losses(tmp_path / "fsdp")
    for step in reference:
        assert again[step] == pytest.approx(sharded[step], rel=1e-5)
    assert read_trainer_state(fsdp_final).step == 6

    # a checkpoint keeps the strategy it was written with
    mixed = train(tmp_path / "fsdp", *args, "--max_steps", "8")
    assert mixed.returncode == 2
    assert "was written with --strategy fsdp (now ddp)" in mixed.stderr


TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]


def torchrun(output_dir, *args: str, launcher: list[str] = TORCHRUN) -> subprocess.CompletedProcess:
    command = [*launcher, "workflows/train.py"]
    return subprocess.run(
        [*command, "--output_dir", str(output_dir), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env=train_env({"RAY_ADDRESS": None}),
    )


def test_torchrun_runs_the_same_loop_without_ray_and_writes_the_same_layout(tmp_path, tiny_model):
    data = write_rows(tmp_path / "rows.jsonl", 16)
    args = ["--data_path", data, "--model_name_or_path", tiny_model, "--per_device_batch_size", "1"]
    args += ["--save_steps", "2", "--report_to", "none", *COMMON]
    first = torchrun(tmp_path / "out", *args, "--max_steps", "4")
    assert first.returncode == 0, first.stderr[-3000:]
    assert "torchrun started 2 processes" in first.stderr
    assert "Ray instance" not in first.stderr  # no Ray was started or joined
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"checkpoint-2", "final", "metrics.jsonl", "loss_curve.png"}
    for checkpoint in (out / "checkpoint-2", out / "final"):
        assert checkpoint_problem(checkpoint) is None
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert AutoModelForCausalLM.from_pretrained(out / "final").config.num_hidden_layers == 2

    # the same command with more steps continues from final/ (step 4), under FSDP as well
    fsdp_out = tmp_path / "fsdp"
    for steps in ("2", "4"):
        run = torchrun(fsdp_out, *args, "--strategy", "fsdp", "--max_steps", steps)
        assert run.returncode == 0, run.stderr[-3000:]
    assert "continuing from" in run.stderr
    assert sorted(losses(fsdp_out)) == [1, 2, 3, 4]
    assert read_trainer_state(fsdp_out / "final").step == 4
    assert AutoModelForCausalLM.from_pretrained(fsdp_out / "final").config.num_hidden_layers == 2

    # accelerate launch starts the processes through torchrun's launcher: the same path. Its own FSDP
    # switch is read (FSDP2, not silently DDP); here the two processes also share each pack (sequence
    # parallelism) and evaluate together
    shared = ["--sequence_parallel", "2", "--validation_split", "0.25"]
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--use_fsdp", "--num_processes", "2"]
    accelerated = torchrun(tmp_path / "accelerate", *args, *shared, "--max_steps", "2", launcher=launcher)
    assert accelerated.returncode == 0, accelerated.stderr[-3000:]
    assert "torchrun started 2 processes" in accelerated.stderr
    assert "accelerate launch --use_fsdp: training with --strategy fsdp" in accelerated.stderr
    assert checkpoint_problem(tmp_path / "accelerate" / "final") is None
    assert (tmp_path / "accelerate" / "final" / SHARDED_DIR).is_dir()
    evaluated = [row for row in read_metrics(tmp_path / "accelerate") if "eval_loss" in row]
    assert evaluated and all(math.isfinite(row["eval_loss"]) for row in evaluated)
