"""The remote cache: a build in one workspace is a remote-hit in another (file:// and a loopback S3),
corrupt remote objects are caught before they enter the local store, and no secret is written."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import pytest
from conftest import Workspace, make_workspace
from remote_helpers import ACCESS_KEY, BUCKET, SECRET_KEY, build_json, cli, s3_server, statuses, tree_bytes

from builder.engine.hashing import digest_folder, sha256_file, tree_digest
from builder.engine.keys import action_key
from builder.engine.store import ActionRecord, Store
from builder.remote.cache import RemoteCache


@pytest.fixture(scope="module")
def s3_endpoint() -> str:
    with s3_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="module")
def first(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str) -> dict:
    """Workspace A builds tiny-sd with a file:// remote, then again with the S3 remote (all local
    hits, each uploaded there because the S3 remote lacks it)."""
    root = tmp_path_factory.mktemp("remote")
    remotes = {"file": (root / "shared").as_uri(), "s3": f"s3://{BUCKET}/team"}
    a = make_workspace(root / "a")
    built, a_log = build_json(a, "--remote", remotes["file"])
    again, again_log = build_json(a, "--remote", remotes["s3"])
    return {"root": root, "a": a, "remotes": remotes, "built": built, "again": again, "logs": a_log + again_log}


@pytest.mark.parametrize("backend", ["file", "s3"])
def test_an_empty_cache_gets_every_stage_from_the_remote(first, backend):
    a: Workspace = first["a"]
    assert set(statuses(first["built"]).values()) <= {"built", "skipped"}
    assert set(statuses(first["again"]).values()) <= {"hit", "skipped"}
    b = make_workspace(first["root"] / f"b-{backend}")
    report, log = build_json(b, "--remote", first["remotes"][backend])
    ran = {stage_id: status for stage_id, status in statuses(report).items() if status != "skipped"}
    assert ran and set(ran.values()) == {"remote-hit"}, ran
    assert tree_bytes(b.bundle) == tree_bytes(a.bundle)
    assert "remote-hit" in log
    assert cli(b, "verify", "--full")[0] == 0
    # The next build there is local: nothing left to fetch.
    assert set(statuses(build_json(b, "--remote", first["remotes"][backend])[0]).values()) <= {"hit", "skipped"}


def test_a_corrupt_remote_object_is_reported_rebuilt_and_replaced(first):
    """Same size, other bytes: only the digest tells. The stage is rebuilt, the bad bytes never enter
    the local store, and the rebuilt upload replaces the remote's copy."""
    a: Workspace = first["a"]
    shared = first["root"] / "corrupt-remote"
    shutil.copytree(first["root"] / "shared", shared)
    stage_id = "convert:text_encoder"
    key = json.loads((a.cache / "index" / "tiny-sd.json").read_text())[stage_id]
    record = ActionRecord.model_validate_json((a.cache / "actions" / f"{key}.json").read_bytes())
    rel, digest = max(record.files.items(), key=lambda item: item[1].size)
    blob = shared / "files" / digest.sha256[:2] / digest.sha256
    good = blob.read_bytes()
    blob.chmod(0o644)
    blob.write_bytes(bytes([good[0] ^ 0xFF]) + good[1:])
    corrupt_sha = sha256_file(blob)

    d = make_workspace(first["root"] / "d")
    report, log = build_json(d, "--remote", shared.as_uri())
    assert statuses(report)[stage_id] == "built"
    assert "warning" in log and key[:12] in log and rel in " ".join(log.split()) and "corrupt" in log
    local = [sha256_file(p) for p in (d.cache / "objects").rglob("*") if p.is_file()]
    assert corrupt_sha not in local
    assert cli(d, "verify", "--full")[0] == 0
    assert sha256_file(blob) == digest.sha256  # the remote's copy was replaced by the rebuilt one
    assert tree_bytes(d.bundle) == tree_bytes(a.bundle)


def test_push_then_pull_moves_entries_without_building(first):
    a: Workspace = first["a"]
    target = (first["root"] / "pushed").as_uri()
    code, out, err = cli(a, "push", "recipes/tiny-sd.yaml", "--remote", target, "--json")
    assert code == 0, err
    pushed = json.loads(out)
    assert pushed and {entry["status"] for entry in pushed} == {"pushed"}
    c = make_workspace(first["root"] / "c")
    code, out, err = cli(c, "pull", "recipes/tiny-sd.yaml", "--remote", target, "--json")
    assert code == 0, err
    assert {entry["status"] for entry in json.loads(out)} <= {"pulled", "skipped"}
    assert set(statuses(build_json(c)[0]).values()) <= {"hit", "skipped"}  # no remote needed any more
    assert tree_bytes(c.bundle) == tree_bytes(a.bundle)


def test_no_credential_is_written_anywhere(first, s3_endpoint):
    import boto3

    s3 = boto3.client("s3")
    stored = [
        s3.get_object(Bucket=BUCKET, Key=item["Key"])["Body"].read()
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
        for item in page.get("Contents", [])
    ]
    assert stored
    files = [p.read_bytes() for p in first["root"].rglob("*") if p.is_file() and not p.is_symlink()]
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in first["logs"]
        assert not [blob for blob in stored + files if secret.encode() in blob]


def test_an_unusable_remote_is_one_error_block(first, s3_endpoint):
    code, out, err = cli(first["a"], "push", "--remote", f"s3://no-{BUCKET}/team")
    assert code == 2 and "cannot be used" in err and "fix:" in err and "Traceback" not in err


def test_a_url_with_credentials_is_refused_without_echoing_them(workspace, monkeypatch):
    url = f"s3://{ACCESS_KEY}:{SECRET_KEY}@{BUCKET}/team"
    code, out, err = cli(workspace, "build", "recipes/tiny-sd.yaml", "--remote", url)
    assert code == 2 and "carries credentials" in err and "fix:" in err
    monkeypatch.setenv("SDBUILD_REMOTE", url)
    code, out, err = cli(workspace, "build", "recipes/tiny-sd.yaml")
    assert code == 2 and "SDBUILD_REMOTE" in err
    assert SECRET_KEY not in out + err and ACCESS_KEY not in out + err
    assert not (workspace.cache / "objects").exists()


def _output(folder: Path, text: str) -> ActionRecord:
    (folder / "data").mkdir(parents=True)
    (folder / "data" / "a.txt").write_text(text)
    (folder / "b.bin").write_bytes(text.encode() * 1000)
    files = digest_folder(folder, None)
    inputs = {"stage": "demo", "text": text}
    return ActionRecord(
        key=action_key(inputs), key_inputs=inputs, output_digest=tree_digest(files), files=files, seconds=0.0
    )


def test_concurrent_uploads_of_one_key_leave_one_valid_entry(tmp_path):
    record = _output(tmp_path / "out", "same")
    remote_url = (tmp_path / "remote").as_uri()
    barrier = threading.Barrier(4)
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            barrier.wait()
            RemoteCache(remote_url).upload(record, tmp_path / "out")
        except BaseException as problem:
            errors.append(problem)

    threads = [threading.Thread(target=upload) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    leftovers = [p.name for p in (tmp_path / "remote").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers
    store = Store(tmp_path / "cache")
    fetched = RemoteCache(remote_url).fetch(record.key, store)
    assert fetched.record is not None and fetched.problem is None
    assert store.check_object(fetched.record, trust_memo=False) is None


def test_a_record_naming_a_file_outside_its_folder_is_refused(tmp_path):
    """A remote is not trusted: a consistent record (key, digests) whose file name climbs out is unusable."""
    record = _output(tmp_path / "out", "x")
    remote = RemoteCache((tmp_path / "remote").as_uri())
    remote.upload(record, tmp_path / "out")
    files = {"../escaped.txt": record.files["data/a.txt"]}
    inputs = {"stage": "demo", "text": "hostile"}
    hostile = ActionRecord(
        key=action_key(inputs), key_inputs=inputs, output_digest=tree_digest(files), files=files, seconds=0.0
    )
    (tmp_path / "remote" / "actions" / f"{hostile.key}.json").write_text(hostile.model_dump_json())
    fetched = remote.fetch(hostile.key, Store(tmp_path / "cache"))
    assert fetched.record is None and "unsafe file" in (fetched.problem or "")
    assert not (tmp_path / "cache" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()
