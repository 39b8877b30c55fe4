"""--data_path's files, directories, globs and URIs, read line by line (sftcore.sources)."""

from __future__ import annotations

import bz2
import gzip
import io

import pyarrow as pa
import pytest

from sftcore.data import LINE_TOO_LONG, DataError, parse_line
from sftcore.sources import (
    glob_matches,
    line_key,
    open_lines,
    read_jsonl,
    resolve_data_files,
    split_data_path,
    split_lines,
)


def write(path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".bz2"):
        data = bz2.compress(data)
    elif path.name.endswith(".zst"):
        with pa.output_stream(str(path), compression="zstd") as f:
            f.write(data)
        return
    path.write_bytes(data)


@pytest.fixture
def tree(tmp_path):
    """shards/a.jsonl, shards/b.jsonl.gz, shards/more/c.jsonl.zst, shards/more/d.jsonl.bz2, shards/notes.txt"""
    root = tmp_path / "shards"
    write(root / "a.jsonl", b'{"n": 1}\n\n{"n": 2}\n')
    write(root / "b.jsonl.gz", b'{"n": 3}\nnot json\n')
    write(root / "more" / "c.jsonl.zst", b'{"n": 4}\n{"n": 5}')
    write(root / "more" / "d.jsonl.bz2", b'{"n": 6}\n')
    write(root / "notes.txt", b"not data\n")
    return root


def names(files) -> list[str]:
    return [file.name.rpartition("shards/")[2] for file in files]


def test_a_directory_is_every_jsonl_file_under_it_compressed_or_not_in_path_order(tree):
    assert names(resolve_data_files(str(tree))) == ["a.jsonl", "b.jsonl.gz", "more/c.jsonl.zst", "more/d.jsonl.bz2"]


def test_globs_match_by_path_component_and_double_star_spans_directories(tree):
    assert names(resolve_data_files(f"{tree}/*.jsonl*")) == ["a.jsonl", "b.jsonl.gz"]
    assert names(resolve_data_files(f"{tree}/**/*.jsonl.*")) == ["b.jsonl.gz", "more/c.jsonl.zst", "more/d.jsonl.bz2"]
    assert names(resolve_data_files(f"{tree}/m*/?.jsonl.[bz]*")) == ["more/c.jsonl.zst", "more/d.jsonl.bz2"]
    assert glob_matches("/x/**/*.jsonl", "/x/a.jsonl") and glob_matches("/x/**/*.jsonl", "/x/y/z/a.jsonl")
    assert not glob_matches("/x/*.jsonl", "/x/y/a.jsonl")


def test_comma_separated_sources_keep_their_order_and_name_each_file_once(tree):
    files = resolve_data_files(f"{tree}/more/d.jsonl.bz2, {tree}/a.jsonl,{tree}")
    assert names(files) == ["more/d.jsonl.bz2", "a.jsonl", "b.jsonl.gz", "more/c.jsonl.zst"]


def test_lines_are_decompressed_and_numbered_per_file_blank_and_bad_lines_included(tree):
    results = list(read_jsonl(str(tree)))
    got = [(r.file.rpartition("shards/")[2], r.line, r.row, r.error and r.error.reason) for r in results]
    assert got == [
        ("a.jsonl", 1, {"n": 1}, None),
        ("a.jsonl", 2, None, None),
        ("a.jsonl", 3, {"n": 2}, None),
        ("b.jsonl.gz", 1, {"n": 3}, None),
        ("b.jsonl.gz", 2, None, "invalid_json"),
        ("more/c.jsonl.zst", 1, {"n": 4}, None),
        ("more/c.jsonl.zst", 2, {"n": 5}, None),  # no newline at the end
        ("more/d.jsonl.bz2", 1, {"n": 6}, None),
    ]


def test_an_explicit_file_is_named_as_given(tree, monkeypatch):
    monkeypatch.chdir(tree)
    (file,) = resolve_data_files("a.jsonl")
    assert file.name == "a.jsonl" and [n for n, _ in open_lines(file)] == [1, 2, 3]


@pytest.mark.parametrize(
    "source,message",
    [
        ("{tree}/nope.jsonl", "{tree}/nope.jsonl: no such file"),
        ("{tree}/*.parquet", "{tree}/*.parquet: no file matches"),
        ("{tree}/more/../../", None),
        ("nosuchscheme://bucket/x.jsonl", "nosuchscheme://bucket/x.jsonl: cannot open this URI"),
        ("", "--data_path names no file"),
    ],
)
def test_sources_that_name_nothing_readable_are_clear_errors(tree, source, message):
    source = source.format(tree=tree)
    if message is None:  # tmp_path itself: its only JSONL files are the tree's
        assert len(resolve_data_files(source)) == 4
        return
    with pytest.raises(DataError) as info:
        resolve_data_files(source)
    assert str(info.value).startswith(message.format(tree=tree))


def test_a_directory_without_jsonl_and_empty_files_are_clear_errors(tmp_path):
    (tmp_path / "notes.txt").write_text("x\n")
    with pytest.raises(DataError, match="a directory with no .jsonl"):
        resolve_data_files(str(tmp_path))
    (tmp_path / "a.jsonl").write_text("")
    (tmp_path / "b.jsonl").write_text("")
    with pytest.raises(DataError, match=r"no rows \(all 2 files are empty\)"):
        resolve_data_files(str(tmp_path))
    with pytest.raises(DataError, match=r"a.jsonl: no rows \(the file is empty\)"):
        resolve_data_files(str(tmp_path / "a.jsonl"))


@pytest.mark.parametrize("chunk", [1, 3, 1 << 20])
def test_split_lines_matches_python_line_splitting_whatever_the_read_size(chunk, monkeypatch):
    import sftcore.sources

    monkeypatch.setattr(sftcore.sources, "_READ_BYTES", chunk)
    data = b'{"a": 1}\r\n\n\nx\n{"b": "\xc3\xa9"}'
    assert list(split_lines(io.BytesIO(data))) == list(enumerate(data.split(b"\n"), start=1))
    assert list(split_lines(io.BytesIO(b"a\n"))) == [(1, b"a")]
    assert list(split_lines(io.BytesIO(b""))) == []
    # a line past the cap is neither held nor joined: it reads as LINE_TOO_LONG, its neighbours intact
    monkeypatch.setattr(sftcore.sources, "MAX_LINE_BYTES", 8)
    long = b'{"a": 1}\n' + b"y" * 50 + b"\n12345678\n" + b"z" * 9
    assert list(split_lines(io.BytesIO(long))) == [
        (1, b'{"a": 1}'),
        (2, LINE_TOO_LONG),
        (3, b"12345678"),
        (4, LINE_TOO_LONG),
    ]
    with pytest.raises(DataError, match="line longer than 256 MiB") as info:
        parse_line(LINE_TOO_LONG)
    assert info.value.reason == "line_too_long"


def test_line_keys_depend_on_seed_file_and_line_only():
    assert line_key(1, "a.jsonl", 3) == line_key(1, "a.jsonl", 3)
    assert len({line_key(1, "a.jsonl", 3), line_key(2, "a.jsonl", 3), line_key(1, "b.jsonl", 3)}) == 3
    keys = [line_key(7, "f", n) for n in range(1, 2001)]
    assert all(0 <= k < 1 << 63 for k in keys)
    assert 0.45 < sum(k < 1 << 62 for k in keys) / len(keys) < 0.55  # spread evenly over the key range


def test_a_corrupt_compressed_file_is_named(tmp_path):
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(gzip.compress(b'{"input": "a", "output": "b"}\n' * 50)[:40])
    with pytest.raises(DataError, match=f"^{path}: cannot be read \\(.*[Tt]runcated"):
        list(read_jsonl(str(path)))


def test_s3_directories_globs_and_compressed_files_read_from_a_real_s3_server(s3_bucket):
    client, bucket = s3_bucket
    client.put_object(Bucket=bucket, Key="shards/a.jsonl", Body=b'{"n": 1}\nnot json\n')
    client.put_object(Bucket=bucket, Key="shards/deep/b.jsonl.gz", Body=gzip.compress(b'{"n": 2}\n\n{"n": 3}\n'))
    client.put_object(Bucket=bucket, Key="shards/readme.md", Body=b"# not data\n")
    where = f"s3://{bucket}/shards"
    assert [f.name for f in resolve_data_files(where)] == [f"{where}/a.jsonl", f"{where}/deep/b.jsonl.gz"]
    assert [f.name for f in resolve_data_files(f"{where}/*.jsonl")] == [f"{where}/a.jsonl"]
    got = [(r.file, r.line, r.row, r.error and r.error.reason) for r in read_jsonl(f"{where}/**/*.jsonl*")]
    assert got == [
        (f"{where}/a.jsonl", 1, {"n": 1}, None),
        (f"{where}/a.jsonl", 2, None, "invalid_json"),
        (f"{where}/deep/b.jsonl.gz", 1, {"n": 2}, None),
        (f"{where}/deep/b.jsonl.gz", 2, None, None),
        (f"{where}/deep/b.jsonl.gz", 3, {"n": 3}, None),
    ]
    with pytest.raises(DataError, match=f"^s3://{bucket}/nope.jsonl: no such file$"):
        resolve_data_files(f"s3://{bucket}/nope.jsonl")
    with pytest.raises(DataError, match=f"^s3://{bucket}/shards/\\*.parquet: no file matches$"):
        resolve_data_files(f"s3://{bucket}/shards/*.parquet")


def test_a_source_may_carry_a_mixing_weight_after_a_last_colon(tmp_path):
    assert split_data_path("a.jsonl:2, s3://b/x/*.jsonl:0.5,s3://b/y, c:d.jsonl,e.jsonl") == [
        ("a.jsonl", 2.0),
        ("s3://b/x/*.jsonl", 0.5),
        ("s3://b/y", 1.0),
        ("c:d.jsonl", 1.0),  # a colon in a name is not a weight
        ("e.jsonl", 1.0),
    ]
    for bad in ("a.jsonl:0", "a.jsonl:-1", "a.jsonl:nan", "a.jsonl:inf"):
        with pytest.raises(DataError, match="must be a number above 0"):
            split_data_path(bad)
    data = tmp_path / "a.jsonl"
    data.write_text('{"input": "q", "output": "a"}\n')
    assert [f.weight for f in resolve_data_files(f"{data}:3")] == [3.0]
    with pytest.raises(DataError, match="named twice in --data_path, with weights 3 and 1"):
        resolve_data_files(f"{data}:3,{tmp_path}")


# --- columnar files: Parquet, and the Arrow streams of datasets' save_to_disk folders ---


def _tau_rows(count: int) -> list[dict]:
    import json

    from conftest import DATA

    rows = [json.loads(line) for line in (DATA / "taubench_airline_dev.jsonl").read_text().splitlines()[:count]]
    return [{"input": json.loads(r["input"]), "output": r["output"]} for r in rows]


def test_parquet_files_and_save_to_disk_folders_train_the_same_samples_as_jsonl(tmp_path):
    """The same trajectories as JSONL rows, as OpenAI messages in a Parquet file and as a datasets
    folder (save_to_disk): token for token the same samples; a bad row is named by its file and row."""
    import json

    import datasets
    import pyarrow.parquet as pq

    from sftcore.dataset import build_sequences
    from sftcore.masking import EncodeOptions

    rows = _tau_rows(5)
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    messages = [{"messages": r["input"] + r["output"]} for r in rows]
    messages.append({"messages": [{"role": "user", "content": "q"}]})  # row 6: nothing to answer
    (tmp_path / "parquet").mkdir()
    pq.write_table(pa.Table.from_pylist(messages), tmp_path / "parquet" / "part-0.parquet")
    datasets.Dataset.from_list(messages).save_to_disk(str(tmp_path / "saved"))

    def samples(data_path: str):
        train, _, summary = build_sequences(
            data_path, "smollm2-135m-instruct", EncodeOptions(max_seq_length=4096), 0, 0, packing=False
        )
        return sorted((tuple(s["input_ids"]), tuple(s["labels"])) for s in train), summary

    expected, _ = samples(str(jsonl))
    assert len(expected) >= 5
    for source in (tmp_path / "parquet", tmp_path / "parquet" / "part-0.parquet", tmp_path / "saved"):
        got, summary = samples(str(source))
        assert got == expected, source
        assert summary.rows == 5 and [(r["line"], r["reason"]) for r in summary.rejected] == [(6, "no_assistant")]
        assert summary.shapes == {"messages": 5}  # said in the data line
        assert summary.rejected[0]["file"].endswith((".parquet", ".arrow"))

    # a datasets DatasetDict: which split to train on is said, not guessed
    datasets.DatasetDict({"train": datasets.Dataset.from_list(messages)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(
        DataError, match="a datasets DatasetDict \\(train\\): name the split to train on, as .*/dict/train"
    ):
        resolve_data_files(str(tmp_path / "dict"))
    # a file that is not Parquet: one line naming it
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match="broken.parquet: cannot be read \\(not a readable parquet file after row 0"):
        list(open_lines(resolve_data_files(str(tmp_path / "broken.parquet"))[0]))


def test_a_hub_dataset_without_hub_access_is_one_line_saying_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # never reach out from a test
    for source in ("Salesforce/APIGen-MT-5k", "hf://datasets/Salesforce/APIGen-MT-5k"):
        with pytest.raises(DataError) as info:
            resolve_data_files(source)
        message = str(info.value)
        assert "\n" not in message and "offline mode is enabled" in message
        assert "huggingface-cli download --repo-type dataset Salesforce/APIGen-MT-5k --local-dir DIR" in message
    assert str(info.value).startswith("hf://datasets/Salesforce/APIGen-MT-5k: cannot be read")
