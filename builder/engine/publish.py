"""Put build outputs where users and apps look for them, without ever exposing a half-written folder."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

from builder.engine.files import remove_tree, set_writable
from builder.errors import UserError


def publish_tree(src: Path, dest: Path, extra: dict[str, bytes] | None = None) -> None:
    """Make `dest` a writable copy of `src` plus the `extra` files: copy beside it, then swap it in by renames.

    The copy is complete before `dest` changes; an old `dest` is renamed aside, replaced, then
    deleted, and put back if the replacement fails.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    staging = dest.parent / f".{dest.name}.new-{tag}"
    try:
        shutil.copytree(src, staging)
        set_writable(staging, True)
        for name, data in (extra or {}).items():
            (staging / name).write_bytes(data)
    except BaseException:
        remove_tree(staging)
        raise
    if not (dest.exists() or dest.is_symlink()):
        os.rename(staging, dest)
        return
    aside = dest.parent / f".{dest.name}.old-{tag}"
    os.rename(dest, aside)
    try:
        os.rename(staging, dest)
    except BaseException:
        os.rename(aside, dest)
        remove_tree(staging)
        raise
    remove_tree(aside)


def point_link(link: Path, target_name: str) -> None:
    """Atomically make `link` a relative symlink to `target_name`, resolved from the link's folder."""
    if link.exists() and not link.is_symlink():
        raise UserError(
            f"{link} exists and is not a symlink, so it cannot be pointed at {target_name}",
            "move it away; this path is managed by the build",
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    staging = link.parent / f".{link.name}.link-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    os.symlink(target_name, staging)
    try:
        os.replace(staging, link)
    except BaseException:
        staging.unlink()
        raise
