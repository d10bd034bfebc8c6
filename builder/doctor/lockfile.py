"""Read the hash-pinned lock (`requirements.lock`, written by `make lock`) back as name -> version."""

from __future__ import annotations

import re
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

# The checkout's lock; an sdbuild installed from a wheel has none, and the lock checks are skipped.
LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"
_PYTHON = re.compile(r"--python-version[ =](\d+\.\d+)")


def pinned_versions(lock: Path) -> dict[str, str]:
    """Canonical name -> pinned version, for the requirements whose markers hold on this machine."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        if not line or line[0] in " #-":  # hash continuation lines, comments, options
            continue
        try:
            requirement = Requirement(line.rstrip(" \\"))
        except InvalidRequirement:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        versions = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if versions:
            pins[canonicalize_name(requirement.name)] = versions[0]
    return pins


def lock_python(lock: Path) -> str | None:
    """The Python version the lock was resolved for, from the command in its header."""
    for line in lock.read_text().splitlines():
        if not line.startswith("#"):
            break
        found = _PYTHON.search(line)
        if found:
            return found.group(1)
    return None
