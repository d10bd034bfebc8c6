"""How workers start: forked from a zygote that imported the stage modules once (Linux), or spawned."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import engine_stages
import pytest

from builder.engine import Engine, Graph, Heartbeat, StageSpec, WorkersReady
from builder.errors import StageFailed, UserError

fork_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the zygote is Linux only")


def stage(name: str, function: str = "whoami", **params) -> StageSpec:
    return StageSpec(
        id=name, stage=function, version="1", function=f"engine_stages:{function}", params={"name": name} | params
    )


def three() -> Graph:
    return Graph([stage("a"), stage("b"), stage("c")])


@pytest.fixture
def import_log(tmp_path: Path, monkeypatch) -> Path:
    log = tmp_path / "imports.txt"
    monkeypatch.setenv(engine_stages.IMPORT_LOG_VARIABLE, str(log))
    return log


@fork_only
def test_forked_workers_share_one_import(tmp_path, import_log, monkeypatch):
    monkeypatch.setenv("SDBUILD_WORKERS", "fork")
    events = []
    results = Engine(tmp_path / "cache", "t").build(three(), jobs=1, on_event=events.append)
    importers = import_log.read_text().split()
    assert len(importers) == 1  # the zygote; the workers were forked with the module loaded
    zygote = int(importers[0])
    pids = {r.summary["pid"] for r in results}
    assert len(pids) == 3 and zygote not in pids  # still one process per stage
    assert {r.summary["parent"] for r in results} == {zygote}
    assert [e for e in events if isinstance(e, WorkersReady)]


def test_spawned_workers_import_for_themselves(tmp_path, import_log, monkeypatch):
    monkeypatch.setenv("SDBUILD_WORKERS", "spawn")
    results = Engine(tmp_path / "cache", "t").build(three(), jobs=2)
    assert len(import_log.read_text().split()) == 3
    assert {r.summary["parent"] for r in results} == {os.getpid()}


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_a_crashing_worker_fails_its_stage_with_its_log(tmp_path, monkeypatch, mode):
    if mode == "fork" and not sys.platform.startswith("linux"):
        pytest.skip("the zygote is Linux only")
    monkeypatch.setenv("SDBUILD_WORKERS", mode)
    engine = Engine(tmp_path / "cache", "t")
    with pytest.raises(StageFailed, match=r"(?s)stage boom was killed by SIGABRT.*about to crash"):
        engine.build(Graph([stage("ok"), stage("boom", "crash")]), jobs=1)
    assert [r.status for r in engine.build(Graph([stage("ok")]), jobs=1)] == ["hit"]  # kept


@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_cpu_time_is_the_workers_own(tmp_path, monkeypatch, mode):
    if mode == "fork" and not sys.platform.startswith("linux"):
        pytest.skip("the zygote is Linux only")
    monkeypatch.setenv("SDBUILD_WORKERS", mode)
    (result,) = Engine(tmp_path / "cache", "t").build(Graph([stage("busy", "burn", seconds=0.3)]), jobs=1)
    assert result.cpu_seconds >= 0.3


@fork_only
def test_a_dead_zygote_fails_the_running_stage_and_names_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("SDBUILD_WORKERS", "fork")
    control = tmp_path / "control"
    control.mkdir()
    (control / "hold").touch()

    def kill_zygote(event) -> None:
        if isinstance(event, Heartbeat) and (control / "pid").exists() and (control / "parent").exists():
            os.kill(int((control / "parent").read_text()), signal.SIGKILL)

    with pytest.raises(
        StageFailed, match=r"(?s)stage held was killed by SIGKILL.*zygote process that forks workers exited"
    ):
        Engine(tmp_path / "cache", "held").build(engine_stages.held_graph(control), jobs=1, on_event=kill_zygote)


def test_an_unknown_worker_mode_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SDBUILD_WORKERS", "threads")
    with pytest.raises(UserError, match="SDBUILD_WORKERS=threads is not a worker mode"):
        Engine(tmp_path / "cache", "t").build(three())


def test_a_build_with_nothing_to_do_starts_no_process(tmp_path, import_log):
    engine = Engine(tmp_path / "cache", "t")
    engine.build(three())
    before = import_log.read_text()
    events = []
    assert [r.status for r in engine.build(three(), on_event=events.append)] == ["hit"] * 3
    assert import_log.read_text() == before and not [e for e in events if isinstance(e, WorkersReady)]
