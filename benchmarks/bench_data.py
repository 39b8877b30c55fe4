"""Driver memory and preprocessing speed of the Ray Data pipeline, against an earlier commit's.

    python benchmarks/bench_data.py [--lines 20000 100000] [--baseline REV] [--workers 2]

Builds JSONL files of N lines by repeating the FireAct rows of ../shared/data (or tests/data), then,
in a fresh process per file and implementation, starts a local Ray and runs sftcore's
build_datasets (read, validate, render, mask, split, shuffle, pack; SmolLM2's tokenizer, packing to
2,048 tokens) to the end. It reports the driver's peak resident memory (ru_maxrss: the process that
runs workflows/train.py; Ray's own processes are not in it), how much of it came after Ray had
started, and lines per second. --baseline runs the same on the sftcore of an earlier commit (checked
out with `git archive` into a temporary folder), side by side: the driver used to read every line.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCES = [REPO.parent / "shared" / "data", REPO / "tests" / "data"]  # the first that exists: its FireAct rows
MB = 1024 * 1024


def build_file(lines: int, folder: Path) -> Path:
    source = next(data / "fireact_hotpotqa.jsonl" for data in SOURCES if data.exists())
    rows = [line for line in source.read_text().splitlines() if line.strip()]
    path = folder / f"fireact_{lines}.jsonl"
    with path.open("w") as f:
        for n in range(lines):
            f.write(rows[n % len(rows)] + "\n")
    return path


def child(data: str, workers: int) -> None:
    """One measurement, printed as JSON on the last line."""
    import ray

    from sftcore.dataset import build_datasets
    from sftcore.masking import EncodeOptions

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.execution_options.preserve_order = True
    after_ray = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    kwargs = {
        "data_path": data,
        "model_name_or_path": "smollm2-135m-instruct",
        "options": EncodeOptions(max_seq_length=2048),
        "validation_split": 0.1,
        "seed": 42,
        "encoder_concurrency": workers,
    }
    if "rejected_file" in inspect.signature(build_datasets).parameters:
        kwargs["rejected_file"] = Path(data).with_suffix(".rejected")
    start = time.perf_counter()
    train, _, summary = build_datasets(**kwargs)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"lines": summary.lines, "packs": train.count(), "seconds": seconds, "peak": peak, "after_ray": after_ray}
    print(json.dumps(result))


def measure(tree: Path, data: Path, workers: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", str(data), "--workers", str(workers)]
    env = {"PYTHONPATH": str(tree), "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run(command, cwd=tree, capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode:
        raise SystemExit(f"{tree}: failed\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def checkout(rev: str, folder: Path) -> Path:
    tree = folder / f"sftcore-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", rev, "sftcore"], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, nargs="+", default=[20000, 100000])
    parser.add_argument("--baseline", help="an earlier commit to compare with (e.g. ddf8909)")
    parser.add_argument("--workers", type=int, default=2, help="CPUs for Ray (and encoder tasks)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.workers)
        return
    with tempfile.TemporaryDirectory(prefix="sftcore-bench-data-") as tmp:
        folder = Path(tmp)
        trees = {"sftcore (this tree)": REPO}
        if args.baseline:
            trees[f"sftcore {args.baseline}"] = checkout(args.baseline, folder)
        rows = []
        for lines in args.lines:
            data = build_file(lines, folder)
            size = data.stat().st_size / MB
            for name, tree in trees.items():
                result = measure(tree, data, args.workers)
                rows.append((name, lines, size, result))
                print(f"measured {name}, {lines} lines: {json.dumps(result)}", file=sys.stderr, flush=True)
    print(
        f"\n{'implementation':<24} {'lines':>7} {'MB':>5} {'driver peak MB':>15} {'after Ray MB':>13} "
        f"{'seconds':>8} {'lines/s':>8}"
    )
    for name, lines, size, r in rows:
        print(
            f"{name:<24} {lines:>7} {size:>5.0f} {r['peak'] / MB:>15.0f} {(r['peak'] - r['after_ray']) / MB:>13.0f} "
            f"{r['seconds']:>8.1f} {lines / r['seconds']:>8.0f}"
        )
    for name in trees:
        peaks = [r["peak"] for n, _, _, r in rows if n == name]
        if len(peaks) > 1:
            growth = (peaks[-1] - peaks[0]) / MB
            print(f"{name}: driver peak grows by {growth:.0f} MB from the smallest to the largest file")


if __name__ == "__main__":
    main()
