"""What a data file will train: counts, rejects and omissions by reason (with line numbers), how each
trained turn meets the token contract (checked afresh), and highlighted samples (trained text, and the
reasoning within it)."""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftcore.data import Conversation, DataError, LineCounts, parse_row
from sftcore.masking import FULL_HISTORY, IGNORE_INDEX, WINDOW, EncodedRow, EncodeOptions, Sample, encode_conversation
from sftcore.sources import read_jsonl
from sftcore.templates import adapt_to_template, template_support
from sftcore.trees import Tree, build_trees, tree_stats
from sftcore.turns import render_turn

_GREEN, _MAGENTA, _DIM, _RESET = "\x1b[1;32m", "\x1b[1;35m", "\x1b[2m", "\x1b[0m"
MASKED, TRAINED, REASONING = "masked", "trained", "reasoning"
_HISTORY = {FULL_HISTORY: "full history", WINDOW: "recent history only", "window_no_system": "without system prompt"}


# How a trained turn stands with the token contract (sftcore.masking): verified exact, or why it differs
EXACT, SHORTENED, FALLBACK_CALLS, MISMATCH = "exact", "history_shortened", "tool_calls_in_fallback_format", "mismatch"
_CONTRACT_WORDS = {
    EXACT: "exact (prompt and turn re-rendered and tokenized on their own give the sample's tokens)",
    SHORTENED: "trained with a shortened history (--overflow window): the prompt of a shortened conversation",
    FALLBACK_CALLS: "the template renders no tool calls: sftcore's <tool_call> JSON in prompt or turn",
    MISMATCH: "differ from a fresh render (a bug: please report it)",
}


def contract_outcomes(conv: Conversation, tokenizer: Any, encoded: EncodedRow) -> Counter:
    """Each trained turn of an encoded row by how it meets the token contract, checked afresh: its
    prompt rendered again and tokenized on its own must be the sample's tokens before it, its text
    tokenized on its own the trained tokens, and nothing else trained."""
    support = template_support(tokenizer)
    tc = adapt_to_template(conv, support)
    turn_messages = [k for k, trained in enumerate(tc.trained) if trained]
    first_call = next((k for k, m in enumerate(tc.sources) if any(s.get("tool_calls") for s in m)), None)
    outcomes = Counter()
    for sample in encoded.samples:
        spans = dict(zip(sample.turns, sample.spans, strict=True))
        trained = {i for first, last in sample.spans for i in range(first, last)}
        labels_ok = all(
            (label == token) == (i in trained) and label in (token, IGNORE_INDEX)
            for i, (token, label) in enumerate(zip(sample.input_ids, sample.labels, strict=True))
        )
        for ordinal, (first, last) in spans.items():
            message = turn_messages[ordinal]
            if not support.tool_calls and first_call is not None and first_call <= message:
                outcomes[FALLBACK_CALLS] += 1
            elif sample.history != FULL_HISTORY:
                outcomes[SHORTENED] += 1
            else:
                turn = render_turn(tokenizer, tc, support, list(range(message + 1)), message, ordinal)
                prompt = tokenizer(turn.context, add_special_tokens=False)["input_ids"]
                text = tokenizer(turn.text, add_special_tokens=False)["input_ids"]
                exact = labels_ok and sample.input_ids[:first] == prompt and sample.input_ids[first:last] == text
                outcomes[EXACT if exact else MISMATCH] += 1
    return outcomes


@dataclass
class DataReport(LineCounts):
    messages: int = 0
    split_rows: int = 0  # rows trained as several samples
    examples: list[tuple[str, int, EncodedRow]] = field(default_factory=list)  # (file, line, encoded)
    example_trees: list[list[Tree]] = field(default_factory=list)  # each example row's prefix trees
    contract: dict[str, Counter] = field(default_factory=dict)  # file -> trained turns by contract outcome


def inspect_file(
    path: str | Path, tokenizer: Any, options: EncodeOptions | None = None, num_examples: int = 1
) -> DataReport:
    options = options or EncodeOptions()
    report = DataReport(path=str(path))
    for result in read_jsonl(str(path)):
        if result.row is None and result.error is None:
            report.blank(result.file)
            continue
        try:
            if result.error:
                raise result.error
            conv = parse_row(result.row, options.train_on, options.data_format)
            encoded = encode_conversation(conv, tokenizer, options)
        except DataError as e:
            report.reject(result.file, result.line, e)
            continue
        trees = build_trees(encoded.samples, options.max_seq_length)  # as --tree_packing auto trains them
        report.add_row(result.file, result.line, encoded.stats() | tree_stats(trees))
        report.contract.setdefault(result.file, Counter()).update(contract_outcomes(conv, tokenizer, encoded))
        report.messages += len(conv.messages)
        report.split_rows += len(encoded.samples) > 1
        if len(report.examples) < num_examples:
            report.examples.append((result.file, result.line, encoded))
            report.example_trees.append(trees)
    return report


def tree_outline(tree: Tree, tokenizer: Any, preview: int = 60) -> str:
    """A prefix tree as its segments (runs of tokens each the child of the one before), in order: the
    first sample's path, then each branch with the token it grows from, its size, the tokens it trains
    and how it begins."""
    starts = [i for i, parent in enumerate(tree.parents) if i == 0 or parent != i - 1]
    ends = [*starts[1:], len(tree.parents)]
    lines = []
    for start, end in zip(starts, ends, strict=True):
        parent = tree.parents[start]
        trained = sum(label != IGNORE_INDEX for label in tree.labels[start:end])
        begins = tokenizer.decode(tree.input_ids[start : start + 24])[:preview]
        where = "first path" if parent < 0 else f"  branch from token {parent} (position {tree.position_ids[start]})"
        lines.append(f"{where}: tokens {start}-{end - 1} ({end - start}, {trained} trained): {begins!r}")
    return "\n".join(lines)


def tree_title(path: str, line: int, trees: list[Tree], n: int) -> str:
    tree = trees[n]
    return (
        f"{path}:{line} tree {n + 1}/{len(trees)}: {len(tree.input_ids)} tokens for {tree.samples} samples of "
        f"{tree.sample_tokens} tokens, {tree.branches} branches"
    )


def format_report(report: DataReport, max_lines_per_reason: int = 10) -> str:
    trained_pct = 100 * report.trained_tokens / max(report.tokens, 1)
    bad = report.bad_row_count()
    out = [
        f"{report.path}",
        f"  lines: {report.lines} ({report.blank_lines} blank)",
        f"  rows to train: {report.rows}   rejected: {report.rejected_total} ({bad} bad input, "
        f"{report.rejected_total - bad} valid but nothing to train)",
        f"  messages: {report.messages}   trained assistant turns: {report.trained_turns}",
        f"  samples: {report.samples} ({report.split_rows} rows split into several)   tokens in samples / in rows: "
        f"{report.tokens} / {report.row_tokens} = {report.split_overhead:.2f}x",
        f"  tokens: {report.token_costs()} (--tree_packing auto, {report.tree_tokens} tokens; "
        f"{report.repeated_targets} targets two samples share, trained once)",
        f"  tokens: {report.tokens}   trained tokens: {report.trained_tokens} ({trained_pct:.1f}%)",
        f"  mean tokens/sample: {report.tokens / max(report.samples, 1):.0f}",
        f"  turns with a shortened history (--overflow window): {report.windowed_turns}   "
        f"turns that did not fit: {report.dropped_turns}",
    ]
    for file, outcomes in sorted(report.contract.items()):
        total = sum(outcomes.values())
        out.append(f"  token contract in {file}: {outcomes[EXACT]} of {total} trained turns exact")
        out += [f"    {n} {_CONTRACT_WORDS[kind]}" for kind, n in sorted(outcomes.items()) if kind != EXACT]
    if report.rejected_counts:
        out.append(report.format_rejected(max_lines_per_reason))
    if report.omission_counts:
        out.append("  left out of rows that are trained (turns that do not fit, history, text the template drops):")
        out.append(report.format_omissions(max_lines_per_reason))
    return "\n".join(out)


def _runs(sample: Sample, tokenizer: Any) -> list[tuple[str, str]]:
    """Consecutive (kind, decoded text) runs of one sample; kinds: MASKED, TRAINED, REASONING."""
    reasoning = {i for first, last in sample.reasoning for i in range(first, last)}
    runs: list[tuple[str, list[int]]] = []
    for i, (token, label) in enumerate(zip(sample.input_ids, sample.labels, strict=True)):
        kind = MASKED if label == IGNORE_INDEX else REASONING if i in reasoning else TRAINED
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(token)
        else:
            runs.append((kind, [token]))
    return [(kind, tokenizer.decode(tokens)) for kind, tokens in runs]


def sample_title(path: str, line: int, encoded: EncodedRow, n: int) -> str:
    sample = encoded.samples[n]
    turns = f"turn {sample.turns[0] + 1}" + (f"-{sample.turns[-1] + 1}" if len(sample.turns) > 1 else "")
    return f"{path}:{line} sample {n + 1}/{len(encoded.samples)} ({turns}; {_HISTORY[sample.history]})"


def _elided(text: str, limit: int | None) -> str:
    """A long stretch of context shortened to its beginning and end (the end leads into the turn)."""
    if limit is None or len(text) <= limit:
        return text
    head, tail = limit // 3, limit - limit // 3
    return f"{text[:head]}\n[... {len(text) - limit} characters of context not shown ...]\n{text[-tail:]}"


def highlight_terminal(sample: Sample, tokenizer: Any, color: bool = True, context_chars: int | None = None) -> str:
    """Trained text in bold green, trained reasoning in bold magenta, the rest dimmed; without colour,
    trained text is wrapped in [[ ]] and reasoning in (( )). ``context_chars``: show at most that much
    of each stretch of untrained context (its beginning and end)."""
    runs = [(kind, _elided(text, context_chars) if kind == MASKED else text) for kind, text in _runs(sample, tokenizer)]
    if color:
        style = {MASKED: _DIM, TRAINED: _GREEN, REASONING: _MAGENTA}
        return "".join(f"{style[kind]}{text}{_RESET}" for kind, text in runs)
    marks = {MASKED: ("", ""), TRAINED: ("[[", "]]"), REASONING: ("((", "))")}
    return "".join(marks[kind][0] + text + marks[kind][1] for kind, text in runs)


def highlight_html(report: DataReport, tokenizer: Any) -> str:
    sections = []
    for file, line, encoded in report.examples:
        for n, sample in enumerate(encoded.samples):
            body = "".join(
                f'<span class="{kind}">{html.escape(text)}</span>' for kind, text in _runs(sample, tokenizer)
            )
            sections.append(f"<h2>{html.escape(sample_title(file, line, encoded, n))}</h2><pre>{body}</pre>")
    return (
        "<!doctype html><meta charset='utf-8'><title>sftcore data inspection</title><style>"
        "body{font-family:sans-serif} pre{white-space:pre-wrap;font-size:13px}"
        ".trained{background:#c8f7c5;color:#064} .reasoning{background:#f3d1f4;color:#606}"
        " .masked{color:#777}</style>"
        f"<h1>Trained tokens (green; reasoning in purple) in {html.escape(report.path)}</h1>"
        f"<pre>{html.escape(format_report(report))}</pre>" + "".join(sections)
    )
