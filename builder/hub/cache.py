"""A pinned hub snapshot taken from the standard Hugging Face cache, and copied out of it by hard links.

The hub client's cache-aware `snapshot_download` (no `local_dir`) downloads only what the cache
lacks; a snapshot the cache already holds whole is used without asking the Hub anything. With
`HF_HUB_OFFLINE=1`, or when the Hub's host does not resolve, only the cache is read. Where the cache
is, and the token for gated repositories, come from the client's own environment variables.
"""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from builder.errors import UserError, first_line
from builder.hub.layout import RepoKind, allow_patterns, ignore_patterns, missing_files, wanted

FETCH_HINT = (
    "`sdbuild fetch RECIPE` downloads every hub input of a recipe into the Hugging Face cache (HF_HUB_CACHE, "
    "else HF_HOME/hub); log in with `hf auth login` (or set HF_TOKEN) for gated repositories; or download the "
    "model once and give that folder as `local: {path: ...}` instead of `hub:`"
)


@dataclass(frozen=True)
class HubRef:
    """One repository at one commit, and what kind of repository it is."""

    repo_id: str
    revision: str
    kind: RepoKind
    unread: tuple[str, ...] = ()  # pipeline folders the recipe never reads (`layout.unread_folders`)

    def __str__(self) -> str:
        return f"{self.repo_id}@{self.revision[:12]}"


def hub_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def snapshot(ref: HubRef) -> Path:
    """The cache's snapshot folder of `ref`, holding every file a conversion reads; downloaded into the
    cache first where files are missing and the Hub may be used. One-line UserError otherwise.

    The cache is read first: a snapshot that holds every file of the commit's cached file listing (the
    client writes it on an online download), or, offline, every file `missing_files` asks for, is
    used without any request to the Hub.
    """
    from huggingface_hub import constants, snapshot_download

    arguments: dict[str, Any] = {
        "revision": ref.revision,
        "allow_patterns": allow_patterns(ref.kind),
        "ignore_patterns": ignore_patterns(ref.unread),
    }
    cached, missing = _cached_snapshot(ref, arguments)
    unreachable = None if constants.HF_HUB_OFFLINE else _unreachable(constants.ENDPOINT)
    why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else unreachable  # set: only the cache may be read
    if cached is not None and not missing and (why is not None or _has_listing(ref)):
        return cached
    if why is not None:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise not_cached(ref, why, detail=f"the cached snapshot lacks {shown}" if cached is not None else None)
    try:
        folder = Path(snapshot_download(ref.repo_id, **arguments))
    except Exception as error:  # network, auth, missing repository or revision: all end the same way for the user
        raise not_cached(ref, first_line(error)) from None
    missing = missing_files(folder, ref.kind, ref.unread)
    if missing:  # the client downloaded everything the patterns match: the repository lacks them
        raise UserError(
            f"{ref} has no {', '.join(missing[:3])}; sdbuild reads safetensors weights, configs and tokenizer "
            "files only",
            hint="pin a revision (or repository) with safetensors weights, or convert the model to a diffusers "
            "folder with safetensors elsewhere and give it as `local: {path: ...}`",
        )
    return folder


def _cached_snapshot(ref: HubRef, arguments: dict[str, Any]) -> tuple[Path | None, list[str]]:
    """The cache's snapshot folder without any request (None when absent, or short of files its cached
    listing names), and the files a conversion needs that it lacks."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(ref.repo_id, local_files_only=True, **arguments))
    except Exception:  # not cached, or incomplete by the cached listing
        return None, []
    return folder, missing_files(folder, ref.kind, ref.unread)


def _has_listing(ref: HubRef) -> bool:
    """Whether the client cached the commit's file listing, so it could tell a complete snapshot."""
    from huggingface_hub import get_cached_repo_tree

    try:
        get_cached_repo_tree(ref.repo_id, revision=ref.revision)
    except Exception:
        return False
    return True


def not_cached(ref: HubRef, why: str, detail: str | None = None) -> UserError:
    """The one error for a hub input the build cannot have: it names `sdbuild fetch`."""
    held = detail or f"the Hugging Face cache ({hub_cache_dir()}) does not hold it"
    return UserError(
        f"cannot fetch the weights of {ref} ({why}) and {held}: run `sdbuild fetch` on this recipe where the Hub "
        "is reachable, then build again",
        hint=FETCH_HINT,
    )


def link_snapshot(folder: Path, ref: HubRef, out: Path) -> list[str]:
    """Put the files of the snapshot `folder` a conversion reads into `out`, hard-linked to the cache's
    blobs when on the same filesystem, else copied; returns their repository paths.

    Every snapshot entry must lead into its repository's `blobs/` (the cache's own layout), so a
    tampered cache cannot make a build read files from elsewhere.
    """
    blobs = (folder.parent.parent / "blobs").resolve()
    taken: list[str] = []
    for parent, dirs, names in os.walk(folder):
        dirs.sort()
        for name in sorted(names):
            source = Path(parent) / name
            relative = source.relative_to(folder).as_posix()
            if not wanted(relative, ref.kind, ref.unread):
                continue
            real = source.resolve()
            if source.is_symlink() and not real.is_relative_to(blobs):
                raise UserError(
                    f"the Hugging Face cache entry {relative} of {ref} points outside its blobs/ folder ({real})",
                    hint=f"delete {folder} and fetch it again with `sdbuild fetch`",
                )
            if not real.is_file():
                raise UserError(
                    f"the Hugging Face cache entry {relative} of {ref} is not a file (a broken link?)",
                    hint=f"delete {folder} and fetch it again with `sdbuild fetch`",
                )
            destination = out / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(real, destination)
            taken.append(relative)
    return taken


def link_or_copy(source: Path, destination: Path) -> None:
    """A hard link (no bytes copied, same inode), or a copy where the filesystem cannot link."""
    try:
        os.link(source, destination)
    except OSError as error:
        if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copyfile(source, destination)


def _unreachable(endpoint: str) -> str | None:
    """Why the Hub's host cannot be reached (known in a second, not after the client's retries), or None."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(endpoint)
    try:
        socket.getaddrinfo(url.hostname, url.port or 443)
    except OSError as error:
        return f"{url.hostname} is unreachable: {error.strerror or error}"
    return None
