"""publish_tree and point_link: destinations change in one step and are never left half-written."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from builder.engine.publish import point_link, publish_tree
from builder.errors import UserError


def make_source(root: Path, text: str) -> Path:
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "file.txt").write_text(text)
    os.chmod(root / "sub" / "file.txt", 0o444)  # like a cache object
    return root


def test_publish_tree_copies_and_replaces_with_writable_files(tmp_path):
    dest = tmp_path / "out" / "Resources"
    publish_tree(make_source(tmp_path / "one", "one"), dest)
    assert (dest / "sub" / "file.txt").read_text() == "one"
    assert os.stat(dest / "sub" / "file.txt").st_mode & 0o200

    (dest / "stale.txt").write_text("from the old copy")
    publish_tree(make_source(tmp_path / "two", "two"), dest)
    assert sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*")) == ["sub", "sub/file.txt"]
    assert (dest / "sub" / "file.txt").read_text() == "two"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["Resources"]  # no temp or aside folders left


def test_failed_copy_leaves_the_old_destination_untouched(tmp_path):
    dest = tmp_path / "out" / "Resources"
    publish_tree(make_source(tmp_path / "one", "one"), dest)
    broken = make_source(tmp_path / "broken", "two")
    (broken / "dangling").symlink_to(broken / "nowhere")
    with pytest.raises(shutil.Error):
        publish_tree(broken, dest)
    assert (dest / "sub" / "file.txt").read_text() == "one"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["Resources"]


def test_point_link_switches_a_relative_symlink(tmp_path):
    (tmp_path / "v1").mkdir()
    (tmp_path / "v2").mkdir()
    link = tmp_path / "current"
    point_link(link, "v1")
    assert os.readlink(link) == "v1" and link.resolve() == (tmp_path / "v1").resolve()
    point_link(link, "v2")
    assert os.readlink(link) == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v1", "v2"]


def test_point_link_refuses_to_replace_a_real_folder(tmp_path):
    (tmp_path / "current").mkdir()
    with pytest.raises(UserError, match="is not a symlink"):
        point_link(tmp_path / "current", "v1")
