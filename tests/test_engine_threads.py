"""Threads follow the critical path, fixed per stage so outputs do not depend on timing: the longest
chain's stages get every core and start first; other stages get one thread and a free core."""

from __future__ import annotations

import os

import pytest

from builder.engine import Engine, Graph, StageSpec
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
def test_the_critical_stage_runs_on_every_core_and_others_wait_for_a_free_one(tmp_path, monkeypatch, mode):
    monkeypatch.setenv("SDBUILD_WORKERS", mode)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    journal = tmp_path / "journal.txt"
    graph = Graph([_spec("long", 4, journal=str(journal)), _spec("short", 1, journal=str(journal))])
    results = {r.id: r.summary for r in Engine(tmp_path / "cache", "t").build(graph, jobs=2)}
    assert results == {"long": {"threads": CORES}, "short": {"threads": 1}}
    # The long chain starts first; the short stage finds no free core until it ends.
    assert journal.read_text().split("\n")[:4] == ["start long", "end long", "start short", "end short"]


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
