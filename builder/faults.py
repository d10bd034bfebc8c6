"""Environment faults (disk full, read-only, permission, name too long) as one kind of user error.

Such an OSError can surface anywhere a file is written, in the build process or in a stage's
worker; `as_fault` recognises it, also when a library re-raised it as another exception type that
keeps it as its cause or repeats its message, and words it as what was being done, where, and how
much space is free against what was needed."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import cast

from builder.errors import EnvironmentFault

_REASONS = {
    errno.ENOSPC: ("no space left on the device", "free space there, or point --cache-dir / the workspace elsewhere"),
    errno.EDQUOT: ("the disk quota is exhausted", "free space within the quota, or use another folder"),
    errno.EROFS: ("the file system is read-only", "use a writable folder (--cache-dir, --workspace)"),
    errno.EACCES: ("permission denied", "make the folder writable for this user, or use another folder"),
    errno.EPERM: ("operation not permitted", "make the folder writable for this user, or use another folder"),
    errno.ENAMETOOLONG: ("a file name is too long for the file system", "use shorter names (recipe name, folders)"),
}
FAULT_ERRNOS = frozenset(_REASONS)


def _os_error_in(error: BaseException) -> OSError | None:
    """The environment OSError behind `error`: itself, a cause or context, or one whose text it repeats."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in FAULT_ERRNOS:
            return current
        text = str(current)
        for number in FAULT_ERRNOS:  # C++ and Rust libraries re-raise errno failures as RuntimeError text
            if os.strerror(number) in text:
                return OSError(number, os.strerror(number), getattr(current, "filename", None))
        current = current.__cause__ or current.__context__
    return None


def free_bytes(path: Path | str | None) -> int | None:
    """Free space on the file system holding `path` (its nearest existing ancestor), if known."""
    if path is None:
        return None
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return shutil.disk_usage(probe).free
    except OSError:
        return None


def size_text(count: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def as_fault(
    error: BaseException, doing: str, *, where: Path | str | None = None, needed_bytes: int | None = None
) -> EnvironmentFault | None:
    """`error` as an EnvironmentFault while `doing` (e.g. "writing the cache"), or None when it is not one."""
    found = _os_error_in(error)
    if found is None:
        return None
    reason, hint = _REASONS[cast(int, found.errno)]  # _os_error_in returns only errors with a FAULT_ERRNOS errno
    path = str(found.filename) if found.filename else (str(where) if where is not None else None)
    message = f"{doing} failed: {reason}" + (f" ({path})" if path else "")
    if found.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(path)
        if needed_bytes is not None:
            message += f"; needed {size_text(needed_bytes)}"
        if free is not None:
            message += f"; {size_text(free)} free there now"
    return EnvironmentFault(message, hint + "; nothing already built was lost")
