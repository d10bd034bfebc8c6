"""Runs one stage function in its own process, so its memory goes back to the OS and a crash stays contained.

Invoked as `python -m builder.engine.worker request.json`, or called in a process forked by the
zygote (`builder.engine.zygote`). The result file is written only on
success; a missing result file means the stage failed and the log says why.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from builder.engine import code, threads
from builder.engine.files import write_json_atomic
from builder.engine.memory import own_cpu_seconds, own_peak_rss_bytes, return_large_frees_to_os
from builder.engine.protocol import (
    FAULT_EXIT,
    USER_ERROR_EXIT,
    WorkerCrash,
    WorkerRequest,
    WorkerResult,
    WorkerUserError,
    crash_path,
    user_error_path,
)
from builder.errors import EnvironmentFault, UserError
from builder.faults import as_fault, size_text


def die_with_parent(parent_pid: int) -> None:
    """Exit when the build that started us dies, so no orphan keeps writing or holding memory."""
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)
        return

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _load(function: str):
    module_name, _, name = function.partition(":")
    return getattr(importlib.import_module(module_name), name)


def _innermost_own_frame(error: BaseException) -> str | None:
    """The deepest traceback line in this project's code (not a library's), as path:line in function."""
    root = Path(__file__).resolve().parents[2]
    found = None
    for frame in traceback.extract_tb(error.__traceback__):
        path = Path(frame.filename)
        if path.is_absolute() and path.is_relative_to(root) and ".venv" not in path.parts:
            found = f"{path.relative_to(root).as_posix()}:{frame.lineno} in {frame.name}"
    return found


def _check_code(request: WorkerRequest) -> None:
    """The code this process runs is the code the stage's cache key names (see `engine.code`)."""
    changed = code.changed_since(request.code, request.function) if request.code else []
    if changed:
        raise UserError(
            f"the code of this stage changed while the build ran ({', '.join(changed[:3])}), so it "
            "would run other code than its cache key says",
            hint="run the build again; stages that finished are cached under the code they ran",
        )


def main(request_file: str) -> None:
    request = WorkerRequest.model_validate_json(Path(request_file).read_bytes())
    die_with_parent(request.parent_pid)
    return_large_frees_to_os()
    sys.path[:0] = [p for p in request.python_path if p not in sys.path]
    os.environ["TMPDIR"] = str(request.tmp)
    if request.threads is not None:
        threads.apply(request.threads)
    tempfile.tempdir = None  # a zygote may have looked it up already
    try:
        function = _load(request.function)
        _check_code(request)
        summary = function(dict(request.inputs), request.params, request.out)
    except UserError as error:
        _report(request, WorkerUserError(message=error.message, hint=error.hint))
    except Exception as error:
        fault = _fault(error, request)
        if fault is not None:
            _report(request, WorkerUserError(message=fault.message, hint=fault.hint, fault=True))
        # A bug: described for the terminal, the traceback left in the log.
        crash = WorkerCrash(type=type(error).__name__, message=str(error), where=_innermost_own_frame(error))
        write_json_atomic(crash_path(request.result), crash.model_dump(mode="json"))
        raise
    if summary is not None and not isinstance(summary, dict):
        raise TypeError(f"{request.function} returned {type(summary).__name__}; expected a dict or None")
    json.dumps(summary)  # fail here, with the stage's name in the log, if the summary is not JSON-able
    result = WorkerResult(summary=summary, peak_memory_bytes=own_peak_rss_bytes(), cpu_seconds=own_cpu_seconds())
    write_json_atomic(request.result, result.model_dump(mode="json"))


def _fault(error: Exception, request: WorkerRequest) -> EnvironmentFault | None:
    """A disk-full or unwritable-folder failure, with how much the stage had written when it struck."""
    fault = as_fault(error, "running the stage", where=request.out)
    if fault is None:
        return None
    written = sum(
        os.lstat(os.path.join(folder, name)).st_size
        for root in (request.out, request.tmp)
        for folder, _, names in os.walk(root)
        for name in names
    )
    if written:
        fault.message += f" (it had written {size_text(written)}; it needs at least that much free)"
    return fault


def _report(request: WorkerRequest, report: WorkerUserError) -> None:
    """Tell the parent why the stage failed; a full disk may refuse even that, then the exit status says it."""
    try:
        write_json_atomic(user_error_path(request.result), report.model_dump(mode="json"))
    except OSError:
        print(f"error: {report.message}", file=sys.stderr)
        sys.exit(FAULT_EXIT)
    sys.exit(USER_ERROR_EXIT)


if __name__ == "__main__":
    main(sys.argv[1])
