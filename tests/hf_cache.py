"""A real Hugging Face cache layout, written by hand as the hub client writes it, and a loopback port
that records whether anything tried to reach "the Hub"."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path

SD21_BASE = "stabilityai/stable-diffusion-2-1-base"
REVISION = "5ede9e4bf3e3fd1cb0ef2f7a3fff13ee514fdf06"


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def write_hf_cache(cache: Path, repo_id: str, revision: str, folder: Path, *, tree_listing: bool = True) -> Path:
    """Put every file of `folder` into `cache` as the client's cache holds a downloaded repository:
    blobs named by their sha256 (LFS files: safetensors) or git blob id (others), `refs/main`, and
    `snapshots/<revision>/` with relative symlinks to the blobs; with `tree_listing`, the commit's file
    listing the client writes after an online download (`trees/<revision>.json`). Returns the snapshot."""
    storage = repo_folder(cache, repo_id)
    snapshot = storage / "snapshots" / revision
    (storage / "blobs").mkdir(parents=True, exist_ok=True)
    (storage / "refs").mkdir(exist_ok=True)
    (storage / "refs" / "main").write_text(revision)
    listing = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder).as_posix()
        data = file.read_bytes()
        git_id = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        lfs = file.suffix == ".safetensors"
        blob_name = hashlib.sha256(data).hexdigest() if lfs else git_id
        blob = storage / "blobs" / blob_name
        if not blob.exists():
            blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        listing[relative] = {"size": len(data), "blob_id": git_id}
        if lfs:
            listing[relative] |= {"lfs_sha256": blob_name, "lfs_size": len(data)}
    if tree_listing:
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{revision}.json").write_text(json.dumps({"format_version": 1, "files": listing}))
    return snapshot


class LoopbackHub:
    """A listening loopback socket that never answers: `HF_ENDPOINT` pointed at it turns any request
    into a connection waiting in the backlog, which `attempts()` counts without accepting it for good."""

    def __init__(self) -> None:
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.socket.setblocking(False)
        self.endpoint = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.count = 0

    def attempts(self) -> int:
        while True:
            try:
                connection, _ = self.socket.accept()
            except BlockingIOError:
                return self.count
            connection.close()
            self.count += 1

    def close(self) -> None:
        self.socket.close()
