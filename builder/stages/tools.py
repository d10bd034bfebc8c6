"""The tools outside Python a build uses (Xcode's Core ML compiler), and the versions a manifest records.

Stage keys take the versions of the Python packages each stage's code imports by themselves
(`builder.engine.code`); what is here is for the people reading a manifest, and for `compile`, whose
tool the engine cannot see in the code.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from functools import cache
from importlib import metadata

# What a manifest names as the tools that made it (all dependencies are in its `environment`).
_RECORDED = ("torch", "coremltools", "diffusers", "transformers", "numpy", "scikit-learn", "kmeans1d")


@cache
def recorded_tools() -> dict[str, str]:
    """Installed versions, read from package metadata so no heavy import is needed.

    A local version label names a build of the same release for one platform (Linux's torch is
    2.13.0+cpu, macOS's 2.13.0): it is dropped, so a Mac records (and keys its bundle on) the versions
    the Linux build that filled the cache did.
    """
    versions = {"python": platform.python_version()}
    for name in _RECORDED:
        try:
            versions[name] = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            versions[name] = "absent"
    return versions


# Names the `xcrun` to compile with, on any platform. Unset (always, for users), compiling needs
# macOS and Xcode's own xcrun; tests set it to a fake xcrun they put on PATH, so the compile and
# bundle stages' `.mlmodelc` branch runs on Linux too. Nobody trips it by accident: it must be named.
XCRUN_VARIABLE = "SDBUILD_XCRUN"


def xcrun() -> str:
    """The xcrun program that runs `coremlcompiler`."""
    return os.environ.get(XCRUN_VARIABLE) or "xcrun"


def compile_unavailable() -> str | None:
    """Why `.mlmodelc` compilation cannot run here, or None when it can."""
    if os.environ.get(XCRUN_VARIABLE):
        if shutil.which(xcrun()) is None:
            return f"{XCRUN_VARIABLE}={xcrun()} names no executable program"
        return None
    if sys.platform != "darwin":
        return "needs macOS (xcrun coremlcompiler)"
    if shutil.which("xcrun") is None:
        return "needs Xcode's command line tools (xcrun coremlcompiler not found)"
    return None


def xcode_version() -> str:
    """The Core ML compiler's version, keying the compile stage."""
    return _compiler_version(xcrun())


@cache
def _compiler_version(program: str) -> str:
    done = subprocess.run([program, "coremlcompiler", "version"], capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"
