"""Parent side of a worker: start the process (see `launch`), wait for it in a thread, turn its end into an Outcome."""

from __future__ import annotations

import hashlib
import os
import queue
import re
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from builder.engine.files import remove_tree
from builder.engine.hashing import FileDigest, NotRegularFile, digest_folder
from builder.engine.launch import Launcher, WorkerProcess
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
from builder.engine.spec import StageSpec
from builder.engine.store import ActionRecord
from builder.engine.threads import USER_VARIABLES
from builder.errors import StageFailed
from builder.faults import free_bytes, size_text

_LOG_TAIL_LINES = 20
_NEARLY_FULL_BYTES = 1 << 20
# The folder holding the `builder` package, so `-m builder.engine.worker` works even when not installed.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


@dataclass
class Job:
    """A stage running in a worker process, with the key its output will be recorded under."""

    spec: StageSpec
    key: str
    key_inputs: dict[str, Any]
    reason: str
    folder: Path
    process: WorkerProcess
    threads: int | None = None  # None when the user fixed thread counts
    started: float = field(default_factory=time.monotonic)

    @property
    def out(self) -> Path:
        return self.folder / "out"

    @property
    def log(self) -> Path:
        return self.folder / "log.txt"

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started


@dataclass
class Outcome:
    job: Job
    seconds: float
    result: WorkerResult | None = None
    files: dict[str, FileDigest] | None = None
    error: StageFailed | None = None
    # Set when the stage ran elsewhere (a Dask worker): its entry, already in the local store.
    record: ActionRecord | None = None


def work_folder(tmp: Path, stage_id: str) -> Path:
    readable = re.sub(r"[^A-Za-z0-9._-]", "_", stage_id)[:100]  # a long ControlNet name must not overflow NAME_MAX
    return tmp / f"{readable}-{hashlib.sha256(stage_id.encode()).hexdigest()[:8]}"


def worker_env(threads: int) -> dict[str, str]:
    """The workers' environment: `threads` caps their OpenMP/BLAS pools (unless the user set them),
    so stages running side by side share the cores instead of oversubscribing them."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"  # so the log is complete even if the worker is killed
    for name in USER_VARIABLES:
        env.setdefault(name, str(threads))
    return env


def python_path() -> list[str]:
    """The parent's import path, absolute ("" and relative entries mean the cwd)."""
    return [os.path.abspath(p) for p in sys.path]


def start(
    spec: StageSpec,
    key: str,
    key_inputs: dict[str, Any],
    reason: str,
    inputs: dict[str, Path],
    folder: Path,
    launcher: Launcher,
    threads: int | None,
) -> Job:
    """Start the worker with `threads` threads (None: as the user's environment says). Call from the
    thread that will outlive it: Linux's parent-death signal follows the thread."""
    folder.mkdir(parents=True)
    (folder / "out").mkdir()
    (folder / "tmp").mkdir()
    request = WorkerRequest(
        function=spec.function,
        inputs=inputs,
        params=spec.params,
        out=folder / "out",
        result=folder / "result.json",
        tmp=folder / "tmp",
        parent_pid=launcher.parent_pid,
        python_path=python_path(),
        threads=threads,
        code=key_inputs.get("code", {}),
    )
    request_file = folder / "request.json"
    request_file.write_text(request.model_dump_json())
    process = launcher.start(request_file, folder / "log.txt", folder)
    return Job(
        spec=spec, key=key, key_inputs=key_inputs, reason=reason, folder=folder, process=process, threads=threads
    )


def watch(job: Job, outcomes: queue.Queue[Outcome]) -> None:
    """Wait in a background thread; hashing the output here keeps the scheduler responsive."""

    def wait_and_digest() -> None:
        returncode = job.process.wait()
        seconds = job.elapsed
        try:
            outcomes.put(_collect(job, returncode, seconds))
        except Exception as problem:  # never leave the scheduler waiting for an outcome
            outcomes.put(Outcome(job, seconds, error=_failure(job, f"could not be collected: {problem!r}")))

    threading.Thread(target=wait_and_digest, name=f"watch {job.spec.id}", daemon=True).start()


def wait(job: Job) -> Outcome:
    """Wait for the worker in this thread and collect its outcome (for callers with no scheduler)."""
    returncode = job.process.wait()
    return _collect(job, returncode, job.elapsed)


def _collect(job: Job, returncode: int, seconds: float) -> Outcome:
    outcome = _outcome(job, returncode, seconds)
    if outcome.error is not None:  # keep the log, give back the space a failed output took
        remove_tree(job.out)
        remove_tree(job.folder / "tmp")
    return outcome


def _outcome(job: Job, returncode: int, seconds: float) -> Outcome:
    if returncode < 0:
        return Outcome(job, seconds, error=_failure(job, f"was killed by {signal.Signals(-returncode).name}"))
    reported = user_error_path(job.folder / "result.json")
    if returncode == USER_ERROR_EXIT and reported.is_file():
        problem = WorkerUserError.model_validate_json(reported.read_bytes())
        error = StageFailed(
            f"{job.spec.id}: {problem.message}", problem.hint, stage_id=job.spec.id, expected=not problem.fault
        )
        return Outcome(job, seconds, error=error)
    if returncode == FAULT_EXIT:  # the worker could not even write why: the disk is full or not writable
        free = free_bytes(job.folder)
        why = (
            f"no space left on the device ({size_text(free)} free at {job.folder})"
            if free is not None and free < _NEARLY_FULL_BYTES
            else f"its work folder {job.folder} cannot be written"
        )
        return Outcome(
            job,
            seconds,
            error=StageFailed(
                f"stage {job.spec.id} failed: {why}",
                "free space there or use another --cache-dir; stages that finished are cached",
                stage_id=job.spec.id,
            ),
        )
    if returncode > 0:
        return Outcome(job, seconds, error=_failure(job, f"failed (exit status {returncode})"))
    result_file = job.folder / "result.json"
    if not result_file.is_file():
        return Outcome(job, seconds, error=_failure(job, "exited without reporting a result"))
    result = WorkerResult.model_validate_json(result_file.read_bytes())
    try:
        files = digest_folder(job.out, None)
    except NotRegularFile as problem:
        return Outcome(job, seconds, error=_failure(job, f"wrote an output that cannot be cached: {problem}"))
    return Outcome(job, seconds, result=result, files=files)


def _failure(job: Job, what: str) -> StageFailed:
    """The stage's failure for the terminal: the exception and where it was raised when the worker
    could describe it, else the end of its log; tracebacks stay in the log, whose path is the fix."""
    hint = f"full log: {job.log}; stages that finished are cached, so a rebuild resumes here"
    crash_file = crash_path(job.folder / "result.json")
    if crash_file.is_file():
        crash = WorkerCrash.model_validate_json(crash_file.read_bytes())
        where = f" (at {crash.where})" if crash.where else ""
        message = f"stage {job.spec.id} {what}: {crash.type}: {crash.message.strip()}{where}"
        return StageFailed(message, hint, stage_id=job.spec.id)
    message = f"stage {job.spec.id} {what}"
    tail = _log_tail(job.log)
    if tail:
        message += "\n" + tail
    return StageFailed(message, hint, stage_id=job.spec.id)


def _log_tail(log: Path) -> str:
    """The last lines of a log, with any Python traceback shortened to its final line."""
    try:
        with open(log, "rb") as file:
            lines = b"".join(deque(file, maxlen=_LOG_TAIL_LINES)).decode(errors="replace").rstrip().splitlines()
    except OSError:
        return ""
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last)")]
    if starts:
        lines = lines[: starts[0]] + lines[-1:]
    return "\n".join(lines)


def stop(job: Job) -> None:
    """Kill a worker whose build is being abandoned (interrupted, or an error in the build itself)."""
    if job.process.poll() is None:
        job.process.kill()
    job.process.wait()
