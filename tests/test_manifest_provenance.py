"""The manifest says what made the bundle: the recipe as written, the sources, sdbuild's version and
commit, the dependencies' versions, a date only from SOURCE_DATE_EPOCH; and it follows the schema
`sdbuild schema --manifest` publishes."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import jsonschema
import pytest
from conftest import PROJECT, make_workspace, resource_bytes

from builder import __version__
from builder.cli import main
from builder.recipe import load_recipe
from builder.stages.pipeline import build_graph


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_manifest_records_what_made_the_bundle(built):
    ws, _ = built
    manifest = _manifest(ws.bundle)
    recipe = manifest["recipe"]
    assert recipe["path"] == "recipes/tiny-sd.yaml"
    assert recipe["text"] == (ws.root / "recipes" / "tiny-sd.yaml").read_text()
    assert recipe["digest"] == manifest["recipe_digest"] and recipe["extends"] == [] and recipe["includes"] == []
    assert manifest["sources"] == {
        "model": {"kind": "synthetic", "preset": "tiny-sd", "seed": 0},
        "refiner": None,
        "vae": None,
        "controlnets": [],
        "loras": [],
    }
    packages = manifest["environment"]["packages"]
    for name in ("torch", "coremltools", "diffusers", "transformers", "numpy", "huggingface-hub", "safetensors"):
        assert packages[name] == metadata.version(name), name
    assert "pytest" not in packages and "jsonschema" not in packages  # test tools do not shape a bundle
    assert manifest["date"] is None
    sdbuild = manifest["sdbuild"]
    assert sdbuild["version"] == __version__
    if (PROJECT / ".git").exists():
        head = subprocess.run(["git", "-C", str(PROJECT), "rev-parse", "HEAD"], capture_output=True, text=True)
        status = subprocess.run(
            ["git", "-C", str(PROJECT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
        )
        assert sdbuild["commit"] == head.stdout.strip() and sdbuild["dirty"] == bool(status.stdout.strip())


def _metadata_copy(folder: Path, requires: list[str]) -> None:
    """A `sdbuild.egg-info` like the one an older `pip install -e .` leaves in a checkout."""
    info = folder / "sdbuild.egg-info"
    info.mkdir(parents=True)
    header = f"Metadata-Version: 2.1\nName: sdbuild\nVersion: {__version__}\n"
    (info / "PKG-INFO").write_text(header + "".join(f"Requires-Dist: {line}\n" for line in requires))


def test_a_stale_copy_of_sdbuilds_metadata_is_refused_not_read(tmp_path, monkeypatch):
    """The manifest lists sdbuild's dependencies from its package metadata. A stale copy earlier on the
    import path (the checkout is on it under pytest and `python -m`) would silently change that list and
    the bundle's key; it is refused, naming both copies. A copy that agrees is harmless."""
    from builder.build_info import environment
    from builder.errors import UserError

    installed = metadata.distribution("sdbuild").requires or []
    _metadata_copy(tmp_path / "agrees", installed)
    monkeypatch.syspath_prepend(str(tmp_path / "agrees"))
    read = environment.__wrapped__  # uncached: the process's own answer stays as it was
    assert read()["packages"]  # one list of dependencies, whichever copy is read
    _metadata_copy(tmp_path / "stale", [line for line in installed if not line.startswith("peft")])
    monkeypatch.syspath_prepend(str(tmp_path / "stale"))
    with pytest.raises(UserError) as refused:
        read()
    assert str(tmp_path / "stale") in str(refused.value) and "rm -rf sdbuild.egg-info" in refused.value.hint


def test_recipe_record_holds_every_file_the_recipe_reads(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    child = ws.root / "recipes" / "variants" / "child.yaml"
    child.parent.mkdir()
    child.write_text("# a variant\nextends: ../tiny-sd-mbp.yaml\nversion: 0.2.0\n")
    loaded = load_recipe(child, workspace=ws.root)
    record = build_graph(loaded)["bundle"].params["recipe"]
    assert record["path"] == "recipes/variants/child.yaml" and record["text"] == child.read_text()
    assert record["extends"] == [
        {"path": "recipes/tiny-sd-mbp.yaml", "text": (ws.root / "recipes" / "tiny-sd-mbp.yaml").read_text()}
    ]
    mbp = ws.root / "recipes" / "mbp" / "tiny-sd-40db.yaml"
    assert record["includes"] == [{"path": "recipes/mbp/tiny-sd-40db.yaml", "text": mbp.read_text()}]


def test_a_comment_changes_only_the_bundle_key(tmp_path):
    """The manifest holds the recipe's text, so the bundle's params must; no other stage's."""
    ws = make_workspace(tmp_path / "ws")
    recipe = ws.root / "recipes" / "tiny-sd.yaml"
    before = build_graph(load_recipe(recipe, workspace=ws.root))
    recipe.write_text("# one more comment\n" + recipe.read_text())
    after = build_graph(load_recipe(recipe, workspace=ws.root))
    assert [spec.id for spec in before] == [spec.id for spec in after]
    changed = [spec.id for spec in after if spec != before[spec.id]]
    assert changed == ["bundle"]
    assert after["bundle"].params["recipe"]["text"] == recipe.read_text()
    assert {k: v for k, v in after["bundle"].params.items() if k != "recipe"} == {
        k: v for k, v in before["bundle"].params.items() if k != "recipe"
    }


def test_source_date_epoch_dates_the_manifest_and_nothing_else(built, tmp_path):
    reference, _ = built
    ws = make_workspace(tmp_path / "ws")
    shutil.copytree(reference.cache, ws.cache, symlinks=True)
    report = json.loads(
        ws.run("build", "recipes/tiny-sd.yaml", "--json", env={"SOURCE_DATE_EPOCH": "1700000000"}, check=True).stdout
    )
    assert [s["id"] for s in report["stages"] if s["status"] == "built"] == ["bundle"]
    assert _manifest(ws.bundle)["date"] == "2023-11-14T22:13:20Z"
    assert resource_bytes(ws.bundle) == resource_bytes(reference.bundle)

    done = ws.run("plan", "recipes/tiny-sd.yaml", env={"SOURCE_DATE_EPOCH": "yesterday"})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")] == [
        "error: SOURCE_DATE_EPOCH='yesterday' is not a number of seconds since 1970-01-01 UTC"
    ]


def test_published_schema_accepts_manifests_and_rejects_broken_ones(built, capsys):
    ws, _ = built
    assert main(["schema", "--manifest"]) == 0
    schema = json.loads(capsys.readouterr().out)
    jsonschema.Draft202012Validator.check_schema(schema)
    manifest = _manifest(ws.bundle)
    jsonschema.validate(manifest, schema, cls=jsonschema.Draft202012Validator)
    for broken in (
        {k: v for k, v in manifest.items() if k != "sources"},
        manifest | {"sdbuild": manifest["sdbuild"] | {"commit": 7}},
        manifest | {"sources": manifest["sources"] | {"model": {"kind": "hub", "id": "a/b", "revision": "main"}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(broken, schema, cls=jsonschema.Draft202012Validator)
