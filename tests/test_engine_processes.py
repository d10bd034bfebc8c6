"""Worker processes: killed workers, a killed build, the cache lock, concurrency and the memory budget."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import engine_stages
import pytest

from builder.engine import GIB, Engine, Graph, Heartbeat, StageFinished, StageSpec, StageStarted
from builder.errors import StageFailed, UserError

HELPER = Path(engine_stages.__file__)


def wait_until(condition, what: str, limit: float = 20.0) -> None:
    """Poll for a state another process creates; the limit only stops a broken test from hanging."""
    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.fixture(autouse=True, params=["fork", "spawn"])
def worker_mode(request, monkeypatch) -> str:
    """Every test here holds for forked (Linux) and spawned workers alike."""
    if request.param == "fork" and not sys.platform.startswith("linux"):
        pytest.skip("the zygote is Linux only")
    monkeypatch.setenv("SDBUILD_WORKERS", request.param)
    return request.param


@pytest.fixture
def control(tmp_path: Path) -> Path:
    folder = tmp_path / "control"
    folder.mkdir()
    (folder / "hold").touch()
    return folder


def records(cache: Path) -> list[Path]:
    return sorted((cache / "actions").glob("*.json"))


def objects(cache: Path) -> list[Path]:
    return sorted((cache / "objects").iterdir())


def start_held_build(cache: Path, control: Path) -> subprocess.Popen:
    build = subprocess.Popen([sys.executable, str(HELPER), str(cache), str(control)], cwd=HELPER.parent)
    wait_until(lambda: (control / "pid").exists() or build.poll() is not None, "the held stage to start")
    assert build.poll() is None, "the build exited before reaching the held stage"
    return build


def test_killed_worker_fails_the_stage_and_leaves_nothing_behind(tmp_path, control):
    cache = tmp_path / "cache"
    engine = Engine(cache, "held")

    def kill_when_held(event) -> None:
        if isinstance(event, Heartbeat) and (control / "pid").exists():
            os.kill(int((control / "pid").read_text()), signal.SIGKILL)

    with pytest.raises(StageFailed, match="stage held was killed by SIGKILL"):
        engine.build(engine_stages.held_graph(control), jobs=1, on_event=kill_when_held)
    assert len(records(cache)) == 1 and len(objects(cache)) == 1  # only "first"

    (control / "hold").unlink()
    results = engine.build(engine_stages.held_graph(control), jobs=1)
    assert [r.status for r in results] == ["hit", "built", "built"]
    assert results[1].summary == {"held": True}
    assert sorted(p.name for p in results[1].output.iterdir()) == ["done.txt", "partial.bin"]


def test_killed_build_leaves_no_partial_entries_and_resumes(tmp_path, control):
    cache = tmp_path / "cache"
    build = start_held_build(cache, control)
    worker = int((control / "pid").read_text())
    build.kill()
    build.wait()
    wait_until(lambda: not alive(worker), "the worker to die with its parent")
    assert len(records(cache)) == 1 and len(objects(cache)) == 1
    assert not any(p.name == "done.txt" for p in (cache / "objects").rglob("*"))

    (control / "hold").unlink()
    resumed = Engine(cache, "held").build(engine_stages.held_graph(control), jobs=1)
    assert [r.status for r in resumed] == ["hit", "built", "built"]
    assert not list((cache / "tmp").rglob("partial.bin"))  # the dead build's work folder was cleaned
    reference = Engine(tmp_path / "reference", "held").build(engine_stages.held_graph(control))
    assert [r.digest for r in resumed] == [r.digest for r in reference]


def test_second_concurrent_build_fails_fast_on_the_lock(tmp_path, control):
    cache = tmp_path / "cache"
    build = start_held_build(cache, control)
    try:
        engine = Engine(cache, "other")
        graph = Graph(
            [StageSpec(id="x", stage="s", version="1", function="engine_stages:log_span", params={"name": "x"})]
        )
        with pytest.raises(UserError, match=rf"another build holds the cache lock \(pid {build.pid}\)"):
            engine.build(graph)
        with pytest.raises(UserError, match="another build holds the cache lock"):
            engine.gc()
    finally:
        (control / "hold").unlink()
        assert build.wait() == 0
    assert [e.status for e in Engine(cache, "held").plan(engine_stages.held_graph(control))] == ["cached"] * 3


def test_heartbeats_report_elapsed_time_and_memory(tmp_path, control):
    beats: list[Heartbeat] = []

    def release_on_heartbeat(event) -> None:
        if isinstance(event, Heartbeat) and event.id == "held":
            beats.append(event)
            (control / "hold").unlink(missing_ok=True)

    Engine(tmp_path / "cache", "held").build(engine_stages.held_graph(control), jobs=1, on_event=release_on_heartbeat)
    assert beats and beats[0].elapsed_seconds > 0
    assert beats[0].rss_bytes is None or beats[0].rss_bytes > 1 << 20


def pair(control: Path, function: str, estimate: int, journal: Path | None = None) -> Graph:
    def stage(name: str, peer: str) -> StageSpec:
        params = {"control": str(control), "name": name, "peer": peer}
        if journal:
            params["journal"] = str(journal)
        return StageSpec(
            id=name,
            stage=function,
            version="1",
            function=f"engine_stages:{function}",
            params=params,
            memory_estimate_bytes=estimate,
        )

    return Graph([stage("a", "b"), stage("b", "a")])


def test_two_jobs_run_independent_stages_concurrently(tmp_path, control):
    results = Engine(tmp_path / "cache", "pair").build(
        pair(control, "rendezvous", GIB), jobs=2, memory_budget_bytes=2 * GIB
    )
    assert [r.status for r in results] == ["built", "built"]  # each waited for the other to start


def test_memory_budget_serialises_stages_that_do_not_fit_together(tmp_path, control):
    journal = tmp_path / "journal"
    events = []
    Engine(tmp_path / "cache", "pair").build(
        pair(control, "log_span", GIB, journal), jobs=2, memory_budget_bytes=GIB + GIB // 2, on_event=events.append
    )
    order = [
        f"{'start' if isinstance(e, StageStarted) else 'finish'} {e.id if isinstance(e, StageStarted) else e.result.id}"
        for e in events
        if isinstance(e, StageStarted | StageFinished)
    ]
    assert order == ["start a", "finish a", "start b", "finish b"]
    assert journal.read_text().split("\n")[:-1] == ["start a", "end a", "start b", "end b"]


def test_stage_larger_than_the_budget_still_runs_alone(tmp_path, control):
    graph = Graph(
        [
            StageSpec(
                id="huge",
                stage="s",
                version="1",
                function="engine_stages:log_span",
                params={"name": "huge"},
                memory_estimate_bytes=64 * GIB,
            )
        ]
    )
    assert Engine(tmp_path / "cache", "huge").build(graph, memory_budget_bytes=GIB)[0].status == "built"
