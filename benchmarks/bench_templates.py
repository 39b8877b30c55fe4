"""Real chat templates on real agent trajectories: what each one trains, at what token cost, how fast.

    python benchmarks/bench_templates.py [--data FILE ...] [--max_seq_length N] [--families qwen3,chatml,...]

For each model family in tests/chat_templates/families.json (the verbatim official templates, on the
bundled SmolLM2 tokenizer with the family's special tokens) and SmolLM2's own ChatML template, and
each data file: the share of rows trained, rows not trained by reason, samples per row, the token
overhead of per-turn samples (tokens in the samples / tokens of the rows as one sequence each), what
trained rows lose by reason, and the encoding speed in rows per second on one core (CPU time of
parse + render + mask + tokenize, pinned to one CPU, tokenizers single-threaded), next to the floor
any trainer pays: the template rendering and tokenizing each row once (``apply_chat_template(...,
tokenize=True)``, as TRL does before it masks), without masks.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "tests" / "chat_templates"
DATA = REPO / "tests" / "data"


# Marker-like strings in a template that are one token in its model's tokenizer: <|...|>, <｜...｜>, [INST]-style
# tags, and the common <think>, <tool_call>, <start_of_turn> tags.
MARKERS = re.compile(
    r"<\|[^|<>\s]{1,40}\|>|<｜[^｜]{1,40}｜>|\[/?[A-Z_]{2,20}\]|</?(?:think|tool_call|tool_response)>"
    r"|<(?:start|end)_of_turn>|<bos>|<eos>|</?s>"
)


def family_tokenizer(name: str):
    """The SmolLM2 tokenizer with a family's template and special tokens (families.json), SmolLM2's own
    ChatML ("chatml"), or any template file, with the marker-like strings in it as special tokens."""
    from sftcore.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    if name == "chatml":
        return tokenizer
    if name.endswith(".jinja"):
        template = Path(name).read_text(encoding="utf-8")
        tokenizer.add_tokens(sorted(set(MARKERS.findall(template))), special_tokens=True)
        tokenizer.chat_template = template
        return tokenizer
    family = json.loads((TEMPLATES / "families.json").read_text(encoding="utf-8"))[name]
    special = family["special_tokens"] + [t for t in (family["bos"], family["eos"]) if t]
    tokenizer.add_tokens(special, special_tokens=True)
    if family["bos"]:
        tokenizer.bos_token = family["bos"]
    tokenizer.eos_token = family["eos"]
    tokenizer.chat_template = (TEMPLATES / f"{family['template']}.jinja").read_text(encoding="utf-8")
    return tokenizer


def measure(name: str, path: Path, max_seq_length: int | None) -> dict:
    from sftcore.data import DataError, LineCounts, parse_line, parse_row
    from sftcore.masking import EncodeOptions, encode_conversation
    from sftcore.templates import adapt_to_template, template_support

    tokenizer = family_tokenizer(name)
    options = EncodeOptions(max_seq_length=max_seq_length)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    counts = LineCounts(path=str(path))
    template_support(tokenizer)  # probed once per template, outside the timing
    start = time.process_time()
    for number, line in enumerate(lines, start=1):
        try:
            encoded = encode_conversation(parse_row(parse_line(line)), tokenizer, options)
        except DataError as e:
            counts.reject(path.name, number, e)
            continue
        counts.add_row(path.name, number, encoded.stats())
    seconds = time.process_time() - start
    start = time.process_time()
    for line in lines:
        try:
            adapted = adapt_to_template(parse_row(parse_line(line)), template_support(tokenizer))
            tokenizer.apply_chat_template(adapted.messages, tools=adapted.tools, tokenize=True)
        except Exception:  # what the template cannot render costs no less
            pass
    once = time.process_time() - start
    return {
        "family": name,
        "file": path.name,
        "rows": len(lines),
        "trained": counts.rows,
        "rejected": dict(counts.rejected_counts),
        "samples": counts.samples,
        "overhead": counts.split_overhead,
        "omissions": dict(counts.omission_counts),
        "rows_per_second": len(lines) / seconds,
        "render_once_rows_per_second": len(lines) / once,
    }


def survey(templates: list[str], args: argparse.Namespace) -> None:
    """One line per template over all the data: the share of rows trained and why the rest are not."""
    trained_enough = 0
    for template in templates:
        try:
            results = [measure(template, Path(path), args.max_seq_length) for path in args.data]
        except ValueError as e:  # the template as a whole is refused (no template, or ambiguous turn ends)
            print(f"{Path(template).name[:48]:48}   refused: {e}")
            continue
        rows, trained = sum(r["rows"] for r in results), sum(r["trained"] for r in results)
        rejected = sum((Counter(r["rejected"]) for r in results), Counter())
        trained_enough += trained >= 0.95 * rows
        notes = ", ".join(f"{k} {v}" for k, v in sorted(rejected.items()))
        print(f"{Path(template).name[:48]:48} {trained:>5}/{rows:<5} {100 * trained / rows:5.1f}%  {notes}")
    print(f"{trained_enough} of {len(templates)} templates train at least 95% of the rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", nargs="+", default=[str(DATA / "taubench_airline_dev.jsonl"), str(DATA / "fireact_hotpotqa.jsonl")]
    )
    parser.add_argument("--max_seq_length", type=int, default=None, help="default: no limit (whole rows)")
    parser.add_argument("--families", default=None, help="comma-separated; default: chatml and every verbatim family")
    parser.add_argument(
        "--templates_dir",
        default=None,
        help="instead, every *.jinja file in this folder (e.g. llama.cpp's models/templates), its marker-like "
        "strings as special tokens; prints one summary line per template",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    families = (
        args.families.split(",")
        if args.families
        else ["chatml", *json.loads((TEMPLATES / "families.json").read_text())]
    )
    if args.templates_dir:
        survey(sorted(str(p) for p in Path(args.templates_dir).glob("*.jinja")), args)
        return

    results = [measure(name, Path(path), args.max_seq_length) for name in families for path in args.data]
    print(
        f"max_seq_length: {args.max_seq_length or 'none'}; one core; rows/s: parse, render, mask, tokenize "
        "(sftcore); once: render and tokenize each row once, no masks (the floor)"
    )
    columns = f"{'family':14} {'file':28} {'trained':>9} {'samples':>8} {'overhead':>9} {'rows/s':>7} {'once':>7}"
    print(columns + "  not trained / left out")
    for r in results:
        notes = ", ".join(f"{k} {v}" for k, v in sorted({**r["rejected"], **r["omissions"]}.items()))
        trained = f"{r['trained']}/{r['rows']}"
        print(
            f"{r['family']:14} {r['file']:28} {trained:>9} {r['samples']:>8} {r['overhead']:>8.2f}x "
            f"{r['rows_per_second']:>7.1f} {r['render_once_rows_per_second']:>7.1f}  {notes}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
