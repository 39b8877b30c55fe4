"""One epoch of the product path with prefix trees and without, in one run: wall time and peak memory.

    python benchmarks/bench_trees.py [--data FILE] [--rows N] [--epochs 1] [-- FLAG ...]

SmolLM2-135M (the bundled model) under Qwen3's chat template, its special tokens added to the vocabulary
(the embeddings grown to match), trained by `workflows/train.py` with default flags (plus any after --)
on the tau-bench rows (or the first --rows of them: all 60 take hours on 2 CPU cores), once with
`--tree_packing auto` and once with `--tree_packing off`. For each: wall time of the whole command
(start-up, encoding, training, evaluation, checkpoints), the data line's token costs, the training
tokens and steps, and the peak resident memory of the whole process tree (driver, Ray, the training
worker), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from bench_memory import GB, tree_rss

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "taubench_airline_dev.jsonl"
TEMPLATES = REPO / "tests" / "chat_templates"


def qwen3_smollm2(target: Path) -> str:
    """SmolLM2-135M-Instruct with Qwen3's template and special tokens (tests/chat_templates/families.json)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftcore.models import resolve_model_path

    family = json.loads((TEMPLATES / "families.json").read_text(encoding="utf-8"))["qwen3"]
    source = resolve_model_path("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.add_tokens(family["special_tokens"], special_tokens=True)
    tokenizer.eos_token = family["eos"]
    tokenizer.chat_template = (TEMPLATES / f"{family['template']}.jinja").read_text(encoding="utf-8")
    model = AutoModelForCausalLM.from_pretrained(source)
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return str(target)


def run(model: str, tree_packing: str, data: Path, epochs: int, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="sftcore-trees-") as out:
        command = [sys.executable, "workflows/train.py", "--data_path", str(data), "--model_name_or_path", model]
        command += ["--num_epochs", str(epochs), "--report_to", "none", "--tree_packing", tree_packing]
        command += ["--output_dir", out, *flags]
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        root, peak = psutil.Process(process.pid), 0
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
        reader.start()
        while process.poll() is None:
            peak = max(peak, tree_rss(root)[0])
            time.sleep(0.2)
        reader.join()
        seconds = time.monotonic() - start
        text = "".join(output)
        if process.returncode:
            raise SystemExit(f"--tree_packing {tree_packing} failed:\n{text[-3000:]}")
        data_line = next(line for line in text.splitlines() if line.startswith("data:"))
        return {
            "tree_packing": tree_packing,
            "seconds": seconds,
            "peak_gb": peak / GB,
            "tokens": re.search(r"tokens (as one sequence .*?) \(", data_line).group(1),
            "train_tokens": int(re.search(r"train: (\d+) tokens", data_line).group(1)),
            "steps": int(re.search(r"; (\d+) steps", data_line).group(1)),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--rows", type=int, default=None, help="only the first N rows of --data")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("flags", nargs="*", help="training flags after --")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="sftcore-qwen3-smollm2-") as work:
        data = Path(args.data)
        if args.rows:  # a fixed path: the validation split is drawn from the path and line numbers
            data = Path(tempfile.gettempdir()) / f"sftcore-bench-trees-{args.rows}-rows.jsonl"
            data.write_text("".join(Path(args.data).read_text(encoding="utf-8").splitlines(True)[: args.rows]))
        model = qwen3_smollm2(Path(work) / "model")
        results = [run(model, mode, data, args.epochs, args.flags) for mode in ("auto", "off")]
    print(f"{'tree_packing':12} {'steps':>6} {'train tokens':>13} {'wall s':>8} {'peak GB':>8}  tokens")
    for r in results:
        print(
            f"{r['tree_packing']:12} {r['steps']:>6} {r['train_tokens']:>13} {r['seconds']:>8.0f} "
            f"{r['peak_gb']:>8.1f}  {r['tokens']}"
        )
    trees, samples = results
    print(
        f"trees: {samples['seconds'] / trees['seconds']:.2f}x faster, "
        f"{samples['train_tokens'] / trees['train_tokens']:.2f}x fewer tokens for one epoch"
    )


if __name__ == "__main__":
    main()
