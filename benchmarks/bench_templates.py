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
import sys
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


def real_vocab_tokenizer(name: str):
    """A family on its model's real vocabulary (tests/vocabs/families.json), built offline and cached."""
    sys.path.insert(0, str(REPO / "tests"))
    from real_vocabs import real_tokenizer

    return real_tokenizer(name)


def measure(name: str, path: Path, args: argparse.Namespace, real_vocab: bool = False) -> dict:
    from sftcore.data import DataError, LineCounts, parse_line, parse_row
    from sftcore.inspection import EXACT, contract_outcomes
    from sftcore.masking import EncodeOptions, encode_conversation
    from sftcore.templates import adapt_to_template, template_support
    from sftcore.trees import build_trees

    options = EncodeOptions(max_seq_length=args.max_seq_length, window_slack=args.window_slack)
    tokenizer = real_vocab_tokenizer(name) if real_vocab else family_tokenizer(name)
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    counts = LineCounts(path=str(path))
    template_support(tokenizer)  # probed once per template, outside the timing
    encoded_rows = []
    start = time.process_time()
    for number, line in enumerate(lines, start=1):
        try:
            conv = parse_row(parse_line(line))
            encoded = encode_conversation(conv, tokenizer, options)
        except DataError as e:
            counts.reject(path.name, number, e)
            continue
        counts.add_row(path.name, number, encoded.stats())
        encoded_rows.append((conv, encoded))
    seconds = time.process_time() - start
    contract = Counter()  # checked afresh, outside the timing
    tree_tokens = 0  # the samples merged into prefix trees (--tree_packing auto), outside the timing too
    for conv, encoded in encoded_rows:
        contract.update(contract_outcomes(conv, tokenizer, encoded))
        tree_tokens += sum(len(tree.input_ids) for tree in build_trees(encoded.samples, options.max_seq_length))
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
        "tree_overhead": tree_tokens / max(1, counts.row_tokens),
        "contract": dict(contract),
        "contract_exact": contract[EXACT] / max(1, sum(contract.values())),
        "omissions": dict(counts.omission_counts),
        "rows_per_second": len(lines) / seconds,
        "render_once_rows_per_second": len(lines) / once,
    }


def survey(templates: list[str], args: argparse.Namespace) -> None:
    """One line per template over all the data: the share of rows trained and why the rest are not."""
    trained_enough = fallback = 0
    for template in templates:
        try:
            results = [measure(template, Path(path), args) for path in args.data]
        except ValueError as e:  # the template as a whole is refused (no template, or ambiguous turn ends)
            print(f"{Path(template).name[:48]:48}   refused: {e}")
            continue
        rows, trained = sum(r["rows"] for r in results), sum(r["trained"] for r in results)
        rejected = sum((Counter(r["rejected"]) for r in results), Counter())
        contract = sum((Counter(r["contract"]) for r in results), Counter())
        trained_enough += trained >= 0.95 * rows
        fallback += contract["tool_calls_in_fallback_format"] > 0
        exact = 100 * contract["exact"] / max(1, sum(contract.values()))
        notes = ", ".join(f"{k} {v}" for k, v in sorted({**rejected, **_not_exact(contract)}.items()))
        print(
            f"{Path(template).name[:48]:48} {trained:>5}/{rows:<5} {100 * trained / rows:5.1f}%  "
            f"contract {exact:5.1f}%  {notes}"
        )
    print(f"{trained_enough} of {len(templates)} templates train at least 95% of the rows")
    print(f"{fallback} of {len(templates)} templates get tool calls in sftcore's fallback format (they render none)")


def _not_exact(contract: Counter) -> dict[str, int]:
    """Trained turns that do not meet the token contract exactly, by reason."""
    return {f"turns_{kind}": n for kind, n in contract.items() if kind != "exact"}


def main() -> None:
    from sftcore.masking import EncodeOptions

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--data", nargs="+", default=[str(DATA / "taubench_airline_dev.jsonl"), str(DATA / "fireact_hotpotqa.jsonl")]
    )
    parser.add_argument("--max_seq_length", type=int, default=None, help="default: no limit (whole rows)")
    parser.add_argument(
        "--window_slack", type=float, default=EncodeOptions.window_slack, help="as train.py's (with a length)"
    )
    parser.add_argument("--families", default=None, help="comma-separated; default: chatml and every verbatim family")
    parser.add_argument(
        "--templates_dir",
        default=None,
        help="instead, every *.jinja file in this folder (e.g. llama.cpp's models/templates), its marker-like "
        "strings as special tokens; prints one summary line per template",
    )
    parser.add_argument(
        "--real_vocabs",
        action="store_true",
        help="the families of tests/vocabs/families.json, each on its model's real vocabulary (llama.cpp's GGUFs)",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    listed = REPO / "tests" / "vocabs" / "families.json" if args.real_vocabs else TEMPLATES / "families.json"
    families = args.families.split(",") if args.families else ["chatml"] * (not args.real_vocabs)
    families = families or list(json.loads(listed.read_text()))
    if not args.families and not args.real_vocabs:
        families += list(json.loads(listed.read_text()))
    if args.templates_dir:
        survey(sorted(str(p) for p in Path(args.templates_dir).glob("*.jinja")), args)
        return

    results = [measure(name, Path(path), args, args.real_vocabs) for name in families for path in args.data]
    vocabulary = "each model's real vocabulary" if args.real_vocabs else "SmolLM2's with each family's special tokens"
    print(
        f"max_seq_length: {args.max_seq_length or 'none'}, window_slack {args.window_slack}; {vocabulary}; one core; "
        "rows/s: parse, render, mask, tokenize (sftcore); once: render and tokenize each row once, no masks "
        "(the floor); overhead: the samples' tokens / the rows' as one sequence; as trees: the prefix trees' "
        "(--tree_packing auto); contract: the trained turns whose prompt and tokens a fresh render confirms"
    )
    columns = f"{'family':26} {'file':28} {'trained':>9} {'samples':>8} {'overhead':>9} {'as trees':>9} {'contract':>9}"
    print(columns + f" {'rows/s':>7} {'once':>7}  not trained / left out / not exact")
    for r in results:
        notes = {**r["rejected"], **r["omissions"], **_not_exact(Counter(r["contract"]))}
        notes = ", ".join(f"{k} {v}" for k, v in sorted(notes.items()))
        trained = f"{r['trained']}/{r['rows']}"
        print(
            f"{r['family']:26} {r['file']:28} {trained:>9} {r['samples']:>8} {r['overhead']:>8.2f}x "
            f"{r['tree_overhead']:>8.2f}x {100 * r['contract_exact']:>8.1f}% {r['rows_per_second']:>7.1f} "
            f"{r['render_once_rows_per_second']:>7.1f}  {notes}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
