"""Ray Data pipeline: JSONL lines -> samples (Ray Data tasks) -> rejects reported -> train / validation split.

Every input line is accounted for: it becomes a training row, a validation row (each trained as one
or more samples, with what of it is not trained counted by reason), a blank line, or a rejected row
with its line number and reason.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sftcore.data import DataError, LineCounts, check_readable_file, parse_line, parse_row
from sftcore.masking import IGNORE_INDEX, EncodeOptions, encode_conversation
from sftcore.models import load_tokenizer
from sftcore.packing import PACK_WINDOW_ROWS, pack_rows


@dataclass
class DatasetSummary(LineCounts):
    train_rows: int = 0
    validation_rows: int = 0
    train_tokens: int = 0
    train_trained_tokens: int = 0
    train_sequences: int = 0  # what a worker iterates over: packs, or samples without packing
    validation_lines: list[int] = field(default_factory=list)  # line numbers of the validation rows
    packing_efficiency: float | None = None  # real tokens / (packs x max_seq_length)


LINE_STATS = ("samples", "tokens", "trained_tokens", "row_tokens", "trained_turns", "windowed_turns", "dropped_turns")
STATUS_COLUMNS = ["line", "error_reason", "error_message", "rejected_text", "omissions", *LINE_STATS]
SEQUENCE_COLUMNS = ["line", "input_ids", "labels", "num_tokens", "num_trained"]
_NO_STATUS = {
    "error_reason": "",
    "error_message": "",
    "rejected_text": "",
    "omissions": "[]",
    **dict.fromkeys(LINE_STATS, 0),
}


class RowEncoder:
    """Loads the tokenizer once, then encodes batches of raw lines into samples. Each line's first
    output row (``sample`` 0) also carries the line's status: its error, or its counts."""

    def __init__(
        self,
        model_name_or_path: str,
        options: EncodeOptions,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
    ):
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code, chat_template)
        self.options = options

    def encode(self, line: int, text: str) -> list[dict[str, Any]]:
        try:
            row = parse_row(parse_line(text), self.options.train_on)
            encoded = encode_conversation(row, self.tokenizer, self.options)
        except DataError as e:
            empty = {"input_ids": np.zeros(0, np.int32), "labels": np.zeros(0, np.int64), "num_tokens": 0}
            error = {"error_reason": e.reason, "error_message": str(e), "rejected_text": text}
            return [{"line": line, "sample": 0, **empty, "num_trained": 0, **_NO_STATUS, **error}]
        stats = encoded.stats()
        status = {k: stats[k] for k in LINE_STATS} | {"omissions": json.dumps(stats["omissions"])}
        out = []
        for n, sample in enumerate(encoded.samples):
            labels = np.asarray(sample.labels, dtype=np.int64)
            out.append(
                {
                    "line": line,
                    "sample": n,
                    "input_ids": np.asarray(sample.input_ids, dtype=np.int32),
                    "labels": labels,
                    "num_tokens": len(labels),
                    "num_trained": int((labels != IGNORE_INDEX).sum()),
                    **_NO_STATUS,
                    **(status if n == 0 else {}),
                }
            )
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = [
            out for line, text in zip(batch["line"], batch["text"], strict=True) for out in self.encode(int(line), text)
        ]
        return columns_of(rows) if rows else {}  # a torchrun rank may get no lines


@functools.lru_cache(maxsize=2)
def _process_encoder(
    model_name_or_path: str, options: EncodeOptions, trust_remote_code: bool, chat_template: str | None
) -> RowEncoder:
    return RowEncoder(model_name_or_path, options, trust_remote_code, chat_template)


def encode_lines(
    batch: dict[str, np.ndarray],
    model_name_or_path: str,
    options: EncodeOptions,
    trust_remote_code: bool,
    chat_template: str | None,
) -> dict[str, Any]:
    """Ray Data task: RowEncoder on a batch of lines. Tasks (not an actor pool) because Ray retries a
    task lost with its node, and reuses worker processes, so each process loads the tokenizer once."""
    return _process_encoder(model_name_or_path, options, trust_remote_code, chat_template)(batch)


def _read_lines(path: Path, summary: DatasetSummary) -> list[dict[str, Any]]:
    """Non-blank UTF-8 lines as {"line", "text"} items; counts lines and blanks, rejects undecodable ones."""
    items = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            summary.lines += 1
            if not raw.strip():
                summary.blank_lines += 1
                continue
            try:
                items.append({"line": number, "text": raw.decode("utf-8")})
            except UnicodeDecodeError as e:
                error = DataError(f"invalid UTF-8 at byte {e.start}", "invalid_utf8")
                summary.reject(number, error, raw.decode("utf-8", errors="replace"))
    return items


def _split_lines(lines: list[int], validation_split: float, seed: int) -> set[int]:
    """Deterministic validation lines for a seed: the same rows whatever the worker count."""
    if validation_split <= 0 or len(lines) < 2:
        return set()
    count = min(len(lines) - 1, max(1, round(len(lines) * validation_split)))
    return set(random.Random(seed).sample(sorted(lines), count))


def _account(summary: DatasetSummary, status: list[dict[str, Any]], validation_split: float, seed: int) -> set[int]:
    """Fill the summary from every encoded line's status (rejects in line order, what each trained row
    yielded, train / validation counts) and return the validation lines."""
    for row in status:
        if row["error_reason"]:
            summary.reject(int(row["line"]), DataError(row["error_message"], row["error_reason"]), row["rejected_text"])
    summary.rejected.sort(key=lambda r: r["line"])
    good = sorted((row for row in status if not row["error_reason"]), key=lambda row: row["line"])
    validation_lines = _split_lines([int(row["line"]) for row in good], validation_split, seed)
    summary.validation_lines = sorted(validation_lines)
    for row in good:
        summary.add_row(int(row["line"]), row | {"omissions": json.loads(row["omissions"])})
        if row["line"] in validation_lines:
            summary.validation_rows += 1
        else:
            summary.train_rows += 1
            summary.train_tokens += int(row["tokens"])
            summary.train_trained_tokens += int(row["trained_tokens"])
    return validation_lines


def _start_summary(data_path: str) -> tuple[DatasetSummary, list[dict[str, Any]]]:
    path = check_readable_file(data_path)
    summary = DatasetSummary(path=str(data_path))
    items = _read_lines(path, summary)
    if not items and not summary.rejected:
        raise DataError(f"{data_path}: no rows (only blank lines)", "empty_file")
    return summary, items


def _finish_summary(summary: DatasetSummary, train_sequences: int, packing: bool, max_seq_length: int) -> None:
    summary.train_sequences = train_sequences
    if packing:
        summary.packing_efficiency = summary.train_tokens / max(1, train_sequences * max_seq_length)


def columns_of(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows (dicts) as a batch of columns, the shape map_batches functions and collate take."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def rows_of(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def build_datasets(
    data_path: str,
    model_name_or_path: str,
    options: EncodeOptions,
    validation_split: float,
    seed: int,
    encoder_concurrency: int = 1,
    trust_remote_code: bool = False,
    packing: bool = True,
    chat_template: str | None = None,
) -> tuple[Any, Any | None, DatasetSummary]:
    """(train dataset, validation dataset or None, summary) as Ray Datasets. Datasets hold input_ids,
    labels and token counts per sample, or with packing per pack (plus position_ids and num_rows). A
    row's samples all go to the same split."""
    import ray.data
    from ray.data.expressions import col

    summary, items = _start_summary(data_path)
    encoded = (
        ray.data.from_items(items)
        .map_batches(
            encode_lines,
            fn_args=(model_name_or_path, options, trust_remote_code, chat_template),
            batch_size=32,
            compute=ray.data.TaskPoolStrategy(size=encoder_concurrency),
            num_cpus=1,
        )
        .materialize()
    )
    status = encoded.select_columns(["sample", *STATUS_COLUMNS]).to_pandas().to_dict("records")
    validation_lines = _account(summary, _line_status(status), validation_split, seed)

    valid = encoded.filter(expr=col("error_reason") == "").select_columns(SEQUENCE_COLUMNS)
    held_out = sorted(validation_lines)
    train = valid.filter(expr=col("line").not_in(held_out)) if held_out else valid
    validation = valid.filter(expr=col("line").is_in(held_out)) if held_out else None
    budget = options.max_seq_length
    if packing:
        train, validation = (
            None if ds is None else ds.map_batches(pack_rows, fn_kwargs={"budget": budget}, batch_size=PACK_WINDOW_ROWS)
            for ds in (train, validation)
        )
    train = train.materialize()
    validation = validation.materialize() if validation is not None else None
    _finish_summary(summary, train.count(), packing, budget)
    return train, validation, summary


def _line_status(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["sample"] == 0]


def build_sequences(
    data_path: str,
    model_name_or_path: str,
    options: EncodeOptions,
    validation_split: float,
    seed: int,
    trust_remote_code: bool = False,
    packing: bool = True,
    chat_template: str | None = None,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[Any], list[Any]] = lambda value: [value],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, DatasetSummary]:
    """The same sequences as build_datasets, as in-memory lists, without Ray (torchrun / accelerate).
    Each of `world` processes encodes every world-th line; gather (an all-gather) shares the results,
    so every process ends with the same lists and summary."""
    summary, items = _start_summary(data_path)
    mine = {"line": [i["line"] for i in items[rank::world]], "text": [i["text"] for i in items[rank::world]]}
    encoded = rows_of(RowEncoder(model_name_or_path, options, trust_remote_code, chat_template)(mine))
    rows = sorted((row for part in gather(encoded) for row in part), key=lambda row: (row["line"], row["sample"]))
    validation_lines = _account(summary, _line_status(rows), validation_split, seed)

    valid = [{k: row[k] for k in SEQUENCE_COLUMNS} for row in rows if not row["error_reason"]]
    train = [row for row in valid if row["line"] not in validation_lines]
    validation = [row for row in valid if row["line"] in validation_lines] or None
    budget = options.max_seq_length
    if packing:
        train, validation = (None if part is None else _pack_in_windows(part, budget) for part in (train, validation))
    _finish_summary(summary, len(train), packing, budget)
    return train, validation, summary


def _pack_in_windows(rows: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    packs = []
    for start in range(0, len(rows), PACK_WINDOW_ROWS):
        packs += rows_of(pack_rows(columns_of(rows[start : start + PACK_WINDOW_ROWS]), budget))
    return packs
