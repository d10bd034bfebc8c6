"""Checks of the Python environment: interpreter, installed versions against the lock, numpy, the Core ML compiler."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from builder.doctor import Check
from builder.doctor.lockfile import lock_python, pinned_versions
from builder.stages.tools import compile_unavailable, xcrun

NUMPY_BELOW = Version("2.3")  # numpy 2.3+ breaks conversion (pyproject.toml says why)
_SETUP = "make setup (re-creates .venv from requirements.lock)"


def python_check(lock: Path | None) -> Check:
    version = platform.python_version()
    wanted = lock_python(lock) if lock is not None and lock.is_file() else None
    if wanted is not None:
        if ".".join(version.split(".")[:2]) != wanted:
            return Check(
                "python", "fail", f"{version}, but requirements.lock is for {wanted}", f"make PYTHON=python{wanted}"
            )
        return Check("python", "ok", f"{version} (requirements.lock is for {wanted})")
    required = SpecifierSet(metadata.metadata("sdbuild").get("Requires-Python") or "")
    if version not in required:
        return Check("python", "fail", f"{version}, sdbuild needs {required}", "install a Python that sdbuild supports")
    return Check("python", "ok", f"{version} (sdbuild needs {required})")


def _same(installed: str, pinned: str) -> bool:
    try:
        return Version(installed) == Version(pinned)
    except InvalidVersion:
        return installed == pinned


def lock_check(lock: Path | None) -> Check:
    if lock is None or not lock.is_file():
        return Check("lock", "note", "no requirements.lock beside this sdbuild (not installed from a checkout)")
    wrong = []
    pins = pinned_versions(lock)
    for name, pinned in sorted(pins.items()):
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} missing (lock {pinned})")
            continue
        if not _same(installed, pinned):
            wrong.append(f"{name} {installed} (lock {pinned})")
    if wrong:
        shown = ", ".join(wrong[:6]) + (f" and {len(wrong) - 6} more" if len(wrong) > 6 else "")
        return Check("lock", "fail", f"{len(wrong)} of {len(pins)} packages differ from {lock.name}: {shown}", _SETUP)
    return Check("lock", "ok", f"all {len(pins)} packages as {lock.name} pins them")


def numpy_check() -> Check:
    try:
        installed = metadata.version("numpy")
    except metadata.PackageNotFoundError:
        return Check("numpy", "fail", "not installed", _SETUP)
    if Version(installed) >= NUMPY_BELOW:
        return Check("numpy", "fail", f"{installed}; conversion needs numpy < {NUMPY_BELOW}", _SETUP)
    return Check("numpy", "ok", f"{installed} (< {NUMPY_BELOW})")


def compiler_check() -> Check:
    unavailable = compile_unavailable()
    if unavailable is not None:
        if sys.platform != "darwin":
            return Check("xcrun", "note", f"{unavailable}: bundles keep .mlpackage files (compiling needs a Mac)")
        return Check("xcrun", "fail", unavailable, "install Xcode, then `sudo xcode-select -s /Applications/Xcode.app`")
    done = subprocess.run([xcrun(), "coremlcompiler", "version"], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        said = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return Check(
            "xcrun",
            "fail",
            f"`xcrun coremlcompiler version` exited {done.returncode}: {said[0]}",
            "install Xcode (not only the command line tools) and select it with xcode-select",
        )
    return Check("xcrun", "ok", f"coremlcompiler {done.stdout.strip()}")


def environment_checks(lock: Path | None) -> list[Check]:
    return [python_check(lock), lock_check(lock), numpy_check(), compiler_check()]
