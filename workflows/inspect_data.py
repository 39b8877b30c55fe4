"""Show what a trajectory file will train: counts, rejects and text not trained by reason with line
numbers, and highlighted samples (trained text in green, its reasoning in magenta).

    python workflows/inspect_data.py --data_path rows.jsonl --model_name_or_path smollm2-135m-instruct \
        [--max_seq_length 4096] [--chat_template FILE] [--examples 1] [--html out.html]

The rendering options (--max_seq_length, --overflow, --history_rewrites, --train_on, --chat_template)
are training's own, with the same defaults, so the report shows what a run with them trains; `--config
run.yaml` takes them from a run's config file (its other options are ignored here).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from sftcore.config import RENDERING_OPTIONS, TrainConfig, add_config_arguments
from sftcore.data import DataError
from sftcore.inspection import (
    format_report,
    highlight_html,
    highlight_terminal,
    inspect_file,
    sample_title,
    tree_outline,
    tree_title,
)
from sftcore.models import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser, RENDERING_OPTIONS, defaults={"model_name_or_path": "smollm2-135m-instruct"}, argv=argv)
    parser.add_argument("--examples", type=int, default=1, help="how many rows to show highlighted, sample by sample")
    parser.add_argument("--html", default=None, help="also write the highlighted examples to this HTML file")
    parser.add_argument("--no_color", action="store_true", help="mark trained text with [[ ]] instead of colour")
    parser.add_argument(
        "--context_chars",
        type=int,
        default=1500,
        help="show at most this much of each stretch of untrained context, its beginning and end (0: all)",
    )
    args = vars(parser.parse_args(argv))
    examples, html_path, no_color = args.pop("examples"), args.pop("html"), args.pop("no_color")
    args.pop("config")
    context_chars = args.pop("context_chars") or None
    cfg = TrainConfig(**args)
    logging.basicConfig(level=logging.WARNING)

    start = time.perf_counter()
    try:
        tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.trust_remote_code, cfg.chat_template)
        report = inspect_file(cfg.data_path, tokenizer, cfg.encode_options(), examples)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    color = sys.stdout.isatty() and not no_color
    legend = "trained text in green, its reasoning in magenta" if color else "trained text in [[ ]], reasoning in (( ))"
    for (file, line, encoded), trees in zip(report.examples, report.example_trees, strict=True):
        for n, sample in enumerate(encoded.samples):
            print(f"--- {sample_title(file, line, encoded, n)}: {legend} ---")
            print(highlight_terminal(sample, tokenizer, color=color, context_chars=context_chars))
        for n, tree in enumerate(trees):
            print(f"--- {tree_title(file, line, trees, n)}: trained as one sequence ---")
            print(tree_outline(tree, tokenizer))
    print("--- report ---")
    print(format_report(report))
    if html_path:
        with open(html_path, "w", encoding="utf-8") as f:
            f.write(highlight_html(report, tokenizer))
        print(f"wrote {html_path}")
    print(f"({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
