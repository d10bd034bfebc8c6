"""A process that imports the stage modules once, then forks one worker per stage.

Every stage runs in its own process (memory goes back to the OS, a crash stays contained), but a
fresh interpreter spends seconds importing the libraries a stage needs before doing any work; for
a short stage that is most of its time. Forking from a process that has already imported them
gives each worker those modules at no cost, and still a process of its own.

Invoked as `python -m builder.engine.zygote CONFIG_JSON` by `builder.engine.launch`. The protocol is
one JSON object per line: requests `{"request", "log", "cwd"}` on stdin; on stdout `{"ready"}` once
the imports are done, `{"pid"}` per request in request order, and `{"exit", "returncode"}` when a
worker ends (a negative returncode is the signal that killed it). End of stdin ends the zygote,
and its workers die with it. Linux only: forking after native libraries (Objective-C on macOS)
initialised is unsafe elsewhere.
"""

from __future__ import annotations

import importlib
import json
import os
import select
import signal
import sys
import time
import traceback

from pydantic import BaseModel

from builder.engine import code, worker


class ZygoteConfig(BaseModel):
    parent_pid: int
    modules: list[str]
    python_path: list[str]


class ForkRequest(BaseModel):
    request: str
    log: str
    cwd: str


def _import_all(modules: list[str]) -> None:
    """A module that fails here fails again in the worker that needs it, with the traceback in its log."""
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:
            traceback.print_exc()


def _run_worker(fork: ForkRequest, private_fds: list[int]) -> None:
    """In the forked child: the worker's own stdio, folder and signal state, then the stage; never returns."""
    code = 1
    try:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in private_fds:
            os.close(fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        log = os.open(fork.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.chdir(fork.cwd)
        worker.main(fork.request)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def serve(config: ZygoteConfig) -> None:
    # The protocol keeps the real stdout; anything the imports print goes to stderr (the zygote's log).
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    worker.die_with_parent(config.parent_pid)
    sys.path[:0] = [p for p in config.python_path if p not in sys.path]
    started = time.monotonic()
    _import_all(config.modules)
    for name in config.modules:  # the code as imported: forked workers check their keys against it
        code.module_digests(name)

    def reply(message: dict) -> None:
        replies.write(json.dumps(message) + "\n")

    reply({"ready": round(time.monotonic() - started, 3)})
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_read, False)
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # the wakeup fd, not the handler, does the work
    pending = b""
    while True:
        readable, _, _ = select.select([0, wake_read], [], [])
        if wake_read in readable:
            while True:
                try:
                    if not os.read(wake_read, 512):
                        break
                except BlockingIOError:
                    break
            _reap(reply)
        if 0 in readable:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                fork = ForkRequest.model_validate_json(line)
                pid = os.fork()
                if pid == 0:
                    _run_worker(fork, [wake_read, wake_write, replies.fileno()])
                reply({"pid": pid})


def _reap(reply) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        reply({"exit": pid, "returncode": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve(ZygoteConfig.model_validate_json(sys.argv[1]))
