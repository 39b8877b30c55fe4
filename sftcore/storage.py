"""Where a run's files live: a local directory, or a bucket (s3://, gs://, hdfs://: any pyarrow
filesystem). OUTPUT_DIR's checkpoints, manifests, metrics.jsonl, rejected_rows.jsonl, the resolved
config and final/ are all read and written through a StoragePath, so the same code serves both.

Object stores have no append and no rename: a file is written whole (an upload is atomic: an
object is either all there or not at all), and a "directory" is a key prefix. Locally a file is
written to a temporary name and renamed, for the same guarantee.

Credentials come from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS, instance roles), as
pyarrow reads them; a pickled pyarrow filesystem does not carry them, so a StoragePath can be sent
to Ray tasks and workers, which authenticate on their own node.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GLOB_CHARS = "*?["
_CHUNK_BYTES = 1 << 20


def filesystem_of(location: str) -> tuple[Any, str, str]:
    """(pyarrow filesystem, path within it, prefix that turns such a path back into the user's form)
    for a local path or a URI. A URI's filesystem is resolved from its part before any glob character.
    Unknown schemes and unreachable buckets raise ValueError with pyarrow's reason."""
    import pyarrow.fs as pafs

    scheme, sep, rest = location.partition("://")
    if not sep or len(scheme) < 2:  # a plain path (or a Windows drive letter)
        return pafs.LocalFileSystem(), os.path.abspath(location), ""
    if scheme == "hf":  # the Hugging Face hub (hf://datasets/ORG/NAME/...), through huggingface_hub's fsspec
        from huggingface_hub import HfFileSystem
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return PyFileSystem(FSSpecHandler(HfFileSystem())), rest.rstrip("/"), "hf://"
    glob_at = min((rest.find(c) for c in GLOB_CHARS if c in rest), default=-1)
    root = location if glob_at < 0 else f"{scheme}://{rest[:glob_at]}"
    try:
        filesystem, _ = pafs.FileSystem.from_uri(root)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError / ValueError for unknown schemes and bad URIs
        raise ValueError(first_line(e)) from None
    return filesystem, rest.rstrip("/"), f"{scheme}://"


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


@dataclass(frozen=True)
class StoragePath:
    """A file or directory on a pyarrow filesystem, with the few operations a run's output needs."""

    filesystem: Any  # pyarrow.fs.FileSystem
    path: str  # within filesystem
    uri: str  # as messages show it: the absolute local path, or the URI

    @classmethod
    def of(cls, location: str | os.PathLike | StoragePath) -> StoragePath:
        """A local path (made absolute) or a URI; ValueError if the URI's filesystem cannot be opened."""
        if isinstance(location, StoragePath):
            return location
        filesystem, path, prefix = filesystem_of(os.fspath(location))
        return cls(filesystem, path, prefix + path)

    def __truediv__(self, name: str) -> StoragePath:
        return StoragePath(self.filesystem, posixpath.join(self.path, name), posixpath.join(self.uri, name))

    def __str__(self) -> str:
        return self.uri

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> StoragePath:
        return StoragePath(self.filesystem, posixpath.dirname(self.path), posixpath.dirname(self.uri))

    @property
    def is_local(self) -> bool:
        return self.filesystem.type_name == "local"

    @property
    def local_path(self) -> Path:
        """This path on this machine's disk (only for local storage)."""
        if not self.is_local:
            raise ValueError(f"{self.uri} is not on a local filesystem")
        return Path(self.path)

    def _type(self) -> Any:
        return self.filesystem.get_file_info(self.path).type

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.Directory

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.File

    def mkdir(self) -> None:
        if self.is_local:  # the OS's own error (strerror) when it cannot be made
            Path(self.path).mkdir(parents=True, exist_ok=True)
        else:
            self.filesystem.create_dir(self.path, recursive=True)

    def read_bytes(self) -> bytes:
        """The whole file; FileNotFoundError if there is none."""
        if not self.is_file():  # some filesystems say "not found" as a plain OSError
            raise FileNotFoundError(2, "No such file", self.uri)
        with self.filesystem.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Write the whole file at once: a reader sees the old file or the new one, never part of it."""
        if self.is_local:
            tmp = Path(f"{self.path}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            tmp.replace(self.path)
            return
        with self.filesystem.open_output_stream(self.path) as f:  # one upload: atomic in an object store
            f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def open_output(self) -> Any:
        """A binary stream that writes the file (streamed; in a bucket it appears when closed)."""
        if self.is_local:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        return self.filesystem.open_output_stream(self.path)

    def sha256(self) -> str:
        digest = hashlib.sha256()
        with self.filesystem.open_input_stream(self.path) as f:
            while chunk := f.read(_CHUNK_BYTES):
                digest.update(chunk)
        return digest.hexdigest()

    def children(self) -> dict[str, bool]:
        """The names directly under this directory, each with whether it is a directory (none if missing)."""
        import pyarrow.fs as pafs

        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return {posixpath.basename(i.path): i.type == pafs.FileType.Directory for i in infos}

    def files(self) -> dict[str, int]:
        """Every file under this directory, at any depth, by relative path, with its size in bytes."""
        import pyarrow.fs as pafs

        infos = self.filesystem.get_file_info(pafs.FileSelector(self.path, recursive=True, allow_not_found=True))
        base = self.path.rstrip("/") + "/"
        return {i.path[len(base) :]: i.size for i in infos if i.type == pafs.FileType.File}

    def remove(self) -> None:
        """Delete this file or directory (with everything under it); nothing to do if it is not there."""
        import pyarrow.fs as pafs

        kind = self._type()
        if kind == pafs.FileType.Directory:
            self.filesystem.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.filesystem.delete_file(self.path)

    def upload(self, local_dir: Path, skip: tuple[str, ...] = ()) -> None:
        """Copy the files under local_dir into this directory (but those named in skip)."""
        import pyarrow.fs as pafs

        for file in sorted(p for p in local_dir.rglob("*") if p.is_file() and p.name not in skip):
            destination = self / file.relative_to(local_dir).as_posix()
            if self.is_local:
                Path(destination.path).parent.mkdir(parents=True, exist_ok=True)
            pafs.copy_files(
                str(file),
                destination.path,
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.filesystem,
            )

    def download(self, local_dir: Path) -> None:
        """Copy every file under this directory into local_dir."""
        import pyarrow.fs as pafs

        local_dir.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self.path, str(local_dir), source_filesystem=self.filesystem, destination_filesystem=pafs.LocalFileSystem()
        )
