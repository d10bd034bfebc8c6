"""Filesystem primitives the engine relies on for crash safety: every write lands whole or not at all."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write through a sibling temp file and rename, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: Path, value: Any) -> None:
    write_bytes_atomic(path, json.dumps(value, indent=1, sort_keys=True).encode())


def remove_tree(path: Path) -> None:
    """Delete a folder even when a stage left read-only files or folders in it."""

    def make_writable_and_retry(function, failed_path, _error):
        parent = os.path.dirname(failed_path)
        os.chmod(parent, os.stat(parent).st_mode | stat.S_IWUSR | stat.S_IXUSR)
        if os.path.isdir(failed_path) and not os.path.islink(failed_path):
            os.chmod(failed_path, os.stat(failed_path).st_mode | stat.S_IRWXU)
        function(failed_path)

    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        handler = "onexc" if sys.version_info >= (3, 12) else "onerror"
        shutil.rmtree(path, **{handler: make_writable_and_retry})


def set_writable(root: Path, writable: bool) -> None:
    """Add or drop write permission on every file under `root`; published objects are read-only.

    A file with more than one link is left as it is: its inode is shared with another owner (a
    stage may hard-link a Hugging Face cache blob), whose permissions are not ours to change. Its
    recorded digest still catches any change to its bytes.
    """
    for folder, _dirs, names in os.walk(root):
        for name in names:
            file = os.path.join(folder, name)
            info = os.lstat(file)
            mode = info.st_mode
            if stat.S_ISLNK(mode) or info.st_nlink > 1:
                continue
            mode = mode | stat.S_IWUSR if writable else mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)
            os.chmod(file, stat.S_IMODE(mode))
