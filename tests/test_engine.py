"""Caching behaviour of the build engine: hits, staleness reasons, corruption, determinism, skips, failures."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from builder.engine import Engine, Graph, StageFinished, StageSpec, StageStarted, hashing
from builder.errors import StageFailed


def spec(id: str, text: str, journal: Path | None = None, **fields) -> StageSpec:
    params = {"text": text} | ({"journal": str(journal)} if journal else {})
    return StageSpec(id=id, stage="write", version="1", function="engine_stages:write", params=params, **fields)


def diamond(journal: Path | None = None, *, right_text: str = "r", version: str = "1", tools=None) -> Graph:
    """root -> left, right -> join; plus an independent stage."""
    return Graph(
        [
            spec("root", "a", journal),
            spec("left", "l", journal, inputs={"up": "root"}),
            spec(
                "right",
                right_text,
                journal,
                inputs={"up": "root"},
                param_origins={"text": "components.right.text"},
            ).model_copy(update={"version": version, "tools": tools or {"torch": "2.12"}}),
            spec("join", "j", journal, inputs={"left": "left", "right": "right"}),
            spec("alone", "z", journal),
        ]
    )


def runs(journal: Path) -> list[str]:
    return journal.read_text().split() if journal.exists() else []


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def test_first_build_builds_everything_and_second_build_hits(tmp_path, cache):
    journal = tmp_path / "journal"
    engine = Engine(cache, "demo")
    assert {e.status for e in engine.plan(diamond(journal))} == {"stale"}
    assert {e.reason for e in engine.plan(diamond(journal))} == {"never built"}

    first = engine.build(diamond(journal))
    assert [r.status for r in first] == ["built"] * 5
    assert len(runs(journal)) == 10  # "run <text>" per stage

    second = engine.build(diamond(journal))
    assert [r.status for r in second] == ["hit"] * 5
    assert len(runs(journal)) == 10
    assert [r.digest for r in first] == [r.digest for r in second]
    assert {e.status for e in engine.plan(diamond(journal))} == {"cached"}

    join = second[3]
    assert join.summary == {"inputs": ["left", "right"], "length": len("j|left=l|up=a|right=r|up=a")}
    assert (join.output / "data" / "text.txt").read_text() == "j|left=l|up=a|right=r|up=a"
    assert engine.output_path(join) == engine.output_path(join.digest) == join.output
    assert os.access(join.output / "tool.sh", os.X_OK)
    assert not os.access(join.output / "data" / "text.txt", os.W_OK) or os.geteuid() == 0
    assert not (join.output / "empty").exists() or not any((join.output / "empty").iterdir())


def test_changed_param_makes_exactly_that_stage_and_dependants_stale(tmp_path, cache):
    engine = Engine(cache, "demo")
    engine.build(diamond())
    plan = {e.id: e for e in engine.plan(diamond(right_text="R"))}
    assert {i: e.status for i, e in plan.items()} == {
        "root": "cached",
        "left": "cached",
        "right": "stale",
        "join": "stale",
        "alone": "cached",
    }
    assert plan["right"].reason == 'params.text changed "r" -> "R" (components.right.text)'
    assert plan["join"].reason == "input 'right' changed (upstream right is stale)"
    assert plan["join"].key is None

    results = {r.id: r for r in engine.build(diamond(right_text="R"))}
    assert {i: r.status for i, r in results.items()} == {
        "root": "hit",
        "left": "hit",
        "right": "built",
        "join": "built",
        "alone": "hit",
    }
    assert results["join"].reason == "input 'right' content changed"


def test_reasons_for_version_and_tool_changes(cache):
    engine = Engine(cache, "demo")
    engine.build(diamond())
    plan = {e.id: e for e in engine.plan(diamond(version="2", tools={"torch": "2.13"}))}
    assert plan["right"].reason == "implementation version changed 1 -> 2; tool torch changed 2.12 -> 2.13"

    explanation = engine.explain(diamond(version="2"), "right")
    assert explanation.status == "stale"
    assert explanation.key_inputs["version"] == "2"
    assert explanation.previous_key_inputs["version"] == "1"
    assert explanation.output is None
    cached = engine.explain(diamond(), "right")
    assert cached.status == "cached" and cached.output is not None and cached.output.is_dir()


def test_external_input_content_is_part_of_the_key(tmp_path, cache):
    source = tmp_path / "weights"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "w.bin").write_bytes(b"one")

    def graph() -> Graph:
        return Graph(
            [
                StageSpec(
                    id="read",
                    stage="read",
                    version="1",
                    function="engine_stages:log_span",
                    params={"name": "read"},
                    external_inputs={"weights": source},
                )
            ]
        )

    engine = Engine(cache, "demo")
    engine.build(graph())
    assert engine.plan(graph())[0].status == "cached"
    (source / "sub" / "w.bin").write_bytes(b"two")
    assert engine.plan(graph())[0].reason == "input 'weights' content changed"


def test_corrupted_object_is_detected_and_rebuilt_to_the_same_digest(tmp_path, cache):
    journal = tmp_path / "journal"
    engine = Engine(cache, "demo")
    before = {r.id: r for r in engine.build(diamond(journal))}
    damaged = before["left"].output / "data" / "text.txt"
    os.chmod(damaged, 0o644)
    damaged.write_text("X" + damaged.read_text()[1:])

    plan = {e.id: e for e in engine.plan(diamond(journal))}
    assert plan["left"].reason == "cached output is corrupt (data/text.txt: sha256 mismatch)"
    assert plan["join"].status == "stale"
    problem = "cached output is corrupt (data/text.txt: sha256 mismatch)"
    assert engine.verify() == [f"action {plan['left'].key[:12]} (write): {problem}"]

    after = {r.id: r for r in engine.build(diamond(journal))}
    assert after["left"].status == "built"
    assert after["left"].reason == "cached output was corrupt (data/text.txt: sha256 mismatch)"
    assert after["join"].status == "hit"  # same bytes again, so the dependant's key is unchanged
    assert {i: r.digest for i, r in after.items()} == {i: r.digest for i, r in before.items()}
    assert engine.verify(full=True) == []


def test_missing_object_is_reported_and_rebuilt(cache):
    engine = Engine(cache, "demo")
    root = engine.build(diamond())[0]
    shutil.rmtree(root.output)
    assert engine.plan(diamond())[0].reason == "cached output missing"
    again = engine.build(diamond())
    assert again[0].status == "built" and again[0].digest == root.digest
    assert [r.status for r in again[1:]] == ["hit"] * 4


def test_two_fresh_caches_give_identical_digests_and_bytes(tmp_path):
    one = Engine(tmp_path / "one", "demo").build(diamond())
    two = Engine(tmp_path / "two", "other").build(diamond())
    assert [r.digest for r in one] == [r.digest for r in two]
    for a, b in zip(one, two, strict=False):
        files_a = sorted(p.relative_to(a.output) for p in a.output.rglob("*") if p.is_file())
        files_b = sorted(p.relative_to(b.output) for p in b.output.rglob("*") if p.is_file())
        assert files_a == files_b
        assert all((a.output / f).read_bytes() == (b.output / f).read_bytes() for f in files_a)


def test_identical_work_under_two_ids_is_shared(tmp_path, cache):
    journal = tmp_path / "journal"
    graph = Graph([spec("one", "same", journal), spec("two", "same", journal, component="other")])
    results = Engine(cache, "demo").build(graph, jobs=1)
    assert [r.status for r in results] == ["built", "hit"]
    assert runs(journal) == ["run", "same"]


def test_unavailable_stage_is_skipped_and_its_dependant_runs_without_it(cache):
    graph = Graph(
        [
            spec("base", "b"),
            spec("compile", "c", inputs={"up": "base"}, unavailable="needs macOS (xcrun coremlcompiler)"),
            spec("bundle", "u", inputs={"base": "base", "compiled": "compile"}),
        ]
    )
    engine = Engine(cache, "demo")
    plan = engine.plan(graph)
    assert [(e.status, e.reason) for e in plan][1] == ("skipped", "needs macOS (xcrun coremlcompiler)")
    events = []
    results = engine.build(graph, on_event=events.append)
    assert [r.status for r in results] == ["built", "skipped", "built"]
    assert results[1].output is None and results[1].reason == "needs macOS (xcrun coremlcompiler)"
    assert results[2].summary["inputs"] == ["base"]
    assert [e.id for e in events if isinstance(e, StageStarted)] == ["base", "bundle"]
    assert [e.result.id for e in events if isinstance(e, StageFinished)] == ["base", "compile", "bundle"]
    assert [e.status for e in engine.plan(graph)] == ["cached", "skipped", "cached"]


def test_failing_stage_names_itself_and_keeps_earlier_outputs(cache):
    graph = diamond()
    graph.add(
        StageSpec(
            id="broken",
            stage="fail",
            version="1",
            function="engine_stages:fail",
            params={"message": "weights have the wrong shape"},
            inputs={"up": "join"},
        )
    )
    engine = Engine(cache, "demo")
    with pytest.raises(StageFailed) as failure:
        engine.build(graph)
    assert "stage broken failed (exit status 1)" in failure.value.message
    assert "RuntimeError: weights have the wrong shape" in failure.value.message
    assert "log.txt" in failure.value.hint
    statuses = {e.id: e.status for e in engine.plan(graph)}
    assert statuses == {
        "root": "cached",
        "left": "cached",
        "right": "cached",
        "join": "cached",
        "alone": "cached",
        "broken": "stale",
    }
    assert len(list((cache / "actions").glob("*.json"))) == 5


def test_symlink_in_output_is_refused(cache):
    graph = Graph([StageSpec(id="link", stage="link", version="1", function="engine_stages:link")])
    with pytest.raises(StageFailed, match="alias.txt: is a symlink"):
        Engine(cache, "demo").build(graph)
    assert not (cache / "actions").exists() or not any((cache / "actions").iterdir())


def test_gc_keeps_what_targets_reference(cache):
    engine = Engine(cache, "demo")
    old = engine.build(diamond())
    new = engine.build(diamond(right_text="R"))
    report = engine.gc()
    assert report.removed_actions == 2 and report.removed_objects == 2 and report.freed_bytes > 0
    assert not old[2].output.exists() and new[2].output.exists()
    assert [r.status for r in engine.build(diamond(right_text="R"))] == ["hit"] * 5

    report = engine.gc(keep_targets=[])
    assert report.removed_targets == ["demo"] and report.removed_actions == 5
    assert not any((cache / "objects").iterdir())


def test_no_op_rebuild_hashes_nothing(cache, monkeypatch):
    """A no-op rebuild reads no output file: its cost is stat calls (bench/build_bench.py times it)."""
    graph = Graph(
        StageSpec(
            id=f"blob{i}",
            stage="blob",
            version="1",
            function="engine_stages:blob",
            params={"seed": str(i), "megabytes": 2},
        )
        for i in range(20)
    )
    Engine(cache, "demo").build(graph, jobs=2)
    hashed: list[Path] = []
    real_sha256_file = hashing.sha256_file
    monkeypatch.setattr(hashing, "sha256_file", lambda path: hashed.append(path) or real_sha256_file(path))

    assert {r.status for r in Engine(cache, "demo").build(graph)} == {"hit"}
    assert hashed == []  # verified by stat against the digest memo
