"""Versions of the tools whose behaviour shapes stage outputs; they are part of every action key."""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
from functools import cache
from importlib import metadata

_PACKAGES = ("torch", "coremltools", "diffusers", "transformers", "numpy", "scikit-learn", "kmeans1d")


@cache
def python_tools() -> dict[str, str]:
    """Installed versions, read from package metadata so no heavy import is needed."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


def compile_unavailable() -> str | None:
    """Why `.mlmodelc` compilation cannot run here, or None when it can."""
    if sys.platform != "darwin":
        return "needs macOS (xcrun coremlcompiler)"
    if shutil.which("xcrun") is None:
        return "needs Xcode's command line tools (xcrun coremlcompiler not found)"
    return None


@cache
def xcode_version() -> str:
    """The Core ML compiler's version, keying the compile stage."""
    done = subprocess.run(["xcrun", "coremlcompiler", "version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"
