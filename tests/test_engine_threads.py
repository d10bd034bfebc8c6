"""Threads follow the critical path, fixed per stage so outputs do not depend on timing: the longest
chain's stages get every core and start first; other stages get one thread and a free core."""

from __future__ import annotations

import os

import pytest

from builder.engine import Engine, Graph, StageSpec, StageStarted
from builder.engine.threads import chain_lengths, critical_path, plan_threads

GIB = 1 << 30
CORES = os.cpu_count() or 1
needs_two_cores = pytest.mark.skipif(CORES < 2, reason="needs two cores to share")


def _spec(stage_id: str, gib: int, inputs: dict[str, str] | None = None, parallel: bool = True, **params) -> StageSpec:
    return StageSpec(
        id=stage_id,
        stage="s",
        version="1",
        function="engine_stages:threads_seen",
        params={"name": stage_id} | params,
        inputs=inputs or {},
        memory_estimate_bytes=gib * GIB,
        parallel=parallel,
    )


def _pipeline() -> list[StageSpec]:
    return [
        _spec("source", 1, parallel=False),
        _spec("unet", 6, {"m": "source"}),
        _spec("convert", 6, {"m": "unet"}, parallel=False),
        _spec("text", 3, {"m": "source"}),
        _spec("bundle", 1, {"a": "convert", "b": "text"}, parallel=False),
    ]


def test_chains_are_measured_from_the_start_and_to_the_end():
    from_start, to_end = chain_lengths(_pipeline())
    assert to_end == {"source": 14 * GIB, "unet": 13 * GIB, "convert": 7 * GIB, "text": 4 * GIB, "bundle": GIB}
    assert from_start == {"source": GIB, "unet": 7 * GIB, "convert": 13 * GIB, "text": 4 * GIB, "bundle": 14 * GIB}
    assert critical_path(_pipeline()) == {"source", "unet", "convert", "bundle"}


def test_only_parallel_stages_on_the_critical_path_get_every_core():
    assert plan_threads(_pipeline(), 8) == {"source": 1, "unet": 8, "convert": 1, "text": 1, "bundle": 1}


@needs_two_cores
@pytest.mark.parametrize("mode", ["fork", "spawn"])
def test_the_critical_stage_runs_on_every_core_and_one_more_thread_beside_it(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("SDBUILD_WORKERS", mode)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    control = tmp_path / "control"
    control.mkdir()
    journal = tmp_path / "journal.txt"
    graph = Graph(
        [
            _spec("long", 4, journal=str(journal), peer="short", control=str(control)),
            _spec("short", 1, journal=str(journal), peer="long", control=str(control)),
            _spec("third", 1, journal=str(journal)),
        ]
    )
    started: list[str] = []
    on_event = lambda event: started.append(event.id) if isinstance(event, StageStarted) else None  # noqa: E731
    built = Engine(tmp_path / "cache", "t").build(graph, jobs=3, on_event=on_event)
    seen = {r.id: r.summary for r in built}
    assert seen == {"long": {"threads": CORES}, "short": {"threads": 1}, "third": {"threads": 1}}
    # The long chain is started first and the short stage beside it (they met; which worker is first to
    # run is up to the OS); a third thread would be one too many, so the third stage waits for one to end.
    lines = journal.read_text().split("\n")
    assert started[:2] == ["long", "short"] and lines.index("start third") > min(
        lines.index("end long"), lines.index("end short")
    )


@needs_two_cores
def test_a_single_threaded_critical_stage_leaves_a_core_to_the_others(tmp_path, monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    control = tmp_path / "control"
    control.mkdir()
    graph = Graph(
        [
            _spec("convert", 4, parallel=False, peer="short", control=str(control)),
            _spec("short", 1, peer="convert", control=str(control)),
        ]
    )
    results = {r.id: r.summary for r in Engine(tmp_path / "cache", "t").build(graph, jobs=2)}
    assert results == {"convert": {"threads": 1}, "short": {"threads": 1}}  # and they met: both ran at once


def test_threads_the_user_set_are_left_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    results = {r.id: r.summary for r in Engine(tmp_path / "cache", "t").build(Graph([_spec("long", 4)]), jobs=2)}
    assert results == {"long": {"threads": 1}}


def test_applying_a_count_sizes_torchs_pool_and_the_environment(monkeypatch):
    import torch

    from builder.engine import threads

    limited = []
    monkeypatch.setattr(threads, "threadpool_limits", lambda limits: limited.append(limits))
    before = torch.get_num_threads()
    for name in threads.USER_VARIABLES:  # set through monkeypatch so that what apply() writes is undone
        monkeypatch.setenv(name, "")
    try:
        threads.apply(1)
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1" and limited == [1]
    finally:
        torch.set_num_threads(before)
