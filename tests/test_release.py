"""`sdbuild release` archives and `sdbuild reproduce`.

One cold rebuild serves two acceptance points: `reproduce` rebuilds the released default bundle in a
fresh workspace with an empty cache (at another wall time, under another umask) and must find every
file equal; releasing again from that kept workspace and cache must give the same archive sha256.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import struct
import zipfile
from pathlib import Path

import pytest
from conftest import Workspace

from builder.cli import main

PREFIX = "tiny-sd-0.1.0"
WEIGHTS = "Resources/Unet.mlpackage/Data/com.apple.CoreML/weights/weight.bin"


def _sdbuild(ws: Workspace, *args: str, capsys) -> tuple[int, str, str]:
    """The CLI in this process; a recipe argument is read in the workspace (relative paths are the cwd's)."""
    capsys.readouterr()
    args = tuple(str(ws.root / a) if a.startswith("recipes/") else a for a in args)
    code = main(["--workspace", str(ws.root), "--cache-dir", str(ws.cache), *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def released(built, tmp_path_factory) -> tuple[Path, str]:
    """The default recipe released from the session's build (no stage runs again)."""
    ws, _ = built
    out = tmp_path_factory.mktemp("dist")
    # capsys is function-scoped; the CLI's printing goes to the real streams here.
    recipe = str(ws.root / "recipes" / "tiny-sd.yaml")
    code = main(["--workspace", str(ws.root), "--cache-dir", str(ws.cache), "release", recipe, "--out", str(out)])
    assert code == 0
    archive = out / f"{PREFIX}.zip"
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_archive_entries_are_sorted_and_carry_fixed_metadata(released, built):
    archive, digest = released
    ws, _ = built
    assert (archive.parent / f"{PREFIX}.zip.sha256").read_text() == f"{digest}  {PREFIX}.zip\n"
    manifest = json.loads((ws.bundle / "manifest.json").read_text())
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        names = [i.filename for i in infos]
        assert names == sorted(names)
        assert names == sorted([f"{PREFIX}/manifest.json", *(f"{PREFIX}/Resources/{n}" for n in manifest["files"])])
        for info in infos:
            assert info.date_time == (1980, 1, 1, 0, 0, 0)
            assert info.external_attr == 0o100644 << 16 and info.create_system == 3
            assert info.compress_type == zipfile.ZIP_DEFLATED
        assert zf.read(f"{PREFIX}/manifest.json") == (ws.bundle / "manifest.json").read_bytes()
        for name, entry in manifest["files"].items():
            assert hashlib.sha256(zf.read(f"{PREFIX}/Resources/{name}")).hexdigest() == entry["sha256"]


def test_source_date_epoch_sets_every_timestamp(built, tmp_path, monkeypatch, capsys, released):
    # a copy: a dated release republishes the bundle, which `built`'s readers compare against
    ws = Workspace(root=tmp_path / "ws", cache=tmp_path / "cache")
    shutil.copytree(built[0].root / "recipes", ws.root / "recipes")
    shutil.copytree(built[0].cache, ws.cache, symlinks=True)
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000001")
    code, out, _ = _sdbuild(ws, "release", "recipes/tiny-sd.yaml", "--out", str(tmp_path), capsys=capsys)
    assert code == 0
    digest, path = out.split()
    assert Path(path) == tmp_path / f"{PREFIX}.zip" and digest != released[1]
    with zipfile.ZipFile(path) as zf:
        assert {i.date_time for i in zf.infolist()} == {(2023, 11, 14, 22, 13, 20)}  # zip time has 2 s steps
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    code, _, err = _sdbuild(ws, "release", "recipes/tiny-sd.yaml", "--out", str(tmp_path), capsys=capsys)
    assert code == 2 and "SOURCE_DATE_EPOCH='yesterday' is not a number of seconds" in err


def test_a_bundle_changed_after_the_build_is_not_released(built, tmp_path, capsys):
    ws, _ = built
    copy = Workspace(root=tmp_path / "ws", cache=ws.cache)
    shutil.copytree(ws.root / "recipes", copy.root / "recipes")
    assert _sdbuild(copy, "build", "recipes/tiny-sd.yaml", capsys=capsys)[0] == 0  # all hits, published here
    weights = copy.root / "artifacts" / "tiny-sd" / "0.1.0" / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, so publishing leaves it in place
    weights.write_bytes(bytes(data))
    code, _, err = _sdbuild(copy, "release", "recipes/tiny-sd.yaml", "--out", str(tmp_path / "dist"), capsys=capsys)
    assert code == 2 and "weight.bin differs from the digest its manifest records" in err
    assert not (tmp_path / "dist" / f"{PREFIX}.zip").exists()


@pytest.mark.slow  # a second cold build of the default recipe
def test_reproduce_rebuilds_from_scratch_and_a_second_release_is_identical(released, tmp_path, capsys):
    archive, digest = released
    ws = Workspace(root=tmp_path / "elsewhere", cache=tmp_path / "unused-cache")
    ws.root.mkdir()
    umask = os.umask(0o077)  # files of the second build get other modes; the archive must not care
    try:
        code, _, err = _sdbuild(ws, "reproduce", str(archive), "--keep", capsys=capsys)
    finally:
        os.umask(umask)
    assert code == 0, err
    assert "reproduced: all " in err and "files match the rebuild" in err
    (kept,) = ws.root.glob(".sdbuild-reproduce-*")
    assert (kept / ".sdbuild-cache").is_dir()  # an empty cache of its own: every stage ran again
    second = Workspace(root=kept, cache=kept / ".sdbuild-cache")
    code, out, err = _sdbuild(second, "release", "recipes/tiny-sd.yaml", "--out", str(tmp_path / "dist"), capsys=capsys)
    assert code == 0, err
    assert out.split()[0] == digest


def _rewritten(archive: Path, dest: Path, name: str, change) -> Path:
    """A copy of `archive` with entry `name` (bundle-relative) passed through `change`, repacked as zips are."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(dest, "w") as out:
        for info in src.infolist():
            data = src.read(info)
            out.writestr(info, change(data) if info.filename == f"{PREFIX}/{name}" else data)
    return dest


def _flip(data: bytes) -> bytes:
    changed = bytearray(data)
    changed[len(changed) // 2] ^= 0x01
    return bytes(changed)


def test_reproduce_names_a_changed_model_file(released, built, tmp_path, capsys):
    archive, _ = released
    built_ws, _ = built
    tampered = _rewritten(archive, tmp_path / f"{PREFIX}.zip", WEIGHTS, _flip)
    ws = Workspace(root=tmp_path / "ws", cache=built_ws.cache)  # --reuse-cache: the rebuild is all hits
    ws.root.mkdir()
    code, _, err = _sdbuild(ws, "reproduce", str(tampered), "--reuse-cache", capsys=capsys)
    assert code == 1, err
    lines = [line for line in err.splitlines() if line.startswith("differs")]
    assert len(lines) == 1 and lines[0].startswith(f"differs  {WEIGHTS}: archive ")
    assert "not reproduced: 1 of " in err
    assert not list(ws.root.glob(".sdbuild-reproduce-*"))  # the temporary workspace is gone


def test_reproduce_names_a_file_damaged_inside_the_zip(released, built, tmp_path, capsys):
    """One byte changed in the archive itself: the entry fails its CRC, and that entry is named."""
    archive, _ = released
    built_ws, _ = built
    data = bytearray(archive.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo(f"{PREFIX}/{WEIGHTS}")
    name_length, extra_length = struct.unpack_from("<HH", data, info.header_offset + 26)  # the local header's
    start = info.header_offset + 30 + name_length + extra_length
    data[start + info.compress_size // 2] ^= 0x01
    damaged = tmp_path / f"{PREFIX}.zip"
    damaged.write_bytes(bytes(data))
    ws = Workspace(root=tmp_path / "ws", cache=built_ws.cache)
    ws.root.mkdir()
    code, _, err = _sdbuild(ws, "reproduce", str(damaged), "--reuse-cache", capsys=capsys)
    assert code == 1, err
    assert f"differs  {WEIGHTS}: archive damaged" in err


def test_reproduce_refuses_what_is_not_a_release(tmp_path, capsys):
    ws = Workspace(root=tmp_path, cache=tmp_path / "cache")
    not_zip = tmp_path / "a.zip"
    not_zip.write_text("hello")
    code, _, err = _sdbuild(ws, "reproduce", str(not_zip), capsys=capsys)
    assert code == 2 and "cannot read" in err
    no_recipe = tmp_path / "b.zip"
    with zipfile.ZipFile(no_recipe, "w") as zf:
        zf.writestr("x-1.0.0/manifest.json", json.dumps({"name": "x", "version": "1.0.0", "files": {}}))
    code, _, err = _sdbuild(ws, "reproduce", str(no_recipe), capsys=capsys)
    assert code == 2 and "does not record the recipe's text" in err


@pytest.mark.parametrize("path", ["/etc/passwd", "../outside.yaml", "recipes/../../x.yaml", "C:/x.yaml", ""])
def test_reproduce_writes_recipe_files_only_inside_its_workspace(tmp_path, capsys, path):
    ws = Workspace(root=tmp_path / "ws", cache=tmp_path / "cache")
    ws.root.mkdir()
    archive = tmp_path / "x-1.0.0.zip"
    manifest = {"name": "x", "version": "1.0.0", "files": {}, "recipe": {"path": path, "text": "name: x\n"}}
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("x-1.0.0/manifest.json", json.dumps(manifest))
    code, _, err = _sdbuild(ws, "reproduce", str(archive), capsys=capsys)
    assert code == 2 and "not a relative path inside a workspace" in err
    assert not (tmp_path / "outside.yaml").exists() and not (tmp_path / "x.yaml").exists()
