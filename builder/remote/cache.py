"""The remote half of the cache: content-addressed files and action records behind an fsspec URL.

Layout under the URL: `files/<sha256[:2]>/<sha256>` (one blob per distinct file content) and
`actions/<key>.json` (the same action record the local store keeps). The protocol:

- upload: every blob first, the record last, each one atomic (a rename on file systems, a single
  PUT or a completed multipart upload on object stores), so a reader never finds a record whose
  blobs are missing; two machines uploading the same key write blobs of equal bytes and either
  record is whole;
- download: blobs into a temporary folder of the local store, each file's size and sha256 checked
  against the record before the folder is moved into the store; a mismatch discards the download
  and marks the blob, so the rebuilt entry's upload overwrites it.
"""

from __future__ import annotations

import os
import re
import stat
import uuid
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any

from pydantic import ValidationError

from builder.engine.elsewhere import Fetched, Progress
from builder.engine.files import remove_tree
from builder.engine.hashing import file_digest, tree_digest
from builder.engine.keys import action_key
from builder.engine.store import ActionRecord, Store
from builder.errors import UserError

_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class RemoteUnavailable(UserError):
    """The remote cannot be read or written at all (no such bucket, no credentials, no network)."""


class RemoteCache:
    def __init__(self, url: str):
        import fsspec

        self.url = url
        try:
            # A fresh instance: fsspec's shared one caches listings, stale in a long-lived Dask worker.
            self.fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True)
        except (ImportError, ValueError) as problem:
            raise UserError(
                f"cannot open the remote cache {url}: {problem}",
                "use s3://bucket/prefix, file:///shared/folder or another URL fsspec knows (its package installed)",
            ) from None
        self.root = root.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        # Where a rename is atomic and cheap; object stores get a single PUT instead (atomic there).
        self.renames = "file" in protocols or "local" in protocols
        self.bad_blobs: set[str] = set()

    def blob_path(self, sha256: str) -> str:
        return f"{self.root}/files/{sha256[:2]}/{sha256}"

    def record_path(self, key: str) -> str:
        return f"{self.root}/actions/{key}.json"

    def lookup(self, key: str) -> tuple[ActionRecord | None, str | None]:
        """The remote record for `key` (None when absent), or why a record that exists is unusable."""
        try:
            data = self._call(self.fs.cat_file, self.record_path(key))
        except FileNotFoundError:
            return None, None
        try:
            record = ActionRecord.model_validate_json(data)
        except (ValidationError, ValueError):
            return None, "action record unreadable"
        if record.key != key or action_key(record.key_inputs) != key:
            return None, "action record does not match its key"
        for rel, digest in record.files.items():
            if not _safe_relative(rel) or not _HEX64.match(digest.sha256):
                return None, f"action record names an unsafe file {rel!r}"
        if tree_digest(record.files) != record.output_digest:
            return None, "action record's output digest does not match its files"
        return record, None

    def has(self, key: str) -> bool:
        return bool(self._call(self.fs.exists, self.record_path(key)))

    def fetch(self, key: str, store: Store, progress: Progress | None = None) -> Fetched:
        """Download `key`'s output into `store` (and its record), verified file by file first."""
        record, problem = self.lookup(key)
        if record is None:
            return Fetched(problem=problem)
        if store.object_path(record.output_digest).is_dir() and store.check_object(record) is None:
            store.write_record(record)  # the same output under another key is already here
            return Fetched(record)
        store.tmp.mkdir(parents=True, exist_ok=True)
        folder = store.tmp / f"remote-{key[:16]}-{uuid.uuid4().hex[:8]}"
        try:
            problem = self._download(record, folder, progress)
            if problem is not None:
                return Fetched(problem=problem)
            store.publish(folder, record.output_digest, record.files)
        finally:
            remove_tree(folder)
        store.write_record(record)
        return Fetched(record)

    def _download(self, record: ActionRecord, folder: Path, progress: Progress | None) -> str | None:
        total = sum(f.size for f in record.files.values())
        done = 0
        folder.mkdir(parents=True)
        for rel, expected in sorted(record.files.items()):
            local = folder / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            blob = self.blob_path(expected.sha256)
            try:
                self._call(self.fs.get_file, blob, str(local), callback=_callback(progress, done, total))
            except FileNotFoundError:
                return f"{rel}: file {expected.sha256[:12]} missing"
            actual = file_digest(local)
            if actual.size != expected.size or actual.sha256 != expected.sha256:
                self.bad_blobs.add(expected.sha256)
                what = f"size {actual.size} != {expected.size}" if actual.size != expected.size else "sha256 mismatch"
                return f"{rel}: file {expected.sha256[:12]} is corrupt ({what})"
            if expected.executable:
                os.chmod(local, os.stat(local).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
            done += expected.size
            if progress is not None:
                progress(done, total)
        return None

    def upload(self, record: ActionRecord, folder: Path, progress: Progress | None = None) -> None:
        """Blobs the remote lacks (or holds corrupt) first, then the record."""
        total = sum(f.size for f in record.files.values())
        done = 0
        for rel, digest in sorted(record.files.items()):
            blob = self.blob_path(digest.sha256)
            if digest.sha256 in self.bad_blobs or not self._holds(blob, digest.size):
                self._put(folder / rel, blob, _callback(progress, done, total))
                self.bad_blobs.discard(digest.sha256)
            done += digest.size
            if progress is not None:
                progress(done, total)
        data = record.model_dump_json(indent=1).encode()
        if self.renames:
            staging = self._staging_name(self.record_path(record.key))
            self._write(self.fs.makedirs, f"{self.root}/actions", exist_ok=True)
            self._write(self.fs.pipe_file, staging, data)
            self._write(self.fs.mv, staging, self.record_path(record.key))
        else:
            self._write(self.fs.pipe_file, self.record_path(record.key), data)

    def record_keys(self) -> list[str]:
        try:
            names = self._call(self.fs.ls, f"{self.root}/actions", detail=False)
        except FileNotFoundError:
            return []
        keys = [PurePosixPath(name).name.removesuffix(".json") for name in names]
        return sorted(key for key in keys if _HEX64.match(key))

    def _holds(self, blob: str, size: int) -> bool:
        try:
            info = self._call(self.fs.info, blob)
        except FileNotFoundError:
            return False
        return bool(info.get("size") == size)

    def _put(self, local: Path, blob: str, callback: Any) -> None:
        if not self.renames:
            self._write(self.fs.put_file, str(local), blob, callback=callback)
            return
        staging = self._staging_name(blob)
        self._write(self.fs.makedirs, blob.rsplit("/", 1)[0], exist_ok=True)
        try:
            self._write(self.fs.put_file, str(local), staging, callback=callback)
            self._write(self.fs.mv, staging, blob)
        finally:
            if self._call(self.fs.exists, staging):
                self._call(self.fs.rm_file, staging)

    @staticmethod
    def _staging_name(path: str) -> str:
        folder, _, name = path.rpartition("/")
        return f"{folder}/.{name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"

    def _call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """`function` with the remote's failures (other than a missing file) as one clear error."""
        try:
            return function(*args, **kwargs)
        except FileNotFoundError:
            raise
        except (OSError, RuntimeError, ValueError) as problem:
            raise self._unavailable(problem) from None
        except Exception as problem:  # botocore/aiohttp errors do not derive from OSError
            if type(problem).__module__.split(".")[0] in ("botocore", "aiobotocore", "aiohttp", "s3fs", "gcsfs"):
                raise self._unavailable(problem) from None
            raise

    def _write(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A write, where a missing file means a missing bucket or folder: the remote is unusable."""
        try:
            return self._call(function, *args, **kwargs)
        except FileNotFoundError as problem:
            raise self._unavailable(problem) from None

    def _unavailable(self, problem: BaseException) -> RemoteUnavailable:
        return RemoteUnavailable(
            f"the remote cache {self.url} cannot be used: {type(problem).__name__}: {problem}",
            "check the URL, that the bucket or folder exists, and the credentials in the environment "
            "(AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL for a non-AWS S3)",
        )


def _safe_relative(rel: str) -> bool:
    """A record from a remote is not trusted: its file names must stay inside the output folder."""
    path = PurePosixPath(rel)
    parts_ok = all(part not in ("", ".", "..") for part in path.parts)
    return bool(rel) and "\\" not in rel and not path.is_absolute() and parts_ok


def _callback(progress: Progress | None, before: int, total: int) -> Any:
    """An fsspec callback reporting bytes of one file as progress of the whole transfer."""
    from fsspec.callbacks import Callback, NoOpCallback

    if progress is None:
        return NoOpCallback()
    report: Progress = progress

    class _Bytes(Callback):
        def call(self, *args: Any, **kwargs: Any) -> None:
            report(before + int(self.value), total)

    return _Bytes()
