"""Ray Data pipeline: the files' lines (read in Ray Data tasks) -> samples (Ray Data tasks) -> counts and
rejects -> validation split and a seeded shuffle -> packs.

Every input line is accounted for: it becomes a training row, a validation row (each trained as one
or more samples, with what of it is not trained counted by reason), a blank line, or a rejected row
with its file, line number and reason. What comes back to the driver is counts and the first examples
of each reason (``LineCounts``), never the rows: its memory does not grow with the data. Every line not
trained is written to rejected_rows.jsonl, streamed in file and line order.

Which rows are held out, and the order rows are packed in, come from a seeded key per line
(``sources.line_key``): a row is a validation row when its key falls below --validation_split of the key
range, and training rows are sorted by key before packing, which shuffles them across the whole data
set (sources sorted by file are mixed in every pack and step). The same seed gives the same split,
packs and batches, on both data paths and for any worker count.
"""

from __future__ import annotations

import bisect
import functools
import json
import os
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sftcore.data import DataError, LineCounts, parse_line, parse_row, row_format
from sftcore.masking import IGNORE_INDEX, EncodeOptions, encode_conversation
from sftcore.models import load_tokenizer
from sftcore.packing import PACK_WINDOW_ROWS, pack_rows
from sftcore.sources import (
    DataFile,
    columnar_lines,
    is_columnar,
    line_key,
    open_lines,
    resolve_data_files,
    seeded_key,
    split_lines,
)
from sftcore.storage import StoragePath
from sftcore.trees import build_trees, tree_stats

KEY_RANGE = 1 << 63  # line_key's keys are in [0, KEY_RANGE)
VALIDATION_LINES_KEPT = 1000  # the first validation rows' (file, line), for --eval_generate_rows
LINES_PER_BLOCK = 1024  # lines per block the reader hands to the encoders
GROUP_PARTITIONS = 64  # most shuffle partitions that gather packing windows (Ray's default of 200 is for big data)


@dataclass
class DatasetSummary(LineCounts):
    train_rows: int = 0
    validation_rows: int = 0
    # the sequences packed: the rows' samples, or with tree packing the prefix trees they merge into
    train_samples: int = 0
    validation_samples: int = 0
    train_tokens: int = 0
    train_trained_tokens: int = 0
    train_sequences: int = 0  # what a worker iterates over: packs, or samples without packing
    # training rows a mixing weight below 1 left out (sampling_copies 0); train_samples and the train
    # tokens count each row as often as its weight has it trained
    unsampled_rows: int = 0
    weights: dict[str, float] | None = None  # each file's mixing weight, when one is not 1
    # the first VALIDATION_LINES_KEPT validation rows as (file, line), in file and line order
    validation_lines: list[tuple[str, int]] = field(default_factory=list)
    packing_efficiency: float | None = None  # real tokens / (packs x max_seq_length)
    # the trained rows with the lowest and the highest key ({"key", "file", "line", "samples", "tokens", ...}):
    # what the split moves when the key threshold leaves one side empty
    lowest: dict[str, Any] | None = None
    highest: dict[str, Any] | None = None

    def merge(self, other: LineCounts) -> None:
        super().merge(other)
        assert isinstance(other, DatasetSummary)
        for key in (*_SPLIT_COUNTS, "unsampled_rows"):
            setattr(self, key, getattr(self, key) + getattr(other, key))
        self.validation_lines = sorted(self.validation_lines + other.validation_lines)[:VALIDATION_LINES_KEPT]
        candidates = [row for row in (self.lowest, self.highest, other.lowest, other.highest) if row]
        self.lowest = min(candidates, key=_row_key, default=None)
        self.highest = max(candidates, key=_row_key, default=None)


_SPLIT_COUNTS = ("train_rows", "validation_rows", "train_samples", "validation_samples", "train_tokens")
_SPLIT_COUNTS += ("train_trained_tokens",)


def _row_key(row: dict[str, Any]) -> tuple[int, str, int]:
    return row["key"], row["file"], row["line"]


LINE_STATS = ("samples", "tokens", "trained_tokens", "row_tokens", "trained_turns", "windowed_turns", "dropped_turns")
LINE_STATS += ("trees", "tree_tokens", "repeated_targets")
STATUS_COLUMNS = ["file", "line", "key", "blank", "error_reason", "error_message", "rejected_text", "omissions"]
STATUS_COLUMNS += ["shape", *LINE_STATS]
SEQUENCE_COLUMNS = ["line", "input_ids", "labels", "num_tokens", "num_trained"]
TREE_COLUMNS = ["position_ids", "parents"]  # a prefix tree's, besides SEQUENCE_COLUMNS (sftcore.trees)
_NO_STATUS = {
    "blank": False,
    "error_reason": "",
    "error_message": "",
    "rejected_text": "",
    "omissions": "[]",
    "shape": "",  # the shape the row was written in (sftcore.data.row_format)
    **dict.fromkeys(LINE_STATS, 0),
}
_EMPTY = {"input_ids": np.zeros(0, np.int32), "labels": np.zeros(0, np.int64), "num_tokens": 0, "num_trained": 0}
_EMPTY_TREE = dict.fromkeys(TREE_COLUMNS, np.zeros(0, np.int32))


class RowEncoder:
    """Loads the tokenizer once, then encodes batches of raw lines into samples. Each line's first
    output row (``sample`` 0) also carries the line's status: blank, its error, or its counts; and every
    row carries the line's key (``sources.line_key``)."""

    def __init__(
        self,
        model_name_or_path: str,
        options: EncodeOptions,
        seed: int,
        trust_remote_code: bool = False,
        chat_template: str | None = None,
    ):
        self.tokenizer = load_tokenizer(model_name_or_path, trust_remote_code, chat_template)
        self.options = options
        self.seed = seed

    def encode(self, file: str, line: int, raw: bytes) -> list[dict[str, Any]]:
        """The line's training sequences: its samples, or the prefix trees they merge into (``sample``
        numbers them)."""
        where = {"file": file, "line": line, "sample": 0, "key": line_key(self.seed, file, line)}
        empty = where | _EMPTY | _NO_STATUS | (_EMPTY_TREE if self.options.trees else {})
        if not raw.strip():
            return [empty | {"blank": True}]
        try:
            parsed = parse_line(raw)
            shape = row_format(parsed, self.options.data_format)
            row = parse_row(parsed, self.options.train_on, self.options.data_format)
            encoded = encode_conversation(row, self.tokenizer, self.options)
        except DataError as e:
            text = raw.decode("utf-8", errors="replace")
            return [empty | {"error_reason": e.reason, "error_message": str(e), "rejected_text": text}]
        sequences: list[Any] = encoded.samples
        if self.options.trees:
            sequences = build_trees(encoded.samples, self.options.max_seq_length)
        stats = encoded.stats() | tree_stats(sequences if self.options.trees else [])
        status = {k: stats[k] for k in LINE_STATS} | {"omissions": json.dumps(stats["omissions"]), "shape": shape}
        out = []
        for n, sequence in enumerate(sequences):
            labels = np.asarray(sequence.labels, dtype=np.int64)
            tree = (
                {k: np.asarray(getattr(sequence, k), dtype=np.int32) for k in TREE_COLUMNS}
                if self.options.trees
                else {}
            )
            out.append(
                where
                | {
                    "sample": n,
                    "input_ids": np.asarray(sequence.input_ids, dtype=np.int32),
                    "labels": labels,
                    "num_tokens": len(labels),
                    "num_trained": int((labels != IGNORE_INDEX).sum()),
                    **tree,
                    **_NO_STATUS,
                    **(status if n == 0 else {}),
                }
            )
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        rows = [
            out
            for file, line, raw in zip(batch["file"], batch["line"], batch["raw"], strict=True)
            for out in self.encode(str(file), int(line), bytes(raw))
        ]
        return columns_of(rows) if rows else {}  # a torchrun rank may get no lines


@functools.lru_cache(maxsize=2)
def _process_encoder(
    model_name_or_path: str, options: EncodeOptions, seed: int, trust_remote_code: bool, chat_template: str | None
) -> RowEncoder:
    return RowEncoder(model_name_or_path, options, seed, trust_remote_code, chat_template)


def encode_lines(
    batch: dict[str, np.ndarray],
    model_name_or_path: str,
    options: EncodeOptions,
    seed: int,
    trust_remote_code: bool,
    chat_template: str | None,
) -> dict[str, Any]:
    """Ray Data task: RowEncoder on a batch of lines. Tasks (not an actor pool) because Ray retries a
    task lost with its node, and reuses worker processes, so each process loads the tokenizer once."""
    return _process_encoder(model_name_or_path, options, seed, trust_remote_code, chat_template)(batch)


def _lines_block(file: str, lines: list[tuple[int, bytes]]) -> Any:
    import pyarrow as pa

    return pa.table(
        {
            "file": pa.array([file] * len(lines), pa.string()),
            "line": pa.array([n for n, _ in lines], pa.int64()),
            "raw": pa.array([raw for _, raw in lines], pa.binary()),
        }
    )


def _jsonl_lines_datasource(files: list[DataFile]) -> Any:
    """A Ray Data datasource of the files' lines as {"file", "line", "raw"}, blank lines included (they
    are counted), decompressed by extension. Built here because Ray's read_text drops line numbers."""
    from ray.data.datasource import FileBasedDatasource

    class JsonlLines(FileBasedDatasource):
        def __init__(self) -> None:
            super().__init__([f.path for f in files], filesystem=files[0].filesystem)
            self.names = {f.path: f.name for f in files}

        def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
            try:
                if is_columnar(path):  # Parquet needs random access
                    return filesystem.open_input_file(path)
                return super()._open_input_source(filesystem, path, **open_args)
            except OSError as e:  # gone since it was listed, no permission, a network or credential error
                raise DataError(f"{self.names[path]}: cannot be read ({e})", "unreadable_file") from None

        def _read_stream(self, f: Any, path: str) -> Iterator[Any]:
            lines: list[tuple[int, bytes]] = []
            try:
                for number, raw in columnar_lines(f, path) if is_columnar(path) else split_lines(f):
                    lines.append((number, raw))
                    if len(lines) == LINES_PER_BLOCK:
                        yield _lines_block(self.names[path], lines)
                        lines = []
            except OSError as e:  # a corrupt compressed file, a connection lost mid-file
                raise DataError(f"{self.names[path]}: cannot be read ({e})", "unreadable_file") from None
            if lines:
                yield _lines_block(self.names[path], lines)

    return JsonlLines()


def read_lines(files: list[DataFile]) -> Any:
    """The files' lines as a Ray Dataset, in file order. Each group of files on one filesystem is one
    read; files on this machine's disk are read by tasks on this node (other nodes may not have them)."""
    import ray
    import ray.data

    groups: list[list[DataFile]] = []
    for file in files:
        if groups and groups[-1][0].filesystem.equals(file.filesystem):
            groups[-1].append(file)
        else:
            groups.append([file])
    here = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    parts = [
        ray.data.read_datasource(_jsonl_lines_datasource(group), label_selector=here if group[0].is_local else None)
        for group in groups
    ]
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def validation_threshold(validation_split: float) -> int:
    """Rows whose key is below this are validation rows."""
    return int(max(0.0, min(1.0, validation_split)) * KEY_RANGE)


def count_lines(
    rows: list[dict[str, Any]], threshold: int, path: str, weights: dict[str, float] | None = None
) -> DatasetSummary:
    """The summary of these lines' status rows: what each line became, and the train / validation
    split for a key threshold (a training row counted as often as its file's weight has it trained).
    Summaries of disjoint parts merge into the summary of the whole."""
    summary = DatasetSummary(path=path, weights=weights)
    for row in sorted(rows, key=lambda row: (row["file"], row["line"])):
        file, line = str(row["file"]), int(row["line"])
        if row["blank"]:
            summary.blank(file)
        elif row["error_reason"]:
            summary.reject(file, line, DataError(row["error_message"], row["error_reason"]), row["rejected_text"])
        else:
            summary.add_row(file, line, row | {"omissions": json.loads(row["omissions"])})
            summary.files[file][f"as {row['shape']}"] += 1
            key = int(row["key"])
            stats = {"key": key, "file": file, "line": line}
            stats["copies"] = sampling_copies(key, weights[file]) if weights else 1
            # what is packed: the row's trees with tree packing, else its samples
            trees = int(row["trees"])
            stats["sequences"] = trees or int(row["samples"])
            stats["tokens"] = int(row["tree_tokens"]) if trees else int(row["tokens"])
            stats["trained_tokens"] = int(row["trained_tokens"]) - int(row["repeated_targets"])
            _count_split(summary, stats, threshold)
    return summary


def _count_split(summary: DatasetSummary, row: dict[str, Any], threshold: int, sign: int = 1) -> None:
    """Count (sign 1) or uncount (sign -1) a trained row on its side of the split."""
    if row["key"] < threshold:
        summary.validation_rows += sign
        summary.validation_samples += sign * row["sequences"]
        if sign > 0:
            bisect.insort(summary.validation_lines, (row["file"], row["line"]))
            del summary.validation_lines[VALIDATION_LINES_KEPT:]
        else:
            summary.validation_lines.remove((row["file"], row["line"]))
    else:
        copies = sign * row["copies"]
        summary.train_rows += sign
        summary.unsampled_rows += sign * (row["copies"] == 0)
        summary.train_samples += copies * row["sequences"]
        summary.train_tokens += copies * row["tokens"]
        summary.train_trained_tokens += copies * row["trained_tokens"]
        if summary.weights:  # each file's share of the training samples, for the weights' report
            summary.files[row["file"]]["train_samples"] += copies * row["sequences"]
    if sign > 0:
        summary.lowest = min(filter(None, (summary.lowest, row)), key=_row_key)
        summary.highest = max(filter(None, (summary.highest, row)), key=_row_key)


def settle_split(summary: DatasetSummary, threshold: int, validation_split: float) -> int:
    """The final key threshold. With --validation_split > 0 and two or more rows, both sides get at
    least one row: the lowest-key row is held out when none was, the highest-key one trained when
    every row was held out. The summary's counts follow."""
    if validation_split <= 0 or summary.rows < 2:
        return threshold
    if summary.validation_rows == 0:
        moved, new_threshold = summary.lowest, summary.lowest["key"] + 1
    elif summary.train_rows == 0:
        moved, new_threshold = summary.highest, summary.highest["key"]
    else:
        return threshold
    _count_split(summary, moved, threshold, sign=-1)
    _count_split(summary, moved, new_threshold)
    return new_threshold


def _summarize_status(
    batch: dict[str, np.ndarray], threshold: int, path: str, weights: dict[str, float] | None
) -> dict[str, Any]:
    """Ray Data task: a batch of status rows as one pickled partial summary."""
    return {"summary": [pickle.dumps(count_lines(rows_of(batch), threshold, path, weights))]}


def file_weights(files: list[DataFile]) -> dict[str, float] | None:
    """Each file's mixing weight by name; None when every weight is 1 (no weighing to do)."""
    return {f.name: f.weight for f in files} if any(f.weight != 1 for f in files) else None


def sampling_copies(key: int, weight: float) -> int:
    """How many times a training row is trained per epoch under its source's mixing weight: the whole
    part of the weight, plus one more for a seeded share of the rows equal to the fractional part (so
    a weight of 0.5 trains about half the rows, 2.5 trains every row twice and half of them thrice)."""
    whole = int(weight)
    if weight == whole:
        return whole
    return whole + (seeded_key(key, "copies") < (weight - whole) * KEY_RANGE)


def weigh_samples(batch: dict[str, np.ndarray], weights: dict[str, float]) -> dict[str, Any]:
    """Ray Data task: each training sample as many times as sampling_copies says; every copy after the
    first gets a key of its own, so copies land in other packing windows and packs, and train at other steps."""
    rows = []
    for row in rows_of(batch):
        key = int(row["key"])
        for copy in range(sampling_copies(key, weights.get(str(row["file"]), 1.0))):
            rows.append(row if copy == 0 else row | {"key": seeded_key(key, copy)})
    return columns_of(rows) if rows else {k: v[:0] for k, v in batch.items()}


def untrained_entries(rows: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """rejected_rows.jsonl's entries from status rows: each rejected line, and each omission of a trained row."""
    for row in rows:
        where = {"file": str(row["file"]), "line": int(row["line"])}
        if row["error_reason"]:
            yield where | {"reason": row["error_reason"], "message": row["error_message"], "text": row["rejected_text"]}
        for reason, message in json.loads(row["omissions"]):
            yield where | {"reason": reason, "message": message, "row_trained": True}


def write_entries(entries: Iterator[dict[str, Any]], path: str | os.PathLike | StoragePath) -> None:
    with StoragePath.of(path).open_output() as f:
        for entry in entries:
            f.write((json.dumps(entry) + "\n").encode())


def _finish_summary(summary: DatasetSummary, train_sequences: int, packing: bool, max_seq_length: int) -> None:
    summary.train_sequences = train_sequences
    if packing:
        summary.packing_efficiency = summary.train_tokens / max(1, train_sequences * max_seq_length)


def columns_of(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows (dicts) as a batch of columns, the shape map_batches functions and collate take."""
    return {key: [row[key] for row in rows] for key in rows[0]}


def rows_of(columns: dict[str, Any]) -> list[dict[str, Any]]:
    return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def window_count(samples: int) -> int:
    """Packing windows for this many samples: about PACK_WINDOW_ROWS each."""
    return max(1, -(-samples // PACK_WINDOW_ROWS))


def window_of(key: int, windows: int) -> int:
    """A sample's packing window: a slice of the key range, so a window holds rows from the whole data set
    (whatever file they come from), and which rows share a window depends on the seed alone."""
    return key * windows // KEY_RANGE


def add_window(batch: dict[str, np.ndarray], windows: int) -> dict[str, np.ndarray]:
    batch["window"] = np.asarray([window_of(int(key), windows) for key in batch["key"]], dtype=np.int64)
    return batch


def pack_window(batch: dict[str, np.ndarray], budget: int | None) -> dict[str, Any]:
    """One window's samples in their shuffled order (sample_order), packed into sequences of at most
    budget tokens (None: as they are), each numbered within the window so the whole set has one
    deterministic order."""
    rows = sorted(rows_of(batch), key=sample_order)
    window = int(rows[0]["window"])
    columns = [k for k in (*SEQUENCE_COLUMNS, *TREE_COLUMNS) if k in batch]
    out = pack_rows(columns_of(rows), budget) if budget else {k: [row[k] for row in rows] for k in columns}
    count = len(next(iter(out.values())))
    return out | {"window": [window] * count, "position": list(range(count))}


def _windowed(ds: Any, samples: int, budget: int | None, trees: bool) -> Any:
    """A Ray Dataset of samples (or prefix trees) as packs (or, budget None, as they are) in their
    deterministic shuffled order."""
    columns = [*SEQUENCE_COLUMNS, *(TREE_COLUMNS if trees else []), "key", "file", "sample"]
    windows = window_count(samples)
    windowed = ds.select_columns(columns).map_batches(add_window, fn_args=(windows,))
    if windows == 1:  # all in one block: no shuffle needed to gather it
        one = windowed.repartition(1).map_batches(pack_window, fn_args=(budget,), batch_size=None, batch_format="numpy")
        return one.drop_columns(["window", "position"])
    groups = windowed.groupby("window", num_partitions=min(windows, GROUP_PARTITIONS))
    ordered = groups.map_groups(pack_window, fn_args=(budget,), batch_format="numpy").sort(["window", "position"])
    return ordered.drop_columns(["window", "position"])


def _windowed_lists(rows: list[dict[str, Any]], budget: int | None) -> list[dict[str, Any]]:
    """_windowed on in-memory samples."""
    windows: dict[int, list[dict[str, Any]]] = {}
    count = window_count(len(rows))
    for row in rows:
        window = window_of(row["key"], count)
        windows.setdefault(window, []).append(row | {"window": window})
    out = []
    for _, members in sorted(windows.items()):
        out += [
            {k: v for k, v in r.items() if k not in ("window", "position")}
            for r in rows_of(pack_window(columns_of(members), budget))
        ]
    return out


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
    rejected_file: str | os.PathLike | StoragePath | None = None,
) -> tuple[Any, Any | None, DatasetSummary]:
    """(train dataset, validation dataset or None, summary) as Ray Datasets. Datasets hold input_ids,
    labels and token counts per sample, or with packing per pack (plus position_ids and num_rows). A
    row's samples all go to the same split. Lines not trained are written to rejected_file."""
    import ray.data
    from ray.data.expressions import col

    files = resolve_data_files(data_path)
    encoding = read_lines(files).map_batches(
        encode_lines,
        fn_args=(model_name_or_path, options, seed, trust_remote_code, chat_template),
        batch_size=32,
        compute=ray.data.TaskPoolStrategy(size=encoder_concurrency),
        num_cpus=1,
    )
    try:
        encoded = encoding.materialize()
    except DataError as e:  # raised in a read task: Ray's error is a DataError too, with its traceback in the text
        cause = getattr(e, "cause", e)  # Ray Data appends its retry advice to the message: keep the first line
        raise DataError(str(cause).splitlines()[0], cause.reason) from None
    status = encoded.filter(expr=col("sample") == 0).select_columns(STATUS_COLUMNS)
    threshold = validation_threshold(validation_split)
    summary = DatasetSummary(path=data_path)
    weights = summary.weights = file_weights(files)
    parts = status.map_batches(_summarize_status, fn_args=(threshold, data_path, weights), batch_size=4096)
    for part in parts.iter_rows():
        summary.merge(pickle.loads(part["summary"]))
    threshold = settle_split(summary, threshold, validation_split)
    if rejected_file is not None and (summary.rejected_counts or summary.omission_counts):
        untrained = status.filter(expr=(col("error_reason") != "") | (col("omissions") != "[]"))
        rows = untrained.sort(["file", "line"]).iter_rows()
        write_entries(untrained_entries(rows), rejected_file)

    valid = encoded.filter(expr=(col("error_reason") == "") & ~col("blank"))
    budget = options.max_seq_length if packing else None
    training = valid.filter(expr=col("key") >= threshold)
    if weights:
        training = training.map_batches(weigh_samples, fn_args=(weights,), batch_format="numpy")
    train = _windowed(training, summary.train_samples, budget, options.trees).materialize()
    validation = None
    if summary.validation_rows:
        held_out = valid.filter(expr=col("key") < threshold)
        validation = _windowed(held_out, summary.validation_samples, budget, options.trees).materialize()
    _finish_summary(summary, train.count(), packing, options.max_seq_length)
    return train, validation, summary


def build_sequences(
    data_path: str,
    model_name_or_path: str,
    options: EncodeOptions,
    validation_split: float,
    seed: int,
    trust_remote_code: bool = False,
    packing: bool = True,
    chat_template: str | None = None,
    rejected_file: str | os.PathLike | StoragePath | None = None,
    rank: int = 0,
    world: int = 1,
    gather: Callable[[Any], list[Any]] = lambda value: [value],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, DatasetSummary]:
    """The same sequences as build_datasets, as in-memory lists, without Ray (torchrun / accelerate).
    Each of `world` processes encodes every world-th line; gather (an all-gather) shares the results,
    so every process ends with the same lists and summary. Rank 0 writes rejected_file."""
    encoder = RowEncoder(model_name_or_path, options, seed, trust_remote_code, chat_template)
    files = resolve_data_files(data_path)
    mine = []
    for file in files:
        lines = list(open_lines(file))[rank::world]
        if lines:
            mine += rows_of(encoder(columns_of([{"file": file.name, "line": n, "raw": raw} for n, raw in lines])))
    file_order = {file.name: i for i, file in enumerate(files)}  # as Ray Data reads them
    rows = sorted(
        (row for part in gather(mine) for row in part), key=lambda r: (file_order[r["file"]], r["line"], r["sample"])
    )
    status = [{k: row[k] for k in STATUS_COLUMNS} for row in rows if row["sample"] == 0]
    weights = file_weights(files)
    summary = count_lines(status, validation_threshold(validation_split), data_path, weights)
    threshold = settle_split(summary, validation_threshold(validation_split), validation_split)
    if rejected_file is not None and rank == 0 and (summary.rejected_counts or summary.omission_counts):
        write_entries(untrained_entries(iter(status)), rejected_file)

    valid = [row for row in rows if not row["error_reason"] and not row["blank"]]
    budget = options.max_seq_length if packing else None
    training = [row for row in valid if row["key"] >= threshold]
    if weights and training:
        training = rows_of(weigh_samples(columns_of(training), weights))
    train = _windowed_lists(training, budget)
    validation = _windowed_lists([row for row in valid if row["key"] < threshold], budget) or None
    _finish_summary(summary, len(train), packing, options.max_seq_length)
    return train, validation, summary


def sample_order(row: dict[str, Any]) -> tuple:
    """A sample's place in the seeded shuffle: a key per sample (the samples of a row split by turn are
    shuffled too, not trained one after another), then its file, line and number for a total order."""
    return seeded_key(row["key"], row["sample"]), row["file"], int(row["line"]), int(row["sample"])
