"""Environment faults (disk full, read-only cache or artifacts) end in one block with exit 2 and
leave the cache intact, whether they strike in a worker or in the build process itself.

Root ignores permission bits, so read-only folders are made by failing the writes that would go
there (EROFS), and a full disk by a stage that fails as a write on one does, or by a tiny tmpfs
where this machine lets the tests mount one."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from conftest import make_workspace

from builder.cli import main
from builder.engine import Engine, Graph, StageSpec, files, lock
from builder.errors import StageFailed


def _stage(id: str, function: str, **params) -> StageSpec:
    return StageSpec(id=id, stage="s", version="1", function=f"engine_stages:{function}", params=params)


@pytest.mark.parametrize("as_text", [False, True])
def test_disk_full_in_a_worker_is_a_fault_and_leaves_the_cache_intact(tmp_path, as_text):
    engine = Engine(tmp_path / "cache", "demo")
    engine.build(Graph([_stage("first", "write", text="a")]))
    with pytest.raises(StageFailed) as raised:
        engine.build(Graph([_stage("first", "write", text="a"), _stage("full", "fill_disk", as_text=as_text)]))
    failure = raised.value
    assert "no space left on the device" in failure.message and "full:" in failure.message
    assert not failure.expected  # a fault: the CLI must not blame a recipe line for it
    assert "Traceback" not in failure.message
    leftovers = [p for p in (tmp_path / "cache" / "tmp").rglob("*") if p.name == "partial.bin"]
    assert leftovers == []  # the failed output gave its space back
    assert engine.verify(full=True) == []
    assert [r.status for r in engine.build(Graph([_stage("first", "write", text="a")]))] == ["hit"]


def _unwritable(monkeypatch, root: Path, number: int = errno.EROFS) -> None:
    """Every atomic write and lock file under `root` fails with `number`, as on a read-only mount."""
    real_mkstemp, real_open = files.tempfile.mkstemp, lock.os.open

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(root):
            raise OSError(number, os.strerror(number), str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    def open_(path, flags, *args):
        if Path(path).is_relative_to(root) and flags & os.O_CREAT:
            raise OSError(number, os.strerror(number), str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(files.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(lock.os, "open", open_)


def _cli(ws, *args: str) -> int:
    """The CLI in this process; recipe paths are given relative to the workspace."""
    args = tuple(str(ws.root / arg) if arg.endswith(".yaml") else arg for arg in args)
    return main(["--workspace", str(ws.root), "--cache-dir", str(ws.cache), *args])


@pytest.fixture
def copied(built, tmp_path):
    """A workspace with a copy of the built workspace's cache and artifacts."""
    reference, _ = built
    ws = make_workspace(tmp_path / "ws")
    shutil.copytree(reference.cache, ws.cache, symlinks=True)
    shutil.copytree(reference.root / "artifacts", ws.root / "artifacts", symlinks=True)
    return ws


def test_plan_and_verify_work_on_a_read_only_cache(copied, monkeypatch, capsys):
    (copied.cache / "digests.json").unlink()  # so plan and verify have digests to remember
    _unwritable(monkeypatch, copied.cache)
    assert _cli(copied, "plan", "recipes/tiny-sd.yaml", "--json") == 0
    assert _cli(copied, "verify", "--full") == 0
    assert "0 problem(s)" in capsys.readouterr().err
    assert not (copied.cache / "digests.json").exists()


def test_building_into_a_read_only_cache_is_one_clear_error(copied, monkeypatch, capsys):
    _unwritable(monkeypatch, copied.cache)
    assert _cli(copied, "build", "recipes/tiny-sd.yaml") == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "read-only" in err and str(copied.cache) in err and "fix:" in err


def test_disk_full_in_the_build_process_is_one_block_and_the_next_build_resumes(copied, monkeypatch, capsys):
    """The parent writes each stage's record after moving its output in; a full disk there loses nothing."""
    from builder.engine.store import Store

    recipe = copied.root / "recipes" / "tiny-sd.yaml"
    recipe.write_text(recipe.read_text().replace("compute_unit: CPU_AND_GPU", "compute_unit: CPU_AND_NE"))
    real_write_record = Store.write_record

    def write_record(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.record_path(record.key)))

    monkeypatch.setattr(Store, "write_record", write_record)
    assert _cli(copied, "build", "recipes/tiny-sd.yaml") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    assert f"writing the cache {copied.cache} failed: no space left on the device" in err and "free there" in err
    monkeypatch.setattr(Store, "write_record", real_write_record)
    assert _cli(copied, "verify", "--full") == 0
    assert _cli(copied, "build", "recipes/tiny-sd.yaml") == 0


def test_publishing_into_read_only_artifacts_is_one_clear_error(copied, monkeypatch, capsys):
    shutil.rmtree(copied.root / "artifacts")
    real_copytree = shutil.copytree

    def copytree(src, dst, *args, **kwargs):
        if Path(dst).is_relative_to(copied.root / "artifacts"):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(dst))
        return real_copytree(src, dst, *args, **kwargs)

    monkeypatch.setattr(shutil, "copytree", copytree)
    assert _cli(copied, "build", "recipes/tiny-sd.yaml") == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "Traceback" not in err
    assert "publishing artifacts/tiny-sd/0.1.0 failed: permission denied" in err and "fix:" in err
    assert not any((copied.root / "artifacts").rglob("manifest.json"))


def _mount_tmpfs(folder: Path, size: int) -> bool:
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    return done.returncode == 0


def test_a_full_disk_during_a_real_build_then_verify_says_intact(built, tmp_path):
    """The default recipe's cache on a tmpfs just larger than it; an edit needs a stage output that does not fit."""
    reference, _ = built
    used = sum(p.stat().st_size for p in reference.cache.rglob("*") if p.is_file() and not p.is_symlink())
    mount = tmp_path / "small"
    if not _mount_tmpfs(mount, used + (2 << 20)):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        ws = make_workspace(tmp_path / "ws")
        ws.cache = mount / "cache"
        shutil.copytree(reference.cache, ws.cache, symlinks=True)
        recipe = ws.root / "recipes" / "tiny-sd.yaml"
        # Only the bundle is rebuilt, and it copies every model: more than the space left.
        recipe.write_text(recipe.read_text().replace("compute_unit: CPU_AND_GPU", "compute_unit: CPU_AND_NE"))
        done = ws.run("build", "recipes/tiny-sd.yaml")
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert "no space left on the device" in done.stderr and "fix:" in done.stderr
        verified = ws.run("verify", "--full")
        assert verified.returncode == 0 and "0 problem(s)" in verified.stderr, verified.stderr
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)
