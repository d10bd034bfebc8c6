"""`--executor dask`: a LocalCluster of two worker processes builds tiny-sd to the same bytes as a local
build, and a worker killed in the middle of a stage costs a retry, not the build."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import make_workspace
from remote_helpers import build_json, statuses, tree_bytes

from builder.engine import GIB, Engine, Graph, StageSpec
from builder.remote.cache import RemoteCache
from builder.remote.dask_executor import DaskExecutor

WAIT_SECONDS = 60


@pytest.mark.slow  # every stage starts its own process on a worker: several times a local build's time
def test_a_dask_build_equals_a_local_build(built, tmp_path):
    local, _ = built
    ws = make_workspace(tmp_path / "dask")
    report, log = build_json(ws, "--executor", "dask")
    assert set(statuses(report).values()) <= {"built", "skipped"}
    assert tree_bytes(ws.bundle) == tree_bytes(local.bundle)


def _graph(control: Path) -> Graph:
    """write -> hold: the second stage waits, on its worker, while control/hold exists."""

    def spec(stage_id: str, function: str, **fields) -> StageSpec:
        return StageSpec(id=stage_id, stage=stage_id, function=f"engine_stages:{function}", **fields)

    return Graph(
        [
            spec("first", "write", params={"text": "a"}),
            spec("held", "hold", params={"control": str(control)}, inputs={"up": "first"}),
        ]
    )


def _wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + WAIT_SECONDS
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.05)


def test_a_worker_killed_mid_stage_is_replaced_and_the_build_finishes(tmp_path):
    control = tmp_path / "control"
    control.mkdir()
    graph = _graph(control)
    local = Engine(tmp_path / "local-cache", "demo")
    expected = local.output_path(local.build(graph)[-1])  # nothing holds it: no hold file yet
    for name in ("pid", "parent"):
        (control / name).unlink()

    (control / "hold").write_text("")
    remote = RemoteCache((tmp_path / "remote").as_uri())
    engine = Engine(tmp_path / "client-cache", "demo")
    results: list = []
    failures: list[BaseException] = []
    executors: list[DaskExecutor] = []

    def build() -> None:
        try:
            with DaskExecutor(remote, None, memory_bytes=4 * GIB, work_dir=tmp_path / "workers") as executor:
                executors.append(executor)
                results.extend(engine.build(graph, executor=executor))
        except BaseException as problem:
            failures.append(problem)

    builder = threading.Thread(target=build)
    builder.start()
    _wait_for(lambda: _pid(control) is not None or failures, "the held stage to start on a worker")
    assert not failures, failures
    first_pid = _pid(control)
    workers = set(executors[0].client.run(os.getpid).values())
    worker_pid = next(pid for pid in _ancestors(first_pid) if pid in workers)  # the Dask worker running it
    os.kill(worker_pid, signal.SIGKILL)
    _wait_for(
        lambda: failures or _pid(control) not in (None, first_pid),
        "the held stage to start again",
    )
    (control / "hold").unlink()
    builder.join(WAIT_SECONDS)
    assert not builder.is_alive() and not failures, failures
    assert [r.status for r in results] == ["built"] * 2
    assert tree_bytes(engine.output_path(results[-1])) == tree_bytes(expected)
    _wait_for(lambda: not _running(first_pid), "the killed worker's stage process to die with it")


def _ancestors(pid: int):
    while pid > 1:
        pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        yield pid


def _pid(control: Path) -> int | None:
    """The held stage's pid once it has written it whole."""
    try:
        return int((control / "pid").read_text())
    except (FileNotFoundError, ValueError):
        return None


def _running(pid: int) -> bool:
    """Whether `pid` still runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")
