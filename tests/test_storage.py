"""StoragePath: the same operations on a local directory and in a bucket of a real S3 server (moto)."""

from __future__ import annotations

import pytest

from sftcore.storage import StoragePath


def test_files_are_written_whole_read_back_and_listed(output_dir):
    (output_dir / "a.txt").write_text("first")
    (output_dir / "a.txt").write_text("second")  # replaced whole, no temporary name left behind
    with (output_dir / "deep" / "b.jsonl").open_output() as f:
        f.write(b'{"x": 1}\n')
    assert (output_dir / "a.txt").read_text() == "second"
    assert output_dir.children() == {"a.txt": False, "deep": True}
    assert output_dir.files() == {"a.txt": 6, "deep/b.jsonl": 9}
    assert (output_dir / "deep").is_dir() and (output_dir / "a.txt").is_file()
    with pytest.raises(FileNotFoundError):
        (output_dir / "missing.txt").read_bytes()
    assert (output_dir / "nothing").children() == {} and (output_dir / "nothing").files() == {}


def test_a_directory_is_uploaded_downloaded_and_removed(output_dir, tmp_path):
    local = tmp_path / "checkpoint"
    (local / "adapter").mkdir(parents=True)
    (local / "adapter" / "weights.bin").write_bytes(b"w" * 1000)
    (local / "manifest.json").write_text("{}")
    (output_dir / "checkpoint-2").upload(local, skip=("manifest.json",))
    assert (output_dir / "checkpoint-2").files() == {"adapter/weights.bin": 1000}

    (output_dir / "checkpoint-2").download(tmp_path / "copy")
    assert (tmp_path / "copy" / "adapter" / "weights.bin").read_bytes() == b"w" * 1000
    (output_dir / "checkpoint-2").remove()
    (output_dir / "checkpoint-2").remove()  # nothing there: nothing to do
    assert not (output_dir / "checkpoint-2").exists()


def test_paths_and_uris_are_named_as_the_user_wrote_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = StoragePath.of("runs/one")
    assert local.is_local and local.uri == str(tmp_path / "runs" / "one") and local.local_path.name == "one"
    assert (local / "final").uri == str(tmp_path / "runs" / "one" / "final") and local.parent.name == "runs"
    with pytest.raises(ValueError):
        StoragePath.of("nosuchscheme://bucket/run")


def test_a_uri_keeps_its_scheme_and_is_not_local(s3_bucket):
    _, bucket = s3_bucket
    run = StoragePath.of(f"s3://{bucket}/runs/one/")
    assert run.uri == f"s3://{bucket}/runs/one" and run.path == f"{bucket}/runs/one" and not run.is_local
    assert str(run / "final") == f"s3://{bucket}/runs/one/final" and run.parent.uri == f"s3://{bucket}/runs"
    with pytest.raises(ValueError):
        _ = run.local_path
