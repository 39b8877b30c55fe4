"""Throughput and memory: sftcore's training step against TRL's SFTTrainer, same model, rows and lengths.

    pip install -e .[bench]          # TRL, for the comparison
    python benchmarks/bench_sft.py   # see benchmarks/README.md for the commands and results

Every configuration runs in its own fresh process (so peak memory is its own), configurations
alternate, and each is repeated; the table shows medians. Both sides get:
- the same rows: those of each data file that fit in --max_length whole, so nobody truncates;
- the same token sequences and masks: TRL gets the messages sftcore rendered (tool calls adapted to
  the template) and a copy of the chat template with {% generation %} marks, so its
  assistant_only_loss trains the tokens sftcore trains;
- the same model (random init, seeded), optimizer (AdamW), --batch_size sequences of up to
  --max_length tokens per step, 1 process, the same torch threads.

Measured: non-pad tokens/s and trained tokens/s over the timed steps (after warm-up), padding fraction
(pad tokens / tokens computed), peak memory (max RSS on CPU, max_memory_allocated on GPU), and
preprocessing tokens/s (sftcore: parse + render + mask + pack; TRL: SFTTrainer's dataset preparation).
Ray start-up and data sharding are not part of either number: this compares the per-worker step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
GENERATION_TEMPLATE = REPO / "tests" / "chat_templates" / "smollm2_generation.jinja"
DATA = REPO / "tests" / "data"
CONFIGS = ["sftcore", "sftcore_no_packing", "trl_default", "trl_packing"]


def load_rows(path: Path, tokenizer, max_length: int, limit: int) -> list[tuple[str, list, int]]:
    """(JSONL line, messages as rendered, tokens) for the first rows that fit whole in max_length."""
    from sftcore.data import DataError, parse_line, parse_row
    from sftcore.masking import FULL_HISTORY, EncodeOptions, encode_conversation
    from sftcore.templates import adapt_to_template, template_support

    rows = []
    for line in path.read_text().splitlines():
        try:
            conv = parse_row(parse_line(line))
            encoded = encode_conversation(conv, tokenizer, EncodeOptions(max_seq_length=max_length))
        except DataError:
            continue
        whole = len(encoded.samples) == 1 and encoded.samples[0].history == FULL_HISTORY and not encoded.dropped_turns
        if whole:
            messages = adapt_to_template(conv, template_support(tokenizer)).messages
            rows.append((line, messages, encoded.num_tokens))
        if len(rows) == limit:
            break
    return rows


def build_model(args, device: torch.device, trainer: str):
    """--model's architecture (default: SmolLM2-135M cut to --layers), random init, seeded. sftcore
    gets the attention its --attn_implementation auto picks (packed, no mask); TRL flash-attn's
    varlen kernel where installed, else sdpa (what it uses then)."""
    import importlib.util

    from transformers import AutoConfig, AutoModelForCausalLM

    from sftcore.attention import resolve_attention
    from sftcore.models import resolve_model_path

    config = AutoConfig.from_pretrained(args.model or resolve_model_path("smollm2-135m-instruct"))
    if args.model is None:
        config.num_hidden_layers = args.layers
    if trainer == "sftcore":
        attention = resolve_attention("auto", config, args.max_length)
    else:
        has_flash = device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None
        attention = "flash_attention_2" if has_flash else "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attention).to(device)
    if args.gradient_checkpointing and trainer == "sftcore":  # TRL turns it on through SFTConfig
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def padded_batch_size(args, rows) -> int:
    """Rows per step without packing: as many as make the tokens of --batch_size full sequences, so
    every configuration trains about the same tokens per optimizer step."""
    mean_tokens = sum(n for _, _, n in rows) / len(rows)
    return max(1, round(args.batch_size * args.max_length / mean_tokens))


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_sftcore(args, rows, device, packing: bool) -> dict:
    import numpy as np

    from sftcore.data import parse_line, parse_row
    from sftcore.loop import TrainedTokenLoss, collate, token_losses
    from sftcore.masking import IGNORE_INDEX, EncodeOptions, encode_conversation
    from sftcore.models import load_tokenizer
    from sftcore.packing import pack_rows

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    start = time.perf_counter()  # preprocessing of the same rows TRL gets: parse + render + mask + pack
    options = EncodeOptions(max_seq_length=args.max_length)
    samples = [
        sample
        for line, _, _ in rows
        for sample in encode_conversation(parse_row(parse_line(line)), tokenizer, options).samples
    ]
    columns = {
        "input_ids": [np.asarray(s.input_ids, dtype=np.int32) for s in samples],
        "labels": [np.asarray(s.labels, dtype=np.int64) for s in samples],
        "num_trained": [int((np.asarray(s.labels) != IGNORE_INDEX).sum()) for s in samples],
    }
    sequences = pack_rows(columns, args.max_length) if packing else columns
    preprocess_s = time.perf_counter() - start
    preprocess_tokens = sum(len(ids) for ids in columns["input_ids"])

    model = TrainedTokenLoss(build_model(args, device, "sftcore")).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    count = len(sequences["input_ids"])
    tokens = trained = computed = 0
    timed_s = 0.0
    batch_size = args.batch_size if packing else padded_batch_size(args, rows)
    for step in range(args.steps + 1):
        index = [(step * batch_size + i) % count for i in range(batch_size)]
        batch = collate({k: [v[i] for i in index] for k, v in sequences.items() if k != "num_rows"}, 0, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss_sum, _ = token_losses(model, batch)
        step_trained = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        (loss_sum / step_trained).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step > 0:  # step 0 warms up (allocator, kernels)
            timed_s += time.perf_counter() - t0
            tokens += int(batch["num_tokens"])
            trained += step_trained
            computed += batch["input_ids"].numel()
    return {
        "tokens": tokens,
        "trained": trained,
        "computed": computed,
        "timed_s": timed_s,
        "preprocess_s": preprocess_s,
        "preprocess_tokens": preprocess_tokens,
        "peak_mb": peak_memory_mb(device),
    }


def run_trl(args, rows, device, packing: bool) -> dict:
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from sftcore.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    tokenizer.chat_template = GENERATION_TEMPLATE.read_text()
    dataset = Dataset.from_list([{"messages": messages} for _, messages, _ in rows])
    counts = {"tokens": 0, "trained": 0, "computed": 0, "timed_s": 0.0, "batches": 0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device.type == "cuda":
                torch.cuda.synchronize()
            if state.global_step > 1:
                counts["timed_s"] += time.perf_counter() - self.t0

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            max_steps=args.steps + 1,
            per_device_train_batch_size=args.batch_size if packing else padded_batch_size(args, rows),
            max_length=args.max_length,
            packing=packing,
            assistant_only_loss=True,
            learning_rate=1e-4,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            logging_steps=1000,
            dataset_num_proc=1,
            use_cpu=device.type == "cpu",
            bf16=device.type == "cuda",
            dataloader_num_workers=0,
            gradient_checkpointing=args.gradient_checkpointing,
            use_liger_kernel=args.liger,
            seed=0,
        )
        model = build_model(args, device, "trl")
        start = time.perf_counter()
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)
        preprocess_s = time.perf_counter() - start
        preprocess_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
        collator = trainer.data_collator

        def counting_collator(examples):
            batch = collator(examples)
            if counts["batches"] > 0:  # the warm-up step's batch is not timed
                ids = batch["input_ids"]
                real = batch["attention_mask"].sum() if "attention_mask" in batch else ids.numel()
                counts["tokens"] += int(real)
                counts["trained"] += int((batch["labels"][:, 1:] != -100).sum())
                counts["computed"] += ids.numel()
            counts["batches"] += 1
            return batch

        trainer.data_collator = counting_collator
        trainer.add_callback(StepTimer())
        trainer.train()
    counts.pop("batches")
    return {
        **counts,
        "preprocess_s": preprocess_s,
        "preprocess_tokens": preprocess_tokens,
        "peak_mb": peak_memory_mb(device),
    }


def run_one(args) -> None:
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from sftcore.models import load_tokenizer

    rows = load_rows(args.data, load_tokenizer("smollm2-135m-instruct"), args.max_length, args.rows)
    runner = run_trl if args.config.startswith("trl") else run_sftcore
    result = runner(args, rows, device, packing=args.config in ("sftcore", "trl_packing"))
    extra = {"config": args.config, "rows": len(rows), "padded_batch_size": padded_batch_size(args, rows)}
    print("RESULT " + json.dumps({**extra, **result}), flush=True)


def summarize(results: list[dict]) -> dict:
    def median(key):
        return statistics.median(r[key] for r in results)

    return {
        "tokens/s": statistics.median(r["tokens"] / r["timed_s"] for r in results),
        "trained tok/s": statistics.median(r["trained"] / r["timed_s"] for r in results),
        "padding": statistics.median(1 - r["tokens"] / r["computed"] for r in results),
        "peak MB": median("peak_mb"),
        "prep tok/s": statistics.median(r["preprocess_tokens"] / r["preprocess_s"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, nargs="+", default=[DATA / "taubench_airline_dev.jsonl"])
    parser.add_argument("--max_length", type=int, default=4096)
    parser.add_argument("--batch_size", type=int, default=2, help="sequences per step, both trainers")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run (after one warm-up step)")
    parser.add_argument("--rows", type=int, default=200, help="at most this many rows per file")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers of the SmolLM2-135M architecture")
    parser.add_argument("--model", help="an HF model directory whose architecture to use instead (random init)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="both trainers")
    parser.add_argument("--liger", action="store_true", help="TRL's use_liger_kernel")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    parser.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)  # one run, in a child process
    args = parser.parse_args()
    if args.config:
        args.data = args.data[0]
        return run_one(args)

    for data in args.data:
        results: dict[str, list[dict]] = {c: [] for c in args.configs}
        for repeat in range(args.repeats):
            for config in args.configs:  # alternate, so drift hits every configuration alike
                command = [sys.executable, __file__, "--config", config, "--data", str(data)]
                for flag in ("max_length", "batch_size", "steps", "rows", "layers", "threads"):
                    command += [f"--{flag}", str(getattr(args, flag))]
                command += ["--model", args.model] if args.model else []
                command += [f"--{flag}" for flag in ("gradient_checkpointing", "liger") if getattr(args, flag)]
                out = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    sys.exit(f"{config} failed:\n{out.stderr[-4000:]}")
                results[config].append(json.loads(line[len("RESULT ") :]))
                print(f"  {data.name} repeat {repeat + 1} {config}: done", file=sys.stderr, flush=True)
        print_table(data.name, args, results)


def print_table(name: str, args, results: dict[str, list[dict]]) -> None:
    first = results[next(iter(results))][0]
    device = "cuda" if torch.cuda.is_available() else f"cpu x{args.threads}"
    print(
        f"\n{name}: {first['rows']} rows, max_length {args.max_length}, {args.batch_size} packs per step "
        f"({first['padded_batch_size']} rows per step without packing), {args.steps} timed steps, "
        f"{args.layers}-layer SmolLM2 architecture, {device}, median of {args.repeats}"
    )
    summaries = {c: summarize(r) for c, r in results.items()}
    keys = list(next(iter(summaries.values())))
    print(f"| {'config':<20} | " + " | ".join(f"{k:>13}" for k in keys) + " |")
    print("|" + "---|" * (len(keys) + 1))
    for config, s in summaries.items():
        cells = [f"{s[k]:13.1%}" if k == "padding" else f"{s[k]:13.0f}" for k in keys]
        print(f"| {config:<20} | " + " | ".join(cells) + " |")
    ours = summaries.get("sftcore")
    for peer in ("trl_default", "trl_packing"):
        if ours and peer in summaries:
            theirs = summaries[peer]
            ratios = {k: ours[k] / theirs[k] for k in ("tokens/s", "trained tok/s", "peak MB", "prep tok/s")}
            print(f"sftcore / {peer}: " + ", ".join(f"{k} x{v:.2f}" for k, v in ratios.items()))


if __name__ == "__main__":
    main()
