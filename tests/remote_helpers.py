"""Shared by the remote-cache and Dask tests: the CLI run in this process, bundle bytes, a loopback S3."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Workspace

from builder.cli import main

# Distinctive fake credentials: tests assert they never reach a cache, log, manifest or the bucket.
ACCESS_KEY = "AKIASDBUILDTESTKEY01"
SECRET_KEY = "sdbuild-test-secret-9f3b2c7e1d"
BUCKET = "sdbuild-cache"


def cli(ws: Workspace, *args: str) -> tuple[int, str, str]:
    """`sdbuild ARGS` in this process, from the workspace: exit status, stdout, stderr."""
    with contextlib.chdir(ws.root), contextlib.redirect_stderr(io.StringIO()) as err:
        with contextlib.redirect_stdout(io.StringIO()) as out:
            code = main(["--workspace", str(ws.root), "--cache-dir", str(ws.cache), *args])
    return code, out.getvalue(), err.getvalue()


def build_json(ws: Workspace, *args: str) -> tuple[dict, str]:
    code, out, err = cli(ws, "build", "recipes/tiny-sd.yaml", "--json", *args)
    assert code == 0, err
    return json.loads(out), err


def statuses(report: dict) -> dict[str, str]:
    return {stage["id"]: stage["status"] for stage in report["stages"]}


def tree_bytes(root: Path) -> dict[str, str]:
    """Every file's sha256 under `root`, by relative path (links resolved). Empty folders are left
    out: cache entries are their files (the content digest has no folders either)."""
    real = root.resolve()
    return {
        path.relative_to(real).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(real.rglob("*"))
        if path.is_file()
    }


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3 API on 127.0.0.1 (a free port), with a bucket; yields the endpoint URL."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        with pytest.MonkeyPatch.context() as env:
            env.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            env.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            env.setenv("AWS_DEFAULT_REGION", "us-east-1")
            env.setenv("AWS_ENDPOINT_URL", endpoint)
            env.delenv("AWS_PROFILE", raising=False)
            boto3.client("s3").create_bucket(Bucket=BUCKET)
            yield endpoint
    finally:
        server.stop()
