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
