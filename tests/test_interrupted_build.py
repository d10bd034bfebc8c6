"""A build killed mid-stage leaves no partial cache entry, resumes, and gives byte-identical output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import make_workspace, resource_bytes


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_matches_a_clean_build(built, tmp_path):
    reference_ws, _ = built
    ws = make_workspace(tmp_path / "ws")
    command = [
        sys.executable,
        "-m",
        "builder.cli",
        "--workspace",
        str(ws.root),
        "--cache-dir",
        str(ws.cache),
        "build",
        "recipes/tiny-sd.yaml",
    ]
    build = subprocess.Popen(
        command, cwd=ws.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    # Wait until the UNet conversion is running, then kill the whole build, workers included.
    deadline = time.monotonic() + 300
    tmp = ws.cache / "tmp"
    while not any(tmp.glob("convert_unet-*/out/*")) and build.poll() is None:
        assert time.monotonic() < deadline, "convert:unet never started"
        time.sleep(0.05)
    assert build.poll() is None, "the build finished before it could be interrupted"
    os.killpg(build.pid, signal.SIGKILL)
    build.wait()

    # Every record points at a complete object; nothing was published for the interrupted stage.
    records = [json.loads(p.read_text()) for p in (ws.cache / "actions").glob("*.json")]
    assert records, "stages finished before the kill should be cached"
    for record in records:
        obj = ws.cache / "objects" / record["output_digest"]
        assert obj.is_dir()
        assert sorted(p.relative_to(obj).as_posix() for p in obj.rglob("*") if p.is_file()) == sorted(record["files"])
    assert ws.run("verify", check=True).returncode == 0
    plan = ws.plan_json()
    assert plan["convert:unet"]["status"] == "stale" and plan["rewrite:unet"]["status"] == "cached"

    report = ws.build_json()
    statuses = {s["id"]: s["status"] for s in report["stages"]}
    assert statuses["rewrite:unet"] == "hit" and statuses["convert:unet"] == "built"
    # Two clean builds in two empty caches give byte-identical Resources.
    assert resource_bytes(ws.bundle) == resource_bytes(reference_ws.bundle)
    assert (ws.bundle / "manifest.json").read_bytes() == (reference_ws.bundle / "manifest.json").read_bytes()
