"""The product path's throughput on one GPU, with TRL side by side at matched settings.

    python benchmarks/bench_gpu.py --models MODELS/qwen05 MODELS/qwen15 --lengths 4096 16384 [--trl]

For each model directory (random-init real shapes: ../shared/gpu/make_models.py) and pack length:
- sftcore full fine-tuning, LoRA, and full fine-tuning with gradient checkpointing, each as
  `workflows/train.py` under Ray (one worker; default flags otherwise: --attn_implementation auto,
  packing), on the 560 rows of tests/data (tau-bench + FireAct); numbers read from its metrics.jsonl;
- with --trl, TRL's SFTTrainer through bench_sft.py on the same model, rows that fit whole, and
  tokens per step, with gradient checkpointing off and on, and Liger on and off.
Each step trains --tokens_per_step tokens: 4 packs of 4,096, or 1 of 16,384. The first --warmup
steps (compilation, allocator) are left out; the table shows medians of the rest, the MFU (6N over
the GPU's bf16 peak, sftcore.throughput) and the peak memory torch held. It runs on CPU too (no MFU
there), which is how it is tested; its numbers only mean something on the GPU it names.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
SFTCORE_RUNS = {"full": [], "lora": ["--use_lora"], "full+gc": ["--gradient_checkpointing", "true"]}
TRL_RUNS = {"trl": [], "trl+gc": ["--gradient_checkpointing"], "trl+liger": ["--liger"]}


def model_parameters(model_dir: str) -> int:
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return sum(p.numel() for p in model.parameters())


def run_sftcore(model_dir: str, length: int, packs: int, args, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as out:
        command = [sys.executable, "workflows/train.py", "--model_name_or_path", model_dir, "--output_dir", out]
        command += ["--data_path", str(args.data)]
        command += ["--max_seq_length", str(length), "--per_device_batch_size", str(packs)]
        command += ["--max_steps", str(args.steps), "--save_steps", str(10 * args.steps), "--validation_split", "0"]
        command += ["--report_to", "none", "--num-workers", "1", *flags]
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
        if done.returncode != 0:
            return {"error": done.stderr[-2000:]}
        rows = [json.loads(line) for line in Path(out, "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r and r["step"] > args.warmup]
    return {
        "tokens/s": statistics.median(r["tokens_per_second"] for r in steps),
        "trained tok/s": statistics.median(r["trained_tokens_per_second"] for r in steps),
        "peak GiB": max(r["peak_memory_gb"] for r in steps),
        "data wait": statistics.median(r["data_wait_seconds"] / r["step_seconds"] for r in steps),
    }


def run_trl(model_dir: str, length: int, packs: int, args, flags: list[str]) -> dict:
    command = [sys.executable, "benchmarks/bench_sft.py", "--config", "trl_packing", "--model", model_dir]
    command += ["--data", str(args.data), "--max_length", str(length), "--batch_size", str(packs)]
    command += ["--steps", str(args.steps - 1), "--rows", "1000", *flags]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if line is None:
        return {"error": done.stderr[-2000:]}
    r = json.loads(line[len("RESULT ") :])
    return {
        "tokens/s": r["tokens"] / r["timed_s"],
        "trained tok/s": r["trained"] / r["timed_s"],
        "peak GiB": r["peak_mb"] / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", required=True, help="HF model directories")
    parser.add_argument("--lengths", nargs="+", type=int, default=[4096, 16384])
    parser.add_argument("--tokens_per_step", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    parser.add_argument("--data", type=Path, default=DATA / "all.jsonl", help="rows (default: tests/data, joined)")
    parser.add_argument("--trl", action="store_true", help="also run TRL (pip install -e .[bench])")
    args = parser.parse_args()
    if args.data == DATA / "all.jsonl":  # one file for both trainers: the 560 rows shipped in tests/data
        joined = Path(tempfile.mkdtemp(prefix="bench-gpu-data-")) / "rows.jsonl"
        joined.write_text("".join(p.read_text() for p in sorted(DATA.glob("*.jsonl"))))
        args.data = joined
    peak = None
    if torch.cuda.is_available():
        from sftcore.throughput import peak_flops

        peak = peak_flops(torch.device("cuda"))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no MFU)"
    runs = {f"sftcore {k}": (run_sftcore, v) for k, v in SFTCORE_RUNS.items()}
    if args.trl:
        runs |= {k: (run_trl, v) for k, v in TRL_RUNS.items()}

    print(f"device: {device}; {args.steps} steps, medians after {args.warmup}; data {args.data}")
    print("| model | pack | run | tokens/s | trained tok/s | MFU | peak GiB | data wait |")
    print("|---|---|---|---|---|---|---|---|")
    for model_dir in args.models:
        flops_per_token = 6.0 * model_parameters(model_dir)
        for length in args.lengths:
            packs = max(1, args.tokens_per_step // length)
            results = {name: runner(model_dir, length, packs, args, flags) for name, (runner, flags) in runs.items()}
            for name, r in results.items():
                if "error" in r:
                    print(f"| {Path(model_dir).name} | {packs}x{length} | {name} | failed: {r['error'][-300:]!r} |")
                    continue
                mfu = f"{flops_per_token * r['tokens/s'] / peak:.1%}" if peak else "-"
                wait = f"{r['data wait']:.1%}" if "data wait" in r else "-"
                print(
                    f"| {Path(model_dir).name} | {packs}x{length} | {name} | {r['tokens/s']:,.0f} | "
                    f"{r['trained tok/s']:,.0f} | {mfu} | {r['peak GiB']:.1f} | {wait} |"
                )
            print_ratios(results)
    return 0


def print_ratios(results: dict[str, dict]) -> None:
    def ratio(a: str, b: str, key: str) -> str:
        if "error" in results.get(a, {"error": 1}) or "error" in results.get(b, {"error": 1}):
            return "n/a"
        return f"x{results[a][key] / results[b][key]:.2f}"

    print(
        f"  LoRA / full: tokens/s {ratio('sftcore lora', 'sftcore full', 'tokens/s')}, "
        f"peak memory {ratio('sftcore lora', 'sftcore full', 'peak GiB')}"
    )
    if "trl" in results:
        for ours, theirs in (("sftcore full", "trl"), ("sftcore full+gc", "trl+gc")):
            print(
                f"  {ours} / {theirs}: trained tok/s {ratio(ours, theirs, 'trained tok/s')}, "
                f"peak memory {ratio(ours, theirs, 'peak GiB')}"
            )


if __name__ == "__main__":
    sys.exit(main())
