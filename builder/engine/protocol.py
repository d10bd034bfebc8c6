"""The files a build and its worker exchange: a request in, a result out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel


class WorkerRequest(BaseModel):
    function: str
    inputs: dict[str, Path]
    params: dict[str, Any]
    out: Path
    result: Path
    # The worker's temporary files: same filesystem as `out` (a rename, not a copy, moves them
    # there) and removed with the work folder even if the worker dies.
    tmp: Path
    parent_pid: int
    # The parent's import path, so "module:function" resolves in the worker exactly as it would in the parent.
    python_path: list[str]
    # Threads the stage runs (`engine.threads`); None when the user fixed the thread counts.
    threads: int | None = None
    # The project modules' digests the stage's key was computed with (`engine.code`): a worker
    # running other code (sdbuild edited during the build) refuses rather than mislabel its output.
    code: dict[str, str] = {}


# Exit status meaning "the stage reported a UserError, see user-error.json".
USER_ERROR_EXIT = 3
# Exit status meaning "the environment failed the stage (e.g. disk full) and even its report could not be written".
FAULT_EXIT = 4


def user_error_path(result: Path) -> Path:
    """Where a worker reports an expected failure, beside its result file."""
    return result.with_name("user-error.json")


class WorkerUserError(BaseModel):
    """A UserError raised by the stage function: an expected failure with a fix, not a crash."""

    message: str
    hint: str | None
    fault: bool = False  # the environment, not the input, failed the stage: no recipe line to blame


class WorkerResult(BaseModel):
    summary: dict[str, Any] | None
    peak_memory_bytes: int
    cpu_seconds: float


def crash_path(result: Path) -> Path:
    """Where a worker describes an unexpected exception, beside its result file (the log has the traceback)."""
    return result.with_name("crash.json")


class WorkerCrash(BaseModel):
    """An exception the stage did not expect: what it was and the innermost line of ours that raised it."""

    type: str
    message: str
    where: str | None  # "builder/sd/read_back.py:100 in read_back"
