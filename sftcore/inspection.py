"""What a data file will train: counts, rejects by reason (with line numbers), highlighted examples."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftcore.data import DataError, LineCounts, parse_row, read_jsonl
from sftcore.masking import IGNORE_INDEX, encode_conversation

_GREEN, _DIM, _RESET = "\x1b[1;32m", "\x1b[2m", "\x1b[0m"


@dataclass
class DataReport(LineCounts):
    rows: int = 0  # rows that will be trained on
    messages: int = 0
    trained_turns: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    dropped_turns: int = 0
    examples: list[tuple[int, dict[str, Any]]] = field(default_factory=list)


def inspect_file(
    path: str | Path, tokenizer: Any, max_seq_length: int | None = None, num_examples: int = 1
) -> DataReport:
    report = DataReport(path=str(path))
    for result in read_jsonl(path):
        report.lines += 1
        if result.row is None and result.error is None:
            report.blank_lines += 1
            continue
        try:
            if result.error:
                raise result.error
            conv = parse_row(result.row)
            encoded = encode_conversation(conv, tokenizer, max_seq_length)
        except DataError as e:
            report.reject(result.line, e)
            continue
        report.rows += 1
        report.messages += len(conv.messages)
        report.trained_turns += encoded["trained_turns"]
        report.tokens += len(encoded["input_ids"])
        report.trained_tokens += sum(label != IGNORE_INDEX for label in encoded["labels"])
        report.truncated_rows += encoded["truncated"]
        report.dropped_turns += encoded["dropped_turns"]
        if len(report.examples) < num_examples:
            report.examples.append((result.line, encoded))
    return report


def format_report(report: DataReport, max_lines_per_reason: int = 10) -> str:
    trained_pct = 100 * report.trained_tokens / max(report.tokens, 1)
    out = [
        f"{report.path}",
        f"  lines: {report.lines} ({report.blank_lines} blank)",
        f"  rows to train: {report.rows}   rejected: {len(report.rejected)}",
        f"  messages: {report.messages}   trained assistant turns: {report.trained_turns}",
        f"  tokens: {report.tokens}   trained tokens: {report.trained_tokens} ({trained_pct:.1f}%)",
        f"  mean tokens/row: {report.tokens / max(report.rows, 1):.0f}",
        f"  truncated rows: {report.truncated_rows} (assistant turns dropped by truncation: {report.dropped_turns})",
    ]
    for reason, count in sorted(report.rejected_by_reason().items()):
        entries = [r for r in report.rejected if r["reason"] == reason]
        out.append(f"  rejected [{reason}]: {count}")
        out += [f"    {report.path}:{r['line']}: {r['message']}" for r in entries[:max_lines_per_reason]]
        if count > max_lines_per_reason:
            out.append(f"    ... and {count - max_lines_per_reason} more")
    return "\n".join(out)


def _runs(encoded: dict[str, Any], tokenizer: Any) -> list[tuple[bool, str]]:
    """Consecutive (trained?, decoded text) runs of one encoded row."""
    runs: list[tuple[bool, list[int]]] = []
    for token, label in zip(encoded["input_ids"], encoded["labels"], strict=True):
        trained = label != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(token)
        else:
            runs.append((trained, [token]))
    return [(trained, tokenizer.decode(tokens)) for trained, tokens in runs]


def highlight_terminal(encoded: dict[str, Any], tokenizer: Any, color: bool = True) -> str:
    """Trained text in bold green, the rest dimmed; without colour, trained text is wrapped in [[ ]]."""
    if color:
        return "".join(f"{_GREEN if t else _DIM}{text}{_RESET}" for t, text in _runs(encoded, tokenizer))
    return "".join(f"[[{text}]]" if t else text for t, text in _runs(encoded, tokenizer))


def highlight_html(report: DataReport, tokenizer: Any) -> str:
    sections = []
    for line, encoded in report.examples:
        body = "".join(
            f'<span class="{"trained" if t else "masked"}">{html.escape(text)}</span>'
            for t, text in _runs(encoded, tokenizer)
        )
        sections.append(f"<h2>{html.escape(report.path)}:{line}</h2><pre>{body}</pre>")
    return (
        "<!doctype html><meta charset='utf-8'><title>sftcore data inspection</title><style>"
        "body{font-family:sans-serif} pre{white-space:pre-wrap;font-size:13px}"
        ".trained{background:#c8f7c5;color:#064} .masked{color:#777}</style>"
        f"<h1>Trained tokens (green) in {html.escape(report.path)}</h1>"
        f"<pre>{html.escape(format_report(report))}</pre>" + "".join(sections)
    )
