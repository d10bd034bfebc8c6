"""What a local model folder may hold before anything reads it: regular files and folders, and
symlinks only to files and folders inside the workspace.

A downloaded model folder is not trusted: a symlink in it could make the build read (and bake into
a bundle) any file the user can read, a directory link could make it walk the whole disk, and a
FIFO named like a config file would block the reader forever. The walk is bounded so that pointing
`path:` at a huge tree fails fast instead of hanging.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .violations import Violation

MAX_ENTRIES = 20_000
"""Files and folders a model folder may hold; a diffusers pipeline has a few dozen."""


def folder_entries(root: Path, workspace: Path | None) -> tuple[list[str], list[Violation]]:
    """The regular files under `root` (relative posix paths, symlinks followed), and why the folder
    may not be read: links leading outside `workspace` (when given), link loops, special files, or
    more entries than MAX_ENTRIES. Never follows a link before checking where it leads."""
    files: list[str] = []
    problems: list[Violation] = []
    seen = {os.path.realpath(root)}
    pending = [(root, "")]
    entries = 0
    while pending and not problems:
        folder, prefix = pending.pop()
        try:
            listing = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as error:
            problems.append(_problem(prefix or ".", f"cannot be listed ({error.strerror or error})"))
            break
        for entry in listing:
            entries += 1
            if entries > MAX_ENTRIES:
                problems.append(
                    Violation(
                        "",
                        f"the folder holds more than {MAX_ENTRIES} files and folders; a model folder has a few dozen",
                        "point `path:` at the model's own folder (the one holding model_index.json or config.json)",
                    )
                )
                break
            relative = f"{prefix}{entry.name}"
            target = Path(entry.path)
            if entry.is_symlink():
                real = Path(os.path.realpath(entry.path))
                try:
                    info = os.stat(real)
                except OSError as error:
                    problems.append(_problem(relative, f"is a symlink that cannot be followed ({error.strerror})"))
                    continue
                if workspace is not None and not real.is_relative_to(workspace):
                    problems.append(
                        Violation(
                            "",
                            f"'{relative}' in the model folder is a symlink to {real}, outside the workspace "
                            f"{workspace}; the build reads only files inside it",
                            "copy the file into the model folder instead of linking to it, or run sdbuild from a "
                            "workspace that contains its target",
                        )
                    )
                    continue
                target = real
            else:
                try:
                    info = entry.stat(follow_symlinks=False)
                except OSError as error:
                    problems.append(_problem(relative, f"cannot be read ({error.strerror})"))
                    continue
            if stat.S_ISDIR(info.st_mode):
                key = os.path.realpath(target)
                if key in seen:
                    problems.append(_problem(relative, "links back to a folder already read (a loop)"))
                    continue
                seen.add(key)
                pending.append((target, f"{relative}/"))
            elif stat.S_ISREG(info.st_mode):
                files.append(relative)
            else:
                problems.append(_problem(relative, "is not a regular file (a pipe, socket or device)"))
    return sorted(files), problems[:1]


def _problem(relative: str, what: str) -> Violation:
    return Violation(
        "",
        f"'{relative}' in the model folder {what}",
        "remove it from the model folder; it may hold only regular files, folders and links inside the workspace",
    )


def folder_violations(root: Path, workspace: Path | None) -> list[Violation]:
    """Why the local model folder `root` may not be read."""
    return folder_entries(root, workspace)[1]
