"""Starting worker processes: forked from a zygote that has the stage modules imported (Linux), or
a fresh interpreter per worker (elsewhere, or with SDBUILD_WORKERS=spawn).

Either way a worker is a process of its own with the same request/result files; only how long it
takes to get to the stage function differs. The scheduler sees a `WorkerProcess`: pid, poll,
wait and kill, as on `subprocess.Popen`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from pathlib import Path
from typing import Protocol

from builder.engine.zygote import ForkRequest, ZygoteConfig
from builder.errors import UserError

# "fork" (the zygote) or "spawn" (a fresh interpreter per worker); the default is fork on Linux.
MODE_VARIABLE = "SDBUILD_WORKERS"
_STOP_SECONDS = 10


class WorkerProcess(Protocol):
    @property
    def pid(self) -> int | None: ...

    def poll(self) -> int | None: ...

    def wait(self) -> int: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    @property
    def parent_pid(self) -> int:
        """The pid the worker's parent will have (it dies with that process)."""
        ...

    @property
    def import_seconds(self) -> float | None:
        """How long the stage modules took to import, once they have been, for all workers at once."""
        ...

    def start(self, request_file: Path, log: Path, cwd: Path) -> WorkerProcess: ...

    def close(self) -> None: ...


def worker_mode() -> str:
    mode = os.environ.get(MODE_VARIABLE) or ("fork" if sys.platform.startswith("linux") else "spawn")
    if mode not in ("fork", "spawn"):
        raise UserError(
            f"{MODE_VARIABLE}={mode} is not a worker mode", f"set {MODE_VARIABLE} to fork or spawn, or unset it"
        )
    if mode == "fork" and not sys.platform.startswith("linux"):
        raise UserError(
            f"{MODE_VARIABLE}=fork needs Linux", f"unset {MODE_VARIABLE} (workers are spawned on {sys.platform})"
        )
    return mode


class Spawner:
    """A fresh `python -m builder.engine.worker` per stage: every worker imports what it needs itself."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.import_seconds: float | None = None  # each worker imports for itself

    @property
    def parent_pid(self) -> int:
        return os.getpid()

    def start(self, request_file: Path, log: Path, cwd: Path) -> WorkerProcess:
        with open(log, "ab") as out:
            return subprocess.Popen(
                [sys.executable, "-m", "builder.engine.worker", str(request_file)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=cwd,
                env=self.env,
            )

    def close(self) -> None:
        pass


class ForkedWorker:
    """A worker forked by the zygote. Its pid is known once the zygote has forked it; until then a
    kill is remembered and delivered then."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.pid: int | None = None
        self.returncode: int | None = None
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._kill_asked = False

    def poll(self) -> int | None:
        return self.returncode

    def wait(self) -> int:
        self._done.wait()
        assert self.returncode is not None
        return self.returncode

    def kill(self) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            if self.pid is None:
                self._kill_asked = True
                return
            _kill(self.pid)

    def forked(self, pid: int) -> None:
        with self._lock:
            self.pid = pid
            if self._kill_asked:
                _kill(pid)

    def ended(self, returncode: int) -> None:
        with self._lock:
            self.returncode = returncode
        self._done.set()


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended and was reaped; its exit is on its way from the zygote
        pass


class Zygote:
    """One zygote per build, started with the modules of the stages that may run."""

    def __init__(self, modules: list[str], env: dict[str, str], python_path: list[str], folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / "zygote.log"
        config = ZygoteConfig(parent_pid=os.getpid(), modules=modules, python_path=python_path)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "builder.engine.zygote", config.model_dump_json()],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=log,
                cwd=folder,
                env=env,
            )
        self.import_seconds: float | None = None
        self._lock = threading.Lock()
        self._unforked: deque[ForkedWorker] = deque()
        self._running: dict[int, ForkedWorker] = {}
        self._gone = False
        threading.Thread(target=self._read_replies, name="zygote replies", daemon=True).start()

    @property
    def parent_pid(self) -> int:
        return self.process.pid

    def start(self, request_file: Path, log: Path, cwd: Path) -> WorkerProcess:
        forked = ForkedWorker(log)
        line = ForkRequest(request=str(request_file), log=str(log), cwd=str(cwd)).model_dump_json() + "\n"
        with self._lock:
            if not self._gone:
                self._unforked.append(forked)
                try:
                    assert self.process.stdin is not None
                    self.process.stdin.write(line.encode())
                    self.process.stdin.flush()
                    return forked
                except OSError:
                    self._unforked.remove(forked)
        self._orphan(forked)
        return forked

    def close(self) -> None:
        """End of input ends the zygote; its workers have been stopped by then."""
        with self._lock:
            self._gone = True
            try:
                assert self.process.stdin is not None
                self.process.stdin.close()
            except OSError:
                pass
        try:
            self.process.wait(timeout=_STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _read_replies(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            reply = json.loads(line)
            with self._lock:
                if "ready" in reply:
                    self.import_seconds = reply["ready"]
                elif "pid" in reply:
                    forked = self._unforked.popleft()
                    self._running[reply["pid"]] = forked
                    forked.forked(reply["pid"])
                elif "exit" in reply:
                    self._running.pop(reply["exit"]).ended(reply["returncode"])
        # The zygote is gone, and its workers died with it (their parent-death signal).
        with self._lock:
            self._gone = True
            orphans = [*self._unforked, *self._running.values()]
            self._unforked.clear()
            self._running.clear()
        for forked in orphans:
            self._orphan(forked)

    def _orphan(self, forked: ForkedWorker) -> None:
        with open(forked.log, "a") as out:
            out.write(f"the zygote process that forks workers exited (its log: {self.log}); the worker died with it\n")
        forked.ended(-signal.SIGKILL)
