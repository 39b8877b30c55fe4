"""Peak memory of the product path on CPU with default flags, per attention implementation.

    python benchmarks/bench_memory.py [--steps 2] [--attn packed_sdpa,sdpa] [--limit_gb 14] [-- FLAG ...]

Runs `workflows/train.py` (Ray in-process, default --max_seq_length 4096 with packing) on the tau-bench
rows with the bundled SmolLM2-135M (plus any training flags after --), once per --attn_implementation,
and samples the resident memory
of the whole process tree (driver, Ray, the training worker) every 0.2 s. A run that passes
--limit_gb is stopped there and reported as over it, so the comparison cannot take the machine down.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data" / "taubench_airline_dev.jsonl"
GB = 1024**3


def tree_rss(root: psutil.Process) -> tuple[int, int]:
    """(total resident bytes of root and its descendants, the largest single process's)."""
    sizes = []
    for process in [root, *root.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a process that ended meanwhile
            sizes.append(process.memory_info().rss)
    return sum(sizes), max(sizes, default=0)


def measure(attn: str, steps: int, limit_gb: float, flags: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="sftcore-mem-") as out:
        command = [
            sys.executable,
            "workflows/train.py",
            "--data_path",
            str(DATA),
            "--model_name_or_path",
            "smollm2-135m-instruct",
            "--max_steps",
            str(steps),
            "--validation_split",
            "0",
            "--report_to",
            "none",
            "--attn_implementation",
            attn,
            "--output_dir",
            out,
            *flags,
        ]
        start = time.monotonic()
        process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        root = psutil.Process(process.pid)
        peak_total = peak_one = 0
        stopped = False
        while process.poll() is None:
            total, one = tree_rss(root)
            peak_total, peak_one = max(peak_total, total), max(peak_one, one)
            if total > limit_gb * GB:
                stopped = True
                for child in [*root.children(recursive=True), root]:
                    child.kill()
                break
            time.sleep(0.2)
        process.wait()
        return {
            "attn": attn,
            "exit": "stopped" if stopped else process.returncode,
            "peak_total_gb": peak_total / GB,
            "peak_process_gb": peak_one / GB,
            "seconds": time.monotonic() - start,
            "stderr_tail": "" if stopped or process.returncode == 0 else process.stderr.read()[-2000:],
        }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--attn", default="packed_sdpa,sdpa")
    parser.add_argument("--limit_gb", type=float, default=14.0)
    parser.add_argument("flags", nargs="*", help="training flags, after --")
    args = parser.parse_args()
    results = [measure(attn, args.steps, args.limit_gb, args.flags) for attn in args.attn.split(",")]
    flags = " ".join(args.flags) or "none"
    print(f"SmolLM2-135M, tau-bench, --max_seq_length 4096 with packing, {args.steps} steps, CPU; flags: {flags}")
    print(f"{'attention':<14}{'exit':>8}{'peak, all processes':>22}{'peak, one process':>20}{'seconds':>10}")
    for r in results:
        over = ">" if r["exit"] == "stopped" else ""
        print(
            f"{r['attn']:<14}{r['exit']!s:>8}{over + format(r['peak_total_gb'], '.2f') + ' GB':>22}"
            f"{r['peak_process_gb']:>17.2f} GB{r['seconds']:>10.0f}"
        )
        if r["stderr_tail"]:
            print(r["stderr_tail"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
