"""Where the rows come from: --data_path's files, directories, globs and URIs (any pyarrow filesystem:
local, s3://, gs://, hdfs://...), resolved once, then read line by line, decompressing .gz / .zst /
.bz2 on the way. Each line is named by its file and 1-based line number wherever it is reported.

Columnar files are read as the same lines: a Parquet file's or an Arrow stream's rows (the files of a
``datasets`` folder written by ``save_to_disk``), each as one JSON line, numbered by row from 1. So
both data paths, the split and every report treat them as they treat JSONL.

Credentials for cloud storage come from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
instance roles), as pyarrow reads them; sftcore never stores them.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from sftcore.data import LINE_TOO_LONG, MAX_LINE_BYTES, DataError, LineResult, parse_line
from sftcore.storage import GLOB_CHARS, filesystem_of, first_line

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.bz2")
COLUMNAR_SUFFIXES = (".parquet", ".arrow")  # .arrow: the Arrow streams datasets' save_to_disk writes
ROW_SUFFIXES = JSONL_SUFFIXES + COLUMNAR_SUFFIXES  # what a directory picks up
_READ_BYTES = 1 << 20


@dataclass(frozen=True)
class DataFile:
    name: str  # as messages show it: the path or URI, as the user would write it
    path: str  # within its filesystem
    filesystem: Any  # pyarrow.fs.FileSystem (picklable: read tasks on other nodes open it themselves)
    size: int
    weight: float = 1.0  # how many times each of its training rows is trained per epoch (sampling_copies)

    @property
    def is_local(self) -> bool:
        return self.filesystem.type_name == "local"


def split_data_path(data_path: str) -> list[tuple[str, float]]:
    """--data_path as its sources: comma-separated files, directories, globs or URIs, each with an
    optional mixing weight after a last colon (``data/tau/:2``, ``s3://bucket/web/*.jsonl:0.5``)."""
    sources = [_weighted(part.strip()) for part in data_path.split(",") if part.strip()]
    if not sources:
        raise DataError("--data_path names no file", "missing_file")
    return sources


def _weighted(source: str) -> tuple[str, float]:
    location, colon, weight = source.rpartition(":")
    if not colon or "/" in weight or not location or location.endswith(":"):  # no weight: "a.jsonl", "s3://x"
        return source, 1.0
    try:
        value = float(weight)
    except ValueError:
        return source, 1.0  # a colon in a file name
    if not math.isfinite(value) or value <= 0:
        raise DataError(f"{source}: the weight after ':' must be a number above 0, not {weight}", "missing_file")
    return location, value


def _filesystem(source: str) -> tuple[Any, str, str]:
    try:
        return filesystem_of(source)
    except ValueError as e:
        raise DataError(f"{source}: cannot open this URI ({e})", "unreadable_file") from None


def _listed(filesystem: Any, base: str, source: str) -> list[Any]:
    """The files under base, at any depth, sorted by path."""
    import pyarrow.fs as pafs

    try:
        infos = filesystem.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    except Exception as e:  # pyarrow maps permission, network and credential errors to OSError subclasses
        raise DataError(f"{source}: cannot be listed ({first_line(e)})", "unreadable_file") from None
    return sorted((i for i in infos if i.is_file), key=lambda i: i.path)


def glob_matches(pattern: str, path: str) -> bool:
    """Shell-style matching by path component: '*' stays within a directory, '**' spans any number."""
    return _match(pattern.strip("/").split("/"), path.strip("/").split("/"))


def _match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match(pattern[1:], parts[1:])


HUB_DATASET = re.compile(r"[\w.-]+/[\w.-]+")  # --data_path ORG/NAME: a hub dataset, where no such path exists


def _resolve_one(source: str, weight: float) -> list[DataFile]:
    given = source
    if HUB_DATASET.fullmatch(source) and not source.endswith(ROW_SUFFIXES) and not os.path.exists(source):
        source = f"hf://datasets/{source}"
    if not source.startswith("hf://"):
        return _resolve_files(source, weight)
    try:
        return _resolve_files(source, weight)
    except DataError as e:  # most often: no hub access from here
        repo = "/".join(source.removeprefix("hf://datasets/").split("/")[:2])
        local = (
            f"{given}: no such file or directory here, nor as a Hugging Face hub dataset: " if given != source else ""
        )
        raise DataError(
            f"{local}{e} (where the hub cannot be reached, download the dataset where it can, `huggingface-cli "
            f"download --repo-type dataset {repo} --local-dir DIR`, and pass --data_path DIR)",
            e.reason,
        ) from None


def _resolve_files(source: str, weight: float) -> list[DataFile]:
    import pyarrow.fs as pafs

    filesystem, path, prefix = _filesystem(source)
    local = filesystem.type_name == "local"
    if any(c in path for c in GLOB_CHARS):
        fixed = path[: min(path.find(c) for c in GLOB_CHARS if c in path)].rpartition("/")[0]
        found = [i for i in _listed(filesystem, fixed or "/", source) if glob_matches(path, i.path)]
        if not found:
            raise DataError(f"{source}: no file matches", "missing_file")
    else:
        try:
            info = filesystem.get_file_info(path)
        except Exception as e:  # as in _listed
            raise DataError(f"{source}: cannot be read ({first_line(e)})", "unreadable_file") from None
        if info.type == pafs.FileType.NotFound:
            raise DataError(f"{source}: no such file", "missing_file")
        if info.type != pafs.FileType.Directory:
            return [DataFile(source, path, filesystem, info.size, weight)]
        listed = _listed(filesystem, path, source)
        if any(i.path == f"{path.rstrip('/')}/dataset_dict.json" for i in listed):
            splits = sorted({i.path[len(path.rstrip("/")) + 1 :].split("/")[0] for i in listed} - {"dataset_dict.json"})
            raise DataError(
                f"{source}: a datasets DatasetDict ({', '.join(splits)}): name the split to train on, as "
                f"{source.rstrip('/')}/{splits[-1] if 'train' not in splits else 'train'}",
                "missing_file",
            )
        found = [i for i in listed if i.path.endswith(ROW_SUFFIXES)]
        if not found:
            raise DataError(f"{source}: a directory with no {', '.join(ROW_SUFFIXES)} file in it", "missing_file")
    return [DataFile(i.path if local else prefix + i.path, i.path, filesystem, i.size, weight) for i in found]


def resolve_data_files(data_path: str) -> list[DataFile]:
    """Every file --data_path names, in the order given (a directory's or a glob's files sorted by
    path), each once; a DataError names the source that is missing, unreadable, or matches nothing."""
    files: dict[str, DataFile] = {}
    for source, weight in split_data_path(data_path):
        for file in _resolve_one(source, weight):
            first = files.setdefault(file.name, file)
            if first.weight != file.weight:
                raise DataError(
                    f"{file.name}: named twice in --data_path, with weights {first.weight:g} and {file.weight:g}",
                    "missing_file",
                )
    for file in files.values():
        if file.is_local:  # cheap here; a bucket's files are opened by the read tasks
            try:
                with open(file.path, "rb") as f:
                    f.read(1)
            except OSError as e:
                raise DataError(f"{file.name}: cannot be read ({e.strerror})", "unreadable_file") from None
    if all(file.size == 0 for file in files.values()):
        if len(files) == 1:
            raise DataError(f"{next(iter(files))}: no rows (the file is empty)", "empty_file")
        raise DataError(f"{data_path}: no rows (all {len(files)} files are empty)", "empty_file")
    return list(files.values())


def split_lines(stream: Any) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, the line without its newline) for each line of a binary stream; a line
    longer than MAX_LINE_BYTES comes as LINE_TOO_LONG (parse_line rejects it) and is not held."""
    number, pending, held = 0, [], 0  # the unfinished line's parts: joined once, when it ends
    while chunk := stream.read(_READ_BYTES):
        lines = chunk.split(b"\n")
        for line in lines[:-1]:
            number += 1
            if held + len(line) > MAX_LINE_BYTES:
                yield number, LINE_TOO_LONG
            else:
                yield number, b"".join([*pending, line]) if pending else line
            pending, held = [], 0
        if held <= MAX_LINE_BYTES:
            pending.append(lines[-1])
            held += len(lines[-1])
        if held > MAX_LINE_BYTES:
            pending = []  # too long already: only its end is still awaited
    if pending and held:
        yield number + 1, b"".join(pending)
    elif held > MAX_LINE_BYTES:
        yield number + 1, LINE_TOO_LONG


def is_columnar(path: str) -> bool:
    return path.endswith(COLUMNAR_SUFFIXES)


def columnar_lines(source: Any, path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based row number, the row as a JSON line) for each row of a Parquet file (``source`` opened
    for random access) or an Arrow stream. Fields a row lacks but the file's schema has are null."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    number = 0
    try:
        batches = (
            pq.ParquetFile(source).iter_batches(batch_size=256)
            if path.endswith(".parquet")
            else pa.ipc.open_stream(source)
        )
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield number, json.dumps(row, ensure_ascii=False, default=str).encode()
    except pa.ArrowException as e:  # not Parquet / Arrow, or corrupt (ArrowInvalid, ArrowIOError)
        raise OSError(f"not a readable {path.rpartition('.')[2]} file after row {number}: {first_line(e)}") from None


def open_lines(file: DataFile) -> Iterator[tuple[int, bytes]]:
    """A file's lines, decompressed by its extension (.gz, .zst, .bz2); a columnar file's rows as lines."""
    try:
        if is_columnar(file.path):
            with file.filesystem.open_input_file(file.path) as source:
                yield from columnar_lines(source, file.path)
            return
        with file.filesystem.open_input_stream(file.path, compression="detect") as stream:
            yield from split_lines(stream)
    except OSError as e:
        raise DataError(f"{file.name}: cannot be read ({first_line(e)})", "unreadable_file") from None


def read_jsonl(data_path: str) -> Iterator[LineResult]:
    """Every line of every file --data_path names, decoded: a row, an error (with its file and line
    number; yielded, not raised) or, for a blank line, neither."""
    for file in resolve_data_files(str(data_path)):
        for number, raw in open_lines(file):
            if not raw.strip():
                yield LineResult(file=file.name, line=number)
                continue
            try:
                yield LineResult(file=file.name, line=number, row=parse_line(raw))
            except DataError as e:
                yield LineResult(file=file.name, line=number, error=e)


def seeded_key(*parts: object) -> int:
    """A pseudo-random 63-bit key for these parts (the same parts give the same key on any machine)."""
    digest = hashlib.blake2b("\0".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def line_key(seed: int, file: str, line: int) -> int:
    """A seeded pseudo-random 63-bit key per line: which rows are held out for validation (the smallest
    keys) and the order rows are packed in (ascending). Depends only on the seed, the file's name and the
    line number, so both data paths and every worker count agree, without a list of all lines anywhere."""
    return seeded_key(seed, file, line)
