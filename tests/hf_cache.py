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


class FakeHub:
    """A Hugging Face Hub on a loopback port serving one repository at one commit from a folder: the
    tree listing, file metadata (HEAD) and file downloads the hub client asks for. Records every
    request; answers 404 to anything else. Used as `with FakeHub(...) as hub:`."""

    def __init__(self, repo_id: str, revision: str, folder: Path) -> None:
        import http.server
        import threading

        self.requests: list[tuple[str, str]] = []
        self.authorizations: set[str | None] = set()  # the Authorization header of every repository request
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *_):  # quiet: the test asserts on hub.requests
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                self._answer(body=True)

            def _answer(self, body: bool) -> None:
                path = self.path.split("?")[0]
                hub.requests.append((self.command, path))
                if repo_id in path:
                    hub.authorizations.add(self.headers.get("Authorization"))
                if path == f"/api/models/{repo_id}/tree/{revision}":
                    listing = [_tree_entry(name, data) for name, data in files.items()]
                    return self._send(200, json.dumps(listing).encode(), {"Content-Type": "application/json"}, body)
                prefix = f"/{repo_id}/resolve/{revision}/"
                if path.startswith(prefix) and path[len(prefix) :] in files:
                    data = files[path[len(prefix) :]]
                    entry = _tree_entry(path[len(prefix) :], data)
                    etag = entry["lfs"]["oid"] if "lfs" in entry else entry["oid"]
                    headers = {"X-Repo-Commit": revision, "ETag": f'"{etag}"', "Content-Length": str(len(data))}
                    return self._send(200, data, headers, body)
                self._send(404, b"{}", {"Content-Type": "application/json"}, body)

            def _send(self, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "Content-Length" not in headers:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *_) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def downloads(self) -> list[str]:
        """Files sent in full (GET of a resolve URL)."""
        return [path for method, path in self.requests if method == "GET" and "/resolve/" in path]


def _tree_entry(name: str, data: bytes) -> dict:
    entry = {
        "type": "file",
        "path": name,
        "size": len(data),
        "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
    }
    if name.endswith(".safetensors"):
        entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
    return entry
