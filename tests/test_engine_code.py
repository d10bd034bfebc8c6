"""Cache keys cover the code: every project module a stage function reaches, by its normalised
source, and the versions of what those modules import from outside."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from conftest import PROJECT

from builder.engine import Engine, Graph, StageSpec
from builder.engine import code as code_keys
from builder.errors import StageFailed

STAGE = '''"""A stage."""


def run(inputs, params, out):
    from {package}.helper import text  # imported lazily, as stages import heavy libraries

    (out / "text.txt").write_text(text())
'''
HELPER = '''"""Helper: the docstring does not count."""
import numpy  # outside the project: keyed by its version


def text():
    # nor does this comment
    return "one"
'''


@pytest.fixture
def package(tmp_path: Path, monkeypatch) -> Path:
    """A fresh importable package `codekeys_<n>` with a stage module and the helper it imports."""
    name = f"codekeys_{tmp_path.name.replace('-', '_')}"
    folder = tmp_path / "src" / name
    folder.mkdir(parents=True)
    (folder / "__init__.py").write_text("")
    (folder / "stage.py").write_text(STAGE.format(package=name))
    (folder / "helper.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield folder
    for module in [m for m in sys.modules if m.startswith(name)]:
        del sys.modules[module]


def _graph(package: Path) -> Graph:
    return Graph([StageSpec(id="s", stage="s", version="", function=f"{package.name}.stage:run")])


def test_the_key_follows_imports_and_ignores_comments_docstrings_and_layout(package, tmp_path):
    engine = Engine(tmp_path / "cache", "t")
    engine.build(_graph(package))
    helper = package / "helper.py"
    helper.write_text(helper.read_text().replace("# nor does this comment", "# another comment\n\n") + "\n\n")
    helper.write_text(helper.read_text().replace('"""Helper: the docstring does not count."""', '"""Reworded."""'))
    assert [e.status for e in engine.plan(_graph(package))] == ["cached"]
    helper.write_text(helper.read_text().replace('return "one"', 'return "two"'))
    (entry,) = engine.plan(_graph(package))
    assert entry.status == "stale" and entry.reason == f"code of {package.name}.helper changed"
    explained = engine.explain(_graph(package), "s")
    assert explained.key_inputs["tools"]["numpy"] == explained.previous_key_inputs["tools"]["numpy"]


def test_packages_are_keyed_by_version_without_local_labels(package):
    stage = code_keys.stage_code(f"{package.name}.stage:run")
    assert set(stage.packages) == {"numpy"} and "+" not in stage.packages["numpy"]
    assert set(stage.modules) == {package.name, f"{package.name}.stage", f"{package.name}.helper"}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forked workers are Linux only")
def test_a_worker_whose_code_changed_after_its_key_refuses(package, tmp_path, monkeypatch):
    """The zygote imported the stage's module before the first stage edited it: the second stage's key
    names the edited code, the forked worker holds the old, so it refuses instead of mislabelling."""
    monkeypatch.setenv("SDBUILD_WORKERS", "fork")
    helper = package / "helper.py"
    graph = Graph(
        [
            StageSpec(
                id="edit",
                stage="edit",
                version="",
                function="engine_stages:edit_file",
                params={"path": str(helper), "old": 'return "one"', "new": 'return "two"'},
            ),
            StageSpec(id="s", stage="s", version="", function=f"{package.name}.stage:run", inputs={"after": "edit"}),
        ]
    )
    with pytest.raises(StageFailed, match=rf"code of this stage changed while the build ran \({package.name}.helper"):
        Engine(tmp_path / "cache", "t").build(graph, jobs=1)
    monkeypatch.setenv("SDBUILD_WORKERS", "spawn")  # a fresh interpreter runs the code its key names
    assert [r.status for r in Engine(tmp_path / "cache", "t").build(graph, jobs=1)] == ["hit", "built"]


def _plan_with_code(ws, code_root: Path) -> dict[str, dict]:
    """`sdbuild plan` of the shared tiny-sd build, run with the project's code taken from `code_root`."""
    done = ws.run("plan", "recipes/tiny-sd.yaml", "--json", env={"PYTHONPATH": str(code_root)}, check=True)
    return {e["id"]: e for e in json.loads(done.stdout)}


def test_an_edit_in_code_palettize_runs_makes_it_and_its_dependants_stale_and_nothing_else(built, tmp_path):
    ws, _ = built
    root = tmp_path / "src"
    shutil.copytree(PROJECT / "builder", root / "builder", ignore=shutil.ignore_patterns("__pycache__"))
    # The copy is no git checkout, so the manifest's sdbuild commit (a bundle param) differs: the
    # unedited copy's plan is the baseline.
    baseline = {stage_id: e["status"] for stage_id, e in _plan_with_code(ws, root).items()}
    assert {s for s, status in baseline.items() if status == "stale"} <= {"bundle"}
    kmeans = root / "builder" / "coreml" / "kmeans.py"
    source = kmeans.read_text()
    kmeans.write_text("# a comment only\n" + source.replace('"""', '"""Reworded. ', 1) + "\n\n")
    assert {stage_id: e["status"] for stage_id, e in _plan_with_code(ws, root).items()} == baseline

    kmeans.write_text(source + "\n\nSCALE = 2\n")
    plan = _plan_with_code(ws, root)
    stale = {stage_id for stage_id, e in plan.items() if e["status"] == "stale"}
    assert stale - {"bundle"} == {"palettize:unet", "verify:unet"} and "bundle" in stale
    assert plan["palettize:unet"]["reason"] == "code of builder.coreml.kmeans changed"
