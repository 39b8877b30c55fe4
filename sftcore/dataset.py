"""Ray Data pipeline: JSONL lines -> encoded rows (actor pool) -> rejects reported -> train / validation split.

Every input line is accounted for: it becomes a training row, a validation row, a blank line, or a
rejected row with its line number and reason.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sftcore.data import DataError, LineCounts, check_readable_file, parse_line, parse_row
from sftcore.masking import IGNORE_INDEX, encode_conversation
from sftcore.models import load_tokenizer
from sftcore.packing import PACK_WINDOW_ROWS, pack_rows


@dataclass
class DatasetSummary(LineCounts):
    train_rows: int = 0
    validation_rows: int = 0
    train_tokens: int = 0
    train_trained_tokens: int = 0
    train_sequences: int = 0  # what a worker iterates over: packs, or rows without packing
    packing_efficiency: float | None = None  # real tokens / (packs x max_seq_length)


class RowEncoder:
    """Ray Data actor: loads the tokenizer once, then encodes batches of raw lines."""

    def __init__(self, model_name_or_path: str, max_seq_length: int, trust_remote_code: bool = False):
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code)
        self.max_seq_length = max_seq_length

    def encode(self, text: str) -> dict[str, Any]:
        try:
            encoded = encode_conversation(parse_row(parse_line(text)), self.tokenizer, self.max_seq_length)
        except DataError as e:
            return {"error_reason": e.reason, "error_message": str(e)}
        labels = np.asarray(encoded["labels"], dtype=np.int64)
        return {
            "input_ids": np.asarray(encoded["input_ids"], dtype=np.int32),
            "labels": labels,
            "num_tokens": len(labels),
            "num_trained": int((labels != IGNORE_INDEX).sum()),
            "truncated": encoded["truncated"],
            "error_reason": "",
            "error_message": "",
        }

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        empty = np.zeros(0, dtype=np.int32)
        out: dict[str, list] = {
            k: []
            for k in (
                "line",
                "input_ids",
                "labels",
                "num_tokens",
                "num_trained",
                "truncated",
                "error_reason",
                "error_message",
                "rejected_text",
            )
        }
        for line, text in zip(batch["line"], batch["text"], strict=True):
            encoded = self.encode(text)
            out["line"].append(int(line))
            out["input_ids"].append(encoded.get("input_ids", empty))
            out["labels"].append(encoded.get("labels", empty.astype(np.int64)))
            for key, default in (("num_tokens", 0), ("num_trained", 0), ("truncated", False)):
                out[key].append(encoded.get(key, default))
            out["error_reason"].append(encoded["error_reason"])
            out["error_message"].append(encoded["error_message"])
            out["rejected_text"].append(text if encoded["error_reason"] else "")
        return out


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
    """Fill the summary from every encoded line's status (rejects in line order, train / validation
    counts) and return the validation lines."""
    for row in status:
        if row["error_reason"]:
            summary.reject(int(row["line"]), DataError(row["error_message"], row["error_reason"]), row["rejected_text"])
    summary.rejected.sort(key=lambda r: r["line"])
    good = [row for row in status if not row["error_reason"]]
    validation_lines = _split_lines([int(row["line"]) for row in good], validation_split, seed)
    for row in good:
        if row["line"] in validation_lines:
            summary.validation_rows += 1
        else:
            summary.train_rows += 1
            summary.train_tokens += int(row["num_tokens"])
            summary.train_trained_tokens += int(row["num_trained"])
    summary.truncated_rows = sum(bool(row["truncated"]) for row in good)
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


STATUS_COLUMNS = ["line", "error_reason", "error_message", "rejected_text", "num_tokens", "num_trained", "truncated"]
SEQUENCE_COLUMNS = ["line", "input_ids", "labels", "num_tokens", "num_trained"]


def build_datasets(
    data_path: str,
    model_name_or_path: str,
    max_seq_length: int,
    validation_split: float,
    seed: int,
    encoder_concurrency: int = 1,
    trust_remote_code: bool = False,
    packing: bool = True,
) -> tuple[Any, Any | None, DatasetSummary]:
    """(train dataset, validation dataset or None, summary) as Ray Datasets. Datasets hold input_ids,
    labels and token counts per row, or with packing per pack (plus position_ids and num_rows)."""
    import ray.data

    summary, items = _start_summary(data_path)
    encoded = (
        ray.data.from_items(items)
        .map_batches(
            RowEncoder,
            fn_constructor_args=(model_name_or_path, max_seq_length, trust_remote_code),
            batch_size=32,
            concurrency=encoder_concurrency,
            num_cpus=1,
        )
        .materialize()
    )
    status = encoded.select_columns(STATUS_COLUMNS).to_pandas().to_dict("records")
    validation_lines = _account(summary, status, validation_split, seed)

    valid = encoded.filter(lambda r: r["error_reason"] == "").select_columns(SEQUENCE_COLUMNS)
    train = valid.filter(lambda r: r["line"] not in validation_lines)
    validation = valid.filter(lambda r: r["line"] in validation_lines) if validation_lines else None
    if packing:
        train, validation = (
            None
            if ds is None
            else ds.map_batches(pack_rows, fn_kwargs={"budget": max_seq_length}, batch_size=PACK_WINDOW_ROWS)
            for ds in (train, validation)
        )
    train = train.materialize()
    validation = validation.materialize() if validation is not None else None
    _finish_summary(summary, train.count(), packing, max_seq_length)
    return train, validation, summary


def build_sequences(
    data_path: str,
    model_name_or_path: str,
    max_seq_length: int,
    validation_split: float,
    seed: int,
    trust_remote_code: bool = False,
    packing: bool = True,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[Any], list[Any]] = lambda value: [value],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, DatasetSummary]:
    """The same sequences as build_datasets, as in-memory lists, without Ray (torchrun / accelerate).
    Each of `world` processes encodes every world-th line; gather (an all-gather) shares the results,
    so every process ends with the same lists and summary."""
    summary, items = _start_summary(data_path)
    mine = {"line": [i["line"] for i in items[rank::world]], "text": [i["text"] for i in items[rank::world]]}
    encoded = rows_of(RowEncoder(model_name_or_path, max_seq_length, trust_remote_code)(mine))
    rows = sorted((row for part in gather(encoded) for row in part), key=lambda row: row["line"])
    validation_lines = _account(summary, rows, validation_split, seed)

    valid = [{k: row[k] for k in SEQUENCE_COLUMNS} for row in rows if not row["error_reason"]]
    train = [row for row in valid if row["line"] not in validation_lines]
    validation = [row for row in valid if row["line"] in validation_lines] or None
    if packing:
        train, validation = (
            None if part is None else _pack_in_windows(part, max_seq_length) for part in (train, validation)
        )
    _finish_summary(summary, len(train), packing, max_seq_length)
    return train, validation, summary


def _pack_in_windows(rows: list[dict[str, Any]], budget: int) -> list[dict[str, Any]]:
    packs = []
    for start in range(0, len(rows), PACK_WINDOW_ROWS):
        packs += rows_of(pack_rows(columns_of(rows[start : start + PACK_WINDOW_ROWS]), budget))
    return packs
