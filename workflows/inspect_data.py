"""Show what a trajectory file will train: counts, rejects by reason with line numbers, highlighted examples.

    python workflows/inspect_data.py --data_path rows.jsonl --model_name_or_path smollm2-135m-instruct \
        [--max_seq_length 4096] [--examples 1] [--html out.html]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from sftcore.data import DataError
from sftcore.inspection import format_report, highlight_html, highlight_terminal, inspect_file
from sftcore.models import load_tokenizer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_path", required=True, help="JSONL file of {input, output} rows")
    parser.add_argument(
        "--model_name_or_path",
        default="smollm2-135m-instruct",
        help="tokenizer (and chat template) to render with: hub id, local dir or bundled alias",
    )
    parser.add_argument("--max_seq_length", type=int, default=None, help="truncate as training would")
    parser.add_argument("--examples", type=int, default=1, help="how many rows to show highlighted")
    parser.add_argument("--html", default=None, help="also write the highlighted examples to this HTML file")
    parser.add_argument("--no_color", action="store_true", help="mark trained text with [[ ]] instead of colour")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model_name_or_path)
    try:
        report = inspect_file(args.data_path, tokenizer, args.max_seq_length, args.examples)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    color = sys.stdout.isatty() and not args.no_color
    for line, encoded in report.examples:
        print(f"--- {args.data_path}:{line} (trained text {'in green' if color else 'inside [[ ]]'}) ---")
        print(highlight_terminal(encoded, tokenizer, color=color))
    print("--- report ---")
    print(format_report(report))
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(highlight_html(report, tokenizer))
        print(f"wrote {args.html}")
    print(f"({time.perf_counter() - start:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
