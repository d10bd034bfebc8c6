"""Content digests of files and folders, memoised by (inode, size, mtime_ns) so unchanged files cost a stat."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from builder.engine.files import write_json_atomic
from builder.errors import UserError
from builder.faults import FAULT_ERRNOS

_BLOCK = 1 << 20
_MEMO_FORMAT = 1


class FileDigest(BaseModel):
    sha256: str
    size: int
    executable: bool = False


def canonical_json(value: Any) -> bytes:
    """Sorted keys, no whitespace: equal values always give equal bytes, hence equal keys."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical_json(value)).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def tree_digest(files: dict[str, FileDigest]) -> str:
    """Digest of a folder from its files' (relative posix path, sha256, size, executable bit)."""
    rows = [[rel, f.sha256, f.size, f.executable] for rel, f in sorted(files.items())]
    return sha256_json(rows)


class DigestMemo:
    """Remembers file digests by absolute path and stat identity; shared by threads, saved atomically."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._entries: dict[str, list] = {}
        self._dirty = False
        if path.is_file():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                data = {}  # a damaged memo only costs re-hashing
            if isinstance(data, dict) and data.get("format") == _MEMO_FORMAT:
                self._entries = data.get("entries", {})

    def digest(self, path: Path, *, trust_memo: bool = True) -> FileDigest:
        """Digest of the regular file at `path` (symlinks followed), re-hashed only when its stat changed."""
        info = os.stat(path)
        identity = [info.st_ino, info.st_size, info.st_mtime_ns]
        key = str(path)
        executable = bool(info.st_mode & stat.S_IXUSR)
        with self._lock:
            known = self._entries.get(key)
        if trust_memo and known is not None and known[:3] == identity:
            return FileDigest(sha256=known[3], size=info.st_size, executable=executable)
        sha = sha256_file(path)
        self.remember(path, info, sha)
        return FileDigest(sha256=sha, size=info.st_size, executable=executable)

    def remember(self, path: Path, info: os.stat_result, sha: str) -> None:
        """Record a digest computed elsewhere, e.g. for a file that was just moved into the store."""
        with self._lock:
            self._entries[str(path)] = [info.st_ino, info.st_size, info.st_mtime_ns, sha]
            self._dirty = True

    def forget_missing(self) -> None:
        """Drop entries whose file is gone, so the memo does not grow without bound."""
        with self._lock:
            gone = [key for key in self._entries if not os.path.exists(key)]
            for key in gone:
                del self._entries[key]
            self._dirty = self._dirty or bool(gone)

    def save(self) -> None:
        with self._lock:
            if not self._dirty:
                return
            snapshot = {"format": _MEMO_FORMAT, "entries": dict(self._entries)}
            self._dirty = False
        try:
            write_json_atomic(self.path, snapshot)
        except OSError as problem:
            # The memo only saves re-hashing: a read-only or full cache can still be planned and verified.
            if problem.errno not in FAULT_ERRNOS:
                raise


class NotRegularFile(ValueError):
    """A folder being digested holds a symlink or special file where only regular files may be."""

    def __init__(self, relative: str, what: str):
        super().__init__(f"{relative}: {what}")
        self.relative = relative
        self.what = what


def list_files(root: Path, *, follow_symlinks: bool, within: Path | None = None) -> list[str]:
    """Relative posix paths of the regular files under `root`; empty folders do not count.

    Stage outputs must not contain symlinks (they could point anywhere, so the digest would not
    describe the content); external inputs may, e.g. the Hugging Face cache links to blobs, but
    when `within` is given every link must lead inside it, checked before it is followed.
    """
    found: list[str] = []
    seen = {os.path.realpath(root)}
    for folder, dirs, names in os.walk(root, followlinks=follow_symlinks):
        base = Path(folder)
        for name in [*dirs, *names]:
            if not (base / name).is_symlink():
                continue
            relative = (base / name).relative_to(root).as_posix()
            if not follow_symlinks:
                raise NotRegularFile(relative, "is a symlink")
            real = Path(os.path.realpath(base / name))
            if within is not None and not real.is_relative_to(within):
                raise NotRegularFile(relative, f"is a symlink to {real}, outside {within}")
        if follow_symlinks:
            for name in dirs:
                real_dir = os.path.realpath(base / name)
                if real_dir in seen:
                    raise NotRegularFile((base / name).relative_to(root).as_posix(), "links back to a folder (a loop)")
                seen.add(real_dir)
        for name in names:
            if not (base / name).is_file():
                raise NotRegularFile((base / name).relative_to(root).as_posix(), "is not a regular file")
            found.append((base / name).relative_to(root).as_posix())
    return sorted(found)


def file_digest(path: Path) -> FileDigest:
    """Digest without the memo, for files about to move (a memo entry for their old path would be garbage)."""
    info = os.stat(path)
    return FileDigest(sha256=sha256_file(path), size=info.st_size, executable=bool(info.st_mode & stat.S_IXUSR))


def digest_folder(
    root: Path, memo: DigestMemo | None, *, follow_symlinks: bool = False, within: Path | None = None
) -> dict[str, FileDigest]:
    digest = memo.digest if memo is not None else file_digest
    return {rel: digest(root / rel) for rel in list_files(root, follow_symlinks=follow_symlinks, within=within)}


def content_digest(path: Path, memo: DigestMemo, within: Path | None = None) -> str:
    """Digest of an external input: a file's sha256, or a folder's tree digest (symlinks followed,
    and, when `within` is given, refused unless they lead inside it)."""
    real = Path(os.path.realpath(path))
    if within is not None and not real.is_relative_to(within):
        raise UserError(f"input {path} resolves to {real}, outside {within}", "move it inside the workspace")
    if real.is_file():
        return memo.digest(real).sha256
    if not real.is_dir():
        raise UserError(f"input not found: {path}", "check the path in the recipe, or create the file first")
    try:
        return tree_digest(digest_folder(real, memo, follow_symlinks=True, within=within))
    except NotRegularFile as problem:
        raise UserError(
            f"cannot read input {path}: {problem}", "remove the link or special file from the folder"
        ) from None
