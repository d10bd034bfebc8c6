"""Tiny stage functions for the engine tests; workers import them as "engine_stages:<name>"."""

from __future__ import annotations

import errno
import os
import sys
import time
from pathlib import Path

from builder.engine import Engine, Graph, StageSpec

WAIT_LIMIT_SECONDS = 20
# Each import of this module appends its pid here, so tests can count who imported it.
IMPORT_LOG_VARIABLE = "ENGINE_STAGES_IMPORT_LOG"
if os.environ.get(IMPORT_LOG_VARIABLE):
    with open(os.environ[IMPORT_LOG_VARIABLE], "a") as _log:
        _log.write(f"{os.getpid()}\n")


def _journal(params: dict, line: str) -> None:
    if "journal" in params:
        with open(params["journal"], "a") as journal:
            journal.write(line + "\n")


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_LIMIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.01)


def write(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    """Text from params plus every input's text, in a nested layout with an executable file."""
    _journal(params, f"run {params['text']}")
    parts = [params["text"]]
    for name in sorted(inputs):
        parts.append(f"{name}=" + (inputs[name] / "data" / "text.txt").read_text())
    (out / "data").mkdir()
    (out / "data" / "text.txt").write_text("|".join(parts))
    (out / "empty").mkdir()
    (out / "tool.sh").write_text("#!/bin/sh\n")
    os.chmod(out / "tool.sh", 0o755)
    return {"inputs": sorted(inputs), "length": len("|".join(parts))}


def fail(inputs: dict[str, Path], params: dict, out: Path) -> None:
    (out / "partial.txt").write_text("half")
    raise RuntimeError(params["message"])


def hold(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    """Writes a partial file and its pid, then waits while the `hold` file exists in params['control']."""
    control = Path(params["control"])
    (out / "partial.bin").write_bytes(b"x" * 1000)
    (control / "parent").write_text(str(os.getppid()))
    (control / "pid").write_text(str(os.getpid()))
    _wait_for(lambda: not (control / "hold").exists(), "the hold file to go")
    (out / "done.txt").write_text("done")
    return {"held": True}


def rendezvous(inputs: dict[str, Path], params: dict, out: Path) -> None:
    """Succeeds only if the peer stage runs at the same time (each waits for the other's start file)."""
    control = Path(params["control"])
    (control / f"{params['name']}.started").touch()
    _wait_for(lambda: (control / f"{params['peer']}.started").exists(), f"stage {params['peer']}")
    (out / "met.txt").write_text(params["peer"])


def log_span(inputs: dict[str, Path], params: dict, out: Path) -> None:
    _journal(params, f"start {params['name']}")
    (out / "name.txt").write_text(params["name"])
    _journal(params, f"end {params['name']}")


def blob(inputs: dict[str, Path], params: dict, out: Path) -> None:
    """`megabytes` MiB of deterministic bytes, to make cache checks meaningful."""
    chunk = (params["seed"].encode() * 1024)[:1024] * 1024
    with open(out / "blob.bin", "wb") as handle:
        for _ in range(params["megabytes"]):
            handle.write(chunk)


def whoami(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    """Reports the worker's pid and parent pid."""
    (out / "name.txt").write_text(params["name"])
    return {"pid": os.getpid(), "parent": os.getppid()}


def burn(inputs: dict[str, Path], params: dict, out: Path) -> None:
    """Keeps a core busy for `seconds` of CPU time."""
    deadline = time.process_time() + params["seconds"]
    while time.process_time() < deadline:
        pass
    (out / "done.txt").write_text("done")


def crash(inputs: dict[str, Path], params: dict, out: Path) -> None:
    print("about to crash")
    os.abort()


def link(inputs: dict[str, Path], params: dict, out: Path) -> None:
    (out / "real.txt").write_text("real")
    (out / "alias.txt").symlink_to("real.txt")


def held_graph(control: Path) -> Graph:
    """first -> held (blocks while control/hold exists) -> last; used by the kill-the-build test."""
    return Graph(
        [
            StageSpec(id="first", stage="write", version="1", function="engine_stages:write", params={"text": "a"}),
            StageSpec(
                id="held",
                stage="hold",
                version="1",
                function="engine_stages:hold",
                params={"control": str(control)},
                inputs={"source": "first"},
            ),
            StageSpec(
                id="last",
                stage="write",
                version="1",
                function="engine_stages:write",
                params={"text": "c"},
                inputs={"source": "first"},
            ),
        ]
    )


def threads_seen(inputs: dict[str, Path], params: dict, out: Path) -> dict:
    """Reports the thread count the worker was given (what libraries loaded from now on will use),
    and journals its start and end."""
    _journal(params, f"start {params['name']}")
    if "peer" in params:  # succeeds only if the peer runs at the same time
        control = Path(params["control"])
        (control / f"{params['name']}.started").touch()
        _wait_for(lambda: (control / f"{params['peer']}.started").exists(), f"stage {params['peer']}")
    _journal(params, f"end {params['name']}")
    return {"threads": int(os.environ["OMP_NUM_THREADS"])}


def fill_disk(inputs: dict[str, Path], params: dict, out: Path) -> None:
    """Writes part of its output, then fails as a write on a full disk does (a library may re-raise
    the OSError as a RuntimeError that keeps only its text, as torch's C++ writers do)."""
    (out / "partial.bin").write_bytes(b"x" * 4096)
    if params.get("as_text"):
        raise RuntimeError(f"[enforce fail at inline_container.cc] . unexpected pos: {os.strerror(errno.ENOSPC)}")
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "weights.bin"))


def edit_file(inputs: dict[str, Path], params: dict, out: Path) -> None:
    """Replaces text in a file (a source file, for the tests of code-keyed caching)."""
    path = Path(params["path"])
    path.write_text(path.read_text().replace(params["old"], params["new"]))
    (out / "done.txt").write_text("done")


if __name__ == "__main__":
    # python engine_stages.py CACHE CONTROL: build held_graph, for tests that kill or race a build.
    Engine(Path(sys.argv[1]), "held").build(held_graph(Path(sys.argv[2])), jobs=1)
