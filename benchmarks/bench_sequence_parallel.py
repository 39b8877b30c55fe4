"""Memory per worker for one long agent trajectory, with and without sequence parallelism (CPU, gloo).

    python benchmarks/bench_sequence_parallel.py [--tokens 8192,16384] [--layers 4] [--cap_gb 2.5]
        [--runs 1:ddp,2:ddp,2:fsdp,1:ddp:tiled,1:ddp:nockpt,2:ddp:nockpt,1:ddp:lora:nockpt,2:ddp:lora:nockpt]

One trajectory is built from tau-bench rows: their conversations chained (each row's messages after
the previous row's) until it reaches the length, encoded with the bundled SmolLM2's template as one
sample with every assistant turn trained. A SmolLM2-135M-shaped model (its config, random weights, the
first --layers of its 30 layers) trains 2 steps on it with the product's pieces (collate, the
trained-positions head, DDP or FSDP2, AdamW; gradient checkpointing as on CPU by default, or not:
":nockpt", the GPU default; full fine-tuning, or ":lora" with the product's LoRA defaults;
":tiled" for --tiled_mlp): in one process (SP 1), then in 2 gloo processes sharing it
(--sequence_parallel 2), each holding the whole model (DDP) or half of it (--strategy fsdp: weights,
gradients and Adam's state sharded). Each process samples its own resident memory every 2 ms during
the second step (Adam's state exists by then; glibc told to unmap what torch frees): the peak, and
the step's own part of it (the peak minus what was resident before the step: activations,
gradients). Under --cap_gb per worker: the longest measured length whose peak fits, and the longest
trajectory extrapolated from the step memory per token between the two longest lengths (a linear
model of the measurements, stated as such). --memory_model prints the GPU memory model for the 1.5B
and 7B shapes instead (memory_model()).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO / "tests" / "data" / "taubench_airline_dev.jsonl"
GB = 1024**3


def long_trajectory(tokens: int, tokenizer) -> dict:
    """One sample of about ``tokens`` tokens: tau-bench conversations chained, as encoded for training."""
    from sftcore.masking import EncodeOptions, encode_row

    rows = [json.loads(line) for line in DATA.read_text().splitlines()]
    messages, row = [], 0
    while True:
        source = rows[row % len(rows)]
        start = json.loads(source["input"]) if isinstance(source["input"], str) else source["input"]
        messages += [m for m in start if m["role"] != "system" or not messages] + source["output"]
        trial = {"input": json.dumps(messages[:1]), "output": messages[1:]}
        encoded = encode_row(trial, tokenizer, EncodeOptions(max_seq_length=10**7))
        if len(encoded.samples[0].input_ids) >= tokens:
            sample = encoded.samples[0]
            ids, labels = sample.input_ids[:tokens], sample.labels[:tokens]
            return {"input_ids": [ids], "labels": [labels], "position_ids": [list(range(len(ids)))]}
        row += 1


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakSampler:
    """The most resident memory seen while the block runs (sampled every 2 ms in a thread)."""

    def __enter__(self) -> PeakSampler:
        self.before = self.peak = resident_bytes()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, resident_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()


def worker(rank: int, world: int, port: int, batch: dict, layers: int, run: str, results: str) -> None:
    import torch.distributed as dist
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftcore.config import TrainConfig
    from sftcore.loop import TrainedTokenLoss, collate, model_inputs
    from sftcore.models import resolve_model_path, tile_mlps
    from sftcore.parallel import wrap_model
    from sftcore.sequence_parallel import sequence_group

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if world > 1:
        os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        dist.init_process_group("gloo", rank=rank, world_size=world)
    sequence = sequence_group(rank, world, world)
    config = AutoConfig.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_config(config, attn_implementation="packed_sdpa").train()
    options = run.split(":")[2:]
    if "nockpt" not in options:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if "tiled" in options:
        tile_mlps(lm)
    if "lora" in options:
        from peft import LoraConfig, get_peft_model

        defaults = TrainConfig()
        lora = LoraConfig(
            r=defaults.lora_r,
            lora_alpha=defaults.lora_alpha,
            lora_dropout=defaults.lora_dropout,
            target_modules=defaults.lora_target_modules,
        )
        lm = get_peft_model(lm, lora)
    model = wrap_model(TrainedTokenLoss(lm), lm, run.split(":")[1], torch.device("cpu"))
    optimizer = torch.optim.AdamW([p for p in lm.parameters() if p.requires_grad], lr=1e-5)
    rows = []
    for _ in range(2):
        with PeakSampler() as memory:
            started = time.perf_counter()
            micro = collate(batch, 0, torch.device("cpu"), sequence)
            loss_sum, _ = model(**model_inputs(micro))
            (loss_sum * world).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            seconds = time.perf_counter() - started
        rows.append({"peak": memory.peak, "step": memory.peak - memory.before, "seconds": seconds})
    peaks = [torch.tensor(float(rows[-1][k])) for k in ("peak", "step")]
    if world > 1:
        for value in peaks:
            dist.all_reduce(value, op=dist.ReduceOp.MAX)  # the worker that needed most
    if rank == 0:
        Path(results).write_text(json.dumps({"peak": peaks[0].item(), "step": peaks[1].item(), **rows[-1]}))
    if world > 1:
        dist.barrier()
    # no teardown: gloo's process group freed from DDP's reducer can deadlock on the GIL (torch 2.13)
    os._exit(0)


def measure(workers: int, run: str, batch: dict, layers: int) -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out, socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        results = Path(out) / "results.json"
        mp.spawn(worker, args=(workers, port, batch, layers, run, str(results)), nprocs=workers)
        return json.loads(results.read_text())


# The shapes of Qwen2.5-1.5B and -7B (config.json): parameters, hidden size, MLP size, layers.
SHAPES = {"1.5B": (1.54e9, 1536, 8960, 28), "7B": (7.62e9, 3584, 18944, 28)}


def memory_model(gpu_gb: float = 80.0, gpus: int = 8) -> None:
    """The longest trajectory per GPU shape, from a memory model (not measured on a GPU): full fine-tuning
    under FSDP2 over `gpus` GPUs (16 bytes per parameter sharded: fp32 weights, gradients, Adam's two
    moments), bf16 autocast, gradient checkpointing; per token on a worker: every layer's checkpointed
    input (fp32 residual stream, 4 bytes x hidden x layers) and one layer's working set in backward
    (about 8 x hidden + 4 x MLP size activations in bf16, and as much again for their gradients; with
    --tiled_mlp the MLP's part is one 4,096-token tile, none per token), the final norm's output and
    the trained positions' hidden states for the head (fp32); 4 GB for the CUDA context, workspaces and
    fragmentation."""
    print(f"\nmemory model (not measured): {gpus} GPUs of {gpu_gb:.0f} GB, FSDP2, bf16 autocast, checkpointing")
    print(f"{'model':>6} {'MLP':>6} {'KB/token':>9} {'per GB':>7}" + "".join(f" {f'SP {n}':>8}" for n in (1, 2, 4, 8)))
    for name, (params, hidden, mlp, layers) in SHAPES.items():
        free = (gpu_gb - 4) * GB - 16 * params / gpus
        for tiled in (False, True):
            per_token = 4 * hidden * (layers + 2) + 2 * 2 * (8 * hidden + (0 if tiled else 4 * mlp))
            longest = "".join(f" {free / per_token * n / 1000:>7.0f}k" for n in (1, 2, 4, 8))
            label = "tiled" if tiled else "whole"
            print(f"{name:>6} {label:>6} {per_token / 1000:>9.0f} {GB / per_token:>7.0f}{longest}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", default="8192,16384", help="trajectory lengths (two or more)")
    parser.add_argument("--layers", type=int, default=4, help="SmolLM2-135M's layers kept (of 30)")
    parser.add_argument(
        "--runs",
        default="1:ddp,2:ddp,2:fsdp,1:ddp:tiled,1:ddp:nockpt,2:ddp:nockpt,1:ddp:lora:nockpt,2:ddp:lora:nockpt",
        help="size:strategy[:options] of each run: the sequence-parallel size, ddp or fsdp, and any of tiled "
        "(--tiled_mlp), lora (LoRA with the product's defaults), nockpt (no gradient checkpointing, the GPU "
        "default); the first run of the list is the 1x",
    )
    parser.add_argument("--cap_gb", type=float, default=2.5, help="memory per worker for the longest-sample column")
    parser.add_argument("--memory_model", action="store_true", help="print the GPU memory model only")
    args = parser.parse_args()
    if args.memory_model:
        memory_model()
        return
    # glibc keeps freed heap memory resident, and raises its mmap threshold as big blocks are freed: a
    # fixed threshold unmaps every freed tensor, so the resident memory follows what torch holds
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"

    from sftcore.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    lengths = [int(t) for t in args.tokens.split(",")]
    runs = args.runs.split(",")
    table = {}
    for tokens in lengths:
        batch = long_trajectory(tokens, tokenizer)
        trained = sum(label != -100 for label in batch["labels"][0])
        print(f"trajectory: {tokens} tokens, {trained} trained", flush=True)
        for run in runs:
            table[run, tokens] = measure(int(run.split(":")[0]), run, batch, args.layers)
            print(f"  {run}: {table[run, tokens]}", flush=True)

    print(f"\nSmolLM2-135M shape, {args.layers} layers, 2 CPU cores, torch {torch.__version__}")
    header = f"{'SP:strategy:options':>22} {'tokens':>7} {'peak/worker':>12} {'step/worker':>12}"
    print(f"{header} {'peak vs SP 1':>13} {'step vs SP 1':>13} {'s/step':>7}")
    for (run, tokens), row in table.items():
        same = ":".join(["1", "ddp", *run.split(":")[2:]])  # the 1x: one worker with the same options
        first = table[same if same in runs else runs[0], tokens]
        print(
            f"{run:>22} {tokens:>7} {row['peak'] / GB:>10.2f}GB {row['step'] / GB:>10.2f}GB "
            f"{row['peak'] / first['peak']:>12.2f}x {row['step'] / first['step']:>12.2f}x {row['seconds']:>7.1f}"
        )
    if len(lengths) >= 2:
        print(f"\nlongest trajectory under {args.cap_gb} GB per worker: measured (the longest length whose peak")
        print("fits), and a linear model of the step memory between the two longest lengths (a model, not measured):")
        short, long = lengths[-2], lengths[-1]
        for run in runs:
            fits = [tokens for tokens in lengths if table[run, tokens]["peak"] <= args.cap_gb * GB]
            a, b = table[run, short], table[run, long]
            per_token = (b["step"] - a["step"]) / (long - short)
            resident = b["peak"] - b["step"]  # model, gradients' and optimizer's state before the step
            fixed = b["step"] - per_token * long
            longest = (args.cap_gb * GB - resident - fixed) / per_token
            measured = f"{max(fits) // 1024}k trains" if fits else f"not even {lengths[0] // 1024}k"
            print(f"  {run:>22}: {measured:>14}; {per_token / 1024:6.1f} KiB/token -> about {longest / 1000:.0f}k")


if __name__ == "__main__":
    main()
